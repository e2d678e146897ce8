"""Seeded, sharded, prefetched batches on grain, for any random-access source.

A *source* is anything with ``__len__`` and ``__getitem__(i) -> {"image",
"label"}`` (numpy):
:class:`ArraySource` for in-memory arrays, the tensorflow-datasets sources of
:mod:`sfpk_jax.data.tfds_source`, or a raw ``tfds.data_source``.

Everything else is grain's: :func:`batches` builds one endless
``grain.MapDataset`` of batches (grain's per-epoch shuffle order, this JAX
process's shard, batches that never cross an epoch, each batch read and
augmented at once, every example with its own seeded draws), so step ``s`` is
a pure function of ``(seed, s)``; iterating it goes through
``to_iter_dataset`` (reader threads, prefetch) and ``mp_prefetch`` (worker
processes for decoding and augmentation), whose iterators carry a
checkpointable state (``get_state``/``set_state``). grain itself is imported by
the functions that build or iterate a pipeline, so importing this module (and
the package) does not load it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from sfpk_jax.data.augment import ExampleRandom, Transform
from sfpk_jax.runtime.cores import max_workers

if TYPE_CHECKING:
    import grain

Batch = dict[str, np.ndarray]


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

        Raises:
          ValueError: the lengths differ.
        """
        if len(images) != len(labels):
            raise ValueError(f"images and labels must have the same length, got {len(images)} and {len(labels)}")
        self.images = images
        self.labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self.images[index], "label": self.labels[index]}


class _Batch:
    """Batch ``g`` of the endless stream: which examples, read and transformed.

    grain's per-element steps (``shuffle``, slices, ``batch``, ``random_map``)
    cost ~50 µs per example here, more than a CIFAR crop, so this map does the
    per-batch arithmetic itself: the epoch and its positions from ``g``, the
    examples at those positions in the order ``MapDataset.shuffle(seed)``
    gives (grain's own ``index_shuffle``, called as that dataset calls it),
    then one read and one vectorised transform of the whole batch (in the
    worker processes when there are any). A class rather than a closure so
    that ``mp_prefetch`` can pickle it.
    """

    def __init__(self, source: RandomAccessSource, transform: Transform | None, *,
                 batch_size: int, steps: int, shuffle_seed: int | None, augment_seed: int,
                 shard_index: int, shard_count: int):
        self.source, self.transform = source, transform
        self.batch_size, self.steps = batch_size, steps
        self.shuffle_seed, self.augment_seed = shuffle_seed, augment_seed
        self.shard_index, self.shard_count = shard_index, shard_count

    def positions(self, index: int) -> tuple[int, np.ndarray]:
        """``(epoch, positions in the epoch's order)`` of this process's part of batch ``index``."""
        n = len(self.source)
        epoch, k = divmod(index, self.steps)
        start = k * self.batch_size + self.shard_index
        return epoch, np.arange(start, min(n, (k + 1) * self.batch_size), self.shard_count)

    def __call__(self, index: int, _) -> Batch:
        n = len(self.source)
        epoch, positions = self.positions(index)
        if self.shuffle_seed is None:
            examples = positions.tolist()
        else:
            import grain

            seed = (self.shuffle_seed + epoch) % 2**32
            examples = [grain.experimental.index_shuffle(int(p), max_index=n - 1, seed=seed,
                                                         rounds=4) for p in positions]
        records = [self.source[i] for i in examples]
        images = [np.asarray(record["image"]) for record in records]
        if self.transform is None:
            images = np.stack(images)
        else:
            rng = ExampleRandom(self.augment_seed, positions + epoch * n)
            images = np.asarray(self.transform(images, rng), np.float32)
        labels = np.asarray([record["label"] for record in records], np.int32)
        return {"image": images, "label": labels}


def shard() -> tuple[int, int]:
    """``(index, count)`` of this JAX process among all, as grain shards data.

    Returns:
      ``(jax.process_index(), jax.process_count())`` via
      ``grain.sharding.ShardByJaxProcess``.
    """
    import grain

    options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    return options.shard_index, options.shard_count


def _seeds(seed: Any) -> tuple[int, int]:
    """Two independent 31-bit seeds (shuffle, augmentation) from an int or a tuple of ints."""
    shuffle_seed, augment_seed = np.random.SeedSequence(seed).generate_state(2) % 2**31
    return int(shuffle_seed), int(augment_seed)


