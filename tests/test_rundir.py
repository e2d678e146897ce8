"""The run folder of the experiments: created without losing earlier results."""

from __future__ import annotations

import pytest

from experiments.harness import rundir


def test_prepare_out_dir_refuses_finished_results(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(rundir.OutputExistsError, match="--overwrite"):
        rundir.prepare_out_dir(tmp_path, overwrite=False)
    assert rundir.prepare_out_dir(tmp_path, overwrite=True) == tmp_path


def test_prepare_out_dir_creates_missing_folders(tmp_path):
    out = rundir.prepare_out_dir(tmp_path / "a" / "b", overwrite=False)
    assert out.is_dir()


def test_prepare_out_dir_rejects_unusable_path(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermissionError, match="cannot create output directory"):
        rundir.prepare_out_dir(tmp_path / "file" / "run", overwrite=False)
