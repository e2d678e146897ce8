"""One entry point for every dataset: ``load(name, data_dir) -> DataBundle``."""

from __future__ import annotations

import os
from typing import NamedTuple

from sfpk_jax.data import augment, cifar, imagenet
from sfpk_jax.data.augment import Transform
from sfpk_jax.data.digits import load_digits
from sfpk_jax.data.pipeline import ArraySource, RandomAccessSource

DATASETS = ("digits", "cifar10", "cifar100", "imagenet")


class DataBundle(NamedTuple):
    """A dataset's splits and what a model and the loaders need to know about it.

    Attributes:
      train: the training split, a random-access source.
      test: the evaluation split (ImageNet: the validation set).
      num_classes: number of labels.
      image_shape: ``(H, W, C)`` of the images the transforms output, i.e.
        the model's input shape.
      train_transform: augmentation and normalisation of training batches.
      eval_transform: normalisation (and resizing) of evaluation batches.
    """

    train: RandomAccessSource
    test: RandomAccessSource
    num_classes: int
    image_shape: tuple[int, int, int]
    train_transform: Transform
    eval_transform: Transform


def load(name: str, data_dir: str | os.PathLike[str] | None = None) -> DataBundle:
    """Loads a dataset by name.

    Args:
      name: one of :data:`DATASETS`.
      data_dir: where the dataset lives (see :func:`sfpk_jax.data.load_cifar`
        and :func:`sfpk_jax.data.load_imagenet`); ignored for the embedded
        digits. ``None`` for CIFAR means the current directory and the tfds
        default; for ImageNet, the tfds default.

    Returns:
      A :class:`DataBundle`.

    Raises:
      ValueError: unknown ``name``.
      DatasetNotFoundError: the dataset is not under ``data_dir``.
    """
    if name == "digits":
        # Already scaled and standardised by load_digits: nothing left to do.
        digits = load_digits()
        return DataBundle(
            ArraySource(digits.x_train, digits.y_train),
            ArraySource(digits.x_test, digits.y_test),
            10,
            (8, 8, 1),
            augment.identity,
            augment.identity,
        )
    if name in ("cifar10", "cifar100"):
        data = cifar.load_cifar(name, os.curdir if data_dir is None else data_dir)
        train_transform, eval_transform = augment.cifar_transforms(name)
        return DataBundle(
            ArraySource(data.x_train, data.y_train),
            ArraySource(data.x_test, data.y_test),
            cifar.NUM_CLASSES[name],
            cifar.IMAGE_SHAPE,
            train_transform,
            eval_transform,
        )
    if name == "imagenet":
        splits = imagenet.load_imagenet(data_dir)
        return DataBundle(
            splits.train,
            splits.validation,
            imagenet.NUM_CLASSES,
            (224, 224, 3),
            augment.imagenet_train,
            augment.imagenet_eval,
        )
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
