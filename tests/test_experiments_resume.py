"""Runs repeat and resume bit for bit; damaged, missing or foreign checkpoints are clear errors.

Two runs of ``cifar100_oneshot --smoke`` (nothing else given) write the same
results.json and metrics.csv, timings aside.

The kill test runs the gradual experiment (dense pretraining, then two rounds
of SFPK and fine-tuning: every kind of checkpoint) at --smoke size in a
subprocess, SIGKILLs it at a random moment, resumes it (twice), and compares
everything it wrote with an uninterrupted run. Set SFPK_KILL_SEED to replay
one choice of kill moments.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import cifar100_oneshot, imagenet_iterative, pretrain
from experiments.harness import outdir, training
from sfpk_jax.storage import checkpoint_files as checkpoints

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ITERATIVE = ["--dataset", "digits", "--model", "small_cnn", "--pretrain-epochs", "1", "--smoke",
             "--no-progress", "--checkpoint-every", "1"]
# Moments at which to kill, in the order the run reaches them: a checkpoint
# folder appears, then a random delay (the kill may land mid-epoch, mid-SFPK
# or mid-save).
MILESTONES = ["checkpoints/train-pretrain/1", "checkpoints/sfpk-round1/1",
              "checkpoints/prune-round1/0", "checkpoints/train-round1/1",
              "checkpoints/sfpk-round2/2", "checkpoints/train-round2/1"]
TIMING = {"prune_seconds", "retrain_seconds", "train_seconds"}


def _env(cache: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # A shared compilation cache makes the later processes start faster; the
    # cached programs are the ones compiled, so results do not change.
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PLATFORMS="cpu")
    return env


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "experiments.imagenet_iterative", *ITERATIVE, "--out", str(out),
            *extra]


def _run(out: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(out, *extra), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _run_and_kill(out: Path, env: dict, milestone: str, delay: float, *extra: str) -> bool:
    """Starts the run, SIGKILLs it ``delay`` s after ``milestone`` appears; False if it ended first."""
    with open(out.parent / f"{out.name}.log", "a") as log:
        proc = subprocess.Popen(_command(out, *extra), cwd=ROOT, env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 300
            while not (out / milestone).exists() and proc.poll() is None:
                assert time.monotonic() < deadline, "the run never reached " + milestone
                time.sleep(0.01)
            time.sleep(delay)
            if proc.poll() is not None:
                return False
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _without_timing(obj):
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def _digest(path: Path) -> str:
    return checkpoints.tree_digest(checkpoints.restore(path))


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """An uninterrupted run and one killed twice and resumed twice."""
    root = tmp_path_factory.mktemp("resume")
    env = _env(root / "jax-cache")
    reference = root / "reference"
    # The uninterrupted run goes alongside the first interrupted one (2 cores).
    with open(root / "reference.log", "w") as log:
        uninterrupted = subprocess.Popen(_command(reference), cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
        try:
            seed = int(os.environ.get("SFPK_KILL_SEED", random.randrange(10**6)))
            rng = random.Random(seed)
            first = rng.randrange(len(MILESTONES) - 1)
            second = rng.randrange(first + 1, len(MILESTONES))
            kills = [(MILESTONES[first], rng.uniform(0.0, 0.4)),
                     (MILESTONES[second], rng.uniform(0.0, 0.4))]
            interrupted = root / "interrupted"
            killed = [_run_and_kill(interrupted, env, *kills[0])]
            assert uninterrupted.wait(timeout=300) == 0, (root / "reference.log").read_text()[-3000:]
        finally:
            if uninterrupted.poll() is None:
                uninterrupted.kill()
                uninterrupted.wait()
    killed.append(_run_and_kill(interrupted, env, *kills[1], "--resume"))
    resumed = _run(interrupted, env, "--resume")
    about = f"SFPK_KILL_SEED={seed}, kills {kills} (landed: {killed})"
    log = (root / "interrupted.log").read_text()[-3000:]
    assert resumed.returncode == 0, f"{about}\n{log}\n{resumed.stderr[-3000:]}"
    assert killed[0], about  # the first kill always lands before the end
    return reference, interrupted, about


def test_killed_and_resumed_run_equals_an_uninterrupted_one(runs_dir):
    reference, resumed, about = runs_dir
    ref_results = json.loads((reference / "results.json").read_text())
    assert _without_timing(json.loads((resumed / "results.json").read_text())) == \
        _without_timing(ref_results), about
    assert (resumed / "metrics.csv").read_text() == (reference / "metrics.csv").read_text(), about
    ref_config = json.loads((reference / "config.json").read_text())
    config = json.loads((resumed / "config.json").read_text())
    # The environment is a record of where each ran (a commit may land between them).
    assert {k: v for k, v in config.items() if k not in ("out", "environment")} == \
        {k: v for k, v in ref_config.items() if k not in ("out", "environment")}, about
    for name in ("dense", "round1", "round2", "final"):
        assert _digest(resumed / "checkpoints" / name) == \
            _digest(reference / "checkpoints" / name), f"{name}: {about}"
    with (resumed / "metrics.csv").open() as f:
        assert [r["phase"] for r in csv.DictReader(f)] == \
            ["pretrain", "round1", "round2", "round2"]


def _interrupted_copy(reference: Path, tmp_path: Path) -> Path:
    """A finished run turned back into an interrupted one (results.json removed)."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "results.json").unlink()
    return out


