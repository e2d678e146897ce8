"""The paper's image augmentations and normalisation, one uint8 HWC image at a time.

Every transform has the signature ``transform(image, rng) -> float32 HWC``:
``image`` is one uint8 ``(H, W, C)`` array (ImageNet's vary in size) and
``rng`` a :class:`numpy.random.Generator`, the only source of randomness, so
a transform is deterministic given the generator's state. Evaluation
transforms ignore it. The loaders (:mod:`sfpk_jax.data.pipeline`) call them
through grain's ``random_map``, which hands each example its own generator.

Hand-written because grain ships no image ops: the crops, flips and resizes
must be torchvision's (the paper's protocol), in numpy and PIL.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

Transform = Callable[[np.ndarray, np.random.Generator | None], np.ndarray]

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Scales uint8 pixels to [0, 1], then standardises each channel.

    Args:
      image: uint8 ``(..., C)`` pixels (one image, or a batch).
      mean: per-channel mean of the [0, 1] pixels.
      std: per-channel standard deviation of the [0, 1] pixels.

    Returns:
      float32 ``(image / 255 - mean) / std``.
    """
    x = np.asarray(image, np.float32) / np.float32(255.0)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def identity(image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """The transform of already-preprocessed data: the image as float32.

    Args:
      image: one image.
      rng: ignored.

    Returns:
      The image as a float32 array.
    """
    del rng
    return np.asarray(image, np.float32)


def cifar_train(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    pad: int = 4,
) -> np.ndarray:
    """Zero-pads, randomly crops back to the input size, flips half the time, normalises.

    Args:
      image: uint8 ``(H, W, C)``.
      rng: source of the crop offset (top, left) and then the flip.
      mean: per-channel mean of the [0, 1] pixels.
      std: per-channel standard deviation of the [0, 1] pixels.
      pad: zero border added on each side before cropping.

    Returns:
      float32 ``(H, W, C)``.
    """
    image = np.asarray(image)
    h, w = image.shape[:2]
    top, left = rng.integers(0, 2 * pad + 1, size=2) - pad
    # The window of the zero-padded image, without building the padded copy.
    crop = np.zeros_like(image)
    crop[max(0, -top) : h - max(0, top), max(0, -left) : w - max(0, left)] = image[
        max(0, top) : h + min(0, top), max(0, left) : w + min(0, left)
    ]
    return normalize(crop[:, ::-1] if rng.random() < 0.5 else crop, mean, std)


def cifar_eval(
    image: np.ndarray, rng: np.random.Generator | None = None, *, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """Normalisation only.

    Args:
      image: uint8 ``(H, W, C)``.
      rng: ignored.
      mean: per-channel mean of the [0, 1] pixels.
      std: per-channel standard deviation of the [0, 1] pixels.

    Returns:
      float32 ``(H, W, C)``.
    """
    del rng
    return normalize(image, mean, std)


def cifar_transforms(name: str) -> tuple[Transform, Transform]:
    """The train and eval transforms of a CIFAR dataset, with its statistics.

    Args:
      name: ``"cifar10"`` or ``"cifar100"``.

    Returns:
      ``(train_transform, eval_transform)``.
    """
    if name not in CIFAR_STATS:
        raise ValueError(f"name must be one of {sorted(CIFAR_STATS)}, got {name!r}")
    mean, std = CIFAR_STATS[name]
    return (
        functools.partial(cifar_train, mean=mean, std=std),
        functools.partial(cifar_eval, mean=mean, std=std),
    )


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """Samples a crop as torchvision's ``RandomResizedCrop.get_params`` does.

    Draws an area fraction in ``scale`` and a log-uniform aspect ratio in
    ``ratio`` until the box fits (at most ``attempts`` times), else falls back
    to the largest center crop whose ratio lies in ``ratio``.

    Args:
      height: image height.
      width: image width.
      rng: source of the draws.
      scale: range of the crop area, as a fraction of the image area.
      ratio: range of the crop's width / height.
      attempts: draws before the fallback.

    Returns:
      ``(top, left, crop_height, crop_width)``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def imagenet_train(image: np.ndarray, rng: np.random.Generator, *, size: int = 224) -> np.ndarray:
    """Random-resized crop to ``size`` (bilinear), horizontal flip half the time, normalisation.

    Args:
      image: uint8 ``(H, W, 3)`` of any size.
      rng: source of the crop, then the flip.
      size: output height and width.

    Returns:
      float32 ``(size, size, 3)``.
    """
    top, left, h, w = random_resized_crop_box(image.shape[0], image.shape[1], rng)
    crop = np.asarray(
        Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    )
    return normalize(crop[:, ::-1] if rng.random() < 0.5 else crop, IMAGENET_MEAN, IMAGENET_STD)


def imagenet_eval(
    image: np.ndarray, rng: np.random.Generator | None = None, *, size: int = 224, resize: int = 256
) -> np.ndarray:
    """Resizes the shorter side to ``resize`` (bilinear), center-crops ``size``, normalises.

    Args:
      image: uint8 ``(H, W, 3)`` of any size.
      rng: ignored.
      size: output height and width.
      resize: length of the shorter side before cropping.

    Returns:
      float32 ``(size, size, 3)``.
    """
    del rng
    h, w = image.shape[:2]
    # As torchvision's Resize(int): the longer side is truncated, not rounded.
    new_h, new_w = (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    return normalize(resized[top : top + size, left : left + size], IMAGENET_MEAN, IMAGENET_STD)
