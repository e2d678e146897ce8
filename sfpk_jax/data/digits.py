"""scikit-learn's bundled 8x8 digits: a real dataset that needs no download.

The 1797 images ship inside scikit-learn, so experiments and tests run
offline. Images come out NHWC (``(N, 8, 8, 1)``) to match Flax convolutions.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

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
    from sklearn import datasets  # on first use: scikit-learn takes a second to import
    from sklearn.model_selection import train_test_split

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
