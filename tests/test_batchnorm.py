"""recompute_batch_stats: the running statistics become the mean of per-batch statistics.

On the zoo's convention (zoo_forward) and on a user's own Linen, NNX and
Equinox models (tests/framework_models.py), each through its own forward.
"""

from __future__ import annotations

import flax.linen as nn
import framework_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfpk_jax.models import build, make_apply_fn
from sfpk_jax.models.small_cnn import SmallCNN
from sfpk_jax.train import recompute_batch_stats, zoo_forward


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

    out = recompute_batch_stats(zoo_forward(apply_fn, variables), variables["batch_stats"],
                                batches)

    mean = np.mean([b.mean(axis=0) for b in batches], axis=0)
    var = np.mean([b.var(axis=0) for b in batches], axis=0)
    np.testing.assert_allclose(out["BatchNorm_0"]["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(out["BatchNorm_0"]["var"], var, rtol=1e-4)


def test_small_cnn_first_layer_matches_hand_computation():
    module = SmallCNN(num_classes=10)
    apply_fn, variables = build("small_cnn")
    batches = [np.asarray(jax.random.normal(jax.random.key(i), (8, 8, 8, 1))) for i in range(3)]

    out = recompute_batch_stats(zoo_forward(apply_fn, variables), variables["batch_stats"],
                                ({"image": b, "label": None} for b in batches))

    def conv0(x):
        _, state = module.apply(variables, x, train=False, capture_intermediates=True, mutable=["intermediates"])
        return np.asarray(state["intermediates"]["Conv_0"]["__call__"][0])

    acts = [conv0(b) for b in batches]
    mean = np.mean([a.mean(axis=(0, 1, 2)) for a in acts], axis=0)
    var = np.mean([a.var(axis=(0, 1, 2)) for a in acts], axis=0)
    np.testing.assert_allclose(out["BatchNorm_0"]["mean"], mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["BatchNorm_0"]["var"], var, rtol=1e-4, atol=1e-6)
    # Deeper layers were recomputed too (they no longer hold the init values).
    assert not np.allclose(out["BatchNorm_2"]["var"], variables["batch_stats"]["BatchNorm_2"]["var"])


def test_independent_of_previous_statistics():
    apply_fn, variables = build("small_cnn")
    batches = [np.asarray(jax.random.normal(jax.random.key(i), (8, 8, 8, 1))) for i in range(2)]
    stale = jax.tree.map(lambda a: a + 7.0, variables["batch_stats"])
    forward = zoo_forward(apply_fn, variables)
    a = recompute_batch_stats(forward, variables["batch_stats"], batches)
    b = recompute_batch_stats(forward, stale, batches)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5), a, b)


def test_empty_iterable_raises():
    apply_fn, variables = build("small_cnn")
    with pytest.raises(ValueError, match="empty"):
        recompute_batch_stats(zoo_forward(apply_fn, variables), variables["batch_stats"], [])


def test_frozen_statistics_raise():
    module = OneBN(momentum=1.0)
    apply_fn = make_apply_fn(module)
    variables = dict(module.init(jax.random.key(0), jnp.zeros((1, 3)), train=False))
    with pytest.raises(ValueError, match="momentum"):
        recompute_batch_stats(zoo_forward(apply_fn, variables), variables["batch_stats"],
                              _batches([4]))


@pytest.mark.parametrize("framework", framework_models.BUILD)
def test_a_users_own_model_gets_the_mean_of_its_batch_statistics(framework):
    model = framework_models.build(framework)
    # Stale statistics, as after pruning: far from anything the batches give.
    stale = jax.tree.map(lambda a: a + 5.0 if jnp.issubdtype(a.dtype, jnp.floating) else a,
                         model.stats)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.standard_normal((16, 8, 8, 1)).astype(np.float32)} for _ in range(3)]
    stats = recompute_batch_stats(model.forward(model.params), stale, batches)
    # What the first batch norm normalises: the first convolution's output.
    acts = [np.asarray(model.preactivation(model.params, b["image"])) for b in batches]
    mean = np.mean([a.mean(axis=(0, 1, 2)) for a in acts], axis=0)
    var = np.mean([a.var(axis=(0, 1, 2)) for a in acts], axis=0)
    leaves = [np.asarray(x) for x in jax.tree.leaves(stats)]
    # The first norm's running mean and variance (every framework's first two float leaves of
    # that size, in its own naming and order) equal the average of the batch statistics.
    sized = [x for x in leaves if x.shape == mean.shape and x.dtype.kind == "f"]
    assert any(np.allclose(x, mean, rtol=1e-4, atol=1e-5) for x in sized), (framework, sized)
    assert any(np.allclose(x, var, rtol=1e-4, atol=1e-5) for x in sized), (framework, sized)


def _equinox_norms(mode):
    import equinox as eqx

    class TwoNorms(eqx.Module):
        norms: list

        def __init__(self):
            self.norms = [eqx.nn.BatchNorm(3, axis_name="batch", mode=mode) for _ in range(2)]

        def __call__(self, x, state):
            for norm in self.norms:
                x, state = norm(2.0 * x + 1.0, state)
            return x, state

    model, state = eqx.nn.make_with_state(TwoNorms)()

    def forward(s, x):
        return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, s)[1]

    def inference_mean(s, layer):
        norm = eqx.nn.inference_mode(model).norms[layer]
        # The mean the layer normalises with in inference: its output at x = 0 is -mean / std.
        zero = jnp.zeros(3)
        return -jax.vmap(norm, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
            zero[None], s)[0][0] * jnp.sqrt(s.get(norm.batch_state_index)[1] + norm.eps)

    return forward, state, inference_mean


def test_equinox_batch_mode_reads_the_average_in_inference():
    forward, state, inference_mean = _equinox_norms("batch")
    batches = _batches([8, 8])
    stats = recompute_batch_stats(forward, state, batches)
    first = np.mean([(2.0 * b + 1.0).mean(axis=0) for b in batches], axis=0)
    # The step counter is set as after a long training, so the zero-debiased reading is r.
    counters = [x for x in jax.tree.leaves(stats) if jnp.issubdtype(x.dtype, jnp.integer)]
    assert counters and all(int(c) == 2**30 for c in counters)
    np.testing.assert_allclose(inference_mean(stats, 0), first, rtol=1e-4)


def test_equinox_ema_mode_is_refused_saying_why():
    # "ema" normalises with the running statistics while training: the second norm's
    # batch statistic depends on the first's running state.
    forward, state, _ = _equinox_norms("ema")
    trained = forward(state, _batches([8])[0])  # past its first step, "ema" uses the running stats
    with pytest.raises(ValueError, match=r"depend on the running statistics of other batch "
                                         r"norms.*mode='batch'"):
        recompute_batch_stats(forward, trained, _batches([8, 8]))
