"""CIFAR-10 / CIFAR-100 as in-memory uint8 arrays.

Two sources, tried in order:

1. the "python version" folders that most users already have
   (``cifar-10-batches-py`` / ``cifar-100-python``), either inside
   ``data_dir`` or ``data_dir`` itself;
2. a tensorflow-datasets preparation (``array_record``) under ``data_dir``,
   read without TensorFlow.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, NamedTuple

import numpy as np

from sfpk_jax.data.digits import Dataset
from sfpk_jax.data.errors import DatasetNotFoundError, InvalidDatasetError
from sfpk_jax.data.tfds_source import TfdsSource, open_tfds, tfds_prepare_command
from sfpk_jax.data.validation import check_labels, check_not_empty, check_pixels

NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
IMAGE_SHAPE = (32, 32, 3)

# Examples read per call when copying a tfds split into memory: large enough
# to amortise the per-call overhead, small enough to keep the lists short.
_TFDS_CHUNK = 1024


class _PickleLayout(NamedTuple):
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    url: str


_LAYOUTS = {
    "cifar10": _PickleLayout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    "cifar100": _PickleLayout(
        "cifar-100-python",
        ("train",),
        ("test",),
        b"fine_labels",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
}

# The only globals a CIFAR pickle needs (numpy arrays; `_codecs.encode` for
# bytes pickled by Python 3 at protocol 2). Refusing every other global keeps a
# tampered file from running code when it is unpickled.
_SAFE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name} in a CIFAR pickle")
        return super().find_class(module, name)


def _read_pickle(path: str, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Reads one batch file into NHWC uint8 images and int32 labels, checking their values."""
    try:
        with open(path, "rb") as f:
            # The original files were pickled by Python 2: keys come back as bytes.
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        data = check_pixels(batch[b"data"], f"CIFAR batch file {path}")
        labels = check_labels(batch[label_key], num_classes, f"CIFAR batch file {path}")
    except InvalidDatasetError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as err:
        raise DatasetNotFoundError(
            f"CIFAR batch file {path} is unreadable or truncated ({type(err).__name__}: {err}); "
            "replace the folder with a freshly extracted copy."
        ) from err
    size = int(np.prod(IMAGE_SHAPE))
    if data.ndim != 2 or data.shape[1] != size or len(labels) != len(data):
        raise DatasetNotFoundError(
            f"CIFAR batch file {path} has data of shape {data.shape} and {len(labels)} labels, "
            f"expected (N, {size}) and N labels; replace the folder with a freshly extracted copy."
        )
    # Rows hold each image channel-major (3 x 32 x 32); the models want NHWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _read_pickles(folder: str, files: tuple[str, ...], label_key: bytes,
                  num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [_read_pickle(os.path.join(folder, name), label_key, num_classes) for name in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _pickle_folder(layout: _PickleLayout, data_dir: str) -> str | None:
    """The python-version folder to read, or None when there is none.

    ``data_dir/<folder>`` counts when it exists; ``data_dir`` itself counts when
    it holds any of the batch files, so that an incomplete folder is reported
    as such rather than silently skipped.
    """
    nested = os.path.join(data_dir, layout.folder)
    if os.path.isdir(nested):
        return nested
    names = layout.train_files + layout.test_files
    if any(os.path.exists(os.path.join(data_dir, n)) for n in names):
        return data_dir
    return None


def _read_tfds(source: TfdsSource, num_classes: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((len(source),) + IMAGE_SHAPE, np.uint8)
    labels = np.empty((len(source),), np.int64)
    for start in range(0, len(source), _TFDS_CHUNK):
        indices = range(start, min(start + _TFDS_CHUNK, len(source)))
        examples = source.read_batch(indices)
        chunk = f"{where} (examples from {start})"
        images[start:start + len(indices)] = check_pixels(
            np.stack([e["image"] for e in examples]), chunk)
        labels[start:start + len(indices)] = check_labels([e["label"] for e in examples],
                                                          num_classes, chunk)
    return images, labels.astype(np.int32)


def load_cifar(name: str, data_dir: str | os.PathLike[str]) -> Dataset:
    """Loads CIFAR-10 or CIFAR-100 (fine labels) into memory.

    Args:
      name: ``"cifar10"`` or ``"cifar100"``.
      data_dir: directory holding the python-version folder
        (``cifar-10-batches-py`` / ``cifar-100-python``), or that folder
        itself, or a tensorflow-datasets data directory where the dataset was
        prepared as ``array_record``.

    Returns:
      A :class:`Dataset` of uint8 images ``(N, 32, 32, 3)`` and int32 labels:
      50000 train and 10000 test examples for the full datasets.

    Raises:
      ValueError: ``name`` is not a CIFAR dataset.
      DatasetNotFoundError: neither source is there, or a batch file is
        missing or corrupt; the message says what was looked for and how to
        provide it.
    """
    if name not in _LAYOUTS:
        raise ValueError(f"name must be one of {sorted(_LAYOUTS)}, got {name!r}")
    layout = _LAYOUTS[name]
    data_dir = os.fspath(data_dir)
    folder = _pickle_folder(layout, data_dir)
    if folder is not None:
        missing = [n for n in layout.train_files + layout.test_files if not os.path.isfile(os.path.join(folder, n))]
        if missing:
            raise DatasetNotFoundError(
                f"CIFAR folder {folder} is incomplete: missing {', '.join(os.path.join(folder, n) for n in missing)}; "
                f"extract {layout.url} again."
            )
        data = Dataset(
            *_read_pickles(folder, layout.train_files, layout.label_key, NUM_CLASSES[name]),
            *_read_pickles(folder, layout.test_files, layout.label_key, NUM_CLASSES[name]),
        )
        check_not_empty(len(data.y_train), f"the train split in {folder}")
        check_not_empty(len(data.y_test), f"the test split in {folder}")
        return data
    try:
        train, test = open_tfds(name, "train", data_dir), open_tfds(name, "test", data_dir)
    except DatasetNotFoundError as err:
        raise DatasetNotFoundError(
            f"{name} not found. Looked for the python-version folder {os.path.join(data_dir, layout.folder)} "
            f"(or its files directly in {data_dir}) and for a tensorflow-datasets preparation: {err}. "
            f"Provide it either by extracting {layout.url} into {data_dir}, "
            f"or by preparing it once with TensorFlow installed (reading does not need it): "
            f"{tfds_prepare_command(name, data_dir)}"
        ) from err
    for split, source in (("train", train), ("test", test)):
        check_not_empty(len(source), f"the {split} split of {name} in {data_dir}")
    return Dataset(*_read_tfds(train, NUM_CLASSES[name], f"{name} train split in {data_dir}"),
                   *_read_tfds(test, NUM_CLASSES[name], f"{name} test split in {data_dir}"))
