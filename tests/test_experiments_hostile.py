"""Hostile input to the experiments, refused in one line before anything is written.

The cases of an adversarial pass (issue 16) that need no training:

* ``--overwrite`` never deletes what the run reads (a dense checkpoint in
  ``--out``) and deletes only the files and checkpoint folders the
  experiments write, never a user's own;
* an empty ``--out``, or a current directory holding other files;
* ``--steps``, ``--seed`` and ``--sparsity`` outside what jax, numpy and the
  model can take;
* CIFAR labels of 2**40 and an empty test split, through the experiment;
* a dense checkpoint holding a NaN, or one that is not a checkpoint;
* a resume on other data (the data's fingerprint in config.json);
* a full disk recognised in OSErrors and in tensorstore's messages;
* ``apply_masks`` given particles, a scalar or a transposed mask;
* worker counts beyond 4 per core, and a compilation cache that is a file
  or an unwritable folder (issue 24), refused before anything starts;
* path flags resolved once, at parse time, so a relative path means the same
  everywhere in the run.
"""

from __future__ import annotations

import errno
import json
import pickle
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_data_cifar import make_cifar100

from experiments import cifar100_oneshot, pretrain
from experiments.harness import compile_cache, datafp, edge, flag_checks, outdir
from sfpk_jax import apply_masks
from sfpk_jax.data import load
from sfpk_jax.models import build
from sfpk_jax.runtime.cores import max_workers
from sfpk_jax.storage import checkpoint_files as checkpoints

DIGITS = ["--dataset", "digits", "--model", "small_cnn", "--no-progress"]


def _one_line_error(capsys, call, code: int = 2) -> str:
    with pytest.raises(SystemExit) as exc:
        call()
    assert exc.value.code == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def _finished_run(out, *, dense: bool = True) -> None:
    """A finished run's folder as the experiments leave it (the checkpoints' insides aside)."""
    (out / "checkpoints" / "train-pretrain" / "1").mkdir(parents=True)
    if dense:
        (out / "checkpoints" / "dense").mkdir()
    for name in ("config.json", "results.json"):
        (out / name).write_text("{}")
    (out / "metrics.csv").write_text("phase,epoch\n")
    (out / "accuracy.png").write_bytes(b"png")


# --overwrite ---------------------------------------------------------------------------------


def test_overwrite_refuses_to_delete_the_dense_checkpoint_it_reads(tmp_path, capsys):
    out = tmp_path / "R"
    _finished_run(out)
    dense = out / "checkpoints" / "dense"
    err = _one_line_error(capsys, lambda: cifar100_oneshot.main(
        [*DIGITS, "--dense-checkpoint", str(dense), "--out", str(out), "--overwrite"]))
    assert f"--overwrite deletes {dense}, which this run reads" in err
    assert dense.is_dir() and (out / "results.json").exists()


def test_overwrite_deletes_only_what_the_experiments_write(tmp_path):
    out = tmp_path / "R"
    _finished_run(out)
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "mine").mkdir()
    (out / "checkpoints" / "dense.orbax-checkpoint-tmp-1234").mkdir()
    args = cifar100_oneshot.parse_args([*DIGITS, "--pretrain-epochs", "1", "--out", str(out),
                                        "--overwrite"])
    outdir.start(args)
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert left == [".lock", "checkpoints", "checkpoints/mine", "config.json", "notes.txt"]
    assert json.loads((out / "config.json").read_text())["overwrite"] is True


def test_overwrite_removes_the_checkpoints_folder_when_it_holds_only_the_runs(tmp_path):
    out = tmp_path / "R"
    _finished_run(out)
    outdir.start(pretrain.parse_args([*DIGITS, "--out", str(out), "--overwrite"]))
    assert not (out / "checkpoints").exists() and not (out / "accuracy.png").exists()


# --out ---------------------------------------------------------------------------------------


def test_an_empty_out_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _one_line_error(capsys, lambda: pretrain.main([*DIGITS, "--out", ""]))
    assert "--out='' is not allowed" in err and "empty" in err
    assert list(tmp_path.iterdir()) == []


