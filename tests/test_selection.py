"""Structured pruning that is right on the user's own model (sfpk_jax.core.selection, .layers).

On models written as Flax NNX's MNIST tutorial, Equinox's MNIST example and
Flax Linen's ResNet example write them (``tests/framework_models.py``):

* channel masks never remove the classes (``"out"``) nor the image's channels
  (``"in"``) by default; restricting the layers overrides that;
* a removed output channel is removed whole: its bias follows its kernel, so
  its pre-activation is exactly 0;
* only Conv and Dense/Linear layouts take channel masks; a DenseGeneral kernel
  or a kernel stacked under a scan is refused naming it, and a weight of rank
  >= 3 is not guessed from its name;
* the default rule never selects an embedding table, in any framework, even
  one tied to the classifier;
* the report flags pruned weights that grew back (training without
  keep_masked).
"""

from __future__ import annotations

import math
import re

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from framework_models import BUILD, build

import sfpk_jax
from sfpk_jax.core.layers import trace_layers
from sfpk_jax.core.masks import MaskLayout

pytestmark = pytest.mark.slow


def _batches(n, size=16, seed=0):
    rng = np.random.default_rng(seed)
    while True:
        yield {"image": rng.standard_normal((n, size, 8, 8, 1)).astype(np.float32),
               "label": rng.integers(0, 10, (n, size)).astype(np.int32)}


def _one(seed=0):
    return jax.tree.map(lambda x: x[0], next(_batches(1, seed=seed)))


def _channel_masks(model, pruner, mask_dim, prunable=None):
    if pruner == "sfpk":
        config = sfpk_jax.SFPKConfig(steps=3, particles=2, scope="local", mask_dim=mask_dim)
        return sfpk_jax.sfpk_prune(model.loss_fn, model.params, _batches(2), 0.5, config=config,
                                   prunable=prunable).masks
    return sfpk_jax.prune("magnitude", model.loss_fn, model.params, _batches(1), 0.5,
                          scope="local", mask_dim=mask_dim, prunable=prunable).masks


