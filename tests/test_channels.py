"""Channel (structured) masks: shapes, node-size weighting, and a full SFPK run."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import flax_axes

import sfpk_jax
from sfpk_jax.core import functional, voting
from sfpk_jax.core import repulsion as repulsion_lib
from sfpk_jax.core.masks import MaskLayout

pytestmark = pytest.mark.slow


def _params():
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "Conv_0": {"kernel": jax.random.normal(k[0], (3, 3, 2, 4))},
        "Dense_0": {"kernel": jax.random.normal(k[1], (4, 5)), "bias": jax.random.normal(k[2], (5,))},
    }


@pytest.mark.parametrize("mask_dim, conv, dense", [
    (None, (3, 3, 2, 4), (4, 5)),
    ("out", (1, 1, 1, 4), (1, 5)),
    ("in", (1, 1, 2, 1), (4, 1)),
])
def test_mask_shapes_broadcast_over_kernels(mask_dim, conv, dense):
    layout = MaskLayout.from_params(_params(), flax_axes, mask_dim=mask_dim)
    shapes = dict(zip(layout.paths, layout.mask_shapes))
    # Under "out" the bias follows its kernel's channels: no prunable leaf of its own.
    bias = {} if mask_dim == "out" else {"Dense_0/bias": (5,)}
    assert shapes == {"Conv_0/kernel": conv, "Dense_0/kernel": dense, **bias}
    nodes = dict(zip(layout.paths, layout.node_sizes))
    assert nodes["Conv_0/kernel"] == 72 // int(np.prod(conv))
    assert nodes.get("Dense_0/bias", 1) == 1
    masks = sfpk_jax.core.masks.ones_like_masks(_params(), flax_axes, mask_dim=mask_dim)
    masked = sfpk_jax.apply_masks(_params(), masks)
    assert jax.tree.map(jnp.shape, masked) == jax.tree.map(jnp.shape, _params())


def test_unknown_mask_dim_is_rejected():
    with pytest.raises(ValueError, match="mask_dim"):
        MaskLayout.from_params(_params(), mask_dim="channels")
    with pytest.raises(ValueError, match="mask_dim"):
        sfpk_jax.SFPKConfig(mask_dim="rows", scope="local")
    with pytest.raises(ValueError, match="scope='local'"):
        sfpk_jax.SFPKConfig(mask_dim="out")


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_channel_sparsity_equals_sparsity_of_the_expanded_mask(kind):
    params = _params()
    layout = MaskLayout.from_params(params, flax_axes, mask_dim="out")
    rng = np.random.default_rng(0)
    mask = [jnp.asarray(rng.uniform(size=s), jnp.float32) for s in layout.mask_shapes]
    expanded = [jnp.broadcast_to(m, s) for m, s in zip(mask, layout.shapes)]
    for scope in ("global", "local"):
        np.testing.assert_allclose(
            functional.g(mask, kind, scope, layout.node_sizes),
            functional.g(expanded, kind, scope), rtol=1e-6)
    ones = [jnp.ones(s) for s in layout.mask_shapes]
    np.testing.assert_allclose(functional.g(ones, kind, "global", layout.node_sizes), 1.0, rtol=1e-6)


@pytest.mark.parametrize("mode", ["exp", "cos"])
@pytest.mark.parametrize("weighted", [True, False])
def test_channel_repulsion_equals_repulsion_of_expanded_masks(mode, weighted):
    params = _params()
    layout = MaskLayout.from_params(params, flax_axes, mask_dim="out")
    theta = layout.gather(params)
    rng = np.random.default_rng(1)
    particles = [jnp.asarray(rng.uniform(size=(3, *s)), jnp.float32) for s in layout.mask_shapes]
    expanded = [jnp.broadcast_to(p, (3, *s)) for p, s in zip(particles, layout.shapes)]
    k_channel, _ = repulsion_lib.repulsion(particles, theta, mode=mode, weighted=weighted)
    k_full, _ = repulsion_lib.repulsion(expanded, theta, mode=mode, weighted=weighted)
    np.testing.assert_allclose(k_channel, k_full, rtol=1e-5)


def test_channel_scores_sum_the_expanded_scores():
    params = _params()
    layout = MaskLayout.from_params(params, flax_axes, mask_dim="in")
    theta = layout.gather(params)
    rng = np.random.default_rng(2)
    particles = [jnp.asarray(rng.normal(size=(2, *s)), jnp.float32) for s in layout.mask_shapes]
    for score in ("mp", "m"):
        got = voting.particle_scores(particles, theta, score)
        for g, p, t, s in zip(got, particles, theta, layout.mask_shapes):
            full = jnp.abs(jnp.broadcast_to(p, (2, *t.shape)) * (t[None] if score == "mp" else 1.0))
            axes = tuple(i + 1 for i, (a, b) in enumerate(zip(t.shape, s)) if b == 1 and a != 1)
            np.testing.assert_allclose(g, jnp.sum(full, axis=axes, keepdims=True), rtol=1e-5)


@pytest.mark.parametrize("mask_dim", ["out", "in"])
def test_structured_sfpk_prunes_whole_channels(cnn, mask_dim):
    sparsity = 0.75
    config = sfpk_jax.SFPKConfig(steps=6, particles=3, scope="local", mask_dim=mask_dim)
    # Every kernel, the classifier's and the first layer's too (they are kept by default).
    every = cnn.layers.restrict("kernel$")
    result = sfpk_jax.sfpk_prune(cnn.loss_fn, cnn.params, cnn.particle_batches(3), sparsity,
                                 config=config, prunable=every)
    layout = MaskLayout.from_params(cnn.params, every, mask_dim=mask_dim)
    channel_sparsity = 1.0 - math.sqrt(1.0 - sparsity)
    for path, m, size in zip(layout.paths, layout.gather(result.masks), layout.mask_sizes):
        assert int(np.sum(m)) == size - math.floor(channel_sparsity * size), path
    masked = sfpk_jax.apply_masks(cnn.params, result.masks)
    widest = int(np.argmax([s if p.endswith("kernel") else 0
                            for p, s in zip(layout.paths, layout.mask_sizes)]))
    kernel, mask = layout.gather(masked)[widest], layout.gather(result.masks)[widest]
    axis = kernel.ndim - 1 if mask_dim == "out" else kernel.ndim - 2
    dropped = np.flatnonzero(np.ravel(mask) == 0)
    assert dropped.size > 0
    assert np.all(np.take(np.asarray(kernel), dropped, axis=axis) == 0)
    assert 0.0 < sfpk_jax.sparsity_of(result.masks, cnn.params) < 1.0


@pytest.mark.parametrize("mask_dim", ["out", "in"])
def test_structured_magnitude_removes_the_weakest_channels(mask_dim):
    params = _params()
    masks = sfpk_jax.magnitude_prune(params, 0.75, scope="local", mask_dim=mask_dim,
                                     prunable=flax_axes)
    layout = MaskLayout.from_params(params, flax_axes, mask_dim=mask_dim)
    channel_sparsity = 1.0 - math.sqrt(0.25)
    for t, m, shape, size in zip(layout.gather(params), layout.gather(masks), layout.mask_shapes,
                                 layout.mask_sizes):
        assert m.shape == shape
        assert int(np.sum(m)) == size - math.floor(channel_sparsity * size)
        axes = tuple(i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1)
        strength = np.ravel(np.sum(np.abs(np.asarray(t)), axis=axes))
        kept = np.ravel(np.asarray(m)) != 0
        if kept.any() and (~kept).any():
            assert strength[kept].min() >= strength[~kept].max()


@pytest.mark.parametrize("method", ["snip", "random", "sfpk"])
def test_every_pruner_takes_channel_masks(cnn, method):
    every = cnn.layers.restrict("kernel$")
    result = sfpk_jax.prune(method, cnn.loss_fn, cnn.params,
                            cnn.particle_batches(1 if method != "sfpk" else 3), 0.75,
                            scope="local", key=jax.random.key(0), mask_dim="out", prunable=every,
                            **({"config": sfpk_jax.SFPKConfig(steps=3, particles=3)}
                               if method == "sfpk" else {}))
    layout = MaskLayout.from_params(cnn.params, every, mask_dim="out")
    for m, shape in zip(layout.gather(result.masks), layout.mask_shapes):
        assert m.shape == shape


def test_channel_masks_need_local_scope():
    with pytest.raises(ValueError, match="scope='local'"):
        sfpk_jax.magnitude_prune(_params(), 0.5, mask_dim="out", prunable=flax_axes)
