"""``cifar100_oneshot --smoke`` over 2 processes x 2 CPU devices (gloo) against 1 process x 4.

The processes split SFPK's particles over the particle mesh and retrain
data-parallel, each reading its half of every batch. Their results.json must
be that of one process with 4 devices: masks exactly (``mask_digest``),
accuracies within 2 test examples of 128 (the processes only reorder
floating-point sums, which can flip an example whose logits are near a tie).
Both runs start from the same dense model file, so pruning sees the same
weights. A run whose process 1 is SIGKILLed mid-retraining, relaunched with
``--resume``, ends with the uninterrupted run's results.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest
from test_experiments import _cifar100_python

from experiments import cifar100_oneshot
from experiments.harness import build_model, open_data
from sfpk_jax.storage import checkpoint_files as checkpoints

pytestmark = pytest.mark.slow

ROOT = str(Path(__file__).resolve().parents[1])
TIMINGS = {"prune_seconds", "retrain_seconds"}
ACC_TOLERANCE = 2 / 128  # two of --smoke's 128 test examples
ACCS = ("final_acc", "mean_last5_acc", "best_acc", "dense_acc", "acc_pruned")
# 8 steps an epoch at --smoke's batch 32: checkpoints within the epoch to kill between.
FLAGS = ["--smoke", "--no-progress", "--particle-mode", "shard", "--checkpoint-steps", "2"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}


def _command(argv: list[str]) -> list[str]:
    return [sys.executable, "-W", "error", "-m", "experiments.cifar100_oneshot", *argv]


def _start(argv: list[str], processes: int = 2) -> list[subprocess.Popen]:
    """One process per (simulated) host, 2 CPU devices each."""
    port = str(_port())
    return [subprocess.Popen(
        _command([*argv, "--num-processes", str(processes), "--process-id", str(p),
                  "--coordinator-address", f"127.0.0.1:{port}"]),
        env=_env(2), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for p in range(processes)]


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    try:
        logs = [proc.communicate(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    return [(proc.returncode, out, err) for proc, (out, err) in zip(procs, logs)]


def _ok(runs) -> None:
    for code, _, err in runs:
        assert code == 0, err[-4000:]


def _results(out: Path) -> dict:
    return {k: v for k, v in json.loads((out / "results.json").read_text()).items()
            if k not in TIMINGS}


def _dense(data: str, folder: Path) -> list[str]:
    """The data flags, after saving a fresh small_cnn for them as the dense model file."""
    flags = ["--data-dir", str(_cifar100_python(folder / "cifar"))] if data == "cifar" else []
    args = argparse.Namespace(dataset="cifar100" if flags else "digits",
                              data_dir=flags[1] if flags else None, smoke=True, batch_size=32,
                              prune_batch_size=16, model="small_cnn", seed=0, mask_dim=None,
                              conv_chunk=0)
    _, variables = build_model(args, open_data(args))
    path = folder / "dense"
    checkpoints.save(path, jax.device_get(variables))
    return [*flags, "--dense-checkpoint", str(path)]


@pytest.fixture(scope="module", params=["cifar"])
def runs(request, tmp_path_factory):
    """``(flags, out of 2 processes, out of 1 process with 4 devices)`` for one dataset.

    CIFAR-100 from files on disk: each process reads its share of the batches through
    grain (the in-memory digits take the same sharded loader, so one dataset is enough).
    """
    folder = tmp_path_factory.mktemp(request.param)
    flags = [*FLAGS, *_dense(request.param, folder)]
    two, one = folder / "two", folder / "one"
    _ok(_finish(_start([*flags, "--out", str(two)])))
    single = subprocess.run(_command([*flags, "--data-parallel", "--out", str(one)]), env=_env(4),
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-4000:]
    return flags, two, one


def test_two_processes_give_the_results_of_one(runs):
    _, two, one = runs
    many, single = _results(two), _results(one)
    assert many["mask_digest"] == single["mask_digest"]
    assert many["sparsity_per_layer"] == single["sparsity_per_layer"]
    for key in ACCS:
        assert many[key] == pytest.approx(single[key], abs=ACC_TOLERANCE), key
    # Process 0 alone wrote the outputs; both took part in the orbax checkpoints.
    config = json.loads((two / "config.json").read_text())
    assert config["num_processes"] == 2 and config["process_id"] == 0
    assert (two / "checkpoints" / "final").is_dir() and (two / "metrics.csv").is_file()


def test_a_killed_process_resumes_to_the_same_results(runs, tmp_path):
    flags, two, _ = runs
    out = tmp_path / "killed"
    procs = _start([*flags, "--out", str(out)])
    steps = out / "checkpoints" / "train-retrain-steps"
    deadline = time.monotonic() + 240
    while not any(p.name.isdigit() for p in (steps.iterdir() if steps.is_dir() else [])):
        assert time.monotonic() < deadline and procs[1].poll() is None, "no retraining checkpoint"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    try:  # process 0 fails at its next collective, then waits out the heartbeat timeout
        procs[0].wait(timeout=3)
    except subprocess.TimeoutExpired:
        procs[0].send_signal(signal.SIGKILL)
    _finish(procs)
    assert not (out / "results.json").exists()
    resumed = _finish(_start([*flags, "--out", str(out), "--resume"]))
    _ok(resumed)
    assert "resuming the run" in resumed[0][2]
    assert _results(out) == _results(two)


def test_bad_launch_settings_stop_every_process_in_one_line(tmp_path):
    runs = _finish(_start([*FLAGS, "--particles", "3", "--out", str(tmp_path / "odd")]))
    for code, _, err in runs:
        assert code == 2
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert lines == ["error: --particles=3 is not allowed: expected a multiple of the 2 "
                         "processes (--num-processes): each process's devices take an equal "
                         "share"], err[-2000:]
    assert not (tmp_path / "odd").exists()


@pytest.mark.parametrize("flags, shown", [
    (["--num-processes", "2"], "--coordinator-address=None is not allowed: --num-processes=2 "
                               "needs HOST:PORT of process 0"),
    (["--num-processes", "2", "--process-id", "2", "--coordinator-address", "127.0.0.1:1"],
     "--process-id=2 is not allowed: expected an integer in [0, 1]"),
    (["--num-processes", "0"], "--num-processes=0 is not allowed: expected an integer >= 1"),
])
def test_launch_flags_are_checked_before_anything_starts(tmp_path, capsys, flags, shown):
    with pytest.raises(SystemExit) as stop:
        cifar100_oneshot.main([*FLAGS, *flags, "--out", str(tmp_path / "run")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {shown}") and "\n" not in err
    assert not (tmp_path / "run").exists()