def _named(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return {sfpk_jax.core.masks.path_to_str(p): leaf for p, leaf in flat}


@pytest.mark.parametrize("framework", BUILD)
@pytest.mark.parametrize("pruner", ["sfpk", "magnitude"])
@pytest.mark.parametrize("mask_dim", ["out", "in"])
def test_channel_masks_keep_the_classes_and_the_inputs(framework, pruner, mask_dim):
    model = build(framework)
    masks = _named(_channel_masks(model, pruner, mask_dim))
    kept = model.output if mask_dim == "out" else model.first
    assert masks[kept] is None  # the classes (the image's channels) are never removed
    pruned = [p for p, m in masks.items() if m is not None]
    assert pruned, "something is pruned"
    logits = model.logits(sfpk_jax.apply_masks(model.params, masks), model.stats,
                          next(_batches(1))["image"][0])
    assert logits.shape[-1] == 10 and np.all(np.std(np.asarray(logits), axis=0) > 0)


@pytest.mark.parametrize("framework", BUILD)
def test_restricting_the_layers_overrides_the_kept_classes(framework):
    model = build(framework)
    layers = trace_layers(model.loss_fn, model.params, _one())
    masks = _named(_channel_masks(model, "magnitude", "out", layers.restrict(".")))
    assert masks[model.output] is not None
    assert int(np.sum(np.asarray(masks[model.output]) == 0)) == math.floor(
        (1 - math.sqrt(0.5)) * 10)


@pytest.mark.parametrize("framework", BUILD)
def test_a_removed_channel_is_removed_whole(framework):
    model = build(framework)
    masks = _channel_masks(model, "magnitude", "out")
    named = _named(masks)
    for path, mask in named.items():
        parent, _, name = path.rpartition("/")
        weight = named.get(f"{parent}/kernel", named.get(f"{parent}/weight"))
        if name == "bias" and mask is not None:
            np.testing.assert_array_equal(np.ravel(mask), np.ravel(weight), err_msg=path)
    if model.first_bias is not None:  # a conv bias follows its kernel too
        assert named[model.first_bias] is not None
    masked = sfpk_jax.apply_masks(model.params, masks)
    out = np.asarray(model.preactivation(masked, next(_batches(1))["image"][0]))
    dead = np.ravel(np.asarray(named[model.first])) == 0
    assert dead.any()
    assert np.all(out[..., dead] == 0.0)  # exactly: no bias left to switch it on
    assert np.all(np.any(out[..., ~dead] != 0.0, axis=(0, 1, 2)))


class _Mixer(nn.Module):
    """An embedding, a DenseGeneral over it (two output axes) and a classifier."""

    @nn.compact
    def __call__(self, ids):
        h = nn.DenseGeneral((2, 4))(nn.Embed(20, 8)(ids))
        return nn.Dense(3)(h.reshape(h.shape[0], -1))


def test_a_kernel_of_unknown_layout_is_refused_naming_the_leaf():
    module = _Mixer()
    ids = jnp.arange(6) % 20
    params = module.init(jax.random.key(0), ids)["params"]
    loss_fn = lambda p, batch: module.apply({"params": p}, batch["ids"]).sum()
    batches = iter([{"ids": ids[None]}])
    with pytest.raises(ValueError, match=r"DenseGeneral_0/kernel \(shape \(8, 2, 4\)\) is the "
                                         r"kernel of a dense layer.*prunable="):
        sfpk_jax.prune("magnitude", loss_fn, params, batches, 0.5, scope="local", mask_dim="out")
    layers = trace_layers(loss_fn, params, {"ids": ids})
    assert layers.inputs == {"DenseGeneral_0/kernel"}  # it reads the embedded input
    masks = sfpk_jax.magnitude_prune(params, 0.5, scope="local", mask_dim="in",
                                     prunable=layers.restrict("^Dense_0/"))
    assert _named(masks)["Dense_0/kernel"].shape == (8, 1)
    # Nor is a rank-3 weight's layout guessed from its name.
    with pytest.raises(ValueError, match="not known from its name"):
        MaskLayout.from_params(params, "DenseGeneral", mask_dim="out")
    # The callable that names its axes is the way to take it anyway.
    layout = MaskLayout.from_params(params, lambda p, x: (2, 0) if p.endswith("General_0/kernel") else False,
                                    mask_dim="out")
    assert layout.mask_shapes == ((1, 1, 4),)


class _LinenEmbed(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Dense(3)(nn.Embed(20, 8)(ids))


class _NNXEmbed(nnx.Module):
    def __init__(self, rngs):
        self.embed, self.fc = nnx.Embed(20, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, ids):
        return self.fc(self.embed(ids))


class _EqxEmbed(eqx.Module):
    embed: eqx.nn.Embedding
    fc: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.embed, self.fc = eqx.nn.Embedding(20, 8, key=k1), eqx.nn.Linear(8, 3, key=k2)

    def __call__(self, ids):
        return jax.vmap(lambda i: self.fc(self.embed(i)))(ids)


def _embedding_model(framework):
    ids = jnp.arange(5)
    if framework == "linen":
        module = _LinenEmbed()
        params = module.init(jax.random.key(0), ids)["params"]
        return params, lambda p, b: module.apply({"params": p}, b).sum(), ids
    split = (sfpk_jax.split_nnx(_NNXEmbed(nnx.Rngs(0))) if framework == "nnx"
             else sfpk_jax.split_equinox(_EqxEmbed(jax.random.key(0))))
    return split.params, lambda p, b: split.merge(p)(b).sum(), ids


@pytest.mark.parametrize("framework", BUILD)
def test_embeddings_are_never_selected(framework):
    params, loss_fn, ids = _embedding_model(framework)
    by_name = MaskLayout.from_params(params).paths
    by_layers = MaskLayout.from_params(params, trace_layers(loss_fn, params, ids)).paths
    assert not [p for p in by_name + by_layers if "embed" in p], (by_name, by_layers)
    assert len(by_name) == 2 and set(by_name) == set(by_layers)  # the linear weight and bias


class _LinenTied(nn.Module):
    """A classifier that reuses its embedding table (``Embed.attend``), as language models do."""

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(20, 8)
        return embed.attend(nn.Dense(8)(nn.relu(nn.Dense(8)(embed(ids)))))


class _NNXTied(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(20, 8, rngs=rngs)
        self.hidden, self.out = nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, ids):
        return self.embed.attend(self.out(nnx.relu(self.hidden(self.embed(ids)))))


class _EqxTied(eqx.Module):
    embed: eqx.nn.Embedding
    hidden: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(20, 8, key=k1)
        self.hidden, self.out = eqx.nn.Linear(8, 8, key=k2), eqx.nn.Linear(8, 8, key=k3)

    def __call__(self, ids):
        h = jax.vmap(lambda i: self.out(jax.nn.relu(self.hidden(self.embed(i)))))(ids)
        return h @ self.embed.weight.T


@pytest.mark.parametrize("framework", BUILD)
@pytest.mark.parametrize("mask_dim", [None, "out", "in", "2:4"])
def test_a_table_tied_to_the_classifier_is_still_never_selected(framework, mask_dim):
    # The tied table is also a dense layer's kernel in the loss; by its layers alone it
    # would be pruned (and under "in", its (1, 8) mask would remove embedding features).
    ids = jnp.arange(6) % 20
    if framework == "linen":
        module = _LinenTied()
        params = module.init(jax.random.key(0), ids)["params"]
        loss_fn = lambda p, b: module.apply({"params": p}, b).sum()
    else:
        split = (sfpk_jax.split_nnx(_NNXTied(nnx.Rngs(0))) if framework == "nnx"
                 else sfpk_jax.split_equinox(_EqxTied(jax.random.key(0))))
        params, loss_fn = split.params, lambda p, b: split.merge(p)(b).sum()
    layers = trace_layers(loss_fn, params, ids)
    paths = MaskLayout.from_params(params, layers, mask_dim=mask_dim).paths
    assert paths and not [p for p in paths if "embed" in p], paths
    # Restricting the layers to it is the way to prune it anyway.
    restricted = MaskLayout.from_params(params, layers.restrict("embed"), mask_dim=None).paths
    assert [p for p in restricted if "embed" in p]


def _scanned_model():
    """Between a first and a last dense layer, three of one stacked (3, 16, 16) kernel,
    run by a scan."""
    keys = jax.random.split(jax.random.key(0), 3)
    params = {"first": {"kernel": jax.random.normal(keys[0], (8, 16)) / 4},
              "stack": {"kernel": jax.random.normal(keys[1], (3, 16, 16)) / 4},
              "head": {"kernel": jax.random.normal(keys[2], (16, 10)) / 4}}

    def loss_fn(p, batch):
        def layer(h, kernel):
            return jax.nn.relu(h @ kernel), None

        h = jax.nn.relu(batch["x"] @ p["first"]["kernel"])
        h, _ = jax.lax.scan(layer, h, p["stack"]["kernel"])
        return (h @ p["head"]["kernel"]).sum()

    return params, loss_fn, {"x": jnp.ones((4, 8))}


@pytest.mark.parametrize("mask_dim", ["out", "in", "2:4"])
def test_a_kernel_stacked_under_a_scan_is_refused_not_guessed(mask_dim):
    # Its axis 0 counts layers: an "out" mask of (1, 16, 1) would mask inputs, an "in"
    # mask of (3, 1, 1) whole layers, with no error.
    params, loss_fn, batch = _scanned_model()
    assert not trace_layers(loss_fn, params, batch).uses["stack/kernel"].known
    with pytest.raises(ValueError, match=r"stack/kernel \(shape \(3, 16, 16\)\) is the kernel "
                                         r"of a dense layer.*under a scan"):
        sfpk_jax.prune("magnitude", loss_fn, params, iter([jax.tree.map(lambda x: x[None], batch)]),
                       0.5, scope="local", mask_dim=mask_dim)
    # Unstructured masks need no axes: the stack is pruned as any weight.
    assert "stack/kernel" in MaskLayout.from_params(params).paths


class _Middle(nn.Module):
    """A DenseGeneral between two dense layers: not the input layer, so not kept."""

    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((2, 4))(nn.relu(nn.Dense(8)(x)))
        return nn.Dense(3)(h.reshape(h.shape[0], -1))


@pytest.mark.parametrize("mask_dim", ["out", "in"])
def test_a_kernel_of_unknown_layout_is_refused_under_either_channel_axis(mask_dim):
    module, x = _Middle(), jnp.ones((4, 6))
    params = module.init(jax.random.key(0), x)["params"]
    loss_fn = lambda p, batch: module.apply({"params": p}, batch["x"]).sum()
    with pytest.raises(ValueError, match=r"DenseGeneral_0/kernel \(shape \(8, 2, 4\)\)"):
        sfpk_jax.prune("magnitude", loss_fn, params, iter([{"x": x[None]}]), 0.5,
                       scope="local", mask_dim=mask_dim)


class _LinenMNIST(nn.Module):
    """The CNN of Flax Linen's MNIST example: convolutions with biases."""

    @nn.compact
    def __call__(self, x, features=False):
        x = nn.relu(nn.Conv(features=32, kernel_size=(3, 3))(x))
        if features:
            return x
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(features=64, kernel_size=(3, 3))(x))
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(features=256)(x.reshape((x.shape[0], -1))))
        return nn.Dense(features=10)(x)


