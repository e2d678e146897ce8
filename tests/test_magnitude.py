"""Magnitude pruning keeps the largest |theta|, with the exact count."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sfpk_jax


def _params(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        "Conv_0": {"kernel": jax.random.normal(k1, (3, 3, 2, 4))},
        "Dense_0": {"kernel": jax.random.normal(k2, (36, 5)), "bias": jax.random.normal(k3, (5,))},
        "BatchNorm_0": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
    }


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
def test_global_magnitude_keeps_largest_exactly(sparsity):
    params = _params()
    masks = sfpk_jax.magnitude_prune(params, sparsity)
    layout = sfpk_jax.core.masks.MaskLayout.from_params(params)
    values = np.concatenate([np.abs(np.ravel(t)) for t in layout.gather(params)])
    kept = np.concatenate([np.ravel(m) for m in layout.gather(masks)]).astype(bool)
    assert kept.sum() == layout.total - math.floor(sparsity * layout.total)
    assert values[kept].min() > values[~kept].max()
    assert masks["BatchNorm_0"]["scale"] is None


def test_local_magnitude_prunes_every_layer_alike():
    params = _params(1)
    masks = sfpk_jax.magnitude_prune(params, 0.75, scope="local")
    layout = sfpk_jax.core.masks.MaskLayout.from_params(params)
    for m, size in zip(layout.gather(masks), layout.sizes):
        assert int(m.sum()) == size - math.floor(0.75 * size)


def test_magnitude_ignores_everything_but_the_weights():
    params = _params(2)
    a = sfpk_jax.magnitude_prune(params, 0.8)
    b = sfpk_jax.magnitude_prune(jax.tree.map(lambda x: -x, params), 0.8)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, 2.0])
def test_magnitude_rejects_bad_sparsity(bad):
    with pytest.raises(ValueError, match="sparsity"):
        sfpk_jax.magnitude_prune(_params(), bad)


def test_magnitude_rejects_bad_scope():
    with pytest.raises(ValueError, match="scope"):
        sfpk_jax.magnitude_prune(_params(), 0.5, scope="layer")
