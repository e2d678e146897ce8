"""A user's own Linen, NNX and Equinox CNNs (with batch norm), pruned and retrained end to end.

Each model is written here as a user would write it, with no help from the
zoo: SFPK and magnitude pruning, unstructured and per channel, then 100
steps of AdamW with weight decay under ``keep_masked`` in a hand-written loop.
The slips a new user makes with NNX and Equinox (the module where its params
belong, an ``nnx.State`` with batch statistics, a result where its masks
belong, a whole Equinox model) each get one line saying what to pass.
"""

from __future__ import annotations

import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sfpk_jax
from sfpk_jax.core.layers import trace_layers
from sfpk_jax.core.masks import MaskLayout
from sfpk_jax.interop import split_equinox, split_nnx

pytestmark = pytest.mark.slow

eqx = pytest.importorskip("equinox")

CLASSES, CHANNELS, SIZE = 3, 4, 6


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(CHANNELS, (3, 3), padding="VALID")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(CLASSES)(x.reshape(x.shape[0], -1))


class NNXCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, CHANNELS, (3, 3), padding="VALID", rngs=rngs)
        self.bn = nnx.BatchNorm(CHANNELS, rngs=rngs)
        self.fc = nnx.Linear(CHANNELS * (SIZE - 2) ** 2, CLASSES, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        return self.fc(x.reshape(x.shape[0], -1))


class EqxCNN(eqx.Module):
    conv: eqx.nn.Conv2d
    bn: eqx.nn.BatchNorm
    fc: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(1, CHANNELS, 3, key=k1)
        self.bn = eqx.nn.BatchNorm(CHANNELS, axis_name="batch", mode="batch")
        self.fc = eqx.nn.Linear(CHANNELS * (SIZE - 2) ** 2, CLASSES, key=k2)

    def __call__(self, x, state):
        x, state = self.bn(self.conv(x), state)
        return self.fc(jax.nn.relu(x).reshape(-1)), state


def _data(seed, n):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, SIZE, SIZE, 1)).astype(np.float32)
    y = (x[:, 2:4, 2:4, 0].mean(axis=(1, 2)) > 0).astype(np.int32) + (x[:, 0, 0, 0] > 1)
    return x, y.astype(np.int32)


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def linen_model():
    module = LinenCNN()
    variables = module.init(jax.random.key(0), jnp.zeros((2, SIZE, SIZE, 1)), True)
    stats = variables["batch_stats"]

    def loss_fn(params, batch):
        logits, _ = module.apply({"params": params, "batch_stats": stats}, batch["x"], True,
                                 mutable=["batch_stats"])
        return _xent(logits, batch["y"])

    return variables["params"], loss_fn, lambda: stats


def nnx_model():
    model = NNXCNN(nnx.Rngs(0))
    model.train()
    split = split_nnx(model)

    def loss_fn(params, batch):
        return _xent(split.merge(params)(batch["x"]), batch["y"])

    return split.params, loss_fn, lambda: nnx.state(model, nnx.BatchStat)


def equinox_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # equinox's note on BatchNorm's mode
        model, state = eqx.nn.make_with_state(EqxCNN)(jax.random.key(0))
    split = split_equinox(model)

    def loss_fn(params, batch):
        x = jnp.moveaxis(batch["x"], -1, 1)  # Equinox convolutions take (C, H, W)
        logits, _ = jax.vmap(split.merge(params), axis_name="batch", in_axes=(0, None),
                             out_axes=(0, None))(x, state)
        return _xent(logits, batch["y"])

    return split.params, loss_fn, lambda: state


FRAMEWORKS = {"linen": linen_model, "nnx": nnx_model, "equinox": equinox_model}
# (leaf, channel axes (out, in)) of each framework's conv weight.
CONV = {"linen": ("Conv_0/kernel", (3, 2)), "nnx": ("conv/kernel", (3, 2)),
        "equinox": ("conv/weight", (0, 1))}


def _batches(n, seed=0, size=16):
    rng = np.random.default_rng(seed)
    x, y = _data(seed, 512)
    while True:
        idx = rng.integers(0, len(x), (n, size))
        yield {"x": x[idx], "y": y[idx]}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_default_rule_selects_conv_and_dense_weights_and_the_dense_bias(framework):
    params, _, _ = FRAMEWORKS[framework]()
    layout = MaskLayout.from_params(params)
    conv = CONV[framework][0]
    dense = {"linen": "Dense_0", "nnx": "fc", "equinox": "fc"}[framework]
    weight = "weight" if framework == "equinox" else "kernel"
    assert set(layout.paths) == {conv, f"{dense}/{weight}", f"{dense}/bias"}


def _prune(framework, pruner, mask_dim):
    params, loss_fn, _ = FRAMEWORKS[framework]()
    return (params, loss_fn, _masks(params, loss_fn, pruner, mask_dim))


def _masks(params, loss_fn, pruner, mask_dim, prunable=None):
    scope = "global" if mask_dim is None else "local"
    if pruner == "sfpk":
        config = sfpk_jax.SFPKConfig(steps=4, particles=2, scope=scope,
                                     mask_dim=mask_dim)
        return sfpk_jax.sfpk_prune(loss_fn, params, _batches(2), 0.5, config=config,
                                   prunable=prunable).masks
    return sfpk_jax.magnitude_prune(params, 0.5, scope=scope, mask_dim=mask_dim,
                                    prunable=prunable)


