"""A fingerprint of the data a run trains on, so that a ``--resume`` on other data is refused.

``--data-dir`` may change on ``--resume`` (the data moved), so the flags
alone cannot tell that the folder now holds other data: a run records, in
its config.json, each split's size, a digest of all its labels (when the
source holds them in memory) and a digest of an evenly spread sample of its
examples (images and labels), and a resume compares them.
"""

from __future__ import annotations

import hashlib

import numpy as np

from sfpk_jax.data import DataBundle

# Examples per split whose bytes are digested (evenly spread over the split).
SAMPLE = 64
# Hex digits of each digest kept: enough to tell data apart, short to read.
DIGITS = 16


def _digest(*arrays) -> str:
    """sha256 of the arrays' dtypes, shapes and bytes (a list counts as its items)."""
    h = hashlib.sha256()
    for array in arrays:
        for value in array if isinstance(array, list) else [array]:
            value = np.ascontiguousarray(np.asarray(value))
            h.update(f"{value.dtype.str}:{value.shape}".encode())
            h.update(value.tobytes())
    return h.hexdigest()[:DIGITS]


def _split(name: str, source) -> dict:
    size = len(source)
    picked = np.unique(np.linspace(0, size - 1, min(size, SAMPLE)).astype(np.int64))
    examples = [source[int(i)] for i in picked]
    found = {f"{name}_size": size,
             f"{name}_sample_sha256": _digest([e["image"] for e in examples],
                                              [e["label"] for e in examples])}
    labels = getattr(source, "labels", None)
    if labels is not None:
        found[f"{name}_labels_sha256"] = _digest(np.asarray(labels, np.int64))
    return found


def fingerprint(bundle: DataBundle) -> dict:
    """Sizes and digests of the training and test splits, as JSON-able values.

    Returns:
      ``{"train_size", "train_sample_sha256", "train_labels_sha256", "test_...",
      "num_classes", "image_shape"}``; ``*_labels_sha256`` only for sources
      that hold their labels in memory (the sample's digest covers its labels
      for the others).
    """
    return {**_split("train", bundle.train), **_split("test", bundle.test),
            "num_classes": int(bundle.num_classes), "image_shape": list(bundle.image_shape)}
