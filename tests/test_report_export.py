"""The per-layer density report, and exporting pruned models to safetensors and back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_frameworks import FRAMEWORKS

import sfpk_jax
from sfpk_jax.tools.export import load_masked, save_masked
from sfpk_jax.tools.report import density_report


def _params():
    rng = np.random.default_rng(0)
    return {"Conv_0": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32),
                       "bias": jnp.zeros(4)},
            "Dense_0": {"kernel": jnp.asarray(rng.standard_normal((16, 5)), jnp.float32),
                        "bias": jnp.asarray(rng.standard_normal(5), jnp.float32)}}


def test_report_counts_every_layer_and_the_total():
    params = _params()
    masks = sfpk_jax.magnitude_prune(params, 0.75)
    report = density_report(masks, params)
    assert [r.path for r in report.layers] == ["Conv_0/kernel", "Dense_0/bias", "Dense_0/kernel"]
    for row, m in zip(report.layers, [masks["Conv_0"]["kernel"], masks["Dense_0"]["bias"],
                                      masks["Dense_0"]["kernel"]]):
        assert row.weights == m.size and row.kept == int(np.sum(m))
        assert row.density == row.kept / row.weights
    assert report.weights == 72 + 5 + 80
    assert report.kept == report.weights - int(0.75 * report.weights)
    assert report.density == sfpk_jax.density(masks)
    table = report.table()
    assert "Conv_0/kernel" in table and "3x3x2x4" in table and table.splitlines()[-1].startswith("total")
    assert report.as_dict()["layers"][0]["shape"] == [3, 3, 2, 4]


def test_report_counts_the_weights_a_channel_mask_covers():
    params = _params()
    masks = sfpk_jax.magnitude_prune(params, 0.5, scope="local", mask_dim="out")
    conv = density_report(masks, params).layers[0]
    assert conv.mask_shape == (1, 1, 1, 4) and conv.weights == 72
    assert conv.kept == 18 * int(np.sum(masks["Conv_0"]["kernel"]))
    assert conv.density == sfpk_jax.density({"k": masks["Conv_0"]["kernel"]})


def test_report_names_a_mask_that_does_not_fit():
    params = _params()
    masks = sfpk_jax.magnitude_prune(params, 0.5)
    masks["Dense_0"]["kernel"] = masks["Dense_0"]["kernel"].T
    with pytest.raises(ValueError, match="Dense_0/kernel"):
        density_report(masks, params)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_export_round_trip(tmp_path, framework):
    params, _, _ = FRAMEWORKS[framework]()
    masks = sfpk_jax.magnitude_prune(params, 0.6, scope="local",
                                     mask_dim="out" if framework != "linen" else None)
    path = tmp_path / "pruned.safetensors"
    save_masked(path, params, masks)
    fresh, _, _ = FRAMEWORKS[framework]()
    loaded, loaded_masks = load_masked(path, jax.tree.map(jnp.zeros_like, fresh))
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(params)
    jax.tree.map(np.testing.assert_array_equal, loaded, sfpk_jax.apply_masks(params, masks))
    jax.tree.map(np.testing.assert_array_equal, loaded_masks, masks)
    assert sfpk_jax.density(loaded_masks, loaded) == sfpk_jax.density(masks, params)


def test_export_refuses_overwrite_nonfinite_and_foreign_files(tmp_path):
    params = _params()
    masks = sfpk_jax.magnitude_prune(params, 0.5)
    path = tmp_path / "m.safetensors"
    save_masked(path, params, masks)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_masked(path, params, masks)
    bad = {**params, "Dense_0": {**params["Dense_0"], "bias": params["Dense_0"]["bias"].at[0].set(jnp.nan)}}
    with pytest.raises(ValueError, match="Dense_0/bias.*NaN"):
        save_masked(path, bad, masks, overwrite=True)
    assert path.read_bytes() == before  # nothing already written is lost
    other = {"Dense_0": {"kernel": jnp.zeros((16, 5))}}
    with pytest.raises(ValueError, match="Conv_0/kernel|does not have"):
        load_masked(path, other)
    wrong = jax.tree.map(lambda x: jnp.zeros(x.shape + (1,)), params)
    with pytest.raises(ValueError, match=r"Conv_0/bias.*float32\[4\].*float32\[4, 1\]"):
        load_masked(path, wrong)
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_masked(garbage, params)
