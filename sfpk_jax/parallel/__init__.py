"""Device placement: meshes, sharded batches and replicated state."""
