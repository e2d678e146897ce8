"""Baseline pruners (random, SNIP, GraSP, SynFlow): scores against independent
computations, exact kept counts, and the registry's option errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sfpk_jax
from sfpk_jax.core import topk
from sfpk_jax.core.masks import MaskLayout, apply_masks
from sfpk_jax.pruners import baselines, masks_from_scores

pytestmark = pytest.mark.slow

INPUT_KEY, LABEL_KEY = "x", "y"


def _f64(tree):
    def cast(a):
        a = np.asarray(a)
        return jnp.asarray(a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a)

    return jax.tree.map(cast, tree)


def _flat(leaves):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in leaves])


def _options(method, model):
    if method == "snip":
        return {"num_batches": 2}
    if method == "grasp":
        return {"logits_fn": model.logits, "input_key": INPUT_KEY, "label_key": LABEL_KEY}
    if method == "synflow":
        return {"logits_fn": model.logits, "input_shape": model.input_shape}
    return {}


# ---------------------------------------------------------------- SNIP


def test_snip_scores_match_finite_differences_in_the_masks(model):
    """|dL/dm| at m = 1 by central differences, one mask entry at a time (float64)."""
    with jax.enable_x64(True):
        params = _f64(model.params)
        layout = MaskLayout.from_params(params)
        batches = [_f64(b) for b in model.batches_list(2, 2, size=6)]
        scores = baselines.snip_scores(model.loss_fn, params, layout, batches, num_batches=2)

        def total_loss(flat_mask):
            masks, start = [], 0
            for shape, size in zip(layout.shapes, layout.sizes):
                masks.append(flat_mask[start:start + size].reshape(shape))
                start += size
            masked = apply_masks(params, layout.scatter(masks))
            return sum(model.loss_fn(masked, jax.tree.map(lambda x: x[i], b))
                       for b in batches for i in range(2))

        eps = 1e-6
        ones = jnp.ones(layout.total, jnp.float64)
        bumps = eps * jnp.eye(layout.total, dtype=jnp.float64)
        fd = jax.jit(jax.vmap(lambda e: (total_loss(ones + e) - total_loss(ones - e)) / (2 * eps)))(bumps)
        expected = np.abs(np.asarray(fd))
        expected /= expected.sum()
        np.testing.assert_allclose(_flat(scores), expected, rtol=1e-4, atol=1e-9)


def test_snip_equals_theta_times_gradient(mlp):
    layout = MaskLayout.from_params(mlp.params)
    batch = next(mlp.particle_batches(1))
    scores = baselines.snip_scores(mlp.loss_fn, mlp.params, layout, [batch])
    theta = layout.gather(mlp.params)
    grad = layout.gather(jax.grad(mlp.loss_fn)(mlp.params, jax.tree.map(lambda x: x[0], batch)))
    raw = [np.abs(np.asarray(t * g)) for t, g in zip(theta, grad)]
    norm = sum(r.sum() for r in raw)
    for s, r in zip(scores, raw):
        np.testing.assert_allclose(np.asarray(s), r / norm, rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------- GraSP


def test_grasp_scores_match_finite_differences_of_gradients(model):
    """Hg against (grad L_T(theta + eps g) - grad L_T(theta - eps g)) / 2 eps."""
    temperature = 200.0
    with jax.enable_x64(True):
        params = _f64(model.params)
        layout = MaskLayout.from_params(params)
        batches = [_f64(b) for b in model.batches_list(2, 2, size=6)]
        slices = [jax.tree.map(lambda x: x[i], b) for b in batches for i in range(2)]

        def loss_t(p, batch):
            logits = model.logits(p, batch[INPUT_KEY]) / temperature
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[LABEL_KEY]).mean()

        @jax.jit
        def grad_sum(p):
            grads = [layout.gather(jax.grad(loss_t)(p, s)) for s in slices]
            return [sum(parts) for parts in zip(*grads)]

        theta = layout.gather(params)
        g = grad_sum(params)
        eps = 1e-4
        plus = grad_sum(layout.replace(params, [t + eps * d for t, d in zip(theta, g)]))
        minus = grad_sum(layout.replace(params, [t - eps * d for t, d in zip(theta, g)]))
        hg = [(a - b) / (2 * eps) for a, b in zip(plus, minus)]
        raw = _flat([t * h for t, h in zip(theta, hg)])
        expected = raw / (abs(raw.sum()) + 1e-10)

        scores = baselines.grasp_scores(model.logits, params, layout, batches, num_batches=2,
                                        input_key=INPUT_KEY, label_key=LABEL_KEY)
        got = _flat(scores)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_grasp_keeps_the_largest_theta_hg_as_the_official_code(mlp):
    """Official: scores = theta * Hg, top kept (= the paper's largest -theta*Hg removed)."""
    layout = MaskLayout.from_params(mlp.params)
    batches = mlp.batches_list(2, 1)
    scores = _flat(baselines.grasp_scores(mlp.logits, mlp.params, layout, batches,
                                          input_key=INPUT_KEY, label_key=LABEL_KEY))
    assert scores.min() < 0 < scores.max()  # signed: the sign convention matters
    result = sfpk_jax.prune("grasp", mlp.loss_fn, mlp.params, batches, 0.6,
                            **_options("grasp", mlp))
    kept = _flat(layout.gather(result.masks)).astype(bool)
    assert scores[kept].min() > scores[~kept].max()


# ------------------------------------------------------------- SynFlow


def _two_layer(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "Dense_0": {"kernel": jnp.asarray(rng.standard_normal((5, 4)), jnp.float32),
                    "bias": jnp.asarray(rng.standard_normal(4), jnp.float32)},
        "Dense_1": {"kernel": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
                    "bias": jnp.asarray(rng.standard_normal(3), jnp.float32)},
    }


def _two_layer_logits(params, x):
    h = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"][None, :])
    return h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"][None, :]


def _hand_synflow(w1, b1, w2, b2):
    """R = sum_k (sum_j (sum_i |W1_ij| + |b1_j|) |W2_jk| + |b2_k|) on x = 1, by hand."""
    w1, b1, w2, b2 = (np.abs(np.asarray(a, np.float64)) for a in (w1, b1, w2, b2))
    h = w1.sum(axis=0) + b1  # hidden activations on the all-ones input
    down = w2.sum(axis=1)  # dR/dh_j
    return [w1 * down[None, :], b1 * down, w2 * h[:, None], b2 * 1.0]


def test_synflow_scores_match_a_hand_written_linear_network():
    params = _two_layer()
    layout = MaskLayout.from_params(params)
    assert layout.paths == ("Dense_0/bias", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel")
    scores = baselines.synflow_scores(_two_layer_logits, params, layout, (5,))
    w1, b1 = params["Dense_0"]["kernel"], params["Dense_0"]["bias"]
    w2, b2 = params["Dense_1"]["kernel"], params["Dense_1"]["bias"]
    hw1, hb1, hw2, hb2 = _hand_synflow(w1, b1, w2, b2)
    for got, want in zip(scores, [hb1, hw1, hb2, hw2]):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_iterative_synflow_matches_a_hand_written_loop():
    params = _two_layer(3)
    sparsity, rounds = 0.8, 3
    names = [("Dense_0", "kernel"), ("Dense_0", "bias"), ("Dense_1", "kernel"), ("Dense_1", "bias")]
    values = [np.asarray(params[a][b], np.float64) for a, b in names]
    total = sum(v.size for v in values)
    masks = [np.ones(v.shape) for v in values]
    for k in range(1, rounds + 1):
        removed = sparsity if k == rounds else 1 - (1 - sparsity) ** (k / rounds)
        scores = _flat(_hand_synflow(*[v * m for v, m in zip(values, masks)]))
        alive = _flat(masks).astype(bool)
        keep = total - math.floor(removed * total)
        order = np.argsort(np.where(alive, scores, -np.inf))[::-1]
        flat = np.zeros(total)
        flat[order[:keep]] = 1.0
        masks, start = [], 0
        for v in values:
            masks.append(flat[start:start + v.size].reshape(v.shape))
            start += v.size
    result = sfpk_jax.prune("synflow", None, params, None, sparsity, logits_fn=_two_layer_logits,
                            input_shape=(5,), iterations=rounds)
    for (a, b), m in zip(names, masks):
        np.testing.assert_array_equal(np.asarray(result.masks[a][b]), m)
    one_shot = sfpk_jax.prune("synflow", None, params, None, sparsity,
                              logits_fn=_two_layer_logits, input_shape=(5,))
    assert sfpk_jax.sparsity_of(one_shot.masks) == sfpk_jax.sparsity_of(result.masks)


def test_synflow_reads_the_input_shape_from_the_batches(cnn):
    a = sfpk_jax.prune("synflow", None, cnn.params, cnn.particle_batches(2), 0.7,
                       logits_fn=cnn.logits, input_key=INPUT_KEY)
    b = sfpk_jax.prune("synflow", None, cnn.params, None, 0.7, logits_fn=cnn.logits,
                       input_shape=cnn.input_shape)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a.masks), jax.tree.leaves(b.masks)))