def batches(
    source: RandomAccessSource,
    batch_size: int,
    *,
    transform: Transform | None,
    seed: Any,
    shuffle: bool = True,
    drop_last: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.MapDataset:
    """The endless, epoch after epoch, batches of ``source`` as a grain ``MapDataset``.

    Element ``e * steps + k`` is batch ``k`` of epoch ``e`` (``steps`` batches
    per epoch, see :func:`steps_per_epoch`): epoch ``e`` is shuffled with
    grain's ``seed + e`` (the order of ``MapDataset.shuffle``) and the
    ``i``-th example of that order is augmented with the draws of
    :class:`~sfpk_jax.data.augment.ExampleRandom` keyed ``e * len(source) +
    i``, so any epoch (or step) is reproduced alone, whatever the order of
    reading, the batching or the worker count.

    Args:
      source: the split to load.
      batch_size: examples per global batch, in [1, len(source)], a multiple
        of ``shard_count``.
      transform: ``transform(images, rng) -> float32`` batch (see
        :mod:`sfpk_jax.data.augment`); None keeps the images.
      seed: non-negative int, or tuple of them, seeding shuffles and
        augmentations.
      shuffle: visit the examples in a random order.
      drop_last: skip each epoch's final batch when smaller than ``batch_size``.
      shard_index: this process's shard (from :func:`shard`).
      shard_count: number of shards; each yields ``batch_size / shard_count``
        examples of every global batch (examples ``shard_index::shard_count``).

    Returns:
      A ``grain.MapDataset`` of ``{"image": (b, ...), "label": int32 (b,)}``.

    Raises:
      ValueError: bad sizes or shards.
    """
    n = len(source)
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must lie in [1, {n}] (the number of examples), got {batch_size}")
    if not 0 <= shard_index < shard_count or batch_size % shard_count:
        raise ValueError(f"batch_size {batch_size} must split evenly over {shard_count} processes "
                         f"(shard {shard_index}): use a multiple of the process count")
    if shard_count > 1 and not drop_last and n % batch_size:
        raise ValueError(f"{n} examples do not make whole batches of {batch_size}; with several "
                         "processes every process must see as many batches: pass drop_last=True")
    shuffle_seed, augment_seed = _seeds(seed)
    steps = steps_per_epoch(n, batch_size, drop_last)
    import grain

    load = _Batch(source, transform, batch_size=batch_size, steps=steps,
                  shuffle_seed=shuffle_seed if shuffle else None, augment_seed=augment_seed,
                  shard_index=shard_index, shard_count=shard_count)
    return grain.MapDataset.range(steps).repeat(None).map_with_index(load)


def steps_per_epoch(num_examples: int, batch_size: int, drop_last: bool = True) -> int:
    """Batches per epoch of :func:`batches`.

    Args:
      num_examples: examples in the source.
      batch_size: global batch size.
      drop_last: whether the final, smaller batch is dropped.

    Returns:
      The number of batches.
    """
    full, rest = divmod(num_examples, batch_size)
    return full + (0 if drop_last or rest == 0 else 1)


def _check_counts(workers: int, prefetch: int) -> None:
    if not 0 <= workers <= max_workers():
        raise ValueError(f"workers must be in [0, {max_workers()}] (4 processes per core at "
                         f"most), got {workers}")
    if prefetch < 0:
        raise ValueError(f"prefetch must be non-negative, got {prefetch}")


def iterate(dataset: grain.MapDataset, *, workers: int = 0, prefetch: int = 2) -> grain.DatasetIterator:
    """A checkpointable iterator over ``dataset``, with readers and worker processes.

    Args:
      dataset: a finite ``grain.MapDataset`` (a slice of :func:`batches`).
      workers: processes that read, decode and augment (``mp_prefetch``); 0:
        this process does.
      prefetch: batches read ahead by background threads (0: read on demand
        in the caller's thread).

    Returns:
      A ``grain.DatasetIterator``; its ``get_state()`` is JSON-able and
      ``set_state`` on a fresh iterator of the same dataset continues there.

    Raises:
      ValueError: ``workers`` negative or above ``max_workers()`` (4 per core), or
        ``prefetch`` negative.
    """
    import grain
    from absl import flags

    _check_counts(workers, prefetch)
    read = grain.ReadOptions(num_threads=min(prefetch, 16), prefetch_buffer_size=prefetch)
    ds = dataset.to_iter_dataset(read)
    if workers:
        # grain's worker start-up reads absl flags, which raise when the program
        # never parsed them (any plain script): their defaults are what we want.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(1, prefetch)))
    return iter(ds)


class Loader:
    """Epochs of transformed mini-batches from a random-access source (grain).

    Epoch ``e`` depends only on ``(seed, e)`` (see :func:`batches`), so a run
    resumed at epoch ``e``, or at step ``k`` of it, sees the batches an
    uninterrupted run would have seen.
    """

    def __init__(
        self,
        source: RandomAccessSource,
        batch_size: int,
        *,
        transform: Transform | None,
        seed: Any,
        shuffle: bool = True,
        drop_last: bool = True,
        workers: int = 0,
        prefetch: int = 2,
        sharded: bool = False,
    ):
        """Configures the loader; nothing is read yet.

        Args:
          source: the split to load.
          batch_size: examples per global batch, in [1, len(source)].
          transform: ``transform(images, rng) -> float32`` of a batch
            (see :mod:`sfpk_jax.data.augment`); None keeps the images.
          seed: non-negative seed of the shuffles and augmentations.
          shuffle: visit the examples in a random order.
          drop_last: skip the final batch when it would be smaller than
            ``batch_size``.
          workers: worker processes for reading and augmenting (0: none).
          prefetch: batches prepared ahead (0: none).
          sharded: yield only this JAX process's part of every batch
            (:func:`shard`); False: the whole batch.

        Raises:
          ValueError: bad sizes, or a batch that does not split over processes.
        """
        index, count = shard() if sharded else (0, 1)
        self.dataset = batches(source, batch_size, transform=transform, seed=seed, shuffle=shuffle,
                               drop_last=drop_last, shard_index=index, shard_count=count)
        _check_counts(workers, prefetch)
        self.steps = steps_per_epoch(len(source), batch_size, drop_last)
        self.workers, self.prefetch = workers, prefetch
        self._next_epoch = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.steps

    def __iter__(self) -> grain.DatasetIterator:
        """The next epoch: the k-th ``iter(loader)`` gives :meth:`epoch` ``(k)``."""
        epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        return self.epoch(epoch)

    def epoch(self, epoch: int, state: dict | None = None) -> grain.DatasetIterator:
        """The batches of one epoch, reproducible on their own: :meth:`epochs` ``(epoch, epoch + 1)``.

        Args:
          epoch: non-negative epoch number.
          state: see :meth:`epochs`.

        Returns:
          A ``grain.DatasetIterator`` of ``{"image": (B, ...), "label": int32
          (B,)}``; ``close()`` it to stop its workers early.
        """
        return self.epochs(epoch, epoch + 1, state)

    def epochs(self, first: int, stop: int, state: dict | None = None) -> grain.DatasetIterator:
        """The batches of epochs ``first .. stop - 1`` back to back, through one iterator.

        One iterator starts its worker processes once for all those epochs.

        Args:
          first: non-negative first epoch.
          stop: the epoch after the last, greater than ``first``.
          state: a ``get_state()`` of an earlier iterator over the same
            epochs, to continue where it stood (e.g. mid-epoch after a
            resume); None: from the start.

        Returns:
          A ``grain.DatasetIterator`` of ``len(self) * (stop - first)`` batches.

        Raises:
          ValueError: a negative or empty range of epochs.
        """
        if not 0 <= first < stop:
            raise ValueError(f"epochs must satisfy 0 <= first < stop, got first={first}, stop={stop}")
        it = iterate(self.dataset[first * self.steps : stop * self.steps],
                     workers=self.workers, prefetch=self.prefetch)
        if state is not None:
            it.set_state(state)
        return it


def _stack(parts: Sequence[Batch]) -> Batch:
    """The particles' batches of one step along a new leading axis."""
    return {key: np.stack([p[key] for p in parts]) for key in ("image", "label")}


def particle_loader(
    source: RandomAccessSource,
    n: int,
    batch_size: int,
    *,
    transform: Transform | None,
    seed: Any,
    start: int = 0,
    workers: int = 0,
    prefetch: int = 2,
) -> grain.DatasetIterator:
    """Endless per-particle mini-batches, stacked along a leading particle axis.

    Particle ``i`` reads its own :func:`batches` stream, seeded ``(seed, i)``
    (its own shuffle of every epoch, dropping the remainder, and its own
    augmentations); grain zips the ``n`` streams, so step ``s`` depends only
    on ``(seed, s)`` and a simulation resumed at step ``start`` reads exactly
    the batches an uninterrupted one reads, without reading the skipped ones.

    Args:
      source: the split to load.
      n: number of particles, at least 1.
      batch_size: examples per particle and step, in [1, len(source)].
      transform: batch transform (see :mod:`sfpk_jax.data.augment`); None keeps
        the images.
      seed: non-negative int (or tuple of them) seeding all the draws.
      start: index of the first step to yield (0 for a fresh run).
      workers: worker processes for reading and augmenting (0: none).
      prefetch: steps prepared ahead (0: none).

    Returns:
      An endless iterator of ``{"image": (n, batch_size, ...), "label":
      (n, batch_size)}``; ``close()`` it to stop its workers early.

    Raises:
      ValueError: bad sizes, particle count or start.
    """
    if n < 1:
        raise ValueError(f"n (the number of particles) must be at least 1, got {n}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be a step index >= 0, got {start!r}")
    import grain

    seeds = np.atleast_1d(np.asarray(seed, np.int64)).tolist()
    streams = [batches(source, batch_size, transform=transform, seed=(*seeds, i)) for i in range(n)]
    steps = grain.experimental.ZipMapDataset(streams).map(_stack)
    # An endless dataset cannot be iterated from a start index, a long finite slice can.
    return iterate(steps[start : sys.maxsize // 2], workers=workers, prefetch=prefetch)
