from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfpk_jax.models import build, make_apply_fn
from sfpk_jax.models.small_cnn import SmallCNN
from sfpk_jax.train import recompute_batch_stats


class OneBN(nn.Module):
    momentum: float

    @nn.compact
    def __call__(self, x, train):
        return nn.BatchNorm(use_running_average=not train, momentum=self.momentum, epsilon=1e-5)(x)


def _batches(sizes, features=3, seed=0):
    rng = np.random.default_rng(seed)
    # Offsets and scales make the per-feature statistics clearly distinct.
    scale = 3.0 * np.arange(1, features + 1)
    return [(2.0 + scale * rng.standard_normal((n, features))).astype(np.float32) for n in sizes]


@pytest.mark.parametrize("momentum", [0.9, 0.5])
def test_equals_average_of_batch_statistics(momentum):
    module = OneBN(momentum=momentum)
    apply_fn = make_apply_fn(module)
    variables = dict(module.init(jax.random.key(0), jnp.zeros((1, 3)), train=False))
    # Stale statistics must be discarded, not blended in.
    variables["batch_stats"] = {"BatchNorm_0": {"mean": jnp.full((3,), 50.0), "var": jnp.full((3,), 9.0)}}
    batches = _batches([16, 16, 8])

    out = recompute_batch_stats(apply_fn, variables, batches)

    mean = np.mean([b.mean(axis=0) for b in batches], axis=0)
    var = np.mean([b.var(axis=0) for b in batches], axis=0)
    np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["var"], var, rtol=1e-4)
    assert out["params"] is variables["params"]


def test_small_cnn_first_layer_matches_hand_computation():
    module = SmallCNN(num_classes=10)
    apply_fn, variables = build("small_cnn")
    batches = [np.asarray(jax.random.normal(jax.random.key(i), (8, 8, 8, 1))) for i in range(3)]

    out = recompute_batch_stats(apply_fn, variables, ({"image": b, "label": None} for b in batches))

    def conv0(x):
        _, state = module.apply(variables, x, train=False, capture_intermediates=True, mutable=["intermediates"])
        return np.asarray(state["intermediates"]["Conv_0"]["__call__"][0])

    acts = [conv0(b) for b in batches]
    mean = np.mean([a.mean(axis=(0, 1, 2)) for a in acts], axis=0)
    var = np.mean([a.var(axis=(0, 1, 2)) for a in acts], axis=0)
    np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["mean"], mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["var"], var, rtol=1e-4, atol=1e-6)
    # Deeper layers were recomputed too (they no longer hold the init values).
    assert not np.allclose(out["batch_stats"]["BatchNorm_2"]["var"], variables["batch_stats"]["BatchNorm_2"]["var"])


def test_independent_of_previous_statistics():
    apply_fn, variables = build("small_cnn")
    batches = [np.asarray(jax.random.normal(jax.random.key(i), (8, 8, 8, 1))) for i in range(2)]
    stale = {**variables, "batch_stats": jax.tree.map(lambda a: a + 7.0, variables["batch_stats"])}
    a = recompute_batch_stats(apply_fn, variables, batches)
    b = recompute_batch_stats(apply_fn, stale, batches)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5), a["batch_stats"], b["batch_stats"])


def test_model_without_batch_norm_is_unchanged():
    apply_fn, variables = build("mlp")
    assert recompute_batch_stats(apply_fn, variables, [np.zeros((2, 8, 8, 1))]) is variables


def test_empty_iterable_raises():
    apply_fn, variables = build("small_cnn")
    with pytest.raises(ValueError, match="empty"):
        recompute_batch_stats(apply_fn, variables, [])


def test_frozen_statistics_raise():
    module = OneBN(momentum=1.0)
    apply_fn = make_apply_fn(module)
    variables = dict(module.init(jax.random.key(0), jnp.zeros((1, 3)), train=False))
    with pytest.raises(ValueError, match="momentum"):
        recompute_batch_stats(apply_fn, variables, _batches([4]))
