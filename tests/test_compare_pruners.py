"""The pruner comparison benchmark runs end to end at smoke size (so it doesn't rot)."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from benchmarks import compare_pruners
from experiments.harness import pruning

pytestmark = pytest.mark.slow


def test_compare_pruners_smoke(tmp_path):
    out = tmp_path / "cmp"
    # --smoke keeps the lists given (its own would be one seed at 90%).
    assert compare_pruners.main(["--out", str(out), "--smoke", "--sparsities", "0.9,0.95",
                                 "--seeds", "0,1", "--pruners", "sfpk,snip",
                                 "--no-progress"]) == 0
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 2 * 2 * 2
    assert all(0 <= r["dense_acc"] <= 1 for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert {(r["pruner"], r["sparsity"]) for r in summary["rows"]} == {
        (p, s) for p in ("sfpk", "snip") for s in (0.9, 0.95)}
    assert all(r["seeds"] == 2 for r in summary["rows"])
    for r in records:
        assert r["achieved_sparsity"] == pytest.approx(r["sparsity"], abs=2e-3)
    table = (out / "table.md").read_text()
    assert "| sfpk | 95% |" in table
    assert (out / "accuracy_vs_sparsity.png").stat().st_size > 0


def test_compare_pruners_rejects_unknown_pruner(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        compare_pruners.main(["--out", str(tmp_path / "x"), "--pruners", "sfpk,oracle"])
    assert exc.value.code == 2
    assert "oracle" in capsys.readouterr().err


def test_synflow_iterations_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        compare_pruners.parse_args(["--out", str(tmp_path / "x"), "--synflow-iterations", "0"])
    assert exc.value.code == 2
    assert "--synflow-iterations=0" in capsys.readouterr().err
    assert compare_pruners.parse_args(["--out", str(tmp_path / "x")]).synflow_iterations == 1


def test_synflow_iterations_reach_synflow_only(monkeypatch):
    seen = {}
    params = {"Dense_0": {"kernel": np.ones((4, 4), np.float32)}}
    removed = {"Dense_0": {"kernel": np.zeros((4, 4), np.float32)}}  # more than asked: fine
    monkeypatch.setattr(pruning, "prune", lambda method, *a, **kw: seen.setdefault(method, kw)
                        and types.SimpleNamespace(masks=removed))
    args = types.SimpleNamespace(pruner="synflow", synflow_iterations=5, scope="global", seed=0,
                                 mask_dim=None)
    bundle = types.SimpleNamespace(image_shape=(8, 8, 1))
    pruning._prune(args, bundle, None, {"params": params}, 0.9, None, 0, "x")
    assert seen["synflow"]["iterations"] == 5
    rows = [{"pruner": "synflow", "sparsity": 0.9, "acc_pruned": 0.5, "acc_pruned_std": 0.0,
             "acc_retrained": 0.6, "acc_retrained_std": 0.0, "prune_seconds": 1.0}]
    assert "| synflow (5 rounds) | 90% |" in compare_pruners.markdown(rows, [0.9], 5)
