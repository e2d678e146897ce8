"""Bad dataset contents are refused when the dataset is opened, naming the file and example."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from test_data_cifar import make_cifar100

from sfpk_jax.data import InvalidDatasetError, load_cifar
from sfpk_jax.data.validation import check_labels, check_pixels


def _rewrite(path, changes: dict) -> None:
    batch = pickle.loads(path.read_bytes(), encoding="bytes")
    batch.update(changes)
    path.write_bytes(pickle.dumps(batch, protocol=4))


@pytest.mark.parametrize("label, shown", [(-1, "-1"), (150, "150"), (0.5, "0.5"), (2**40, "1099511627776")])
def test_bad_cifar100_labels_are_refused_naming_file_and_example(tmp_path, label, shown):
    make_cifar100(tmp_path)
    train = tmp_path / "cifar-100-python" / "train"
    labels = pickle.loads(train.read_bytes(), encoding="bytes")[b"fine_labels"]
    labels[3] = label
    _rewrite(train, {b"fine_labels": labels})
    with pytest.raises(InvalidDatasetError, match=rf"{train}.*example 3 holds {shown}"):
        load_cifar("cifar100", tmp_path)


def test_float_pixels_out_of_range_are_refused(tmp_path):
    make_cifar100(tmp_path)
    test = tmp_path / "cifar-100-python" / "test"
    data = pickle.loads(test.read_bytes(), encoding="bytes")[b"data"].astype(np.float64)
    data[1, 7] = 1e6
    _rewrite(test, {b"data": data})
    with pytest.raises(InvalidDatasetError, match=rf"{test}.*pixels.*example 1 holds 1000000.0"):
        load_cifar("cifar100", tmp_path)


def test_an_empty_test_split_is_refused(tmp_path):
    make_cifar100(tmp_path)
    test = tmp_path / "cifar-100-python" / "test"
    _rewrite(test, {b"data": np.zeros((0, 3072), np.uint8), b"fine_labels": []})
    with pytest.raises(InvalidDatasetError, match="test split.*no examples"):
        load_cifar("cifar100", tmp_path)


def test_good_values_pass_and_are_cast():
    assert check_labels([0, 99, 5.0], 100, "x").dtype == np.int32
    assert check_pixels(np.array([[0, 255]], np.int64), "x").dtype == np.uint8
    with pytest.raises(InvalidDatasetError, match="stored as <U1"):
        check_labels(np.array(["a"]), 10, "x")
