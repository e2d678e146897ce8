"""The per-layer sparsity report: every masked layer and the total."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import flax_axes

import sfpk_jax
from sfpk_jax.tools.sparsity_report import sparsity_report


def _params():
    rng = np.random.default_rng(0)
    return {"Conv_0": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32),
                       "bias": jnp.zeros(4)},
            "Dense_0": {"kernel": jnp.asarray(rng.standard_normal((16, 5)), jnp.float32),
                        "bias": jnp.asarray(rng.standard_normal(5), jnp.float32)}}


def test_report_counts_every_layer_and_the_total():
    params = _params()
    masks = sfpk_jax.magnitude_prune(params, 0.75)
    report = sparsity_report(masks, params)
    assert [r.path for r in report.layers] == ["Conv_0/kernel", "Dense_0/bias", "Dense_0/kernel"]
    for row, m in zip(report.layers, [masks["Conv_0"]["kernel"], masks["Dense_0"]["bias"],
                                      masks["Dense_0"]["kernel"]]):
        assert row.weights == m.size and row.kept == int(np.sum(m))
        assert row.sparsity == (row.weights - row.kept) / row.weights
    assert report.weights == 72 + 5 + 80
    assert report.kept == report.weights - int(0.75 * report.weights)
    assert report.sparsity == sfpk_jax.sparsity_of(masks)
    table = report.table()
    assert "Conv_0/kernel" in table and "3x3x2x4" in table and table.splitlines()[-1].startswith("total")
    assert report.as_dict()["layers"][0]["shape"] == [3, 3, 2, 4]


def test_report_counts_the_weights_a_channel_mask_covers():
    params = _params()
    masks = sfpk_jax.magnitude_prune(params, 0.5, scope="local", mask_dim="out",
                                     prunable=flax_axes)
    conv = {row.path: row for row in sparsity_report(masks, params).layers}["Conv_0/kernel"]
    assert conv.mask_shape == (1, 1, 1, 4) and conv.weights == 72
    assert conv.kept == 18 * int(np.sum(masks["Conv_0"]["kernel"]))
    assert conv.sparsity == sfpk_jax.sparsity_of({"k": masks["Conv_0"]["kernel"]})


def test_report_names_a_mask_that_does_not_fit():
    params = _params()
    masks = sfpk_jax.magnitude_prune(params, 0.5)
    masks["Dense_0"]["kernel"] = masks["Dense_0"]["kernel"].T
    with pytest.raises(ValueError, match="Dense_0/kernel"):
        sparsity_report(masks, params)




