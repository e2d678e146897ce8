"""N:M masks (``mask_dim="2:4"``): every pruner, every framework's layout, and the tools.

* Every pruner (magnitude, random, SNIP, GraSP, SynFlow, a registered score
  pruner, SFPK, SpODE) keeps exactly N of every M consecutive weights along
  each kernel's input axis, on Linen, NNX and Equinox models; biases and
  norms stay dense.
* The groups run along the input axis of each layout: axis -2 of a Flax
  kernel, axis 1 of an Equinox weight (scores that rank the other way along
  any other axis would give another mask).
* Bad patterns, a sparsity other than 1 - N/M and an input size that M does
  not divide are refused in one line.
* keep_masked, save_masked / load_masked, is_n_m and sparsity_report know
  the pattern.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from framework_models import build

import sfpk_jax
from sfpk_jax.core import n_m
from sfpk_jax.core.layers import trace_layers
from sfpk_jax.core.masks import MaskLayout
from sfpk_jax.pruners import PrunerOutputError, register_pruner, score_pruner, unregister_pruner
from sfpk_jax.sfpk.resume import fingerprint

FRAMEWORKS = ("linen", "nnx", "equinox")
QUIET = sfpk_jax.Execution(progress=False)


@functools.cache
def _model(framework):
    return build(framework)


def _batches(particles=1, seed=0):
    rng = np.random.default_rng(seed)
    while True:
        yield {"image": jnp.asarray(rng.normal(size=(particles, 16, 8, 8, 1)), jnp.float32),
               "label": jnp.asarray(rng.integers(0, 10, (particles, 16)), jnp.int32)}


@functools.cache
def _layers(framework):
    model = _model(framework)
    return trace_layers(model.loss_fn, model.params, jax.tree.map(lambda x: x[0],
                                                                  next(_batches())))


def _group_counts(mask, in_axis, m):
    kept = np.moveaxis(np.asarray(mask) != 0, in_axis, -1)
    return kept.reshape(kept.shape[:-1] + (-1, m)).sum(axis=-1)


def _assert_exactly_n(masks, params, layout, pattern):
    for path, mask, axis in zip(layout.paths, layout.gather(masks), layout.in_axes):
        counts = _group_counts(mask, axis, pattern.m)
        assert np.all(counts == pattern.n), (path, np.unique(counts))
    assert sfpk_jax.is_n_m(masks, str(pattern), params) == ()
    assert sfpk_jax.sparsity_of(masks, params) == pytest.approx(pattern.sparsity)


def _prune(method, framework, mask_dim="2:4", **options):
    model = _model(framework)
    logits = lambda p, x: model.logits(p, model.stats, x)  # noqa: E731
    kwargs = {"random": {"key": jax.random.key(1)},
              "grasp": {"logits_fn": logits},
              "synflow": {"logits_fn": logits},
              "sfpk": {"config": sfpk_jax.SFPKConfig(steps=3, particles=2), "execution": QUIET},
              "spode": {"config": sfpk_jax.SFPKConfig(steps=3), "execution": QUIET},
              }.get(method, {})
    particles = 2 if method == "sfpk" else 1
    return sfpk_jax.prune(method, model.loss_fn, model.params, _batches(particles),
                          1 - n_m.parse(mask_dim).n / n_m.parse(mask_dim).m,
                          mask_dim=mask_dim, **kwargs, **options).masks


def _signed_scores(layout, params, batches, key, *, loss_fn):
    """A registered score pruner's scores: -|theta| (keeps the smallest weights)."""
    del batches, key, loss_fn
    return [-jnp.abs(t) for t in layout.gather(params)]


@pytest.fixture(scope="module")
def registered():
    register_pruner("n_m_test_smallest", score_pruner(_signed_scores))
    yield "n_m_test_smallest"
    unregister_pruner("n_m_test_smallest")


CASES = [(f, m) for f in FRAMEWORKS for m in ("magnitude", "random", "snip", "grasp", "synflow",
                                              "registered", "sfpk")] + [("nnx", "spode")]


@pytest.mark.parametrize("framework, method", CASES)
def test_every_pruner_keeps_exactly_n_of_every_m(framework, method, registered):
    model = _model(framework)
    name = registered if method == "registered" else method
    masks = _prune(name, framework)
    layout = MaskLayout.from_params(model.params, _layers(framework), "2:4")
    _assert_exactly_n(masks, model.params, layout, n_m.NM(2, 4))
    # Kernels only: every bias and norm stays dense, and so does the first layer (its
    # input channels are the image's).
    flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]
    masked = {sfpk_jax.core.masks.path_to_str(p) for p, m in flat if m is not None}
    assert masked == set(layout.paths) and model.first not in masked
    assert not any(p.endswith(("bias", "scale")) for p in masked)


