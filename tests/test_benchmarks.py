"""The benchmark scripts run end to end at tiny sizes and print one JSON line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from benchmarks import conv_chunks, conv_speed, kth_smallest, particle_modes, sfpk_step

TINY = ["--model", "mlp", "--input-shape", "8,8,1", "--num-classes", "10",
        "--batch-size", "8", "--particles", "2", "--repeats", "1"]


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["loop", "vmap", "processes"])
def test_sfpk_step_tiny(capsys, mode):
    sfpk_step.main(TINY + ["--particle-mode", mode])
    report = _last_json(capsys)
    for key in ("step_s_median", "bare_s_median", "overhead", "peak_mb"):
        assert isinstance(report[key], float), key
    for key in ("step_s_median", "bare_s_median", "overhead"):
        assert report[key] > 0, key
    assert report["peak_mb"] >= 0
    assert report["backend"] == jax.default_backend()
    assert (report["particles"], report["batch_size"], report["particle_mode"]) == (2, 8, mode)
    assert len(report["step_s"]) == len(report["bare_s"]) == 1


def test_particle_modes_tiny(capsys):
    particle_modes.main(TINY + ["--modes", "loop,map:1"])
    report = _last_json(capsys)
    assert set(report["step_s_median"]) == {"loop", "map:1"}
    assert all(s > 0 for s in report["step_s_median"].values())
    assert report["fastest"] in ("loop", "map:1")


def test_kth_smallest_tiny(capsys):
    kth_smallest.main(["--sizes", "1000", "--repeats", "1"])
    report = _last_json(capsys)
    assert [row["size"] for row in report["rows"]] == [1000]
    assert report["rows"][0]["sort_ms"] > 0 and report["rows"][0]["bisection_ms"] > 0


def test_conv_speed_tiny(capsys):
    conv_speed.main(["--model", "small_cnn", "--input-shape", "8,8,1", "--num-classes", "10",
                     "--batch-size", "4", "--repeats", "1", "--variants", "lax,im2col"])
    report = _last_json(capsys)
    assert set(report["variants"]) == {"lax", "im2col"}
    assert all(v["wall_s_median"] > 0 for v in report["variants"].values())


@pytest.mark.parametrize("conv", sorted(conv_speed.CONVS))
@pytest.mark.parametrize("stride,padding,kernel", [(1, 1, 3), (2, 1, 3), (2, 0, 1), (1, "SAME", 3)])
def test_conv_variants_match_lax(conv, stride, padding, kernel):
    """The experimental convolutions equal lax's, values and gradients."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 9, 9, 3)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 4)), jnp.float32)
    pads = padding if isinstance(padding, str) else ((padding, padding), (padding, padding))
    ref = lambda x, k: lax.conv_general_dilated(
        x, k, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    got = lambda x, k: conv_speed.CONVS[conv](x, k, (stride, stride), pads)
    np.testing.assert_allclose(got(x, k), ref(x, k), rtol=1e-4, atol=1e-4)
    loss = lambda f: (lambda x, k: jnp.sum(jnp.sin(f(x, k))))
    for g_got, g_ref in zip(jax.grad(loss(got), (0, 1))(x, k), jax.grad(loss(ref), (0, 1))(x, k)):
        np.testing.assert_allclose(g_got, g_ref, rtol=1e-4, atol=1e-4)


def test_input_pipeline_tiny(capsys):
    from benchmarks import input_pipeline

    input_pipeline.main(["--tiny"])
    report = _last_json(capsys)
    for name in ("imagenet", "cifar"):
        assert set(report[name]) == {"0", "1", "2"}
        assert all(rate > 0 for rate in report[name].values()), report
        assert all(wait >= 0 for wait in report[f"{name}_wait_ms"].values())
    assert len(report["load_average"]) == 3 and report["jpeg_kb"] > 0


def test_conv_chunks_benchmark_runs_and_the_steps_agree(capsys):
    conv_chunks.main(["--model", "small_cnn", "--input-shape", "8,8,1", "--num-classes", "10",
                      "--batch-size", "8", "--chunk", "4", "--particles", "2", "--repeats", "1"])
    report = _last_json(capsys)
    assert report["chunk"] == 4 and report["plain_s_median"] > 0 and report["chunked_s_median"] > 0
    assert report["max_relative_gap"] < 1e-3
