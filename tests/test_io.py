"""Output folders and atomic writes."""

from __future__ import annotations

import json
import pytest

from sfpk_jax import io


def test_prepare_out_dir_refuses_finished_results(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(io.OutputExistsError, match="--overwrite"):
        io.prepare_out_dir(tmp_path, overwrite=False)
    assert io.prepare_out_dir(tmp_path, overwrite=True) == tmp_path


def test_prepare_out_dir_creates_missing_folders(tmp_path):
    out = io.prepare_out_dir(tmp_path / "a" / "b", overwrite=False)
    assert out.is_dir()


def test_prepare_out_dir_rejects_unusable_path(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermissionError, match="cannot create output directory"):
        io.prepare_out_dir(tmp_path / "file" / "run", overwrite=False)


def test_write_json_is_atomic_on_failure(tmp_path):
    path = tmp_path / "results.json"
    io.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        io.write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