# -------------------------------------------------------- exact counts


@pytest.mark.parametrize("method", ["magnitude", "random", "snip", "grasp", "synflow"])
@pytest.mark.parametrize("scope", ["global", "local"])
def test_exact_kept_counts(model, method, scope):
    sparsity = 0.7
    result = sfpk_jax.prune(method, model.loss_fn, model.params, model.particle_batches(2),
                            sparsity, scope=scope, key=jax.random.key(0),
                            **_options(method, model))
    layout = MaskLayout.from_params(model.params)
    masks = layout.gather(result.masks)
    assert all(m.dtype == jnp.float32 and m.shape == s for m, s in zip(masks, layout.shapes))
    assert set(np.unique(_flat(masks))) <= {0.0, 1.0}
    if scope == "global":
        assert int(_flat(masks).sum()) == layout.total - math.floor(sparsity * layout.total)
    else:
        for m, size in zip(masks, layout.sizes):
            assert int(np.sum(m)) == size - math.floor(sparsity * size)


@pytest.mark.parametrize("method", ["snip", "synflow"])
def test_masks_keep_the_top_scores(mlp, method):
    layout = MaskLayout.from_params(mlp.params)
    batches = mlp.batches_list(2, 1)
    if method == "snip":
        scores = baselines.snip_scores(mlp.loss_fn, mlp.params, layout, batches)
    else:
        scores = baselines.synflow_scores(mlp.logits, mlp.params, layout, mlp.input_shape)
    result = sfpk_jax.prune(method, mlp.loss_fn, mlp.params, batches, 0.5,
                            **{**_options(method, mlp), **({"num_batches": 1} if method == "snip" else {})})
    kept = _flat(layout.gather(result.masks)).astype(bool)
    assert _flat(scores)[kept].min() >= _flat(scores)[~kept].max()


