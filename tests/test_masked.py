"""keep_masked: an optax transformation under which pruned weights stay exactly 0."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import flax_axes

import sfpk_jax
from sfpk_jax.core.masks import MaskLayout


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "Dense_0": {"kernel": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32),
                    "bias": jnp.asarray(rng.standard_normal(5), jnp.float32)},
        "norm": {"scale": jnp.ones(5, jnp.float32)},
        "Dense_1": {"kernel": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)},
    }


def _loss(params, x, y):
    h = jnp.tanh(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"][None])
    logits = (h * params["norm"]["scale"][None]) @ params["Dense_1"]["kernel"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _run(tx, params, steps=100, seed=1):
    """``steps`` updates in the user's own loop; returns every intermediate params."""
    rng = np.random.default_rng(seed)
    state = tx.init(params)
    history = []
    step = jax.jit(lambda p, s, x, y: tx.update(jax.grad(_loss)(p, x, y), s, p))
    for _ in range(steps):
        x = jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)
        y = jnp.asarray(rng.integers(0, 3, 8), jnp.int32)
        updates, state = step(params, state, x, y)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history


def _pruned_entries_are_zero(params, masks):
    layout = MaskLayout.from_params(params)
    for path, p, m in zip(layout.paths, layout.gather(params), layout.gather(masks)):
        covered = np.broadcast_to(np.asarray(m) == 0, p.shape)
        assert np.all(np.asarray(p)[covered] == 0), path


@pytest.mark.parametrize("inner", [
    optax.adamw(1e-2, weight_decay=0.1),
    optax.chain(optax.add_decayed_weights(0.05), optax.sgd(0.1, momentum=0.9)),
    optax.MultiSteps(optax.adam(1e-2), every_k_schedule=3),
], ids=["adamw", "sgd-momentum-wd", "multisteps-adam"])
def test_pruned_weights_stay_exactly_zero_for_100_steps(inner):
    params = _params()
    masks = sfpk_jax.magnitude_prune(params, 0.6)
    # Masks are applied by the transformation itself: start from the unmasked weights.
    history = _run(sfpk_jax.keep_masked(inner, masks), params)
    for p in history:
        _pruned_entries_are_zero(p, masks)
    kept_before = np.asarray(params["Dense_0"]["kernel"])[np.asarray(masks["Dense_0"]["kernel"]) != 0]
    kept_after = np.asarray(history[-1]["Dense_0"]["kernel"])[np.asarray(masks["Dense_0"]["kernel"]) != 0]
    assert not np.allclose(kept_before, kept_after)  # the kept weights do train
    # The unpruned leaf (None in the masks) trains as usual.
    assert not np.allclose(history[-1]["norm"]["scale"], 1.0)


def test_keep_masked_inside_multisteps_keeps_zeros():
    params = _params()
    masks = sfpk_jax.magnitude_prune(params, 0.5)
    outside = optax.MultiSteps(sfpk_jax.keep_masked(optax.sgd(0.1), masks), every_k_schedule=2)
    for p in _run(outside, sfpk_jax.apply_masks(params, masks), steps=10):
        _pruned_entries_are_zero(p, masks)


def test_kept_entries_follow_the_inner_optimizer_on_masked_gradients():
    params = sfpk_jax.apply_masks(_params(), sfpk_jax.magnitude_prune(_params(), 0.5))
    masks = sfpk_jax.magnitude_prune(_params(), 0.5)
    ours = _run(sfpk_jax.keep_masked(optax.sgd(0.05, momentum=0.9), masks), params, steps=5)[-1]
    # By hand: SGD with momentum on the masked gradient, then the mask.
    inner = optax.sgd(0.05, momentum=0.9)
    state, p = inner.init(params), params
    rng = np.random.default_rng(1)
    for _ in range(5):
        x = jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)
        y = jnp.asarray(rng.integers(0, 3, 8), jnp.int32)
        grads = sfpk_jax.apply_masks(jax.grad(_loss)(p, x, y), masks)
        updates, state = inner.update(grads, state, p)
        p = sfpk_jax.apply_masks(optax.apply_updates(p, updates), masks)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ours, p)


def test_channel_masks_broadcast_over_their_kernels():
    params = _params()
    masks = sfpk_jax.magnitude_prune(params, 0.5, scope="local", mask_dim="out",
                                     prunable=flax_axes)
    assert masks["Dense_0"]["kernel"].shape == (1, 5)
    # The bias follows its kernel's channels.
    np.testing.assert_array_equal(masks["Dense_0"]["bias"], masks["Dense_0"]["kernel"][0])
    for p in _run(sfpk_jax.keep_masked(optax.adam(1e-2), masks), params, steps=20):
        _pruned_entries_are_zero(p, masks)


def test_init_names_the_first_leaf_that_does_not_fit():
    params = _params()
    masks = sfpk_jax.magnitude_prune(params, 0.5)
    transposed = jax.tree.map(lambda m: m.T if m.ndim == 2 else m, masks)
    with pytest.raises(ValueError, match=r"Dense_0/kernel.*\(5, 6\).*\(6, 5\)"):
        sfpk_jax.keep_masked(optax.sgd(0.1), transposed).init(params)
    particles = {**masks, "Dense_1": {"kernel": jnp.ones((2, 5, 3))}}
    with pytest.raises(ValueError, match="Dense_1/kernel"):
        sfpk_jax.keep_masked(optax.sgd(0.1), particles).init(params)
    with pytest.raises(ValueError, match="no leaf Dense_1/kernel"):
        sfpk_jax.keep_masked(optax.sgd(0.1), {"Dense_0": masks["Dense_0"]}).init(params)


def test_update_without_params_is_refused():
    params = _params()
    tx = sfpk_jax.keep_masked(optax.sgd(0.1), sfpk_jax.magnitude_prune(params, 0.5))
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, state)
