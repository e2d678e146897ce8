"""Retraining SIGKILLed mid-epoch resumes at the step it reached, bit for bit.

``cifar100_oneshot --smoke`` on the digits with small batches (32 steps per
epoch) and a checkpoint every 4 steps: a run is killed as soon as the
checkpoint of step 4 of the second retraining epoch appears, then resumed;
its results, metrics and final weights must equal an uninterrupted run's, and
the resumed process must have continued inside that epoch (grain iterator
state restored), not from the epoch's start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sfpk_jax.storage import checkpoint_files as checkpoints

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--smoke", "--dataset", "digits", "--model", "small_cnn", "--batch-size", "8",
        "--checkpoint-steps", "4", "--no-progress"]
STEPS_PER_EPOCH = 256 // 8
# Step 4 of retraining epoch 2, numbered by global step.
MILESTONE = f"checkpoints/train-retrain-steps/{STEPS_PER_EPOCH + 4}"
TIMING = {"prune_seconds", "retrain_seconds", "train_seconds"}


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "experiments.cifar100_oneshot", *ARGS, "--out", str(out), *extra]


def _env(cache: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
                JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _results(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    return {k: v for k, v in results.items() if k not in TIMING}


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    env = _env(tmp_path / "jax-cache")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = subprocess.run(_command(reference), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(_command(killed), cwd=ROOT, env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 600
            while not (killed / MILESTONE).exists():
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the run never reached " + MILESTONE
                time.sleep(0.005)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # Killed inside the epoch: its end was never checkpointed.
    assert not (killed / "checkpoints" / "train-retrain" / "2").exists()
    assert not (killed / "results.json").exists()

    resumed = subprocess.run(_command(killed, "--resume"), cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step = int(resumed.stdout.split("retrain: resuming epoch 2 at step ")[1].split()[0])
    assert 4 <= step < STEPS_PER_EPOCH
    assert _results(killed) == _results(reference)
    assert (killed / "metrics.csv").read_text() == (reference / "metrics.csv").read_text()
    final = [checkpoints.tree_digest(checkpoints.restore(out / "checkpoints" / "final"))
             for out in (reference, killed)]
    assert final[0] == final[1]
