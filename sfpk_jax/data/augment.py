"""The paper's image augmentations and normalisation, a batch at a time, seeded per example.

Every transform has the signature ``transform(images, rng) -> float32
(B, H, W, C)``: ``images`` is a batch, one uint8 ``(B, H, W, C)`` array or a
list of ``(H, W, C)`` arrays (ImageNet's vary in size), and ``rng`` an
:class:`ExampleRandom`, the only source of randomness: each example's draws
depend only on its own seed, so an example is augmented the same in any
batch. Evaluation transforms ignore it (None is fine).

Hand-written because grain ships no image ops: the crops, flips and resizes
must be torchvision's (the paper's protocol), in numpy and PIL. CIFAR's are
vectorised over the batch: per example, grain's ``random_map`` and a numpy
``Generator`` cost more than the crop itself (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np

Images = np.ndarray | Sequence[np.ndarray]

_MASK = 2**64 - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective scramble of uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class ExampleRandom:
    """Independent random draws for every example of a batch, vectorised.

    Example ``i``'s ``d``-th draw is a hash of ``(seed, keys[i], d)``
    (SplitMix64, counter-based), so it does not depend on the other examples
    of the batch. numpy has no generator that is vectorised over per-example
    keys, and one ``numpy.random.Generator`` per example costs ~10 µs, more
    than a CIFAR crop; transforms that work example by example (PIL) take
    :meth:`generator`.
    """

    def __init__(self, seed: int, keys: Sequence[int]):
        """Draws for ``len(keys)`` examples.

        Args:
          seed: non-negative int, the stream's seed.
          keys: one non-negative int per example (its position in the data
            stream), distinct within a stream.
        """
        self.seed = int(seed)
        self.keys = np.asarray(keys, np.uint64).reshape(-1)
        base = np.full(1, ((self.seed + 1) * _GOLDEN) & _MASK, np.uint64)
        self._state = _mix(_mix(base) ^ self.keys)
        self._draws = 0

    def __len__(self) -> int:
        return len(self.keys)

    def random(self) -> np.ndarray:
        """One uniform float64 in [0, 1) per example (the next draw of each)."""
        self._draws += 1
        bits = _mix(self._state + np.uint64((self._draws * _GOLDEN) & _MASK))
        return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def integers(self, low: int, high: int) -> np.ndarray:
        """One int64 in ``[low, high)`` per example (the next draw of each)."""
        return low + np.floor(self.random() * (high - low)).astype(np.int64)

    def generator(self, index: int) -> np.random.Generator:
        """Example ``index``'s own numpy generator (seeded by its seed and key only)."""
        return np.random.default_rng((self.seed, int(self.keys[index])))


Transform = Callable[[Images, ExampleRandom | None], np.ndarray]

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


def identity(images: Images, rng: ExampleRandom | None = None) -> np.ndarray:
    """The transform of already-preprocessed data: the batch as float32.

    Args:
      images: a batch of equally shaped images.
      rng: ignored.

    Returns:
      The images stacked into one float32 array.
    """
    del rng
    return np.asarray(np.stack(images) if isinstance(images, list) else images, np.float32)


def cifar_train(
    images: Images,
    rng: ExampleRandom,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    pad: int = 4,
) -> np.ndarray:
    """Zero-pads, randomly crops back to the input size, flips half the time, normalises.

    Vectorised over the batch: the crops and flips are one gather.

    Args:
      images: uint8 ``(B, H, W, C)`` (or a list of ``(H, W, C)``).
      rng: per-example draws: the crop's top offset, its left offset, then
        the flip.
      mean: per-channel mean of the [0, 1] pixels.
      std: per-channel standard deviation of the [0, 1] pixels.
      pad: zero border added on each side before cropping.

    Returns:
      float32 ``(B, H, W, C)``.
    """
    images = np.asarray(np.stack(images) if isinstance(images, list) else images)
    b, h, w = images.shape[:3]
    top, left = rng.integers(0, 2 * pad + 1), rng.integers(0, 2 * pad + 1)
    flip = rng.random() < 0.5
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = top[:, None] + np.arange(h)
    cols = left[:, None] + np.arange(w)
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    crops = padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return normalize(crops, mean, std)


def cifar_eval(
    images: Images, rng: ExampleRandom | None = None, *, mean: Sequence[float],
    std: Sequence[float]
) -> np.ndarray:
    """Normalisation only.

    Args:
      images: uint8 ``(B, H, W, C)`` (or a list of ``(H, W, C)``).
      rng: ignored.
      mean: per-channel mean of the [0, 1] pixels.
      std: per-channel standard deviation of the [0, 1] pixels.

    Returns:
      float32 ``(B, H, W, C)``.
    """
    del rng
    return normalize(np.stack(images) if isinstance(images, list) else images, mean, std)


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


def imagenet_train(images: Images, rng: ExampleRandom, *, size: int = 224) -> np.ndarray:
    """Random-resized crop to ``size`` (bilinear), horizontal flip half the time, normalisation.

    Example by example (PIL), each with its own generator (``rng.generator``).

    Args:
      images: uint8 ``(H, W, 3)`` images of any sizes.
      rng: per-example draws; each example's generator gives its crop, then
        its flip.
      size: output height and width.

    Returns:
      float32 ``(B, size, size, 3)``.
    """
    from PIL import Image  # ImageNet's transforms alone need it

    out = []
    for index, image in enumerate(images):
        gen = rng.generator(index)
        top, left, h, w = random_resized_crop_box(image.shape[0], image.shape[1], gen)
        box = (left, top, left + w, top + h)
        crop = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR,
                                                        box=box))
        out.append(crop[:, ::-1] if gen.random() < 0.5 else crop)
    return normalize(np.stack(out), IMAGENET_MEAN, IMAGENET_STD)


def imagenet_eval(
    images: Images, rng: ExampleRandom | None = None, *, size: int = 224, resize: int = 256
) -> np.ndarray:
    """Resizes the shorter side to ``resize`` (bilinear), center-crops ``size``, normalises.

    Args:
      images: uint8 ``(H, W, 3)`` images of any sizes.
      rng: ignored.
      size: output height and width.
      resize: length of the shorter side before cropping.

    Returns:
      float32 ``(B, size, size, 3)``.
    """
    from PIL import Image

    del rng
    out = []
    for image in images:
        h, w = image.shape[:2]
        # As torchvision's Resize(int): the longer side is truncated, not rounded.
        new_h, new_w = (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h),
                                                           Image.Resampling.BILINEAR))
        top, left = round((new_h - size) / 2), round((new_w - size) / 2)
        out.append(resized[top : top + size, left : left + size])
    return normalize(np.stack(out), IMAGENET_MEAN, IMAGENET_STD)
