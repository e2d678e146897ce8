from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfpk_jax.core.masks import apply_masks, count_prunable, ones_like_masks
from sfpk_jax.models import build, registered


def _images(n=4, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, 8, 8, 1))


def test_registry_lists_bundled_models():
    assert {"small_cnn", "mlp"} <= set(registered())


def test_unknown_name_lists_registered():
    with pytest.raises(ValueError, match="registered models: .*mlp.*small_cnn"):
        build("resnet9000")


def test_small_cnn_contract():
    apply_fn, variables = build("small_cnn", num_classes=7)
    assert set(variables) == {"params", "batch_stats"}
    params = variables["params"]
    assert params["Conv_0"]["kernel"].shape == (3, 3, 1, 16)
    assert params["Conv_2"]["kernel"].shape == (3, 3, 32, 64)
    assert "bias" not in params["Conv_0"]  # conv before BN has no bias
    assert params["Dense_0"]["kernel"].shape == (64, 7)

    x = _images()
    logits, same = apply_fn(variables, x, False)
    assert logits.shape == (4, 7)
    assert same is variables

    logits_train, updated = apply_fn(variables, x, True)
    assert logits_train.shape == (4, 7)
    # Train mode normalises with batch statistics and moves the running ones.
    before = variables["batch_stats"]["BatchNorm_0"]["mean"]
    after = updated["batch_stats"]["BatchNorm_0"]["mean"]
    assert not np.allclose(before, after)
    assert updated["params"] is variables["params"]


def test_small_cnn_batch_norm_momentum_is_torch_default():
    apply_fn, variables = build("small_cnn")
    zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
    ones = jax.tree.map(jnp.ones_like, variables["batch_stats"])
    x = _images()
    _, from_zeros = apply_fn({**variables, "batch_stats": zeros}, x, True)
    _, from_ones = apply_fn({**variables, "batch_stats": ones}, x, True)
    m = from_ones["batch_stats"]["BatchNorm_1"]["var"] - from_zeros["batch_stats"]["BatchNorm_1"]["var"]
    np.testing.assert_allclose(m, 0.9, atol=1e-5)


def test_key_and_input_shape():
    _, a = build("mlp", key=jax.random.key(1))
    _, b = build("mlp", key=jax.random.key(2))
    assert not np.allclose(a["params"]["Dense_0"]["kernel"], b["params"]["Dense_0"]["kernel"])
    _, default = build("mlp")
    _, again = build("mlp", key=jax.random.key(0))
    np.testing.assert_array_equal(default["params"]["Dense_0"]["kernel"], again["params"]["Dense_0"]["kernel"])
    _, wide = build("mlp", input_shape=(1, 4, 4, 3))
    assert wide["params"]["Dense_0"]["kernel"].shape == (48, 64)


def test_mlp_contract():
    apply_fn, variables = build("mlp", num_classes=3)
    assert set(variables) == {"params"}
    logits, updated = apply_fn(variables, _images(5), True)
    assert logits.shape == (5, 3)
    assert updated is variables


@pytest.mark.parametrize("name", ["small_cnn", "mlp"])
def test_zero_mask_on_last_dense_gives_zero_logits(name):
    apply_fn, variables = build(name)
    masks = ones_like_masks(variables["params"])
    last = max(k for k in variables["params"] if k.startswith("Dense_"))
    masks[last] = {"kernel": jnp.zeros_like(masks[last]["kernel"]), "bias": jnp.zeros_like(masks[last]["bias"])}
    masked = {**variables, "params": apply_masks(variables["params"], masks)}
    x = _images()
    for train in (False, True):
        logits, _ = apply_fn(masked, x, train)
        np.testing.assert_array_equal(logits, np.zeros((4, 10)))
    unmasked, _ = apply_fn(variables, x, False)
    assert np.abs(unmasked).max() > 0


def test_small_cnn_prunable_count():
    _, variables = build("small_cnn")
    # Conv kernels and the dense kernel and bias; BN parameters are not prunable.
    expected = 9 * 16 + 9 * 16 * 32 + 9 * 32 * 64 + 64 * 10 + 10
    assert count_prunable(variables["params"]) == expected
