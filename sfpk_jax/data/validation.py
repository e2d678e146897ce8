"""Checks of a dataset's contents when it is opened: labels, pixels, empty splits.

A label of -1 or 150 in CIFAR-100, a label of 0.5, or float pixels of 1e6
would otherwise train silently to nonsense (or be truncated and cast); they
are refused here, naming the file and the first bad example.
"""

from __future__ import annotations

import numpy as np

from sfpk_jax.data.errors import InvalidDatasetError

_FIX = "replace the file with a correct copy"


def _first_bad(bad: np.ndarray, what: str, where: str, raw: np.ndarray) -> None:
    """Raises for the first example (row) of ``raw`` where ``bad`` holds, if any."""
    rows = np.flatnonzero(bad.reshape(len(bad), -1).any(axis=1)) if bad.size else []
    if len(rows):
        i = int(rows[0])
        shown = raw.reshape(len(raw), -1)[i][bad.reshape(len(bad), -1)[i]][0].item()
        raise InvalidDatasetError(f"{where}: {what}, but example {i} holds {shown!r} (stored as "
                                  f"{raw.dtype}; bad examples: {len(rows)}); {_FIX}")


def _numeric(raw: np.ndarray, what: str, where: str) -> np.ndarray:
    if raw.dtype.kind not in "biuf":
        raise InvalidDatasetError(f"{where}: {what}, but they are stored as {raw.dtype}; {_FIX}")
    return raw.astype(np.float64)


def check_labels(labels, num_classes: int, where: str) -> np.ndarray:
    """The labels as int32, after checking they are integers in [0, num_classes).

    Args:
      labels: the raw labels as stored (any array-like, one per example).
      num_classes: the dataset's number of classes.
      where: the file or split, for the message.

    Returns:
      ``labels`` as an int32 array.

    Raises:
      InvalidDatasetError: a label is not an integer or lies out of range.
    """
    raw = np.asarray(labels)
    what = f"labels must be integers in [0, {num_classes})"
    values = _numeric(raw, what, where)
    _first_bad((values != np.round(values)) | (values < 0) | (values >= num_classes), what, where,
               raw)
    return raw.astype(np.int32)


def check_pixels(images, where: str) -> np.ndarray:
    """The images (leading axis: examples) as uint8, after checking they are integers in [0, 255].

    Raises:
      InvalidDatasetError: a pixel is not an integer in range (names the example).
    """
    raw = np.asarray(images)
    if raw.dtype == np.uint8:
        return raw
    what = "pixels must be integers in [0, 255]"
    values = _numeric(raw, what, where)
    _first_bad((values != np.round(values)) | (values < 0) | (values > 255), what, where, raw)
    return raw.astype(np.uint8)


def check_not_empty(size: int, where: str) -> None:
    """Raises when a split has no example."""
    if size == 0:
        raise InvalidDatasetError(f"{where} has no examples; {_FIX}")
