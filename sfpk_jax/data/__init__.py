"""Datasets that ship with the package's dependencies (no downloads)."""

from __future__ import annotations

from sfpk_jax.data.digits import Dataset, batch_iterator, load_digits, particle_batches

__all__ = ["Dataset", "batch_iterator", "load_digits", "particle_batches"]
