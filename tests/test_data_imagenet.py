"""ImageNet through mocked tensorflow-datasets (no TensorFlow) and its transforms."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from sfpk_jax.data import (
    DatasetNotFoundError,
    ExampleRandom,
    Loader,
    imagenet_eval,
    imagenet_train,
    load,
    load_imagenet,
)
from sfpk_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD, random_resized_crop_box


@pytest.fixture
def mock_imagenet():
    # USE_CODE builds fake examples from the dataset's feature spec, so
    # nothing is read from disk and TensorFlow is never imported.
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def test_splits_through_mocked_tfds(tmp_path, mock_imagenet):
    splits = load_imagenet(tmp_path)
    assert len(splits.train) == 5 and len(splits.validation) == 5
    example = splits.train[0]
    assert set(example) == {"image", "label"}
    assert example["image"].dtype == np.uint8 and example["image"].ndim == 3 and example["image"].shape[2] == 3
    assert example["label"].dtype == np.int32 and 0 <= int(example["label"]) < 1000
    batch = splits.validation.read_batch([3, 1])  # batched reads (CIFAR via tfds uses them)
    np.testing.assert_array_equal(batch[0]["image"], splits.validation[3]["image"])


def test_loader_over_variable_size_images(tmp_path, mock_imagenet):
    bundle = load("imagenet", tmp_path)
    assert (bundle.num_classes, bundle.image_shape) == (1000, (224, 224, 3))
    shapes = {bundle.train[i]["image"].shape for i in range(len(bundle.train))}
    assert len(shapes) > 1  # the mock draws random sizes, as real ImageNet has
    for transform in (bundle.train_transform, bundle.eval_transform):
        batches = list(Loader(bundle.train, 2, transform=transform, seed=0).epoch(0))
        assert len(batches) == 2
        assert batches[0]["image"].shape == (2, 224, 224, 3) and batches[0]["image"].dtype == np.float32
        assert batches[0]["label"].shape == (2,) and batches[0]["label"].dtype == np.int32


def test_missing_imagenet_message(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_imagenet(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "imagenet2012") in message
    assert str(tmp_path / "downloads" / "manual") in message
    assert "manual" in message and "download_and_prepare" in message and "array_record" in message


def test_random_resized_crop_box_stays_inside():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(60, 90, rng)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 90 and h > 0 and w > 0
        assert 0.08 * 60 * 90 * 0.8 <= h * w <= 60 * 90


def test_random_resized_crop_falls_back_to_center():
    # A 1-pixel-high strip: no sampled box fits, so the largest center crop
    # with a ratio in [3/4, 4/3] is used, as in torchvision.
    assert random_resized_crop_box(1, 100, np.random.default_rng(0)) == (0, 49, 1, 1)
    assert random_resized_crop_box(100, 10, np.random.default_rng(0), attempts=0) == (43, 0, 13, 10)
    assert random_resized_crop_box(30, 36, np.random.default_rng(0), attempts=0) == (0, 0, 30, 36)


def test_train_transform_shape_determinism_and_flip():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((50, 70), (90, 40), (64, 64))]
    def train(seed, **kw):
        return imagenet_train(images, ExampleRandom(seed, range(len(images))), **kw)

    a = train(1)
    assert a.shape == (3, 224, 224, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, train(1))
    assert not np.array_equal(a, train(2))
    # An image whose left half is black and right half white: each output is
    # dark on one side and bright on the other, and flips make both occur.
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, 32:] = 255
    images = [image] * 16
    out = train(3, size=32)
    left_brighter = out[:, :, 0].mean(axis=(1, 2)) > out[:, :, -1].mean(axis=(1, 2))
    assert 0 < left_brighter.sum() < 16


def test_eval_transform_resizes_and_center_crops():
    # Constant colour survives bilinear resizing exactly.
    image = np.full((300, 400, 3), (10, 120, 250), np.uint8)
    out = imagenet_eval([image, image[:100]])
    assert out.shape == (2, 224, 224, 3) and out.dtype == np.float32
    expected = (np.asarray((10, 120, 250)) / 255 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), atol=1e-5)
    # A centred marker stays centred: rows/cols symmetric around the middle.
    marked = np.zeros((256, 512, 3), np.uint8)
    marked[118:138, 246:266] = 255
    centre = imagenet_eval([marked])[0, :, :, 0]
    bright = np.argwhere(centre > centre.min() + 1)
    assert abs(bright.mean(axis=0) - 111.5).max() < 1.0
