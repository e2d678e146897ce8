"""Datasets and input pipelines.

* :func:`load` (+ :data:`DATASETS`): every dataset by name, as a
  :class:`DataBundle` of random-access sources and transforms.
* :class:`Loader` / :func:`particle_loader`: grain pipelines over any source:
  seeded per-epoch shuffles and per-example augmentations, shards per JAX
  process, worker processes, prefetch and checkpointable iterator state.
* The embedded digits (:func:`load_digits`, :func:`batch_iterator`,
  :func:`particle_batches`) need no download.
"""

from __future__ import annotations

from sfpk_jax.data.arrays import batch_iterator, particle_batches
from sfpk_jax.data.augment import (
    ExampleRandom,
    Transform,
    cifar_eval,
    cifar_train,
    cifar_transforms,
    identity,
    imagenet_eval,
    imagenet_train,
    normalize,
    random_resized_crop_box,
)
from sfpk_jax.data.cifar import load_cifar
from sfpk_jax.data.digits import Dataset, load_digits
from sfpk_jax.data.errors import DatasetNotFoundError, InvalidDatasetError
from sfpk_jax.data.imagenet import ImageNet, load_imagenet
from sfpk_jax.data.pipeline import (
    ArraySource,
    Loader,
    RandomAccessSource,
    batches,
    iterate,
    particle_loader,
    shard,
    steps_per_epoch,
)
from sfpk_jax.data.registry import DATASETS, DataBundle, load
from sfpk_jax.data.tfds_source import TfdsSource, open_tfds

__all__ = [
    "DATASETS",
    "ArraySource",
    "DataBundle",
    "Dataset",
    "DatasetNotFoundError",
    "ImageNet",
    "InvalidDatasetError",
    "Loader",
    "RandomAccessSource",
    "TfdsSource",
    "ExampleRandom",
    "Transform",
    "batch_iterator",
    "batches",
    "cifar_eval",
    "cifar_train",
    "cifar_transforms",
    "identity",
    "imagenet_eval",
    "imagenet_train",
    "iterate",
    "load",
    "load_cifar",
    "load_digits",
    "load_imagenet",
    "normalize",
    "open_tfds",
    "particle_batches",
    "particle_loader",
    "random_resized_crop_box",
    "shard",
    "steps_per_epoch",
]
