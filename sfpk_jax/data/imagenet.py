"""ImageNet-2012 (ILSVRC) through tensorflow-datasets, read by random access.

The 1.28M training images do not fit in memory, so the splits stay on disk as
``array_record`` files and are decoded example by example (with PIL; no
TensorFlow at read time).
"""

from __future__ import annotations

import os
from typing import NamedTuple

from sfpk_jax.data.errors import DatasetNotFoundError
from sfpk_jax.data.tfds_source import (
    TfdsSource,
    open_tfds,
    tfds_data_dir,
    tfds_prepare_command,
)

NAME = "imagenet2012"
NUM_CLASSES = 1000


class ImageNet(NamedTuple):
    """The two ImageNet splits as random-access sources of variable-size uint8 images."""

    train: TfdsSource
    validation: TfdsSource


def load_imagenet(data_dir: str | os.PathLike[str] | None) -> ImageNet:
    """Opens the prepared ImageNet-2012 train and validation splits.

    Args:
      data_dir: tensorflow-datasets data directory in which ``imagenet2012``
        was prepared as ``array_record`` (``None``: the tfds default).

    Returns:
      An :class:`ImageNet` whose sources yield ``{"image": uint8 (H, W, 3),
      "label": int32}``.

    Raises:
      DatasetNotFoundError: the splits are not prepared there; the message
        explains the manual download and the one-off preparation.
    """
    try:
        return ImageNet(open_tfds(NAME, "train", data_dir), open_tfds(NAME, "validation", data_dir))
    except DatasetNotFoundError as err:
        manual_dir = os.path.join(tfds_data_dir(data_dir), "downloads", "manual")
        raise DatasetNotFoundError(
            f"ImageNet-2012 not found: {err}. ImageNet cannot be downloaded automatically: register at "
            f"https://image-net.org/download-images, put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
            f"in the tfds manual_dir ({manual_dir}), then prepare it once with TensorFlow installed "
            f"(reading does not need it): {tfds_prepare_command(NAME, data_dir)}"
        ) from err
