from __future__ import annotations

import numpy as np
import pytest

from sfpk_jax.data import batch_iterator, load_digits, particle_batches


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


def test_shapes_dtypes_and_split(digits):
    assert digits.x_train.shape == (1347, 8, 8, 1)
    assert digits.x_test.shape == (450, 8, 8, 1)
    assert digits.x_train.dtype == np.float32 and digits.x_test.dtype == np.float32
    assert digits.y_train.dtype == np.int32 and digits.y_test.dtype == np.int32
    assert set(np.unique(digits.y_train)) == set(range(10))
    # Stratified: every class holds close to its share of the test set.
    counts = np.bincount(digits.y_test, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47


def test_train_split_is_standardised(digits):
    assert abs(float(digits.x_train.mean())) < 1e-5
    assert float(digits.x_train.std()) == pytest.approx(1.0, abs=1e-5)
    # The test split reuses the train statistics, so it is only roughly standard.
    assert abs(float(digits.x_test.mean())) < 0.1


def test_split_is_deterministic_in_seed(digits):
    again = load_digits(seed=0)
    for a, b in zip(digits, again):
        np.testing.assert_array_equal(a, b)
    other = load_digits(seed=1)
    assert not np.array_equal(digits.y_train, other.y_train)


def test_invalid_test_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.0)


def test_batch_iterator_covers_epoch_deterministically(digits):
    x, y = digits.x_train[:100], digits.y_train[:100]
    batches = list(batch_iterator(x, y, 32, seed=3))
    assert len(batches) == 3  # drop_last drops the 4 leftovers
    assert all(b["image"].shape == (32, 8, 8, 1) and b["label"].shape == (32,) for b in batches)
    again = list(batch_iterator(x, y, 32, seed=3))
    for a, b in zip(batches, again):
        np.testing.assert_array_equal(a["label"], b["label"])
    full = list(batch_iterator(x, y, 32, seed=3, drop_last=False))
    assert [len(b["label"]) for b in full] == [32, 32, 32, 4]
    seen = np.concatenate([b["image"] for b in full])
    np.testing.assert_array_equal(np.sort(seen.reshape(100, -1), axis=0), np.sort(x.reshape(100, -1), axis=0))


def test_batch_iterator_without_shuffle_keeps_order(digits):
    x, y = digits.x_train[:10], digits.y_train[:10]
    (batch,) = batch_iterator(x, y, 10, seed=0, shuffle=False)
    np.testing.assert_array_equal(batch["label"], y)


@pytest.mark.parametrize("batch_size", [0, 11])
def test_batch_size_out_of_range(digits, batch_size):
    x, y = digits.x_train[:10], digits.y_train[:10]
    with pytest.raises(ValueError, match=r"batch_size must lie in \[1, 10\]"):
        next(batch_iterator(x, y, batch_size, seed=0))
    with pytest.raises(ValueError, match=r"batch_size must lie in \[1, 10\]"):
        next(particle_batches(x, y, 2, batch_size, seed=0))


def test_particle_batches_shapes_and_independence(digits):
    x = digits.x_train[:200]
    # Label each example by its index so batches reveal which examples were drawn.
    idx = np.arange(200, dtype=np.int32)
    stream = particle_batches(x, idx, 4, 16, seed=0)
    steps = [next(stream) for _ in range(30)]  # crosses several per-particle epochs
    assert steps[0]["image"].shape == (4, 16, 8, 8, 1)
    assert steps[0]["label"].shape == (4, 16)
    for step in steps:
        for row in step["label"]:
            assert len(np.unique(row)) == 16  # no repeats within a particle's batch
        np.testing.assert_array_equal(step["image"], x[step["label"]])
        assert len({tuple(row) for row in step["label"]}) == 4  # particles differ
    assert not np.array_equal(steps[0]["label"], steps[1]["label"])


def test_particle_batches_deterministic(digits):
    x, y = digits.x_train[:50], digits.y_train[:50]
    a = particle_batches(x, y, 3, 8, seed=7)
    b = particle_batches(x, y, 3, 8, seed=7)
    for _ in range(10):
        np.testing.assert_array_equal(next(a)["image"], next(b)["image"])
    c = particle_batches(x, y, 3, 8, seed=8)
    assert not np.array_equal(next(particle_batches(x, y, 3, 8, seed=7))["image"], next(c)["image"])
