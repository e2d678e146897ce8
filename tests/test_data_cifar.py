"""CIFAR loading from generated python-version folders and from mocked tfds."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds

from sfpk_jax.data import (
    DatasetNotFoundError,
    ExampleRandom,
    cifar_eval,
    cifar_train,
    cifar_transforms,
    load,
    load_cifar,
)
from sfpk_jax.data.augment import CIFAR_STATS

PER_FILE = 3


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def _write_batch(path, images: np.ndarray, labels: np.ndarray, label_key: bytes) -> None:
    # The real files: rows are channel-major flattened images, labels are lists.
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"generated", b"data": rows, label_key: labels.tolist()}, f, protocol=2)


def make_cifar10(root, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Writes a small cifar-10-batches-py folder; returns the images and labels written."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    x_train, y_train = _images(rng, 5 * PER_FILE), rng.integers(0, 10, 5 * PER_FILE)
    for i in range(5):
        part = slice(i * PER_FILE, (i + 1) * PER_FILE)
        _write_batch(folder / f"data_batch_{i + 1}", x_train[part], y_train[part], b"labels")
    x_test, y_test = _images(rng, 2), rng.integers(0, 10, 2)
    _write_batch(folder / "test_batch", x_test, y_test, b"labels")
    return x_train, y_train, x_test, y_test


def make_cifar100(root, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Writes a small cifar-100-python folder; returns the images and fine labels written."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    x_train, y_train = _images(rng, 4), rng.integers(0, 100, 4)
    x_test, y_test = _images(rng, 2), rng.integers(0, 100, 2)
    _write_batch(folder / "train", x_train, y_train, b"fine_labels")
    _write_batch(folder / "test", x_test, y_test, b"fine_labels")
    return x_train, y_train, x_test, y_test


def _assert_loaded(data, expected) -> None:
    for got, want in zip(data, expected):
        np.testing.assert_array_equal(got, want)
    assert data.x_train.dtype == np.uint8 and data.x_train.shape[1:] == (32, 32, 3)
    assert data.y_train.dtype == np.int32 and data.y_test.dtype == np.int32


@pytest.mark.parametrize("name, make", [("cifar10", make_cifar10), ("cifar100", make_cifar100)])
def test_pickled_folder_round_trips(tmp_path, name, make):
    expected = make(tmp_path)
    _assert_loaded(load_cifar(name, tmp_path), expected)


def test_data_dir_may_be_the_folder_itself(tmp_path):
    expected = make_cifar100(tmp_path)
    _assert_loaded(load_cifar("cifar100", tmp_path / "cifar-100-python"), expected)


def test_registry_bundle(tmp_path):
    make_cifar10(tmp_path)
    bundle = load("cifar10", tmp_path)
    assert (bundle.num_classes, bundle.image_shape) == (10, (32, 32, 3))
    assert len(bundle.train) == 5 * PER_FILE and len(bundle.test) == 2
    example = bundle.train[0]
    assert example["image"].shape == (32, 32, 3) and example["label"].dtype == np.int32
    out = bundle.eval_transform(bundle.test.images, None)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.float32


def test_truncated_pickle_names_the_file(tmp_path):
    make_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        load_cifar("cifar10", tmp_path)


def test_missing_batch_file_names_the_file(tmp_path):
    make_cifar10(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(DatasetNotFoundError, match="test_batch"):
        load_cifar("cifar10", tmp_path)


def test_pickle_with_foreign_globals_is_refused(tmp_path):
    make_cifar100(tmp_path)
    # A pickle that would call os.system when loaded with plain pickle.
    (tmp_path / "cifar-100-python" / "test").write_bytes(pickle.dumps(os.system, protocol=2))
    with pytest.raises(DatasetNotFoundError, match="unexpected global"):
        load_cifar("cifar100", tmp_path)


@pytest.mark.parametrize("name, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_missing_dataset_message(tmp_path, name, folder):
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar(name, tmp_path)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / folder) in message
    assert str(tmp_path / name) in message  # the tfds dataset directory
    assert "download_and_prepare" in message and "array_record" in message
    assert "https://www.cs.toronto.edu/~kriz/" in message


def test_unknown_name():
    with pytest.raises(ValueError, match="cifar100"):
        load_cifar("cifar1000", ".")


@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar100", 100)])
def test_tfds_source_without_tensorflow(tmp_path, name, classes):
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        data = load_cifar(name, tmp_path)
        again = load_cifar(name, tmp_path)
    assert data.x_train.shape == (6, 32, 32, 3) and data.x_test.shape == (6, 32, 32, 3)
    assert data.x_train.dtype == np.uint8 and data.y_train.dtype == np.int32
    assert 0 <= data.y_train.min() and data.y_train.max() < classes
    np.testing.assert_array_equal(data.x_train, again.x_train)


# Augmentation ---------------------------------------------------------------

MEAN, STD = CIFAR_STATS["cifar10"]


def _normalised(image: np.ndarray) -> np.ndarray:
    return (image.astype(np.float32) / 255 - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)


def test_crop_is_a_window_of_the_padded_image():
    images = _images(np.random.default_rng(0), 6)
    out = cifar_train(images, ExampleRandom(0, range(6)), mean=MEAN, std=STD)
    assert out.shape == (6, 32, 32, 3) and out.dtype == np.float32
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    offsets = set()
    for image, got in zip(padded, out):
        windows = [
            (top, left, flip)
            for top in range(9)
            for left in range(9)
            for flip in (False, True)
            if np.allclose(got, _normalised(_window(image, top, left, flip)), atol=1e-6)
        ]
        assert windows, "the output is not a (flipped) 32x32 window of the zero-padded image"
        offsets.add(windows[0][:2])
    assert len(offsets) > 1  # the offsets are random, not one fixed crop


def _window(image: np.ndarray, top: int, left: int, flip: bool) -> np.ndarray:
    crop = image[top : top + 32, left : left + 32]
    return np.flip(crop, axis=1) if flip else crop


def test_flip_flips():
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :5] = 255  # a bright band on the left: flipping moves it right
    out = cifar_train(np.stack([image] * 16), ExampleRandom(0, range(16)), mean=MEAN, std=STD,
                      pad=0)
    plain, flipped = _normalised(image), _normalised(np.flip(image, axis=1))
    is_plain = [np.allclose(o, plain) for o in out]
    is_flipped = [np.allclose(o, flipped) for o in out]
    assert all(p != f for p, f in zip(is_plain, is_flipped))
    assert 0 < sum(is_flipped) < 16


def test_normalisation_statistics():
    rng = np.random.default_rng(0)
    images = _images(rng, 4)
    out = cifar_eval(images, mean=MEAN, std=STD)
    np.testing.assert_allclose(out * np.asarray(STD) + np.asarray(MEAN), images / 255.0, atol=1e-6)
    # The channel mean maps to 0 and mean + std to 1 (up to uint8 rounding).
    for target, level in ((0.0, np.asarray(MEAN)), (1.0, np.asarray(MEAN) + np.asarray(STD))):
        pixel = np.broadcast_to(np.round(level * 255).astype(np.uint8), (1, 32, 32, 3))
        out = cifar_eval(pixel, mean=MEAN, std=STD)
        np.testing.assert_allclose(out, target, atol=0.5 / 255 / min(STD))


def test_cifar_transforms_use_each_dataset_statistics():
    images = _images(np.random.default_rng(0), 2)
    ten, hundred = cifar_transforms("cifar10")[1](images[0], None), cifar_transforms("cifar100")[1](images[0], None)
    images = images[0]
    np.testing.assert_allclose(ten, _normalised(images), atol=1e-6)
    assert not np.allclose(ten, hundred)


def test_augmentation_is_deterministic_per_example():
    """An example's crop and flip depend on its seed and key only, not on its batch."""
    images = _images(np.random.default_rng(0), 8)
    train, _ = cifar_transforms("cifar100")
    def augment(seed, keys=range(8)):
        return train(images, ExampleRandom(seed, keys))

    a, b, c = augment(5), augment(5), augment(6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    alone = np.concatenate([train(images[i:i + 1], ExampleRandom(5, [i])) for i in range(8)])
    np.testing.assert_array_equal(alone, a)
    reordered = train(images[::-1], ExampleRandom(5, range(7, -1, -1)))
    np.testing.assert_array_equal(reordered[::-1], a)


def test_example_random_draws_are_uniform_and_independent_of_the_batch():
    rng = ExampleRandom(3, range(20000))
    u, v = rng.random(), rng.random()
    assert u.dtype == np.float64 and 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(np.corrcoef(u, v)[0, 1]) < 0.03
    counts = np.bincount(ExampleRandom(4, range(9000)).integers(0, 9), minlength=9)
    assert counts.min() > 900 and counts.max() < 1100
    part = ExampleRandom(3, [7, 19999])
    np.testing.assert_array_equal(part.random(), u[[7, 19999]])
    gens = [ExampleRandom(3, [5, 6]).generator(0), ExampleRandom(3, [5]).generator(0)]
    assert gens[0].random() == gens[1].random()