def test_pruned_weights_stay_pruned(mlp):
    layout = MaskLayout.from_params(mlp.params)
    first = sfpk_jax.prune("magnitude", None, mlp.params, None, 0.5)
    pruned = apply_masks(mlp.params, first.masks)
    for method in ["random", "snip", "grasp", "synflow"]:
        again = sfpk_jax.prune(method, mlp.loss_fn, pruned, mlp.particle_batches(1), 0.3,
                               key=jax.random.key(1), **_options(method, mlp))
        dead = _flat(layout.gather(first.masks)) == 0
        assert not np.any(_flat(layout.gather(again.masks))[dead]), method


# ------------------------------------------------------- data and keys


def test_random_depends_only_on_the_key(mlp, cnn):
    def run(key, batches=None, loss_fn=None):
        return sfpk_jax.prune("random", loss_fn, cnn.params, batches, 0.6, key=key).masks

    same = [run(jax.random.key(3)), run(jax.random.key(3), cnn.particle_batches(2), cnn.loss_fn)]
    other = run(jax.random.key(4))
    leaves = [jax.tree.leaves(m) for m in same + [other]]
    assert all(np.array_equal(a, b) for a, b in zip(leaves[0], leaves[1]))
    assert not all(np.array_equal(a, b) for a, b in zip(leaves[0], leaves[2]))
    scaled = jax.tree.map(lambda p: 3.0 * p, cnn.params)
    assert all(np.array_equal(a, b) for a, b in zip(
        leaves[0], jax.tree.leaves(sfpk_jax.prune("random", None, scaled, None, 0.6,
                                                  key=jax.random.key(3)).masks)))