def _layers(params, loss_fn):
    return trace_layers(loss_fn, params, jax.tree.map(lambda x: x[0], next(_batches(1))))


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("pruner", ["sfpk", "magnitude"])
def test_unstructured_pruning_hits_the_exact_sparsity(framework, pruner):
    params, _, masks = _prune(framework, pruner, None)
    total = MaskLayout.from_params(params).total
    assert sfpk_jax.sparsity_of(masks, params) == math.floor(0.5 * total) / total


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("pruner", ["sfpk", "magnitude"])
@pytest.mark.parametrize("mask_dim", ["out", "in"])
def test_channel_masks_remove_whole_channels_on_the_framework_axis(framework, pruner, mask_dim):
    params, loss_fn, _ = FRAMEWORKS[framework]()
    # Every layer, the first and the last too (by default they keep their inputs and outputs).
    every = _layers(params, loss_fn).restrict(".")
    masks = _masks(params, loss_fn, pruner, mask_dim, every)
    layout = MaskLayout.from_params(params, every, mask_dim=mask_dim)
    conv, (out_axis, in_axis) = CONV[framework]
    axis = out_axis if mask_dim == "out" else in_axis
    mask = np.asarray(layout.gather(masks)[layout.paths.index(conv)])
    shape = layout.shapes[layout.paths.index(conv)]
    assert mask.shape == tuple(d if i == axis else 1 for i, d in enumerate(shape))
    channels = shape[axis]
    if channels > 1:  # a 1-channel input axis keeps its single channel
        removed = math.floor((1 - math.sqrt(0.5)) * channels)
        assert int(np.sum(mask == 0)) == removed


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_retraining_with_keep_masked_keeps_pruned_weights_at_zero(framework):
    params, loss_fn, batch_stats = FRAMEWORKS[framework]()
    before = jax.tree.map(np.array, batch_stats())
    masks = _masks(params, loss_fn, "sfpk", None)
    tx = sfpk_jax.keep_masked(optax.adamw(1e-2, weight_decay=1e-2), masks)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    stream = _batches(1, seed=5)
    losses = []
    for _ in range(100):
        batch = jax.tree.map(lambda a: a[0], next(stream))
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
    layout = MaskLayout.from_params(params)
    for path, p, m in zip(layout.paths, layout.gather(params), layout.gather(masks)):
        assert np.all(np.asarray(p)[np.asarray(m) == 0] == 0), path
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    # The loss ran batch norm in training mode without touching the running statistics.
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, batch_stats()))
    assert sfpk_jax.sparsity_of(masks, params) == pytest.approx(0.5, abs=1 / layout.total)


def test_a_weight_of_unknown_layout_cannot_take_channel_masks():
    params = {"mixer": {"w": jnp.ones((4, 5))}}
    with pytest.raises(ValueError, match=r"mixer/w.*not known from its name"):
        MaskLayout.from_params(params, prunable="w$", mask_dim="out")
    layout = MaskLayout.from_params(params, prunable=lambda p, x: (0, 1), mask_dim="out")
    assert layout.mask_shapes == ((4, 1),)
    with pytest.raises(ValueError, match="two different axes"):
        MaskLayout.from_params(params, prunable=lambda p, x: (1, 1), mask_dim="out")


# The NNX and Equinox slips of a new user, each one line saying what was passed and what to pass.


def test_an_nnx_module_passed_as_params_says_to_split_it():
    model = NNXCNN(nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"got the nnx.Module NNXCNN where its parameters belong: "
                                        r"pass split = sfpk_jax.split_nnx\(model\); split.params"):
        sfpk_jax.sfpk_prune(lambda p, b: 0.0, model, _batches(2), 0.5,
                            config=sfpk_jax.SFPKConfig(steps=1, particles=2))
    with pytest.raises(TypeError, match="nnx.Module"):
        sfpk_jax.keep_masked(optax.sgd(0.1), sfpk_jax.magnitude_prune(
            split_nnx(model).params, 0.5)).init(model)


def test_an_nnx_state_with_batch_statistics_says_to_take_the_params_alone():
    model = NNXCNN(nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"hold BatchStat variables \(at bn/mean\).*"
                                        r"nnx.state\(model, nnx.Param\)"):
        sfpk_jax.magnitude_prune(nnx.state(model), 0.5)


def test_a_result_where_the_masks_belong_says_to_pass_its_masks():
    params, _, _ = FRAMEWORKS["nnx"]()
    result = sfpk_jax.prune("magnitude", None, params, None, 0.5)
    for call in (lambda: sfpk_jax.keep_masked(optax.sgd(0.1), result),
                 lambda: sfpk_jax.apply_masks(params, result),
                 lambda: sfpk_jax.sparsity_report(result, params)):
        with pytest.raises(TypeError, match="got a PruneResult where the masks belong: pass its "
                                            r"\.masks"):
            call()


def test_a_whole_equinox_model_says_to_split_it():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model, _ = eqx.nn.make_with_state(EqxCNN)(jax.random.key(0))
    with pytest.raises(TypeError, match=r"the params hold a str at bn/axis_name, not an "
                                        r"array.*split_equinox\(model\).params"):
        sfpk_jax.magnitude_prune(model, 0.5)
