"""Mask trees: which leaves are prunable, applying masks, their sparsity, errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfpk_jax import apply_masks, sfpk_prune, sparsity_of
from sfpk_jax.core.masks import MaskLayout, count_prunable, ones_like_masks, path_to_str
from sfpk_jax.core.selection import select

pytestmark = pytest.mark.strict_promotion


class Mixed(nn.Module):
    """Embed + Conv(+bias) + BatchNorm + Conv1D + Dense layers."""

    @nn.compact
    def __call__(self, tokens, images, train: bool = True):
        e = nn.Embed(10, 4)(tokens).mean(axis=1)
        x = nn.Conv(3, (3, 3))(images)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Conv(2, (2, 2), use_bias=False)(x)
        x = x.reshape((x.shape[0], -1))
        seq = nn.Conv(2, (3,), name="Conv1d")(images[:, :, 0, :])
        x = jnp.concatenate([x, e, seq.reshape((seq.shape[0], -1))], axis=-1)
        x = nn.relu(nn.Dense(5)(x))
        return nn.Dense(3, name="head")(x)


@pytest.fixture(scope="module")
def mixed_params():
    init = jax.jit(Mixed().init, static_argnums=3)
    variables = init(jax.random.PRNGKey(0), jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 4, 4, 1)), True)
    return variables["params"]


def _paths(params, chosen):
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {path_to_str(flat[i][0]) for i in chosen.index}


def test_default_rule_picks_conv_and_dense_kernels_and_dense_biases(mixed_params):
    chosen = _paths(mixed_params, select(mixed_params))
    assert chosen == {
        "Conv_0/kernel",
        "Conv_1/kernel",
        "Conv1d/kernel",
        "Dense_0/kernel",
        "Dense_0/bias",
        "head/kernel",
        "head/bias",
    }
    layout = MaskLayout.from_params(mixed_params)
    assert set(layout.paths) == chosen
    leaves = {path_to_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(mixed_params)[0]}
    assert layout.total == sum(leaves[p].size for p in chosen)
    assert count_prunable(mixed_params) == layout.total
    assert layout.shapes == tuple(leaves[p].shape for p in layout.paths)


def test_regex_and_callable_overrides(mixed_params):
    assert _paths(mixed_params, select(mixed_params, r"^head/")) == {"head/kernel", "head/bias"}
    chosen = _paths(mixed_params, select(mixed_params, lambda path, leaf: np.ndim(leaf) == 4))
    assert chosen == {"Conv_0/kernel", "Conv_1/kernel"}
    # An override can pick leaves the default rule leaves alone.
    assert _paths(mixed_params, select(mixed_params, "embedding")) == {"Embed_0/embedding"}
    layout = MaskLayout.from_params(mixed_params, r"Conv_\d/kernel")
    assert layout.paths == ("Conv_0/kernel", "Conv_1/kernel")
    with pytest.raises(TypeError, match="prunable"):
        select(mixed_params, 3)


def test_no_prunable_leaf_names_the_fix(mixed_params):
    with pytest.raises(ValueError, match="prunable=") as err:
        MaskLayout.from_params(mixed_params, "no_such_layer")
    assert "no prunable parameters" in str(err.value)
    # A model without conv/dense kernels under the default rule.
    with pytest.raises(ValueError, match="prunable="):
        MaskLayout.from_params({"Embed_0": {"embedding": jnp.ones((4, 3))}})


def test_sfpk_prune_reports_no_prunable_leaf(mlp):
    with pytest.raises(ValueError, match="prunable="):
        sfpk_prune(mlp.loss_fn, mlp.params, mlp.particle_batches(2), 0.5, prunable="nothing_matches")


def test_apply_masks_multiplies_only_masked_leaves(mixed_params):
    rng = np.random.default_rng(0)
    masks = jax.tree.map(
        lambda m: jnp.asarray(rng.random(m.shape) < 0.5, jnp.float32), ones_like_masks(mixed_params)
    )
    out = apply_masks(mixed_params, masks)
    assert jax.tree.structure(out) == jax.tree.structure(mixed_params)
    layout = MaskLayout.from_params(mixed_params)
    for (path, p), o, m in zip(
        jax.tree_util.tree_flatten_with_path(mixed_params)[0],
        jax.tree.leaves(out),
        jax.tree.leaves(masks, is_leaf=lambda x: x is None),
    ):
        assert o.dtype == p.dtype and o.shape == p.shape
        if path_to_str(path) in layout.paths:
            np.testing.assert_array_equal(np.asarray(o), np.asarray(p) * np.asarray(m))
        else:
            assert m is None
            np.testing.assert_array_equal(np.asarray(o), np.asarray(p))


def test_apply_masks_keeps_param_dtype():
    params = {"Dense_0": {"kernel": jnp.ones((3, 2), jnp.bfloat16), "bias": jnp.ones((2,), jnp.bfloat16)}}
    masks = {"Dense_0": {"kernel": np.array([[1, 0], [0, 1], [1, 1]], np.float32), "bias": None}}
    out = apply_masks(params, masks)
    assert out["Dense_0"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["Dense_0"]["kernel"], np.float32), masks["Dense_0"]["kernel"])


def test_masks_not_mirroring_params_raise(mixed_params):
    masks = ones_like_masks(mixed_params)
    broken = {k: v for k, v in masks.items() if k != "head"}
    with pytest.raises(ValueError, match="the masks have no leaf head/"):
        apply_masks(mixed_params, broken)
    layout = MaskLayout.from_params(mixed_params)
    with pytest.raises(ValueError, match="mirror"):
        layout.gather(broken)


def test_sparsity_of_counts_removed_entries(mixed_params):
    masks = ones_like_masks(mixed_params)
    assert sparsity_of(masks) == 0.0
    layout = MaskLayout.from_params(mixed_params)
    leaves = layout.gather(masks)
    zeroed = [jnp.zeros_like(leaves[0])] + leaves[1:]
    half = layout.replace(masks, zeroed)
    expected = layout.sizes[0] / layout.total
    assert sparsity_of(half) == pytest.approx(expected)
    assert sparsity_of(half, mixed_params) == pytest.approx(expected)


def test_sparsity_of_broadcast_channel_masks_needs_params():
    params = {"Conv_0": {"kernel": jnp.ones((3, 3, 2, 4))}}
    # One entry per output channel, in the kernel's rank.
    masks = {"Conv_0": {"kernel": np.array([1.0, 0.0, 0.0, 1.0]).reshape(1, 1, 1, 4)}}
    assert sparsity_of(masks) == 0.5
    assert sparsity_of(masks, params) == 0.5
    masks = {"Conv_0": {"kernel": np.array([1.0, 0.0, 0.0, 0.0]).reshape(1, 1, 1, 4)}}
    assert sparsity_of(masks, params) == 0.75
    # A mask of another rank would broadcast in numpy, but it is refused as everywhere else.
    with pytest.raises(ValueError, match=r"Conv_0/kernel has shape \(4,\)"):
        sparsity_of({"Conv_0": {"kernel": np.ones(4)}}, params)


def test_sparsity_of_empty_tree_raises():
    with pytest.raises(ValueError, match="empty"):
        sparsity_of({"a": None})


def test_layout_round_trip(mixed_params):
    layout = MaskLayout.from_params(mixed_params)
    leaves = layout.gather(mixed_params)
    assert [x.shape for x in leaves] == list(layout.shapes)
    doubled = layout.replace(mixed_params, [2 * x for x in leaves])
    for a, b in zip(layout.gather(doubled), leaves):
        np.testing.assert_array_equal(np.asarray(a), 2 * np.asarray(b))
    scattered = layout.scatter(leaves)
    assert jax.tree.structure(scattered, is_leaf=lambda x: x is None) == jax.tree.structure(
        ones_like_masks(mixed_params), is_leaf=lambda x: x is None
    )
    # The layout is static: hashable and equal when built twice.
    assert hash(layout) == hash(MaskLayout.from_params(mixed_params))


def test_ones_like_masks_is_dense_float32(mixed_params):
    masks = ones_like_masks(mixed_params)
    leaves = [m for m in jax.tree.leaves(masks) if m is not None]
    assert len(leaves) == 7
    assert all(m.dtype == jnp.float32 and bool(jnp.all(m == 1)) for m in leaves)
