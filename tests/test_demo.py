"""The README's first run, at toy size: outputs, determinism, logs, no silent overwrite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import demo

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--smoke", "--no-progress"]


def test_demo_writes_results_and_is_deterministic(tmp_path, capsys):
    """One run in this process, one as the README's command with its output captured."""
    first, second = tmp_path / "a", tmp_path / "b"
    assert demo.main(["--out", str(first), *TINY]) == 0
    assert "acc_retrained" in capsys.readouterr().out
    # Without --no-progress, but stdout is a pipe: plain lines, no bars.
    done = subprocess.run([sys.executable, "-m", "experiments.demo", "--smoke", "--out",
                           str(second)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr
    log = done.stdout + done.stderr
    assert "\r" not in log
    for line in ("dense: epoch 1/1, train loss", "SFPK 0.9: step 3/3, mean G",
                 "retrain sfpk 0.9: epoch 1/1", "retrain magnitude 0.9: epoch 1/1"):
        assert line in done.stdout, (line, log)
    records = json.loads((first / "results.json").read_text())
    assert {r["pruner"] for r in records} == {"sfpk", "magnitude"}
    for r in records:
        assert set(r) == {"pruner", "sparsity", "n_m", "achieved_sparsity", "dense_acc",
                          "acc_pruned", "acc_retrained", "prune_seconds"}
        assert r["achieved_sparsity"] == pytest.approx(0.9, abs=1e-3)
        assert 0.0 <= r["acc_pruned"] <= 1.0 and 0.0 <= r["acc_retrained"] <= 1.0
    assert records[0]["dense_acc"] == records[1]["dense_acc"]
    for name in ("accuracy_vs_sparsity.png", "sfpk_trace.png", "config.json"):
        assert (first / name).stat().st_size > 0
    config = json.loads((first / "config.json").read_text())
    assert config["smoke"] and config["sparsities"] == [0.9] and config["steps"] == 3
    assert config["environment"]["jax"]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "prune_seconds"} for r in rs]  # noqa: E731
    assert strip(records) == strip(json.loads((second / "results.json").read_text()))


def test_demo_refuses_to_overwrite_results(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("[]")
    assert demo.main(["--out", str(out), *TINY]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "results.json").read_text() == "[]"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sparsities", "1.2"], "--sparsities"),
        (["--sparsities", "x"], "--sparsities"),
        (["--steps", "0"], "--steps"),
        (["--radius", "0.5"], "--radius"),
    ],
)
def test_demo_rejects_bad_flags(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--out", str(tmp_path / "x"), *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
