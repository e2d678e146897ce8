"""grain worker processes (``workers > 0``): same batches as in-process reading, checkpointable, stopped on close."""

from __future__ import annotations

import json
import multiprocessing
import time

import numpy as np
import pytest

from sfpk_jax.data import ArraySource, Loader, particle_loader
from sfpk_jax.data.augment import cifar_transforms

pytestmark = pytest.mark.slow

N, B = 40, 8
TRAIN, _ = cifar_transforms("cifar10")


@pytest.fixture(scope="module")
def source() -> ArraySource:
    rng = np.random.default_rng(0)
    return ArraySource(rng.integers(0, 256, (N, 32, 32, 3), dtype=np.uint8), np.arange(N))


def _equal(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"]) for x, y in zip(a, b)
    )


def test_workers_give_the_same_batches_and_stop_on_close(source):
    before = len(multiprocessing.active_children())
    serial = list(Loader(source, B, transform=TRAIN, seed=1, prefetch=0).epoch(4))
    it = Loader(source, B, transform=TRAIN, seed=1, workers=2).epoch(4)
    assert _equal([next(it)], serial[:1])
    # The first batch can come before the second worker is up on a loaded machine.
    deadline = time.monotonic() + 60
    while len(multiprocessing.active_children()) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(multiprocessing.active_children()) >= before + 2
    assert _equal(serial[1:], list(it))
    it.close()
    assert len(multiprocessing.active_children()) == before


def test_worker_state_continues_mid_epoch(source):
    loader = Loader(source, B, transform=TRAIN, seed=2, workers=2)
    full = list(Loader(source, B, transform=TRAIN, seed=2).epoch(3))
    it = loader.epoch(3)
    head = [next(it), next(it), next(it)]
    state = json.loads(json.dumps(it.get_state()))  # as checkpoints store it
    it.close()
    assert _equal(head, full[:3])
    rest = loader.epoch(3, state)
    assert _equal(list(rest), full[3:])
    rest.close()


def test_particle_loader_with_workers(source):
    serial = particle_loader(source, 3, B, transform=TRAIN, seed=4, start=2, prefetch=0)
    parallel = particle_loader(source, 3, B, transform=TRAIN, seed=4, start=2, workers=2)
    for _ in range(7):
        a, b = next(serial), next(parallel)
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
    parallel.close()
