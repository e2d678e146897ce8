"""Exact top-k masks and k-th smallest thresholds (sfpk_jax.core.topk)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfpk_jax.core import topk

pytestmark = [pytest.mark.slow, pytest.mark.strict_promotion]

LAYOUTS = st.sampled_from([((6, 5),), ((2, 3, 1, 4), (5,), (4, 3)), ((7,), (3, 3, 2, 2), (6,))])
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
