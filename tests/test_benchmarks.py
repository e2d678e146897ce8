"""The benchmark scripts run end to end at tiny sizes and print one JSON line."""

import json

import jax
import pytest

from benchmarks import sfpk_step

pytestmark = pytest.mark.slow

TINY = ["--model", "mlp", "--input-shape", "8,8,1", "--num-classes", "10",
        "--batch-size", "8", "--particles", "2", "--repeats", "1"]


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["auto", "loop", "vmap", "processes"])
def test_sfpk_step_tiny(capsys, mode):
    sfpk_step.main(TINY + ["--particle-mode", mode])
    report = _last_json(capsys)
    assert report["requested"] == {"particle_mode": mode, "conv_chunk": "auto"}
    if mode == "auto":  # a tiny run: no worker processes
        assert report["auto_reason"] and report["particle_mode"] == "loop"
        mode = "loop"
    for key in ("step_s_median", "bare_s_median", "overhead", "peak_mb"):
        assert isinstance(report[key], float), key
    for key in ("step_s_median", "bare_s_median", "overhead"):
        assert report[key] > 0, key
    assert report["peak_mb"] >= 0
    assert report["backend"] == jax.default_backend()
    assert (report["particles"], report["batch_size"], report["particle_mode"]) == (2, 8, mode)
    assert len(report["step_s"]) == len(report["bare_s"]) == 1


def test_input_pipeline_tiny(capsys):
    from benchmarks import input_pipeline

    input_pipeline.main(["--tiny"])
    report = _last_json(capsys)
    for name in ("imagenet", "cifar"):
        assert set(report[name]) == {"0", "1", "2"}
        assert all(rate > 0 for rate in report[name].values()), report
        assert all(wait >= 0 for wait in report[f"{name}_wait_ms"].values())
    assert len(report["load_average"]) == 3 and report["jpeg_kb"] > 0
