"""Random access to prepared tensorflow-datasets splits, without TensorFlow.

``tfds.data_source`` reads ``array_record`` files with numpy and PIL only;
preparing those files (``download_and_prepare``) is what needs TensorFlow.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from sfpk_jax.data.errors import DatasetNotFoundError

# What tfds raises when a split cannot be opened for random access: nothing
# prepared (tfds then assumes the default TFRECORD format and refuses it, or
# finds no splits: KeyError), a TFRECORD-only preparation, an unknown split,
# missing shard files.
_OPEN_ERRORS = (NotImplementedError, KeyError, ValueError, OSError)


def tfds_prepare_command(name: str, data_dir: str | os.PathLike[str] | None) -> str:
    """The one-off shell command that prepares ``name`` for :func:`open_tfds`.

    Args:
      name: tfds dataset name, e.g. ``"cifar100"``.
      data_dir: tfds data directory (``None``: the tfds default).

    Returns:
      A ``pip install ... && python -c ...`` command line. ``array_record`` is
      requested explicitly because tfds prepares TFRECORD files by default,
      and those do not support random access.
    """
    dir_arg = "" if data_dir is None else f", data_dir={os.fspath(data_dir)!r}"
    return (
        "pip install tensorflow tensorflow-datasets && python -c \"import tensorflow_datasets as tfds; "
        f"tfds.builder({name!r}{dir_arg}).download_and_prepare(file_format='array_record')\""
    )


def tfds_data_dir(data_dir: str | os.PathLike[str] | None) -> str:
    """The tfds data directory that ``data_dir`` stands for.

    Args:
      data_dir: a directory, or ``None`` for the tfds default (which honours
        ``TFDS_DATA_DIR``).

    Returns:
      The directory as a string.
    """
    from tensorflow_datasets.core import constants

    return constants.get_default_data_dir() if data_dir is None else os.fspath(data_dir)


def tfds_dataset_dir(name: str, data_dir: str | os.PathLike[str] | None) -> str:
    """Where tfds keeps the prepared files of ``name``: ``<data_dir>/<name>/<version>``.

    Args:
      name: tfds dataset name.
      data_dir: tfds data directory (``None``: the tfds default).

    Returns:
      The directory as a string.
    """
    import tensorflow_datasets as tfds

    return os.path.join(tfds_data_dir(data_dir), name, str(tfds.builder_cls(name).VERSION))


class TfdsSource:
    """A tfds data source seen as ``{"image": uint8 HWC, "label": int32}`` examples.

    Other features (ids, file names, coarse labels) are dropped so that every
    source of the data layer yields the same keys.
    """

    def __init__(self, data_source: Sequence[Any]):
        """Wraps a source returned by ``tfds.data_source``.

        Args:
          data_source: the tfds source of one split.
        """
        self._source = data_source
        self._batched_reads = hasattr(data_source, "__getitems__")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return _example(self._source[int(index)])

    def read_batch(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """Reads several examples, in one call to the source when it can.

        Args:
          indices: example indices.

        Returns:
          The examples, in the order of ``indices``.
        """
        keys = [int(i) for i in indices]
        if self._batched_reads:
            try:
                return [_example(r) for r in self._source.__getitems__(keys)]
            except TypeError:
                # tfds.testing.mock_data installs __getitems__ as a plain
                # attribute that does not receive `self`, so it fails with a
                # TypeError; one-by-one reads work there (and everywhere).
                self._batched_reads = False
        return [self[i] for i in keys]


def _example(record: dict[str, Any]) -> dict[str, np.ndarray]:
    return {"image": np.asarray(record["image"]), "label": np.asarray(record["label"], np.int32)}


def open_tfds(name: str, split: str, data_dir: str | os.PathLike[str] | None) -> TfdsSource:
    """Opens a prepared split for random access; never downloads or prepares.

    Args:
      name: tfds dataset name.
      split: split name, e.g. ``"train"``.
      data_dir: tfds data directory (``None``: the tfds default).

    Returns:
      A :class:`TfdsSource` over the split.

    Raises:
      DatasetNotFoundError: the split is not prepared in a random-access
        format under ``data_dir``; the message gives the directory and tfds'
        reason, for the caller to extend with instructions.
    """
    # Imported here so that users of the embedded or pickled datasets do not
    # pay for importing tensorflow-datasets.
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except _OPEN_ERRORS as err:
        dataset_dir = tfds_dataset_dir(name, data_dir)
        # With nothing prepared, tfds' own message (about TFRECORD) misleads.
        reason = " ".join(str(err).split()) if os.path.isdir(dataset_dir) else "that directory does not exist"
        raise DatasetNotFoundError(
            f"no prepared array_record tfds split {name}/{split} in {dataset_dir} ({reason})"
        ) from err
    return TfdsSource(source)