def test_the_current_directory_is_refused_unless_empty(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert flag_checks.out_problem(".") is None  # empty: fine
    (tmp_path / "thesis.tex").write_text("mine")
    err = _one_line_error(capsys, lambda: pretrain.main([*DIGITS, "--out", "."]))
    assert "current directory" in err
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.tex"]
    assert flag_checks.out_problem(str(tmp_path)) is not None  # the same folder by its full path


# Flags outside what the libraries take --------------------------------------------------------


@pytest.mark.parametrize("flag, value, expected", [
    ("--steps", "99999999999999999999", "an integer <= 2147483647"),
    ("--seed", "9223372036854775808", "an integer in [0, 4294967295]"),
    ("--sparsity", "1e-17", "a fraction in [4.2e-05, 0.999958]"),
    ("--sparsity", "0.99999", "prunable weights of --model=small_cnn"),
])
def test_flags_out_of_range_are_refused_before_any_write(tmp_path, capsys, flag, value, expected):
    out = tmp_path / "o"
    err = _one_line_error(capsys, lambda: cifar100_oneshot.main(
        [*DIGITS, "--pretrain-epochs", "1", flag, value, "--out", str(out)]))
    assert f"{flag}={value}" in err.replace("'", "") and expected in err
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--particle-workers", "--data-workers"])
def test_worker_counts_beyond_four_per_core_are_refused_before_anything_starts(tmp_path, capsys,
                                                                               flag):
    out, many = tmp_path / "o", str(max_workers() + 1)
    extra = ["--particle-mode", "processes"] if flag == "--particle-workers" else []
    err = _one_line_error(capsys, lambda: cifar100_oneshot.main(
        [*DIGITS, "--pretrain-epochs", "1", *extra, flag, many, "--out", str(out)]))
    assert f"{flag}={many}" in err.replace("'", "")
    assert f"[{0 if flag == '--data-workers' else 1}, {max_workers()}]" in err
    assert not out.exists()


def test_particle_workers_belong_to_processes_mode(tmp_path, capsys):
    err = _one_line_error(capsys, lambda: cifar100_oneshot.main(
        [*DIGITS, "--pretrain-epochs", "1", "--particle-workers", "2", "--out", str(tmp_path / "o")]))
    assert "--particle-workers=2 is not allowed" in err and "particle_mode='processes'" in err


@pytest.mark.parametrize("kind", ["file", "unwritable", "environment"])
def test_an_unusable_compile_cache_is_refused_before_any_write(tmp_path, capsys, monkeypatch, kind):
    cache = tmp_path / "cache"
    if kind == "file":
        cache.write_text("not a folder")
    else:
        # /proc takes no new files, even from root (who ignores permission bits).
        cache = Path("/proc/self/cache-here")
    flags = ["--compile-cache", str(cache)]
    if kind == "environment":
        monkeypatch.setenv(compile_cache.ENV, str(cache))
        flags = []
    out = tmp_path / "o"
    err = _one_line_error(capsys, lambda: pretrain.main([*DIGITS, *flags, "--out", str(out)]))
    assert str(cache) in err and "--no-compile-cache" in err
    assert not out.exists()
    if kind == "environment":
        assert compile_cache.ENV in err


def test_path_flags_are_absolute_from_parse_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dense").mkdir()
    args = cifar100_oneshot.parse_args([*DIGITS, "--dense-checkpoint", "dense", "--out", "runs/x",
                                        "--compile-cache", "~/c"])
    assert args.dense_checkpoint == str(tmp_path / "dense")
    assert args.out == str(tmp_path / "runs" / "x")
    assert args.compile_cache == str(Path.home() / "c")


def test_the_sparsity_range_is_that_of_the_model():
    total = 23_834  # small_cnn's prunable weights for 10 classes
    args = cifar100_oneshot.parse_args([*DIGITS, "--pretrain-epochs", "1", "--out", "o",
                                        "--sparsity", str(1.5 / total)])
    assert args.sparsity == pytest.approx(1.5 / total)


# Bad data through the experiment ---------------------------------------------------------------


def _rewrite(path, changes: dict) -> None:
    batch = pickle.loads(path.read_bytes(), encoding="bytes")
    batch.update(changes)
    path.write_bytes(pickle.dumps(batch, protocol=4))


@pytest.mark.parametrize("case", ["huge_label", "empty_test"])
def test_bad_cifar_files_stop_the_experiment_in_one_line(tmp_path, capsys, case):
    make_cifar100(tmp_path / "data")
    folder = tmp_path / "data" / "cifar-100-python"
    if case == "huge_label":
        _rewrite(folder / "train", {b"fine_labels": [2**40, 1, 2, 3]})
        shown = f"{folder / 'train'}: labels must be integers in [0, 100), but example 0 holds"
    else:
        _rewrite(folder / "test", {b"data": np.zeros((0, 3072), np.uint8), b"fine_labels": []})
        shown = "test split"
    out = tmp_path / "o"
    err = _one_line_error(capsys, lambda: pretrain.main(
        ["--dataset", "cifar100", "--data-dir", str(tmp_path / "data"), "--model", "small_cnn",
         "--batch-size", "2", "--epochs", "1", "--out", str(out)]))
    assert shown in err
    assert not out.exists()


# Dense checkpoints ------------------------------------------------------------------------------


def _digits_variables() -> dict:
    return build("small_cnn", num_classes=10, key=jax.random.key(0), input_shape=(1, 8, 8, 1))[1]


@pytest.mark.parametrize("where", ["params", "batch_stats"])
def test_a_dense_checkpoint_with_a_nan_is_refused_naming_the_leaf(tmp_path, capsys, where):
    variables = _digits_variables()
    leaf = {"params": ("params", "Dense_0", "kernel"),
            "batch_stats": ("batch_stats", "BatchNorm_0", "mean")}[where]
    node = variables
    for key in leaf[:-1]:
        node = node[key]
    node[leaf[-1]] = node[leaf[-1]].at[(0,) * node[leaf[-1]].ndim].set(jnp.nan)
    checkpoints.save(tmp_path / "nan", variables)
    out = tmp_path / "o"
    err = _one_line_error(capsys, lambda: cifar100_oneshot.main(
        [*DIGITS, "--dense-checkpoint", str(tmp_path / "nan"), "--out", str(out)]))
    assert f"{'/'.join(leaf)} holds 1 NaN/Inf" in err
    assert not out.exists()


def test_a_folder_that_is_not_a_checkpoint_is_refused_and_the_rerun_is_fresh(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    out = tmp_path / "o"
    err = _one_line_error(capsys, lambda: cifar100_oneshot.main(
        [*DIGITS, "--dense-checkpoint", str(tmp_path / "junk"), "--out", str(out)]))
    assert "no orbax checkpoint" in err and not out.exists()


# The data's fingerprint ------------------------------------------------------------------------


def test_the_fingerprint_tells_other_pixels_and_other_labels(tmp_path):
    make_cifar100(tmp_path / "a", seed=0)
    make_cifar100(tmp_path / "b", seed=0)
    same = datafp.fingerprint(load("cifar100", tmp_path / "a"))
    assert datafp.fingerprint(load("cifar100", tmp_path / "b")) == same
    train = tmp_path / "b" / "cifar-100-python" / "train"
    data = pickle.loads(train.read_bytes(), encoding="bytes")[b"data"]
    data[2, 5] ^= 1
    _rewrite(train, {b"data": data})
    other = datafp.fingerprint(load("cifar100", tmp_path / "b"))
    assert [k for k in same if same[k] != other[k]] == ["train_sample_sha256"]
    _rewrite(train, {b"fine_labels": [0, 1, 2, 3]})
    other = datafp.fingerprint(load("cifar100", tmp_path / "b"))
    assert {k for k in same if same[k] != other[k]} == {"train_sample_sha256",
                                                        "train_labels_sha256"}


def test_a_resume_on_other_data_is_refused_naming_what_differs(tmp_path, capsys):
    argv = [*DIGITS, "--out", str(tmp_path / "o")]
    data = datafp.fingerprint(load("digits"))
    outdir.start(pretrain.parse_args(argv), data)
    assert json.loads((tmp_path / "o" / "config.json").read_text())[outdir.DATA_KEY] == data
    other = {**data, "test_size": data["test_size"] - 1}
    err = _one_line_error(capsys, lambda: outdir.start(pretrain.parse_args([*argv, "--resume"]),
                                                       other))
    assert f"test_size was {data['test_size']}, now {data['test_size'] - 1}" in err
    assert "train_size" not in err
    outdir.start(pretrain.parse_args([*argv, "--resume"]), data)  # the same data: accepted


# A full disk ------------------------------------------------------------------------------------


def test_a_full_disk_is_recognised_with_its_file():
    assert edge.disk_full(OSError(errno.ENOSPC, "No space left on device", "/x/config.json")) == (
        errno.ENOSPC, "/x/config.json")
    ts = ValueError('OUT_OF_RANGE: Error writing "a/0" in OCDBT database at local file "/o/": '
                    'Failed writing: "/o/d/ab": Failed to write 9 bytes to file 8: File too '
                    "large [os_error_code='27']")
    assert edge.disk_full(RuntimeError("wrapped")) is None
    try:
        raise RuntimeError("orbax failed") from ts
    except RuntimeError as err:
        assert edge.disk_full(err) == (errno.EFBIG, "/o/d/ab")
    assert edge.disk_full(OSError(errno.EACCES, "Permission denied")) is None


def test_a_full_disk_in_main_is_one_line_and_exit_1(capsys):
    @edge.guarded
    def main() -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "/o/metrics.csv")

    err = _one_line_error(capsys, main, code=1)
    assert "could not write /o/metrics.csv: No space left on device" in err and "--resume" in err


def test_other_errors_pass_the_edge_unchanged():
    @edge.guarded
    def main() -> int:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        main()


# apply_masks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask, shape", [
    (np.ones((2, 64, 64), np.float32), "(2, 64, 64)"),   # the particles, not the masks
    (np.float32(0), "()"),                                # a scalar would wipe the layer
    (np.ones((64, 32), np.float32), "(64, 32)"),          # transposed
])
def test_apply_masks_refuses_a_mask_that_changes_its_parameter(mask, shape):
    params = {"layer": {"kernel": jnp.ones((32, 64))}}
    with pytest.raises(ValueError, match=rf"layer/kernel has shape {re.escape(shape)}"):
        apply_masks(params, {"layer": {"kernel": mask}})


def test_a_channel_mask_still_broadcasts():
    params = {"layer": {"kernel": jnp.ones((32, 64))}}
    out = apply_masks(params, {"layer": {"kernel": jnp.zeros((1, 64)).at[0, 3].set(1)}})
    assert out["layer"]["kernel"].shape == (32, 64) and float(out["layer"]["kernel"].sum()) == 32