@pytest.mark.parametrize("mask_dim", ["1:4", "3:8"])
def test_other_patterns_and_either_scope(mask_dim):
    model = _model("nnx")
    pattern = n_m.parse(mask_dim)
    layout = MaskLayout.from_params(model.params, _layers("nnx"), mask_dim)
    for scope in ("global", "local"):
        masks = sfpk_jax.magnitude_prune(model.params, pattern.sparsity, prunable=_layers("nnx"),
                                         scope=scope, mask_dim=mask_dim)
        _assert_exactly_n(masks, model.params, layout, pattern)


def _by_input(shape, in_axis):
    """Weights that grow with the input index only (equal along every other axis)."""
    index = np.arange(shape[in_axis], dtype=np.float32).reshape(
        [-1 if i == in_axis else 1 for i in range(len(shape))])
    return jnp.asarray(np.broadcast_to(1.0 + index, shape))


@pytest.mark.parametrize("framework, kernel, in_axis", [
    ("linen", "ResNetBlock_1/Conv_1/kernel", 2), ("nnx", "conv2/kernel", 2),
    ("nnx", "linear1/kernel", 0), ("equinox", "layers/5/weight", 1)])
def test_groups_run_along_each_layouts_input_axis(framework, kernel, in_axis):
    model = _model(framework)
    layers = _layers(framework)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: _by_input(np.shape(x), in_axis)
        if sfpk_jax.core.masks.path_to_str(p) == kernel else x, model.params)
    masks = sfpk_jax.magnitude_prune(params, 0.5, prunable=layers, mask_dim="2:4")
    layout = MaskLayout.from_params(params, layers, "2:4")
    mask = np.asarray(layout.gather(masks)[layout.paths.index(kernel)])
    # The two largest inputs of every group of 4: inputs 2 and 3 of each (the other axes
    # hold equal weights, so grouping along any of them would keep by position instead).
    expected = np.broadcast_to((_by_input(mask.shape, in_axis) - 1) % 4 >= 2, mask.shape)
    assert np.array_equal(mask != 0, expected)


def test_rank_2_kernels_group_by_their_name():
    # A Flax kernel is (in, out): groups down its rows; an Equinox weight is (out, in): along
    # its rows. The same values ranked the wrong way would keep the other half.
    values = jnp.asarray(np.arange(16, dtype=np.float32).reshape(4, 4) + 1.0)
    params = {"dense": {"kernel": values}, "linear": {"weight": values}}
    masks = sfpk_jax.magnitude_prune(params, 0.5, prunable="kernel|weight", mask_dim="2:4")
    assert np.array_equal(masks["dense"]["kernel"], np.repeat([[0.0], [0], [1], [1]], 4, 1))
    assert np.array_equal(masks["linear"]["weight"], np.repeat([[0.0, 0, 1, 1]], 4, 0))


def test_ties_go_by_position_or_by_key():
    params = {"dense": {"kernel": jnp.ones((8, 3)), "bias": jnp.ones(3)}}
    masks = sfpk_jax.magnitude_prune(params, 0.5, prunable="kernel|bias", mask_dim="2:4")
    assert masks["dense"]["bias"] is None  # no input axis: dense
    assert np.array_equal(masks["dense"]["kernel"][:, 0], [0, 0, 1, 1, 0, 0, 1, 1])
    keyed = sfpk_jax.prune("random", None, params, None, 0.5, prunable="kernel",
                           key=jax.random.key(0), mask_dim="2:4").masks
    assert np.all(_group_counts(keyed["dense"]["kernel"], 0, 4) == 2)


def test_top_n_matches_a_sort_of_every_group():
    rng = np.random.default_rng(0)
    values = rng.integers(1, 4, (3, 8, 5)).astype(np.uint32)  # many ties
    ties = np.arange(values.size, dtype=np.float32).reshape(values.shape)
    mask = np.asarray(n_m.top_n(jnp.asarray(values), 1, n_m.NM(3, 4), jnp.asarray(ties)))
    for i, g, j in np.ndindex(3, 2, 5):
        group = values[i, 4 * g:4 * g + 4, j]
        order = np.argsort(group, kind="stable")  # ties: the later position ranks higher
        expected = np.zeros(4)
        expected[order[1:]] = 1.0
        assert np.array_equal(mask[i, 4 * g:4 * g + 4, j], expected)


def test_dead_weights_are_never_kept():
    kernel = np.ones((4, 2), np.float32)
    kernel[:3, 0] = 0.0  # three of the first group's four weights were pruned before
    masks = sfpk_jax.magnitude_prune({"kernel": jnp.asarray(kernel)}, 0.5, prunable="kernel",
                                     mask_dim="2:4")
    assert masks["kernel"][:, 0].tolist() == [0, 0, 0, 1]
    assert sfpk_jax.is_n_m(masks, "2:4") == ()


