"""Exporting pruned models to safetensors and back (save_masked, load_masked)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_interop import FRAMEWORKS, _batches
from test_sparsity_report import _params

import sfpk_jax
from sfpk_jax.core.layers import trace_layers
from sfpk_jax.tools.export import load_masked, save_masked


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_export_round_trip(tmp_path, framework):
    params, loss_fn, _ = FRAMEWORKS[framework]()
    # Channel masks (with their layers, read off the loss) except on Linen: both kinds travel.
    layers = trace_layers(loss_fn, params, jax.tree.map(lambda x: x[0], next(_batches(1))))
    masks = sfpk_jax.magnitude_prune(params, 0.6, scope="local", prunable=layers,
                                     mask_dim="out" if framework != "linen" else None)
    path = tmp_path / "pruned.safetensors"
    save_masked(path, params, masks)
    fresh, _, _ = FRAMEWORKS[framework]()
    loaded, loaded_masks = load_masked(path, jax.tree.map(jnp.zeros_like, fresh))
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(params)
    jax.tree.map(np.testing.assert_array_equal, loaded, sfpk_jax.apply_masks(params, masks))
    jax.tree.map(np.testing.assert_array_equal, loaded_masks, masks)
    assert sfpk_jax.sparsity_of(loaded_masks, loaded) == sfpk_jax.sparsity_of(masks, params)


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
