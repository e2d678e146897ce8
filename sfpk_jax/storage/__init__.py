"""Files and checkpoints: atomic writes, orbax checkpoints."""
