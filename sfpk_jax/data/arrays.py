"""Batches from in-memory arrays: shuffled epochs and endless per-particle mini-batches.

Thin conveniences over :mod:`sfpk_jax.data.pipeline` (grain) for arrays that
are already preprocessed, such as the embedded digits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from sfpk_jax.data.pipeline import ArraySource, batches, iterate, particle_loader, steps_per_epoch

Seed = int | Sequence[int]


def batch_iterator(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    seed: Seed,
    shuffle: bool = True,
    drop_last: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """The mini-batches of one epoch.

    Args:
      x: images, leading axis indexes examples.
      y: labels aligned with ``x``.
      batch_size: examples per batch, in [1, len(x)].
      seed: seed (or sequence of ints, e.g. ``(seed, epoch)``) of the shuffle.
      shuffle: visit the examples in a random order.
      drop_last: skip the final batch when it would be smaller than
        ``batch_size``.

    Returns:
      An iterator of dicts ``{"image": x[idx], "label": int32 y[idx]}``.

    Raises:
      ValueError: mismatched lengths or a batch size out of range.
    """
    source = ArraySource(x, y)
    dataset = batches(source, batch_size, transform=None, seed=seed, shuffle=shuffle, drop_last=drop_last)
    return iterate(dataset[: steps_per_epoch(len(source), batch_size, drop_last)], prefetch=0)


def particle_batches(
    x: np.ndarray, y: np.ndarray, n: int, batch_size: int, *, seed: Seed
) -> Iterator[dict[str, np.ndarray]]:
    """Endless per-particle mini-batches, stacked along a leading particle axis.

    Each particle walks its own random permutations of the data (an epoch at a
    time, dropping the remainder), so particles see independent batches and no
    example repeats within a particle's batch (see
    :func:`sfpk_jax.data.particle_loader`).

    Args:
      x: images, leading axis indexes examples.
      y: labels aligned with ``x``.
      n: number of particles, at least 1.
      batch_size: examples per particle and step, in [1, len(x)].
      seed: seed (or sequence of ints) of all the draws.

    Returns:
      An endless iterator of ``{"image": (n, batch_size, ...), "label": (n, batch_size)}``.

    Raises:
      ValueError: mismatched lengths, bad sizes or particle count.
    """
    return particle_loader(ArraySource(x, y), n, batch_size, transform=None, seed=seed, prefetch=0)
