"""A source-agnostic batch loader with seeded augmentation and background prefetch.

A *source* is anything with ``__len__`` and ``__getitem__(i) -> {"image",
"label"}`` (numpy): :class:`ArraySource` for in-memory arrays, the
tensorflow-datasets sources of :mod:`sfpk_jax.data.tfds_source`, or a raw
``tfds.data_source``. A source may also offer ``read_batch(indices)`` to read
several examples at once.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from sfpk_jax.data.augment import Transform

Batch = dict[str, np.ndarray]

# Prefix of the prefetch threads' names, so that they can be told apart.
THREAD_NAME = "sfpk-data-prefetch"

# How often (seconds) a blocked producer checks whether the consumer has gone.
_POLL_S = 0.05


@runtime_checkable
class RandomAccessSource(Protocol):
    """What the loaders need from a dataset split."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...


class ArraySource:
    """In-memory images and labels as a random-access source."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        """Wraps aligned arrays.

        Args:
          images: images, leading axis indexes examples.
          labels: labels aligned with ``images``.
        """
        if len(images) != len(labels):
            raise ValueError(f"images and labels must have the same length, got {len(images)} and {len(labels)}")
        self.images = images
        self.labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self.images[index], "label": self.labels[index]}

    def read_batch(self, indices: Sequence[int]) -> Batch:
        """Gathers several examples with one fancy index.

        Args:
          indices: example indices.

        Returns:
          ``{"image": (len(indices), ...), "label": (len(indices),)}``.
        """
        idx = np.asarray(indices)
        return {"image": self.images[idx], "label": self.labels[idx]}


def read_batch(source: RandomAccessSource, indices: Sequence[int]) -> dict[str, Any]:
    """Reads examples from any source.

    Args:
      source: a random-access source.
      indices: example indices.

    Returns:
      ``{"image": ..., "label": int32 (len(indices),)}`` where the images are
      one array when they share a shape, else a list (ImageNet).
    """
    records = source.read_batch(indices) if hasattr(source, "read_batch") else [source[int(i)] for i in indices]
    if isinstance(records, Mapping):
        return dict(records)
    images = [np.asarray(r["image"]) for r in records]
    if len({im.shape for im in images}) == 1:
        images = np.stack(images)
    return {"image": images, "label": np.asarray([r["label"] for r in records], np.int32)}


def _apply(transform: Transform | None, batch: dict[str, Any], rng: np.random.Generator) -> Batch:
    images = batch["image"] if transform is None else transform(batch["image"], rng)
    return {"image": np.asarray(images), "label": batch["label"]}


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Blocks until ``item`` is queued (True) or the consumer has gone (False)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


_END = object()


def _produce(make: Callable[[], Iterable[Any]], q: queue.Queue, stop: threading.Event) -> None:
    try:
        for item in make():
            if not _put(q, (item, None), stop):
                return
        _put(q, (_END, None), stop)
    except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises it
        _put(q, (_END, err), stop)


def prefetch_iter(make: Callable[[], Iterable[Any]], size: int) -> Iterator[Any]:
    """Iterates ``make()`` in a background thread, ``size`` items ahead.

    The thread starts at the first ``next``; an exception it raises is
    re-raised here; and it stops (and is joined) as soon as this iterator is
    exhausted, closed or garbage collected, e.g. after a ``break``.

    Args:
      make: builds the iterable to run in the thread.
      size: queue length; 0 runs ``make()`` in the caller's thread instead.

    Yields:
      The items of ``make()``, in order.
    """
    if size == 0:
        yield from make()
        return
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    thread = threading.Thread(target=_produce, args=(make, q, stop), name=THREAD_NAME, daemon=True)
    thread.start()
    try:
        while True:
            item, err = q.get()
            if err is not None:
                raise err
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _check(source: RandomAccessSource, batch_size: int, prefetch_size: int) -> None:
    if not 1 <= batch_size <= len(source):
        raise ValueError(f"batch_size must lie in [1, {len(source)}] (the number of examples), got {batch_size}")
    if prefetch_size < 0:
        raise ValueError(f"prefetch must be non-negative, got {prefetch_size}")


class Loader:
    """Epochs of transformed mini-batches from a random-access source.

    Epoch ``e`` depends only on ``(seed, e)``: its shuffle order and its
    augmentation draws come from ``SeedSequence((seed, e))``, so a run resumed
    at epoch ``e`` sees the batches an uninterrupted run would have seen.
    """

    def __init__(
        self,
        source: RandomAccessSource,
        batch_size: int,
        *,
        transform: Transform | None,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        prefetch: int = 2,
    ):
        """Configures the loader; nothing is read yet.

        Args:
          source: the split to load.
          batch_size: examples per batch, in [1, len(source)].
          transform: ``transform(images, rng) -> float32 NHWC`` applied to each
            batch (see :mod:`sfpk_jax.data.augment`); None keeps the images
            as the source gives them.
          seed: non-negative seed of the shuffles and augmentations.
          shuffle: visit the examples in a random order.
          drop_last: skip the final batch when it would be smaller than
            ``batch_size``.
          prefetch: batches prepared ahead in a background thread (0: none).
        """
        _check(source, batch_size, prefetch)
        self.source = source
        self.batch_size = batch_size
        self.transform = transform
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.prefetch = prefetch
        self._next_epoch = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(len(self.source), self.batch_size)
        return full + (0 if self.drop_last or rest == 0 else 1)

    def __iter__(self) -> Iterator[Batch]:
        """The next epoch: the k-th ``iter(loader)`` gives :meth:`epoch` ``(k)``."""
        epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        return self.epoch(epoch)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of one epoch, reproducible on their own.

        Args:
          epoch: non-negative epoch number.

        Returns:
          An iterator of ``{"image": (B, ...), "label": int32 (B,)}``; close it
          (or let it go) to stop its prefetch thread early.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        return prefetch_iter(lambda: self._batches(epoch), self.prefetch)

    def _batches(self, epoch: int) -> Iterator[Batch]:
        order_seed, augment_seed = np.random.SeedSequence((self.seed, epoch)).spawn(2)
        n = len(self.source)
        order = np.random.default_rng(order_seed).permutation(n) if self.shuffle else np.arange(n)
        rng = np.random.default_rng(augment_seed)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield _apply(self.transform, read_batch(self.source, idx), rng)


def particle_loader(
    source: RandomAccessSource,
    n: int,
    batch_size: int,
    *,
    transform: Transform | None,
    seed: int,
    start: int = 0,
    prefetch: int = 2,
) -> Iterator[Batch]:
    """Endless per-particle mini-batches, stacked along a leading particle axis.

    Each particle walks its own random permutations of the source (an epoch at
    a time, dropping the remainder) and draws its own augmentations, so the
    particles see independent batches. Step ``s`` depends only on ``(seed, s)``:
    the permutation of particle i's epoch e comes from ``(seed, i, e)`` and the
    augmentation of step s from ``(seed, i, s)``, so a simulation resumed at
    step ``start`` reads exactly the batches an uninterrupted one reads, without
    reading the skipped ones. Like :func:`sfpk_jax.data.particle_batches`, for
    any source.

    Args:
      source: the split to load.
      n: number of particles, at least 1.
      batch_size: examples per particle and step, in [1, len(source)].
      transform: applied to each particle's batch; None keeps the images.
      seed: non-negative seed of all the draws.
      start: index of the first step to yield (0 for a fresh run).
      prefetch: steps prepared ahead in a background thread (0: none).

    Returns:
      An endless iterator of ``{"image": (n, batch_size, ...), "label":
      (n, batch_size)}``; close it (or let it go) to stop its thread.
    """
    _check(source, batch_size, prefetch)
    if n < 1:
        raise ValueError(f"n (the number of particles) must be at least 1, got {n}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be a step index >= 0, got {start!r}")
    per_epoch = len(source) // batch_size

    def orders(particle: int) -> Callable[[int], np.ndarray]:
        # One permutation per epoch, drawn when the particle enters that epoch.
        cache: dict[int, np.ndarray] = {}

        def order(epoch: int) -> np.ndarray:
            if epoch not in cache:
                cache.clear()
                rng = np.random.default_rng(np.random.SeedSequence((seed, particle, epoch)))
                cache[epoch] = rng.permutation(len(source))
            return cache[epoch]

        return order

    def steps() -> Iterator[Batch]:
        particle_orders = [orders(i) for i in range(n)]
        step = start
        while True:
            epoch, position = divmod(step, per_epoch)
            parts = []
            for i, order in enumerate(particle_orders):
                idx = order(epoch)[position * batch_size : (position + 1) * batch_size]
                rng = np.random.default_rng(np.random.SeedSequence((seed, i, step, 1)))
                parts.append(_apply(transform, read_batch(source, idx), rng))
            yield {key: np.stack([p[key] for p in parts]) for key in ("image", "label")}
            step += 1

    return prefetch_iter(steps, prefetch)