def test_magnitude_ignores_the_data(mlp):
    a = sfpk_jax.prune("magnitude", None, mlp.params, None, 0.6).masks
    b = sfpk_jax.prune("magnitude", mlp.loss_fn, mlp.params, mlp.particle_batches(2, seed=5), 0.6,
                       key=jax.random.key(9)).masks
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_snip_depends_on_the_data(mlp):
    a = sfpk_jax.prune("snip", mlp.loss_fn, mlp.params, mlp.particle_batches(1, seed=1), 0.6).masks
    b = sfpk_jax.prune("snip", mlp.loss_fn, mlp.params, mlp.particle_batches(1, seed=2), 0.6).masks
    assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_unknown_method_lists_the_names():
    with pytest.raises(ValueError, match="unknown pruner 'snap'.*magnitude.*random.*snip.*grasp.*synflow"):
        sfpk_jax.prune("snap", None, _two_layer(), None, 0.5)


@pytest.mark.parametrize("method,option", [("random", "key"), ("grasp", "logits_fn"),
                                           ("synflow", "logits_fn")])
def test_missing_required_options(mlp, method, option):
    with pytest.raises(ValueError, match=f"{method} needs the option {option}="):
        sfpk_jax.prune(method, mlp.loss_fn, mlp.params, mlp.particle_batches(1), 0.5)


def test_missing_data_and_shapes(mlp):
    with pytest.raises(ValueError, match="snip needs data"):
        sfpk_jax.prune("snip", mlp.loss_fn, mlp.params, None, 0.5)
    with pytest.raises(ValueError, match="grasp needs data"):
        sfpk_jax.prune("grasp", mlp.loss_fn, mlp.params, None, 0.5, logits_fn=mlp.logits)
    with pytest.raises(ValueError, match="input_shape"):
        sfpk_jax.prune("synflow", None, mlp.params, None, 0.5, logits_fn=mlp.logits)
    with pytest.raises(ValueError, match="ran out after 1 of num_batches=3"):
        sfpk_jax.prune("snip", mlp.loss_fn, mlp.params, mlp.batches_list(1, 1), 0.5, num_batches=3)
    with pytest.raises(ValueError, match="leading particle axis"):
        sfpk_jax.prune("snip", mlp.loss_fn, mlp.params, [{"x": np.ones(3), "y": np.int32(1)}], 0.5)


@pytest.mark.parametrize("bad", [0, 1.5, True])
def test_bad_counts_are_rejected(mlp, bad):
    with pytest.raises(ValueError, match="iterations"):
        sfpk_jax.prune("synflow", None, mlp.params, None, 0.5, logits_fn=mlp.logits,
                       input_shape=mlp.input_shape, iterations=bad)
    with pytest.raises(ValueError, match="num_batches"):
        sfpk_jax.prune("snip", mlp.loss_fn, mlp.params, mlp.particle_batches(1), 0.5,
                       num_batches=bad)


def test_bad_scope_and_sparsity(mlp):
    with pytest.raises(ValueError, match="scope"):
        sfpk_jax.prune("random", None, mlp.params, None, 0.5, scope="layer", key=jax.random.key(0))
    with pytest.raises(ValueError, match="sparsity"):
        sfpk_jax.prune("random", None, mlp.params, None, 1.0, key=jax.random.key(0))


def test_signed_and_tied_scores_give_exact_counts():
    params = {"Dense_0": {"kernel": jnp.ones((4, 5)), "bias": jnp.ones(5)}}
    layout = MaskLayout.from_params(params)
    scores = [-jnp.ones(5), jnp.concatenate([-jnp.ones((2, 5)), jnp.zeros((2, 5))])]
    for key in (None, jax.random.key(0)):
        masks = masks_from_scores(layout, scores, 0.4, scope="global", key=key)
        kept = layout.gather(masks)
        assert int(_flat(kept).sum()) == 25 - 10
        assert np.all(np.asarray(kept[1])[2:] == 1.0)  # the zeros beat every -1


def test_score_keys_preserve_the_float_order():
    values = jnp.asarray([-jnp.inf, -3.0, -1e-30, -0.0, 0.0, 1e-30, 2.0, jnp.inf], jnp.float32)
    keys = np.asarray(topk.positive_keys([values], [jnp.ones(8, bool)])[0]).astype(np.int64)
    assert keys.min() >= 1 and np.all(np.diff(keys)[[0, 1, 2, 4, 5, 6]] > 0) and keys[3] == keys[4]
    dead = topk.positive_keys([values], [jnp.arange(8) % 2 == 0])[0]
    assert np.all(np.asarray(dead)[1::2] == 0)