def test_a_linen_conv_bias_follows_its_kernel():
    module, x = _LinenMNIST(), _one()["image"]
    params = module.init(jax.random.key(0), x)["params"]

    def loss_fn(p, batch):
        logits = module.apply({"params": p}, batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    masks = sfpk_jax.prune("magnitude", loss_fn, params, _batches(1), 0.5, scope="local",
                           mask_dim="out").masks
    kernel, bias = _named(masks)["Conv_0/kernel"], _named(masks)["Conv_0/bias"]
    np.testing.assert_array_equal(np.ravel(bias), np.ravel(kernel))
    masked = sfpk_jax.apply_masks(params, masks)
    out = np.asarray(module.apply({"params": masked}, x, features=True))
    dead = np.ravel(np.asarray(kernel)) == 0
    assert dead.any() and np.all(out[..., dead] == 0.0)


def test_the_report_flags_pruned_weights_that_grew_back():
    model = build("nnx")
    masks = sfpk_jax.magnitude_prune(model.params, 0.9)
    stream = _batches(1, seed=3)

    def train(tx, steps=5):
        params, state = sfpk_jax.apply_masks(model.params, masks), None
        state = tx.init(params)
        for _ in range(steps):
            grads = jax.grad(model.loss_fn)(params, jax.tree.map(lambda x: x[0], next(stream)))
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params

    plain = sfpk_jax.sparsity_report(masks, train(optax.adamw(1e-3)))
    assert plain.regrown > 0 and plain.nonzero > plain.kept
    table = plain.table()
    assert re.search(r"conv2/kernel .* regrown: [\d,]+", table), table
    rows = plain.as_dict()["layers"]
    assert sum(r["regrown"] for r in rows) == plain.regrown
    assert plain.sparsity == pytest.approx(0.9, abs=1e-3)  # the masks' count, unchanged
    kept = sfpk_jax.sparsity_report(masks, train(sfpk_jax.keep_masked(optax.adamw(1e-3), masks)))
    assert kept.regrown == 0 and "regrown" not in kept.table()
