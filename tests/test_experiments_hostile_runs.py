"""Hostile conditions that need a run (issue 16): a full disk, a truncated checkpoint, a too-large
learning rate, other data on resume, a diverged SFPK simulation.

* A file-size limit (``RLIMIT_FSIZE``, what a full disk looks like to a
  writer) stops the run with one line naming the file, exit 1; ``--resume``
  once the limit is lifted ends bit-identical to an uninterrupted run.
* Resuming from a truncated checkpoint prints its one line and nothing of
  orbax's or asyncio's shutdown.
* NaN weights from a too-large ``--lr`` are never saved as the dense model
  nor mark the phase finished: ``--resume --lr <smaller>`` recovers, in
  ``experiments.pretrain`` and in the pretraining phase of the one-shot run.
* ``--resume`` on other data (same sizes, other pixels) is refused.
* A diverged SFPK simulation's advice works as given.
* "Not found" is the only line (no absl warning before it), which only a
  separate process shows (pytest captures log records itself).
* ``experiments.pretrain`` never checks ``--prune-batch-size`` (it never prunes).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from test_data_cifar import make_cifar10

from experiments import cifar100_oneshot, pretrain
from sfpk_jax.storage import checkpoint_files as checkpoints

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ["--dataset", "digits", "--model", "small_cnn", "--no-progress"]
# Below the size of one training checkpoint's data file of small_cnn (about 160 kB).
FILE_LIMIT = 100_000


# Runs a module under a file-size limit. Set in the child itself rather than
# through subprocess's preexec_fn: that forks the test process, where JAX's
# threads already run (JAX warns, and the suite turns warnings into errors).
# SIGXFSZ is ignored so that a write beyond the limit fails with EFBIG
# instead of killing the writer.
_LIMITED = ("import resource, runpy, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "limit = (int(sys.argv[1]), resource.RLIM_INFINITY)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, limit)\n"
            "sys.argv = sys.argv[2:]\n"
            "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")


def _run(module: str, *argv: str, file_limit: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = ["-c", _LIMITED, str(file_limit), module] if file_limit else ["-m", module]
    return subprocess.run([sys.executable, *start, *argv], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=600)


def _results(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    return {k: v for k, v in results.items() if not k.endswith("_seconds")}


def test_a_full_disk_is_one_line_and_resume_ends_bit_identical(tmp_path):
    flags = ["--smoke", "--no-progress"]
    whole = _run("experiments.cifar100_oneshot", *flags, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "cut"
    cut = _run("experiments.cifar100_oneshot", *flags, "--out", str(out), file_limit=FILE_LIMIT)
    assert cut.returncode == 1
    assert cut.stderr.startswith("error: could not write ") and cut.stderr.count("\n") == 1, (
        cut.stderr)
    assert str(out / "checkpoints") in cut.stderr and "--resume" in cut.stderr
    assert not (out / "results.json").exists()
    resumed = _run("experiments.cifar100_oneshot", *flags, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    expected, got = _results(tmp_path / "whole"), _results(out)
    assert got == expected and got["mask_digest"] == expected["mask_digest"]
    assert (out / "metrics.csv").read_text() == (tmp_path / "whole" / "metrics.csv").read_text()


def test_resuming_from_a_truncated_checkpoint_prints_one_error_line(tmp_path):
    out = tmp_path / "o"
    flags = ["--smoke", "--no-progress", "--epochs", "3", "--out", str(out)]
    assert _run("experiments.pretrain", *flags).returncode == 0
    (out / "results.json").unlink()  # as if killed after the last epoch's checkpoint
    for f in (out / "checkpoints" / "train-pretrain" / "3" / "state").rglob("d/*"):
        os.truncate(f, 10)
    resumed = _run("experiments.pretrain", *flags, "--resume")
    assert resumed.returncode == 2
    lines = resumed.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("resuming") and "truncated" in lines[1], (
        resumed.stderr)


def _finite(path: Path) -> bool:
    return all(np.isfinite(np.asarray(x)).all() for x in
               jax.tree_util.tree_leaves(checkpoints.restore(path)))


def _exit_code(call) -> int:
    with pytest.raises(SystemExit) as exc:
        call()
    return exc.value.code


def test_nan_weights_from_a_large_lr_are_never_saved_and_resume_recovers(tmp_path, capsys):
    out = tmp_path / "X"
    argv = [*DIGITS, "--epochs", "2", "--warmup-epochs", "1", "--momentum", "0.875",
            "--weight-decay", "0", "--batch-size", "32", "--out", str(out)]
    assert _exit_code(lambda: pretrain.main([*argv, "--lr", "1e4"])) == 2
    err = capsys.readouterr().err
    assert "non-finite model variables" in err and "--resume" in err
    assert not (out / "checkpoints" / "dense").exists() and not (out / "results.json").exists()
    assert pretrain.main([*argv, "--lr", "0.01", "--resume"]) == 0
    assert _finite(out / "checkpoints" / "dense")
    assert json.loads((out / "config.json").read_text())["lr"] == 0.01


def test_a_poisoned_pretraining_phase_of_the_oneshot_run_recovers(tmp_path, capsys):
    out = tmp_path / "Y"
    argv = [*DIGITS, "--pretrain-epochs", "2", "--epochs", "1", "--steps", "2", "--particles",
            "2", "--prune-batch-size", "16", "--batch-size", "32", "--out", str(out)]
    assert _exit_code(lambda: cifar100_oneshot.main([*argv, "--lr", "1e6"])) == 2
    assert "phase 'pretrain'" in capsys.readouterr().err
    assert cifar100_oneshot.main([*argv, "--lr", "0.01", "--resume"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert np.isfinite(results["dense_acc"]) and results["dense_acc"] > 0.3
    assert _finite(out / "checkpoints" / "dense")


def test_a_resume_on_other_pixels_is_refused(tmp_path, capsys):
    for name in ("A", "B"):
        make_cifar10(tmp_path / name, seed=0)
    batch = tmp_path / "B" / "cifar-10-batches-py" / "data_batch_1"
    content = pickle.loads(batch.read_bytes(), encoding="bytes")
    content[b"data"] = 255 - content[b"data"]  # other pixels, same labels and sizes
    batch.write_bytes(pickle.dumps(content, protocol=4))
    out = tmp_path / "o"
    argv = ["--dataset", "cifar10", "--model", "small_cnn", "--no-progress", "--epochs", "2",
            "--batch-size", "4", "--out", str(out)]
    assert pretrain.main([*argv, "--data-dir", str(tmp_path / "A")]) == 0
    (out / "results.json").unlink()  # as if killed before its results
    capsys.readouterr()
    assert _exit_code(lambda: pretrain.main(
        [*argv, "--data-dir", str(tmp_path / "B"), "--resume"])) == 2
    err = capsys.readouterr().err
    assert "the data differ" in err and "train_sample_sha256 was" in err, err
    # Moved, not changed: accepted.
    os.rename(tmp_path / "A", tmp_path / "A2")
    assert pretrain.main([*argv, "--data-dir", str(tmp_path / "A2"), "--resume"]) == 0


def test_the_advice_after_a_diverged_simulation_works(tmp_path, capsys):
    dense = tmp_path / "dense"
    assert pretrain.main([*DIGITS, "--smoke", "--epochs", "1", "--out", str(dense)]) == 0
    argv = [*DIGITS, "--smoke", "--dense-checkpoint", str(dense / "checkpoints" / "dense"),
            "--out", str(tmp_path / "o")]
    assert _exit_code(lambda: cifar100_oneshot.main([*argv, "--radius", "1e18"])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite and a smaller --radius" in err
    assert cifar100_oneshot.main([*argv, "--radius", "1.1", "--overwrite"]) == 0


def test_pretrain_does_not_check_the_prune_batch_size(tmp_path):
    # 512 > the 256 examples of --smoke, but pretraining never prunes.
    assert pretrain.main(["--smoke", "--no-progress", "--epochs", "1", "--prune-batch-size",
                          "512", "--out", str(tmp_path / "o")]) == 0


def test_dataset_not_found_is_the_only_line(tmp_path):
    done = _run("experiments.pretrain", "--dataset", "cifar100", "--data-dir", str(tmp_path),
                "--out", str(tmp_path / "o"))
    assert done.returncode == 2
    assert done.stderr.startswith("error: cifar100 not found") and done.stderr.count("\n") == 1, (
        done.stderr)
    assert not (tmp_path / "o").exists()


def _workers_of(pid: int) -> list[int]:
    """The SFPK worker processes (children running worker_main.py) of process ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            if parent == pid and b"worker_main.py" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_a_dead_worker_is_one_line_and_resume_under_loop_finishes(tmp_path):
    """A SFPK worker killed mid-run: one line naming it and saying --resume continues, exit 1,
    no traceback; the run then resumes under another execution (loop), which is announced."""
    out = tmp_path / "run"
    # Enough steps to kill a worker mid-run (they are checkpointed one by one), few enough
    # for the resume under loop to finish them quickly.
    flags = ["--smoke", "--no-progress", "--steps", "60", "--checkpoint-every", "1",
             "--out", str(out)]
    sim = out / "checkpoints" / "sfpk-sfpk-0.95-seed0-0"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen([sys.executable, "-m", "experiments.cifar100_oneshot", *flags,
                           "--particle-mode", "processes", "--particle-workers", "2"],
                          cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as run:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and run.poll() is None:
            steps = [int(p.name) for p in sim.glob("[0-9]*") if p.name.isdigit()]
            workers = _workers_of(run.pid)
            if workers and steps and max(steps) >= 2:
                os.kill(workers[0], signal.SIGKILL)
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the run ended before a worker could be killed: {run.communicate()}")
        _, err = run.communicate(timeout=300)
    assert run.returncode == 1, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: SFPK worker process 0 (pid {workers[0]}) died (exit code -9)")
    assert str(sim) in err and "--resume" in err
    assert not (out / "results.json").exists()
    resumed = _run("experiments.cifar100_oneshot", *flags, "--resume", "--particle-mode", "loop")
    assert resumed.returncode == 0, resumed.stderr
    assert "under another execution" in resumed.stdout, resumed.stdout
    changes = json.loads((out / "config.json").read_text())["resume_changes"]
    assert {"flag": "--particle-mode", "old": "processes", "new": "loop"} in changes
    assert json.loads((out / "results.json").read_text())["achieved_sparsity"] == pytest.approx(
        0.95, abs=1e-3)