@pytest.mark.parametrize("value, problem", [
    ("0:4", "0 < N < M"), ("5:4", "0 < N < M"), ("4:4", "N >= M keeps all"),
    ("2/4", "not one of None, 'out', 'in' or an 'N:M' pattern"), (" 2:4", "'N:M' pattern"),
    ((2, 4), "'N:M' pattern"), (0.5, "'N:M' pattern")])
def test_bad_patterns_are_refused_in_one_line(value, problem):
    params = {"kernel": jnp.ones((4, 4))}
    for call in (lambda: sfpk_jax.magnitude_prune(params, 0.5, prunable="kernel", mask_dim=value),
                 lambda: sfpk_jax.prune("magnitude", None, params, None, 0.5, prunable="kernel",
                                        mask_dim=value)):
        with pytest.raises(ValueError, match="mask_dim=") as err:
            call()
        assert problem in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(sfpk_jax.ConfigError, match=r"SFPKConfig\.mask_dim=.*0 < N < M"):
        sfpk_jax.SFPKConfig(mask_dim=value)
    with pytest.raises(ValueError, match="n_m="):
        sfpk_jax.is_n_m({"kernel": jnp.ones((4, 4))}, value)


def test_a_sparsity_other_than_one_minus_n_over_m_is_refused():
    params = {"kernel": jnp.ones((4, 4))}
    with pytest.raises(ValueError, match=r"mask_dim='2:4' keeps 2 of every 4 weights: pass "
                                         r"sparsity=0\.5 \(1 - N/M\), not 0\.9$"):
        sfpk_jax.magnitude_prune(params, 0.9, prunable="kernel", mask_dim="2:4")
    model = _model("linen")
    with pytest.raises(ValueError, match="pass sparsity=0.75"):
        sfpk_jax.sfpk_prune(model.loss_fn, model.params, _batches(2), 0.5, execution=QUIET,
                            config=sfpk_jax.SFPKConfig(steps=2, particles=2, mask_dim="1:4"))


def test_an_input_size_that_m_does_not_divide_is_refused_naming_the_leaf():
    model = _model("equinox")  # layers/5/weight is (64, 200): 200 inputs, no multiple of 3
    with pytest.raises(ValueError, match=r"^layers/5/weight \(shape \(64, 200\)\) has 200 inputs "
                                         r"along axis 1, not a multiple of M=3") as err:
        _prune("magnitude", "equinox", "1:3")
    assert "\n" not in str(err.value)
    # The first convolution joins when the layers are restricted: its one input channel.
    every = _layers("equinox").restrict("weight")
    with pytest.raises(ValueError, match=r"^layers/0/weight \(shape \(8, 1, 3, 3\)\).*M=4"):
        sfpk_jax.magnitude_prune(model.params, 0.5, prunable=every, mask_dim="2:4")


def test_synflow_iterations_are_refused_with_n_m():
    with pytest.raises(ValueError, match="iterations=2 .* mask_dim='2:4' cannot hold"):
        _prune("synflow", "nnx", iterations=2)


def test_prune_refuses_a_pruner_that_ignores_the_pattern():
    def unstructured(loss_fn, params, batches, sparsity, **_):
        return sfpk_jax.PruneResult(sfpk_jax.magnitude_prune(params, sparsity, prunable="kernel"))

    register_pruner("n_m_test_ignores", unstructured)
    try:
        params = {"kernel": jnp.asarray(np.arange(16.0).reshape(4, 4).T)}  # keeps 2 columns
        with pytest.raises(PrunerOutputError, match=r"break mask_dim='2:4'.* at kernel$"):
            sfpk_jax.prune("n_m_test_ignores", None, params, None, 0.5, prunable="kernel",
                           mask_dim="2:4")
    finally:
        unregister_pruner("n_m_test_ignores")


def test_sfpk_simulates_unstructured_and_resumes(tmp_path):
    model = _model("nnx")
    # Local scope (the pruner test runs the global one): any scope goes, and the dynamics
    # follow it (channel masks would run global dynamics).
    config = sfpk_jax.SFPKConfig(steps=4, particles=2, scope="local", mask_dim="2:4")
    assert config.dynamics == "local"
    policy = sfpk_jax.CheckpointPolicy(tmp_path, every=2)
    first = sfpk_jax.sfpk_prune(model.loss_fn, model.params, _batches(2), 0.5, config=config,
                                execution=QUIET, checkpoint=policy)
    layout = MaskLayout.from_params(model.params, _layers("nnx"), "2:4")
    # Full-shaped particles, aiming at density N/M; the final mask N:M over the votes.
    assert [p.shape[1:] for p in layout.gather(first.particles)] == list(layout.shapes)
    _assert_exactly_n(first.masks, model.params, layout, n_m.NM(2, 4))
    again = sfpk_jax.sfpk_prune(model.loss_fn, model.params, _batches(2), 0.5, config=config,
                                execution=QUIET,
                                checkpoint=sfpk_jax.CheckpointPolicy(tmp_path, every=2,
                                                                     resume=True))
    for a, b in zip(jax.tree.leaves(first.masks), jax.tree.leaves(again.masks)):
        assert np.array_equal(a, b)
    theta = layout.gather(model.params)
    prints = [json.dumps(fingerprint(config.replace(mask_dim=d), 0.5, layout.paths, theta,
                                     layout.mask_shapes, 0.5)) for d in ("2:4", "1:4")]
    assert prints[0] != prints[1] and '"mask_dim": "2:4"' in prints[0]