def _resume_in_process(out: Path, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        imagenet_iterative.main([*ITERATIVE, "--out", str(out), "--resume"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_smoke_alone_runs_on_digits_and_two_runs_write_the_same_files(tmp_path, capsys):
    """``--smoke`` and nothing else; the same machine and flags give the same results."""
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        assert cifar100_oneshot.main(["--smoke", "--no-progress", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    # --no-progress: one plain line per epoch and per 10 SFPK steps (and the last), no bars.
    for line in ("pretrain: epoch 1/1, train loss", "retrain: epoch 2/2, train loss",
                 "SFPK sfpk-sfpk-0.95-seed0-0: step 3/3, mean G"):
        assert log.count(line) == 2, (line, log)
    assert "\r" not in log
    config = json.loads((first / "config.json").read_text())
    # What --smoke chose is recorded: the values the run used.
    assert {k: config[k] for k in ("dataset", "model", "pretrain_epochs", "epochs", "steps",
                                   "particles", "batch_size", "prune_batch_size")} == {
        "dataset": "digits", "model": "small_cnn", "pretrain_epochs": 1, "epochs": 2, "steps": 3,
        "particles": 2, "batch_size": 32, "prune_batch_size": 16}
    environment = config.pop("environment")
    assert {"python", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "git_commit",
            "backend", "devices", "cpu"} <= set(environment)
    again = json.loads((second / "config.json").read_text())
    del again["environment"]
    assert {**config, "out": None} == {**again, "out": None}
    results = [json.loads((out / "results.json").read_text()) for out in (first, second)]
    assert _without_timing(results[0]) == _without_timing(results[1])
    assert (first / "metrics.csv").read_text() == (second / "metrics.csv").read_text()


def test_truncated_checkpoint_is_a_clear_error(runs_dir, tmp_path, capsys):
    out = _interrupted_copy(runs_dir[0], tmp_path)
    step = out / "checkpoints" / "train-pretrain" / "1"
    for f in step.rglob("*"):
        if f.is_file() and f.stat().st_size > 64:
            with f.open("r+b") as fh:
                fh.truncate(f.stat().st_size // 2)
    err = _resume_in_process(out, capsys)
    assert str(step) in err and "--overwrite" in err
    assert not (out / "results.json").exists()


def test_missing_checkpoint_is_a_clear_error(runs_dir, tmp_path, capsys):
    out = _interrupted_copy(runs_dir[0], tmp_path)
    shutil.rmtree(out / "checkpoints" / "train-pretrain")
    err = _resume_in_process(out, capsys)
    assert "'pretrain'" in err and "missing" in err and "--overwrite" in err


def test_checkpoint_of_another_model_is_a_clear_error(runs_dir, tmp_path, capsys):
    # Same flags, but the pretraining checkpoint now holds other weights.
    out = _interrupted_copy(runs_dir[0], tmp_path)
    ours = out / "checkpoints" / "train-round1"
    shutil.rmtree(ours)
    shutil.copytree(out / "checkpoints" / "train-round2", ours)
    err = _resume_in_process(out, capsys)
    assert "not from this run" in err and "phase: checkpoint 'round2', now 'round1'" in err


def test_diverged_epoch_resumes_with_a_smaller_lr(tmp_path, capsys, monkeypatch):
    """A NaN stops with one line naming epoch and step, the last good epoch checkpointed;
    --resume with a smaller --lr continues from it (the change is recorded)."""
    out = tmp_path / "dense"
    argv = ["--dataset", "digits", "--model", "small_cnn", "--smoke", "--no-progress",
            "--out", str(out)]
    real = training.train_epoch

    def nan_in_epoch_2(*args, epoch, **kwargs):
        if epoch == 2:
            raise FloatingPointError(f"non-finite loss (nan) at epoch {epoch}, step 3: try a "
                                     "smaller learning rate")
        return real(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(training, "train_epoch", nan_in_epoch_2)
    with pytest.raises(SystemExit) as exc:
        pretrain.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "epoch 2, step 3" in err and "--resume" in err
    step1 = out / "checkpoints" / "train-pretrain" / "1"
    assert str(step1) in err and step1.is_dir() and not (out / "results.json").exists()

    monkeypatch.setattr(training, "train_epoch", real)
    assert pretrain.main([*argv, "--resume", "--lr", "0.01"]) == 0
    err = capsys.readouterr().err
    assert "--lr=0.01" in err and "warning" in err
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == 0.01
    assert config[outdir.RESUME_LOG] == [{"flag": "--lr", "old": 0.1, "new": 0.01}]
    with (out / "metrics.csv").open() as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]


def test_real_nan_names_epoch_and_step(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        pretrain.main(["--dataset", "digits", "--model", "small_cnn", "--smoke", "--no-progress",
                       "--lr", "1e30", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "epoch 1, step" in err and "smaller --lr" in err
