"""The running vote: which particles vote, and the soft and hard votes by hand."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfpk_jax.core import voting

pytestmark = [pytest.mark.slow, pytest.mark.strict_promotion]

VOTE_LAYOUTS = st.sampled_from([((6, 5),), ((2, 3, 1, 4), (5,), (4, 3))])
SEEDS = st.integers(0, 2**31 - 1)

_vote = jax.jit(voting.vote, static_argnames=("mode", "score", "voters", "scope"))
_voter_weights = jax.jit(voting.voter_weights, static_argnums=1)


def _flat(leaves):
    return np.concatenate([np.ravel(np.asarray(x)) for x in leaves])


def _vote_inputs(seed, shapes, n):
    rng = np.random.default_rng(seed)
    particles = [jnp.asarray(rng.normal(size=(n,) + s), jnp.float32) for s in shapes]
    theta = [jnp.asarray(rng.normal(size=s) * (rng.random(s) > 0.1), jnp.float32) for s in shapes]
    old = [jnp.asarray(rng.random(s), jnp.float32) for s in shapes]
    energy = jnp.asarray(rng.permutation(n), jnp.float32)
    return particles, theta, old, energy


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