@functools.cache
def _pruned(framework):
    model = _model(framework)
    return model, sfpk_jax.magnitude_prune(model.params, 0.5, prunable=_layers(framework),
                                           mask_dim="2:4")


def test_keep_masked_keeps_the_pattern_through_optax_steps():
    rng = np.random.default_rng(0)
    params = {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
                          "bias": jnp.zeros(8)},
              "Dense_1": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)}}
    masks = sfpk_jax.magnitude_prune(params, 0.5, prunable="kernel", mask_dim="2:4")
    x = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)

    def loss_fn(p):
        hidden = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"][None])
        return jnp.mean((hidden @ p["Dense_1"]["kernel"] - y) ** 2)

    tx = sfpk_jax.keep_masked(optax.adamw(1e-1, weight_decay=1e-2), masks)
    params = sfpk_jax.apply_masks(params, masks)
    state = tx.init(params)
    for _ in range(5):
        updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
        params = optax.apply_updates(params, updates)
    nonzero = jax.tree.map(lambda p: (p != 0).astype(jnp.float32), params)
    assert sfpk_jax.is_n_m(nonzero, "2:4") == ()  # the bias, all non-zero, is no kernel
    report = sfpk_jax.sparsity_report(masks, params, n_m="2:4")
    assert report.regrown == 0 and report.n_m_broken == 0


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_save_and_load_keep_the_pattern(tmp_path, framework):
    model, masks = _pruned(framework)
    sfpk_jax.save_masked(tmp_path / "model.safetensors", model.params, masks)
    params, loaded = sfpk_jax.load_masked(tmp_path / "model.safetensors", model.params)
    for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(loaded)):
        assert np.array_equal(a, b)
    assert sfpk_jax.is_n_m(loaded, "2:4", params) == ()
    assert sfpk_jax.is_n_m(jax.tree.map(lambda p: (p != 0).astype(jnp.float32), params),
                           "2:4") == ()


def test_is_n_m_names_the_breaking_leaves():
    masks = {"dense": {"kernel": np.tile([[1.0], [1], [0], [0]], (2, 3)), "bias": np.ones(3)},
             "conv": {"weight": np.tile([1.0, 0, 1, 0], (2, 1)), "bias": None}}
    assert sfpk_jax.is_n_m(masks, "2:4") == ()
    assert sfpk_jax.is_n_m(masks, "1:4") == ("conv/weight", "dense/kernel")
    masks["dense"]["kernel"][2, 1] = 1.0  # one group of three keeps 3 of 4
    assert sfpk_jax.is_n_m(masks, "2:4") == ("dense/kernel",)
    # With params, a channel mask is checked as it applies: a kept output keeps all its inputs.
    params = {"kernel": jnp.ones((8, 2))}
    assert sfpk_jax.is_n_m({"kernel": np.array([[1.0, 0.0]])}, "2:4", params) == ("kernel",)
    with pytest.raises(ValueError, match="kernel"):
        sfpk_jax.is_n_m({"kernel": np.full((8, 2), 0.5)}, "2:4")


def test_sparsity_report_says_which_layers_conform():
    model, masks = _pruned("linen")
    report = sfpk_jax.sparsity_report(masks, model.params, n_m="2:4")
    assert report.n_m == "2:4" and report.n_m_broken == 0
    assert all(row.n_m_broken == 0 for row in report.layers)
    assert report.as_dict()["layers"][0]["n_m_broken"] == 0
    broken = jax.tree.map(np.array, masks)
    broken["Dense_0"]["kernel"][:, :] = 1.0  # 4 groups of 4 inputs, for each of 10 outputs
    report = sfpk_jax.sparsity_report(broken, model.params, n_m="2:4")
    rows = {row.path: row for row in report.layers}
    assert rows["Dense_0/kernel"].n_m_broken == 40 and report.n_m_broken == 40
    assert "40 groups break" in report.table() and " ok" in report.table()
    assert sfpk_jax.sparsity_report(masks, model.params).layers[0].n_m_broken is None
    assert "2:4" not in sfpk_jax.sparsity_report(masks, model.params).table()
