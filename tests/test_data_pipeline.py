"""The grain-based Loader and particle_loader (order, seeds, shards, workers, state) and the registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from sfpk_jax.data import (
    DATASETS,
    ArraySource,
    Loader,
    RandomAccessSource,
    load,
    particle_loader,
)
from sfpk_jax.data.augment import cifar_transforms
from sfpk_jax.data.pipeline import batches as batch_dataset
from sfpk_jax.runtime.cores import max_workers

N, B = 40, 8


@pytest.fixture
def source() -> ArraySource:
    rng = np.random.default_rng(0)
    return ArraySource(rng.integers(0, 256, (N, 32, 32, 3), dtype=np.uint8), np.arange(N))


TRAIN, _ = cifar_transforms("cifar10")


def _equal(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"]) for x, y in zip(a, b)
    )


class ListSource:
    """A minimal source: only __len__ and __getitem__; can fail on one index."""

    def __init__(self, n: int, fail_at: int | None = None):
        self.n, self.fail_at = n, fail_at

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if index == self.fail_at:
            raise RuntimeError(f"cannot read example {index}")
        return {"image": np.full((4, 4, 1), index, np.uint8), "label": index}


def test_batches_cover_one_epoch(source):
    loader = Loader(source, B, transform=TRAIN, seed=0)
    assert isinstance(source, RandomAccessSource) and len(loader) == N // B
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader)
    for batch in batches:
        assert batch["image"].shape == (B, 32, 32, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (B,) and batch["label"].dtype == np.int32
    assert sorted(np.concatenate([b["label"] for b in batches])) == list(range(N))


def test_remainder_and_order():
    loader = Loader(ListSource(10), 4, transform=None, seed=0, shuffle=False, drop_last=False)
    batches = list(loader.epoch(0))
    assert len(loader) == len(batches) == 3
    assert [b["label"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert batches[0]["image"].shape == (4, 4, 4, 1) and batches[0]["image"].dtype == np.uint8
    assert len(Loader(ListSource(10), 4, transform=None, seed=0)) == 2


def test_epochs_are_reproducible_and_distinct(source):
    loader = Loader(source, B, transform=TRAIN, seed=3)
    e1 = list(loader.epoch(1))
    assert _equal(e1, list(Loader(source, B, transform=TRAIN, seed=3, prefetch=0).epoch(1)))
    assert not _equal(e1, list(loader.epoch(0)))
    assert not _equal(e1, list(Loader(source, B, transform=TRAIN, seed=4).epoch(1)))
    # Iterating the loader walks the epochs in order.
    assert not _equal(list(loader), e1) and _equal(list(loader), e1)


def test_epochs_run_back_to_back_through_one_iterator(source):
    loader = Loader(source, B, transform=TRAIN, seed=6)
    joined = list(loader.epochs(1, 3))
    assert _equal(joined, list(loader.epoch(1)) + list(loader.epoch(2)))
    it = loader.epochs(1, 3)
    for _ in range(len(loader) + 1):  # into the second epoch
        next(it)
    assert _equal(list(loader.epochs(1, 3, it.get_state())), joined[len(loader) + 1 :])
    with pytest.raises(ValueError, match="first < stop"):
        loader.epochs(2, 2)


def test_augmentation_differs_between_epochs_even_without_shuffle(source):
    loader = Loader(source, B, transform=TRAIN, seed=0, shuffle=False)
    first, second = next(loader.epoch(0)), next(loader.epoch(1))
    np.testing.assert_array_equal(first["label"], second["label"])
    assert not np.array_equal(first["image"], second["image"])


def test_augmentation_is_seeded_per_example(source):
    # Example i of epoch e gets the same draw whatever the batching or the
    # order around it: only (seed, e, i) matter.
    def by_label(loader, epoch):
        return {int(l): im for b in loader.epoch(epoch) for l, im in zip(b["label"], b["image"])}

    big, small = by_label(Loader(source, B, transform=TRAIN, seed=5), 2), by_label(
        Loader(source, B // 2, transform=TRAIN, seed=5), 2)
    assert big.keys() == small.keys() == set(range(N))
    assert all(np.array_equal(big[i], small[i]) for i in big)
    other = by_label(Loader(source, B, transform=TRAIN, seed=5), 3)
    assert not all(np.array_equal(big[i], other[i]) for i in big)


def test_iterator_state_continues_mid_epoch(source):
    loader = Loader(source, B, transform=TRAIN, seed=2)
    full = list(loader.epoch(3))
    it = loader.epoch(3)
    head = [next(it), next(it)]
    state = json.loads(json.dumps(it.get_state()))  # as checkpoints store it
    it.close()
    assert _equal(head, full[:2])
    assert _equal(list(loader.epoch(3, state)), full[2:])


def test_shards_make_the_global_batch(source):
    whole = list(batch_dataset(source, B, transform=TRAIN, seed=0)[: 2 * (N // B)])
    parts = [list(batch_dataset(source, B, transform=TRAIN, seed=0, shard_index=i, shard_count=2)[: 2 * (N // B)])
             for i in range(2)]
    for k, batch in enumerate(whole):
        assert parts[0][k]["label"].shape == (B // 2,)
        joined = {int(l): im for p in parts for l, im in zip(p[k]["label"], p[k]["image"])}
        assert sorted(joined) == sorted(batch["label"].tolist())
        assert all(np.array_equal(joined[int(l)], im) for l, im in zip(batch["label"], batch["image"]))
    with pytest.raises(ValueError, match="multiple of the process count"):
        batch_dataset(source, B + 1, transform=None, seed=0, shard_index=0, shard_count=2)


def test_worker_exception_reaches_the_consumer():
    loader = Loader(ListSource(12, fail_at=9), 4, transform=None, seed=0, shuffle=False)
    it = loader.epoch(0)
    assert next(it)["label"].tolist() == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="cannot read example 9"):
        list(it)


def test_invalid_arguments(source):
    with pytest.raises(ValueError, match="batch_size"):
        Loader(source, N + 1, transform=None, seed=0)
    with pytest.raises(ValueError, match="prefetch"):
        Loader(source, B, transform=None, seed=0, prefetch=-1)
    with pytest.raises(ValueError, match="workers"):
        Loader(source, B, transform=None, seed=0, workers=-1)
    # Bounded as the particle workers are: a typo of 1000 must not start 1000 processes.
    with pytest.raises(ValueError, match=rf"workers must be in \[0, {max_workers()}\]"):
        Loader(source, B, transform=None, seed=0, workers=max_workers() + 1)
    with pytest.raises(ValueError, match="workers must be in"):
        particle_loader(source, 2, B, transform=None, seed=0, workers=max_workers() + 1)
    with pytest.raises(ValueError, match="particles"):
        particle_loader(source, 0, B, transform=None, seed=0)


def test_particle_loader(source):
    stream = particle_loader(source, 3, B, transform=TRAIN, seed=0)
    steps = [next(stream) for _ in range(12)]  # more than an epoch per particle
    stream.close()
    assert steps[0]["image"].shape == (3, B, 32, 32, 3) and steps[0]["image"].dtype == np.float32
    assert steps[0]["label"].shape == (3, B) and steps[0]["label"].dtype == np.int32
    labels = np.stack([s["label"] for s in steps])  # (steps, particles, B)
    assert not np.array_equal(labels[:, 0], labels[:, 1])
    # Each particle's epoch (N // B steps) visits distinct examples.
    for p in range(3):
        assert len(set(labels[: N // B, p].ravel())) == N // B * B
    again = particle_loader(source, 3, B, transform=TRAIN, seed=0, prefetch=0)
    for step in steps:
        other = next(again)
        np.testing.assert_array_equal(step["image"], other["image"])


def test_particle_loader_starts_at_any_step(source):
    full = particle_loader(source, 2, B, transform=TRAIN, seed=3, prefetch=0)
    steps = [next(full) for _ in range(N // B + 3)]  # into the second epoch
    for start in (1, N // B, N // B + 2):
        resumed = next(particle_loader(source, 2, B, transform=TRAIN, seed=3, start=start, prefetch=0))
        np.testing.assert_array_equal(resumed["image"], steps[start]["image"])
        np.testing.assert_array_equal(resumed["label"], steps[start]["label"])
    with pytest.raises(ValueError, match="start"):
        particle_loader(source, 2, B, transform=None, seed=0, start=-1)


def test_particles_draw_their_own_augmentation():
    # One example: every particle gets the same image, so only augmentation differs.
    images = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    step = next(particle_loader(ArraySource(images, [0]), 4, 1, transform=TRAIN, seed=0, prefetch=0))
    assert len({step["image"][p].tobytes() for p in range(4)}) > 1


def test_raw_tfds_data_source_is_a_source():
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        raw = tfds.data_source("cifar10", split="train")
        assert isinstance(raw, RandomAccessSource)
        batches = list(Loader(raw, 3, transform=TRAIN, seed=0).epoch(0))
    assert len(batches) == 2 and batches[0]["image"].shape == (3, 32, 32, 3)
    assert batches[0]["label"].dtype == np.int32


def test_registry_digits():
    bundle = load("digits", "/ignored")
    assert (bundle.num_classes, bundle.image_shape) == (10, (8, 8, 1))
    assert len(bundle.train) == 1347 and len(bundle.test) == 450
    batch = next(Loader(bundle.train, 16, transform=bundle.train_transform, seed=0, prefetch=0).epoch(0))
    assert batch["image"].shape == (16, 8, 8, 1) and batch["image"].dtype == np.float32
    # The digits come standardised: their transforms change nothing.
    image = bundle.train.images[0]
    np.testing.assert_array_equal(bundle.train_transform(image, None), image)
    np.testing.assert_array_equal(bundle.eval_transform(image, None), image)


def test_registry_unknown_name():
    with pytest.raises(ValueError) as info:
        load("mnist")
    assert all(name in str(info.value) for name in DATASETS)
