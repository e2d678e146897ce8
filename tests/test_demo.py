"""The README's first run, at toy size: outputs, determinism, no silent overwrite."""

from __future__ import annotations

import json

import pytest

from experiments import demo

TINY = ["--sparsities", "0.9", "--pretrain-epochs", "2", "--retrain-epochs", "1",
        "--steps", "4", "--particles", "2", "--prune-batch-size", "32", "--no-progress"]


def test_demo_writes_results_and_is_deterministic(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    assert demo.main(["--out", str(first), *TINY]) == 0
    assert demo.main(["--out", str(second), *TINY]) == 0
    records = json.loads((first / "results.json").read_text())
    assert {r["pruner"] for r in records} == {"sfpk", "magnitude"}
    for r in records:
        assert set(r) >= {"pruner", "sparsity", "density", "acc_pruned", "acc_retrained"}
        assert r["density"] == pytest.approx(0.1, abs=1e-3)
        assert 0.0 <= r["acc_pruned"] <= 1.0 and 0.0 <= r["acc_retrained"] <= 1.0
    for name in ("accuracy_vs_sparsity.png", "sfpk_trace.png", "config.json"):
        assert (first / name).stat().st_size > 0
    strip = lambda rs: [{k: v for k, v in r.items() if k != "prune_seconds"} for r in rs]
    assert strip(records) == strip(json.loads((second / "results.json").read_text()))
    assert "acc_retrained" in capsys.readouterr().out


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
