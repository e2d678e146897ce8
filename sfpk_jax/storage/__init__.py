"""Files and checkpoints: atomic writes, run locks, orbax checkpoints."""
