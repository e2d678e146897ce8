"""Exact top-k masks, k-th smallest thresholds and the running vote."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfpk_jax.core import topk, voting

LAYOUTS = st.sampled_from([((6, 5),), ((2, 3, 1, 4), (5,), (4, 3)), ((7,), (3, 3, 2, 2), (6,))])
VOTE_LAYOUTS = st.sampled_from([((6, 5),), ((2, 3, 1, 4), (5,), (4, 3))])
SEEDS = st.integers(0, 2**31 - 1)


def _distinct_scores(rng, shapes):
    """Positive scores without ties: a random permutation of 1..D, scaled."""
    total = sum(math.prod(s) for s in shapes)
    flat = (rng.permutation(total) + 1.0) / total
    out, start = [], 0
    for s in shapes:
        size = math.prod(s)
        out.append(jnp.asarray(flat[start : start + size].reshape(s), jnp.float32))
        start += size
    return out


_counts = jax.jit(topk.counts, static_argnums=(0, 2))


@functools.partial(jax.jit, static_argnums=2)
def _thresholded(values, k, scope):
    return topk.at_or_above_kth(values, k, scope), topk.above_kth(values, k, scope)


_vote = jax.jit(voting.vote, static_argnames=("mode", "score", "voters", "scope"))


def _flat(leaves):
    return np.concatenate([np.ravel(np.asarray(x)) for x in leaves])


@settings(max_examples=20)
@given(shapes=LAYOUTS, sparsity=st.floats(0.0, 0.99), seed=SEEDS)
def test_topk_global_keeps_exactly_the_top_entries(shapes, sparsity, seed):
    scores = _distinct_scores(np.random.default_rng(seed), shapes)
    total = sum(math.prod(s) for s in shapes)
    remove = math.floor(sparsity * total)
    masks = topk.topk_mask(scores, remove, "global")
    assert [m.shape for m in masks] == [s.shape for s in scores]
    assert all(m.dtype == jnp.float32 for m in masks)
    kept = _flat(masks)
    assert set(np.unique(kept)) <= {0.0, 1.0}
    assert kept.sum() == total - remove
    flat = _flat(scores)
    order = np.argsort(flat)
    np.testing.assert_array_equal(kept[order[remove:]], 1.0)
    np.testing.assert_array_equal(kept[order[:remove]], 0.0)


@settings(max_examples=20)
@given(shapes=LAYOUTS, sparsity=st.floats(0.0, 0.99), seed=SEEDS)
def test_topk_local_keeps_exactly_the_top_entries_per_layer(shapes, sparsity, seed):
    scores = _distinct_scores(np.random.default_rng(seed), shapes)
    remove = [math.floor(sparsity * math.prod(s)) for s in shapes]
    masks = topk.topk_mask(scores, remove, "local")
    for m, s, r in zip(masks, scores, remove):
        m, s = np.ravel(np.asarray(m)), np.ravel(np.asarray(s))
        assert m.sum() == s.size - r
        order = np.argsort(s)
        np.testing.assert_array_equal(m[order[r:]], 1.0)


@pytest.mark.parametrize("scope", ["global", "local"])
@settings(max_examples=15)
@given(shapes=LAYOUTS, sparsity=st.floats(0.0, 0.99), zero_frac=st.floats(0.0, 0.9), seed=SEEDS)
def test_zero_scores_are_never_kept(scope, shapes, sparsity, zero_frac, seed):
    rng = np.random.default_rng(seed)
    scores = [jnp.where(rng.random(s.shape) >= zero_frac, s, 0.0) for s in _distinct_scores(rng, shapes)]
    sizes = [math.prod(s) for s in shapes]
    if scope == "global":
        remove = math.floor(sparsity * sum(sizes))
        groups = [(scores, remove)]
    else:
        remove = [math.floor(sparsity * d) for d in sizes]
        groups = [([s], r) for s, r in zip(scores, remove)]
    masks = topk.topk_mask(scores, remove, scope)
    kept, flat = _flat(masks), _flat(scores)
    assert np.all(kept[flat == 0] == 0)
    # Kept: the requested count, or every non-zero entry when there are fewer.
    for leaves, r in groups:
        idx = [id(x) for x in leaves]
        part_kept = _flat([m for m, s in zip(masks, scores) if id(s) in idx])
        part_flat = _flat(leaves)
        assert part_kept.sum() == min(part_flat.size - r, np.count_nonzero(part_flat))


@pytest.mark.parametrize("use_key", [True, False])
@pytest.mark.parametrize("scope", ["global", "local"])
@settings(max_examples=15)
@given(shapes=LAYOUTS, sparsity=st.floats(0.05, 0.95), levels=st.integers(2, 5), seed=SEEDS)
def test_ties_are_broken_to_the_exact_count(use_key, scope, shapes, sparsity, levels, seed):
    rng = np.random.default_rng(seed)
    # Few distinct positive values: many ties at any threshold.
    scores = [jnp.asarray(rng.integers(1, levels + 1, s), jnp.float32) for s in shapes]
    sizes = [math.prod(s) for s in shapes]
    key = jax.random.PRNGKey(seed % 1000) if use_key else None
    if scope == "global":
        remove = math.floor(sparsity * sum(sizes))
        parts = [(_flat(scores), _flat(topk.topk_mask(scores, remove, scope, key)), remove)]
    else:
        remove = [math.floor(sparsity * d) for d in sizes]
        masks = topk.topk_mask(scores, remove, scope, key)
        parts = [(np.ravel(np.asarray(s)), np.ravel(np.asarray(m)), r) for s, m, r in zip(scores, masks, remove)]
    for flat, kept, r in parts:
        assert kept.sum() == flat.size - r
        if r >= 1:
            tau = np.sort(flat)[r - 1]
            assert np.all(kept[flat > tau] == 1)
            assert np.all(kept[flat < tau] == 0)
    # The same key gives the same mask.
    again = topk.topk_mask(scores, remove, scope, key)
    np.testing.assert_array_equal(_flat(again), _flat(topk.topk_mask(scores, remove, scope, key)))


def test_tie_breaking_by_key_differs_from_position():
    scores = [jnp.ones((64,), jnp.float32)]
    by_position = np.asarray(topk.topk_mask(scores, 32, "global")[0])
    np.testing.assert_array_equal(by_position, np.arange(64) >= 32)
    by_key = np.asarray(topk.topk_mask(scores, 32, "global", jax.random.PRNGKey(0))[0])
    assert by_key.sum() == 32 and not np.array_equal(by_key, by_position)


_kth = jax.jit(topk.kth_smallest)


@settings(max_examples=20)
@given(size=st.sampled_from([1, 7, 40]), k=st.integers(-3, 45), seed=SEEDS, ties=st.booleans())
def test_kth_smallest_is_exact_and_clips_k(size, k, seed, ties):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=size).astype(np.float32)
    if ties:
        values = np.round(values).astype(np.float32)  # negatives, zeros, repeats
    got = float(_kth(jnp.asarray(values), jnp.int32(k)))
    assert got == np.sort(values)[min(max(k, 1), size) - 1]


def test_kth_smallest_handles_signed_zeros_and_extremes():
    values = jnp.asarray([0.0, -0.0, -np.inf, np.inf, 3.0, -2.5, 1e-38, -1e-38], jnp.float32)
    expected = np.sort(np.asarray(values))
    for k in range(1, 9):
        assert float(topk.kth_smallest(values, jnp.int32(k))) == expected[k - 1]


def test_kth_smallest_is_exact_in_float64():
    # With jax_enable_x64 (the spec's way to compare computation paths) the
    # polarizer's threshold must be a value of the float64 vector itself.
    with jax.enable_x64(True):
        values = jnp.asarray(1.0 + np.arange(1, 9) * 1e-12, jnp.float64)
        tau = topk.kth_smallest(values, jnp.int32(3))
        assert float(tau) == float(values[2])
        kept = topk.at_or_above_kth([values], jnp.int32(3), "global")[0]
        assert int(np.sum(np.asarray(kept))) == 6


@pytest.mark.parametrize("scope", ["global", "local"])
@settings(max_examples=15)
@given(shapes=LAYOUTS, density=st.floats(0.0, 1.2), seed=SEEDS)
def test_counts_and_thresholded_masks(scope, shapes, density, seed):
    values = _distinct_scores(np.random.default_rng(seed), shapes)
    sizes = tuple(math.prod(s) for s in shapes)
    k = _counts(sizes, jnp.float32(density), scope)
    f32 = np.float32
    if scope == "global":
        expected_k = [int(np.floor((f32(1.0) - f32(density)) * f32(sum(sizes))))]
        groups = [list(range(len(shapes)))]
    else:
        expected_k = [int(np.floor((f32(1.0) - f32(density)) * f32(d))) for d in sizes]
        groups = [[l] for l in range(len(shapes))]
    np.testing.assert_array_equal(np.atleast_1d(np.asarray(k)), expected_k)
    at_or_above, above = _thresholded(values, k, scope)
    for group, kk in zip(groups, expected_k):
        flat = _flat([values[l] for l in group])
        got_ge = _flat([at_or_above[l] for l in group])
        got_gt = _flat([above[l] for l in group])
        if kk < 1:
            np.testing.assert_array_equal(got_ge, 1.0)
            np.testing.assert_array_equal(got_gt, flat)
        else:
            tau = np.sort(flat)[min(kk, flat.size) - 1]
            np.testing.assert_array_equal(got_ge, (flat >= tau).astype(np.float32))
            np.testing.assert_array_equal(got_gt, np.where(flat <= tau, 0.0, flat))


def test_remove_counts():
    assert topk.remove_counts([10, 30], 0.5, "global") == 20
    assert topk.remove_counts([10, 30], 0.55, "local") == [5, 16]


_voter_weights = jax.jit(voting.voter_weights, static_argnums=1)


@settings(max_examples=20)
@given(n=st.sampled_from([1, 4, 9]), ratio=st.floats(0.01, 1.0), seed=SEEDS)
def test_voter_weights_pick_the_lowest_energies(n, ratio, seed):
    energy = np.random.default_rng(seed).permutation(n).astype(np.float32)
    voters = max(1, math.ceil(ratio * n - 1e-9))
    w = np.asarray(_voter_weights(jnp.asarray(energy), voters))
    assert w.dtype == np.float32
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)
    chosen = np.flatnonzero(w > 0)
    np.testing.assert_array_equal(np.sort(chosen), np.sort(np.argsort(energy)[:voters]))
    np.testing.assert_allclose(w[chosen], 1.0 / voters, rtol=1e-6)


def test_voter_weights_break_ties_by_index():
    w = np.asarray(voting.voter_weights(jnp.asarray([1.0, 0.5, 0.5, 0.5]), 2))
    np.testing.assert_allclose(w, [0.0, 0.5, 0.5, 0.0])


def _vote_inputs(seed, shapes, n):
    rng = np.random.default_rng(seed)
    particles = [jnp.asarray(rng.normal(size=(n,) + s), jnp.float32) for s in shapes]
    theta = [jnp.asarray(rng.normal(size=s) * (rng.random(s) > 0.1), jnp.float32) for s in shapes]
    old = [jnp.asarray(rng.random(s), jnp.float32) for s in shapes]
    energy = jnp.asarray(rng.permutation(n), jnp.float32)
    return particles, theta, old, energy


@pytest.mark.parametrize("score", ["mp", "m"])
@settings(max_examples=10)
@given(shapes=VOTE_LAYOUTS, n=st.sampled_from([1, 4]), voters_frac=st.floats(0.01, 1.0),
       momentum=st.floats(0.0, 1.0), seed=SEEDS)
def test_soft_vote_by_hand(score, shapes, n, voters_frac, momentum, seed):
    particles, theta, old, energy = _vote_inputs(seed, shapes, n)
    voters = max(1, math.ceil(voters_frac * n - 1e-9))
    new = _vote(old, particles, theta, energy, mode="soft", score=score, voters=voters,
                      momentum=momentum, target_density=0.3, scope="global")
    best = np.argsort(np.asarray(energy))[:voters]
    for s_new, p, t, o in zip(new, particles, theta, old):
        p, t = np.asarray(p, np.float64), np.asarray(t, np.float64)
        s = np.abs(p * t[None]) if score == "mp" else np.abs(p)
        expected = s[best].mean(axis=0) + momentum * np.asarray(o, np.float64)
        np.testing.assert_allclose(np.asarray(s_new), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scope", ["global", "local"])
@settings(max_examples=10)
@given(shapes=VOTE_LAYOUTS, n=st.sampled_from([1, 3]), target=st.floats(0.05, 0.9),
       momentum=st.floats(0.0, 1.0), seed=SEEDS)
def test_hard_vote_by_hand(scope, shapes, n, target, momentum, seed):
    particles, theta, old, energy = _vote_inputs(seed, shapes, n)
    new = _vote(old, particles, theta, energy, mode="hard", score="mp", voters=n,
                      momentum=momentum, target_density=target, scope=scope)
    sizes = [math.prod(s) for s in shapes]
    f32 = np.float32
    hard = []
    for i in range(n):
        s_i = [np.abs(np.asarray(p[i]) * np.asarray(t)) for p, t in zip(particles, theta)]
        if scope == "global":
            k = int(np.floor((f32(1.0) - f32(target)) * f32(sum(sizes))))
            tau = [np.sort(_flat(s_i))[k - 1] if k >= 1 else -np.inf] * len(shapes)
        else:
            ks = [int(np.floor((f32(1.0) - f32(target)) * f32(d))) for d in sizes]
            tau = [np.sort(np.ravel(x))[k - 1] if k >= 1 else -np.inf for x, k in zip(s_i, ks)]
        hard.append([np.where(x <= t, 0.0, x) for x, t in zip(s_i, tau)])
    for l, (s_new, o) in enumerate(zip(new, old)):
        expected = np.mean([h[l] for h in hard], axis=0) + momentum * np.asarray(o)
        np.testing.assert_allclose(np.asarray(s_new), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scope", ["global", "local"])
def test_hard_vote_of_one_voter_keeps_its_top_entries(scope):
    rng = np.random.default_rng(7)
    shapes = [(6, 5), (10,)]
    particles, theta, old, energy = _vote_inputs(7, shapes, 1)
    theta = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]  # no zeros
    new = voting.vote(old, particles, theta, energy, mode="hard", score="mp", voters=1,
                      momentum=0.0, target_density=0.25, scope=scope)
    if scope == "global":
        assert sum(np.count_nonzero(np.asarray(x)) for x in new) == 40 - math.floor(0.75 * 40)
    else:
        assert [np.count_nonzero(np.asarray(x)) for x in new] == [30 - 22, 10 - 7]
