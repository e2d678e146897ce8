"""Batches from in-memory arrays: shuffled epochs and endless per-particle mini-batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

Seed = int | Sequence[int]


def _check_batch_size(batch_size: int, num_examples: int) -> None:
    if not 1 <= batch_size <= num_examples:
        raise ValueError(
            f"batch_size must lie in [1, {num_examples}] (the number of examples), "
            f"got {batch_size}"
        )


def _check_pairs(x: np.ndarray, y: np.ndarray) -> None:
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")


def batch_iterator(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    seed: Seed,
    shuffle: bool = True,
    drop_last: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields the mini-batches of one epoch.

    Args:
      x: images, leading axis indexes examples.
      y: labels aligned with ``x``.
      batch_size: examples per batch, in [1, len(x)].
      seed: seed (or sequence of ints, e.g. ``(seed, epoch)``) of the shuffle.
      shuffle: visit the examples in a random order.
      drop_last: skip the final batch when it would be smaller than
        ``batch_size``.

    Yields:
      Dicts ``{"image": x[idx], "label": y[idx]}``.
    """
    _check_pairs(x, y)
    _check_batch_size(batch_size, len(x))
    order = np.random.default_rng(seed).permutation(len(x)) if shuffle else np.arange(len(x))
    stop = len(x) - len(x) % batch_size if drop_last else len(x)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield {"image": x[idx], "label": y[idx]}


def _particle_indices(rng: np.random.Generator, num_examples: int, batch_size: int) -> Iterator[np.ndarray]:
    """Endless batches of indices for one particle: epochs of fresh permutations."""
    while True:
        order = rng.permutation(num_examples)
        for start in range(0, num_examples - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def particle_batches(
    x: np.ndarray, y: np.ndarray, n: int, batch_size: int, *, seed: Seed
) -> Iterator[dict[str, np.ndarray]]:
    """Endless per-particle mini-batches, stacked along a leading particle axis.

    Each particle walks its own random permutations of the data (an epoch at a
    time, dropping the remainder), so particles see independent batches and no
    example repeats within a particle's batch.

    Args:
      x: images, leading axis indexes examples.
      y: labels aligned with ``x``.
      n: number of particles, at least 1.
      batch_size: examples per particle and step, in [1, len(x)].
      seed: seed (or sequence of ints) of all the draws.

    Yields:
      Dicts ``{"image": (n, batch_size, ...), "label": (n, batch_size)}``.
    """
    _check_pairs(x, y)
    _check_batch_size(batch_size, len(x))
    if n < 1:
        raise ValueError(f"n (the number of particles) must be at least 1, got {n}")
    children = np.random.SeedSequence(seed).spawn(n)
    streams = [_particle_indices(np.random.default_rng(c), len(x), batch_size) for c in children]
    while True:
        idx = np.stack([next(s) for s in streams])
        yield {"image": x[idx], "label": y[idx]}
