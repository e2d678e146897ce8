"""scikit-learn's bundled 8x8 digits: a real dataset that needs no download.

The 1797 images ship inside scikit-learn, so experiments and tests run
offline. Images come out NHWC (``(N, 8, 8, 1)``) to match Flax convolutions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
from sklearn import datasets
from sklearn.model_selection import train_test_split

Seed = int | Sequence[int]

# Pixel intensities in the bundled data are integers in [0, 16].
_MAX_INTENSITY = 16.0


class Dataset(NamedTuple):
    """A train/test split of NHWC images (float32 digits, uint8 CIFAR) and int32 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalises both splits per channel with the train split's mean and std."""
    axes = tuple(range(x_train.ndim - 1))
    mean = x_train.mean(axis=axes, keepdims=True)
    std = x_train.std(axis=axes, keepdims=True)
    return (
        ((x_train - mean) / std).astype(np.float32),
        ((x_test - mean) / std).astype(np.float32),
    )


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    """Loads the digits with a stratified, seed-deterministic train/test split.

    Args:
      seed: seed of the split.
      test_fraction: fraction of the examples held out, in (0, 1).

    Returns:
      A :class:`Dataset` with images of shape ``(N, 8, 8, 1)`` (scaled to
      [0, 1], then standardised with the train split's statistics) and int32
      labels in [0, 10).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    bunch = datasets.load_digits()
    images = (bunch.images / _MAX_INTENSITY).astype(np.float32)[..., None]
    labels = bunch.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    x_train, x_test = _standardise(x_train, x_test)
    return Dataset(x_train, y_train, x_test, y_test)


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
