"""chex property tests of the pure SFPK step functions and of compile-once stepping.

* Every pure function of one step (:func:`sfpk_jax.sfpk.sfpk_update`,
  :func:`~sfpk_jax.core.functional.g_and_descent`,
  :func:`~sfpk_jax.core.direction.direction`,
  :func:`~sfpk_jax.core.repulsion.repulsion`, :func:`~sfpk_jax.core.voting.vote`)
  runs under the chex variants with/without ``jit`` and with/without device
  placement of its arguments; each variant must agree with the jitted
  function and satisfy the properties the modules' docstrings state:
  G(1) = 1, g = -grad G, <delta, g> = 1 and |delta| = r/|g|, grad K of the
  particles' shape and equal to the derivative of K_i in m_i alone, the vote
  averaging only the lowest-energy particles, and one update lowering G by
  dt to first order (or leaving the state alone when a value is not finite).
* The compiled step of :func:`sfpk_jax.sfpk.make_stepper` traces the user's loss
  once (``chex.assert_max_traces``) and compiles nothing after the first step,
  for the ``vmap``, ``map`` and ``loop`` particle modes.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import sfpk_jax
from sfpk_jax import SFPKConfig
from sfpk_jax.core import direction as direction_lib
from sfpk_jax.core import functional, voting
from sfpk_jax.core import repulsion as repulsion_lib
from sfpk_jax.core.masks import MaskLayout

pytestmark = pytest.mark.strict_promotion

ALL_VARIANTS = dict(with_jit=True, without_jit=True, with_device=True, without_device=True)
# For further properties of a function already run under ALL_VARIANTS (the
# un-jitted variants recompile every loop of the function at every call, which
# is most of this file's time).
JIT_VARIANTS = dict(with_jit=True, without_jit=True)

# Leaves of one particle: a conv kernel, a dense bias, a dense kernel (the
# layout order of PARAMS below; one set of shapes keeps the un-jitted
# variants' per-shape compilations shared across the tests).
SHAPES = [(2, 2, 1, 3), (3,), (4, 3)]
N = 3


def _rng(seed):
    return np.random.default_rng(seed)


def _leaves(rng, shapes, lo=-1.0, hi=1.0, lead=()):
    return [jnp.asarray(rng.uniform(lo, hi, lead + s), jnp.float32) for s in shapes]


def _f64(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _dot(a, b):
    return sum(float(np.sum(x * y)) for x, y in zip(_f64(a), _f64(b)))


# The library functions go to ``self.variant`` as they are, their
# configuration marked static (``with_jit`` jits them with it; the device
# variants leave static arguments alone), rather than as fresh lambdas: jit
# caches by function, so ``with_jit`` and the jitted references below share
# one compilation per configuration.
DENSITY_STATIC = dict(static_argnums=(1, 2, 3))
DIRECTION_STATIC = dict(static_argnums=(2, 3))
REPULSION_STATIC = dict(static_argnames=("mode", "weighted"))
VOTE_STATIC = dict(static_argnames=("mode", "score", "voters", "momentum", "target_density", "scope"))
UPDATE_STATIC = dict(static_argnames=("config", "target"))

_density_jit = jax.jit(functional.g_and_descent, **DENSITY_STATIC)
_direction_jit = jax.jit(direction_lib.direction, **DIRECTION_STATIC)
_repulsion_jit = jax.jit(repulsion_lib.repulsion, **REPULSION_STATIC)
_vote_jit = jax.jit(voting.vote, **VOTE_STATIC)
_update_jit = jax.jit(sfpk_jax.sfpk.sfpk_update, **UPDATE_STATIC)


class DensityTest(chex.TestCase):
    """G and g = -grad G (core.functional.g_and_descent)."""

    @chex.variants(**ALL_VARIANTS)
    @parameterized.parameters(("l2", "global"), ("l1", "local"))
    def test_density_of_ones_is_one(self, kind, scope):
        fn = self.variant(functional.g_and_descent, **DENSITY_STATIC)
        g_value, descent = fn([jnp.ones(s, jnp.float32) for s in SHAPES], kind, scope, (1, 2, 3))
        chex.assert_shape(g_value, () if scope == "global" else (len(SHAPES),))
        chex.assert_type(g_value, jnp.float32)
        chex.assert_trees_all_close(g_value, jnp.ones_like(g_value), rtol=1e-6)
        chex.assert_trees_all_equal_shapes(descent, [jnp.ones(s) for s in SHAPES])
        # Every entry of 1 pushes G up: the descent direction is negative everywhere.
        assert all(bool(jnp.all(d < 0)) for d in descent)

    @chex.variants(**ALL_VARIANTS)
    @parameterized.product(kind=("l2", "l1"), scope=("global", "local"))
    def test_value_and_descent_match_the_closed_form(self, kind, scope):
        node = (3, 1, 2)
        mask = _leaves(_rng(0), SHAPES, 0.1, 1.0)
        got = self.variant(functional.g_and_descent, **DENSITY_STATIC)(mask, kind, scope, node)
        chex.assert_trees_all_close(got, _density_jit(mask, kind, scope, node), rtol=1e-5, atol=1e-7)
        chex.assert_tree_all_finite(got)

        # The closed form in float64: per layer, S_l = sum n_l m^p, D_l = n_l size_l.
        m64 = _f64(mask)
        power = [n * (np.sum(m**2) if kind == "l2" else np.sum(np.abs(m))) for m, n in zip(m64, node)]
        sizes = [n * m.size for m, n in zip(m64, node)]
        groups = [list(range(len(SHAPES)))] if scope == "global" else [[i] for i in range(len(SHAPES))]
        values, grads = [], [None] * len(SHAPES)
        for group in groups:
            s, d = sum(power[i] for i in group), sum(sizes[i] for i in group)
            values.append(math.sqrt(s) / math.sqrt(d) if kind == "l2" else s / d)
            for i in group:
                if kind == "l2":
                    grads[i] = node[i] * m64[i] / (math.sqrt(d) * math.sqrt(s))
                else:
                    grads[i] = node[i] * np.sign(m64[i]) / d
        g_value, descent = got
        np.testing.assert_allclose(np.reshape(g_value, -1), values, rtol=1e-5)
        for d, ref in zip(descent, grads):
            np.testing.assert_allclose(d, -ref, rtol=1e-4, atol=1e-7)

    @chex.variants(**JIT_VARIANTS)
    @parameterized.parameters("l2", "l1")
    def test_binary_mask_density_counts_the_kept_entries(self, kind):
        rng = _rng(1)
        mask = [jnp.asarray(rng.random(s) < 0.4, jnp.float32) for s in SHAPES]
        kept = sum(int(np.sum(m)) for m in mask)
        total = sum(math.prod(s) for s in SHAPES)
        g_value, _ = self.variant(functional.g_and_descent, **DENSITY_STATIC)(mask, kind, "global", None)
        # l1: the kept fraction; l2: its square root (G = |m|_2 / sqrt(D)).
        expected = kept / total if kind == "l1" else math.sqrt(kept / total)
        np.testing.assert_allclose(float(g_value), expected, rtol=1e-5)


class DirectionTest(chex.TestCase):
    """delta = x e + y g (core.direction.direction)."""

    @chex.variants(**ALL_VARIANTS)
    @parameterized.parameters((1.0, 0), (2.5, 1))
    def test_global_direction_meets_its_two_constraints(self, radius, seed):
        rng = _rng(seed)
        g = [x * rng.uniform(0.2, 3.0) for x in _leaves(rng, SHAPES)]
        e = [x * rng.uniform(0.2, 3.0) for x in _leaves(rng, SHAPES)]
        delta = self.variant(direction_lib.direction, **DIRECTION_STATIC)(g, e, radius, "global")
        chex.assert_trees_all_close(delta, _direction_jit(g, e, radius, "global"), rtol=1e-5, atol=1e-7)
        chex.assert_trees_all_equal_shapes_and_dtypes(delta, g)
        chex.assert_tree_all_finite(delta)
        np.testing.assert_allclose(_dot(delta, g), 1.0, rtol=1e-4)
        np.testing.assert_allclose(math.sqrt(_dot(delta, delta)), radius / math.sqrt(_dot(g, g)), rtol=1e-4)

    @chex.variants(**ALL_VARIANTS)
    @parameterized.parameters((1.5,))
    def test_local_direction_meets_them_per_layer(self, radius):
        rng = _rng(2)
        g = [x * rng.uniform(0.2, 3.0) for x in _leaves(rng, SHAPES)]
        e = _leaves(rng, SHAPES)
        delta = self.variant(direction_lib.direction, **DIRECTION_STATIC)(g, e, radius, "local")
        chex.assert_trees_all_equal_shapes_and_dtypes(delta, g)
        for gl, dl in zip(g, delta):
            np.testing.assert_allclose(_dot([dl], [gl]), 1.0, rtol=1e-4)
            np.testing.assert_allclose(math.sqrt(_dot([dl], [dl])), radius / math.sqrt(_dot([gl], [gl])), rtol=1e-4)


def _repulsion_inputs():
    rng = _rng(3)
    return _leaves(rng, SHAPES, 0.0, 1.0, lead=(N,)), _leaves(rng, SHAPES)


@functools.lru_cache(maxsize=None)  # one (eager, n x n) reference per case, shared by the variants
def _repulsion_reference(mode, weighted):
    """K_i and d K_i / d m_i by autodiff, the other particles and S held fixed.

    Unstructured masks: w = |theta| and w^2 = theta^2 when weighted, else 1.
    """
    particles, theta = _repulsion_inputs()
    n = particles[0].shape[0]
    w = [jnp.abs(t) if weighted else jnp.ones_like(t) for t in theta]
    w2 = [jnp.square(t) if weighted else jnp.ones_like(t) for t in theta]
    strength = jnp.stack([sum(jnp.sum(jnp.square(m[j]) * wl) for m, wl in zip(particles, w)) for j in range(n)])

    def k_i(x, i):
        total = 0.0
        for j in range(n):
            scale = jnp.sqrt(strength[i] * strength[j] + 1e-12)
            if mode == "exp":
                dist = sum(jnp.sum(wl * jnp.square(xl - m[j])) for xl, m, wl in zip(x, particles, w2))
                total = total + jnp.exp(-dist / scale)
            else:
                total = total + sum(jnp.sum(xl * m[j] * wl) for xl, m, wl in zip(x, particles, w)) / scale
        return total / n

    values, grads = [], []
    for i in range(n):
        value, grad = jax.value_and_grad(k_i)([m[i] for m in particles], i)
        values.append(value)
        grads.append(grad)
    return jnp.stack(values), [jnp.stack(leaf) for leaf in zip(*grads)]


class RepulsionTest(chex.TestCase):
    """K_i and grad K_i (core.repulsion.repulsion)."""

    @chex.variants(**ALL_VARIANTS)
    @parameterized.parameters(("exp", True), ("cos", False))
    def test_repulsion_is_the_derivative_in_m_i_alone(self, mode, weighted):
        particles, theta = _repulsion_inputs()
        fn = self.variant(repulsion_lib.repulsion, **REPULSION_STATIC)
        k_value, k_grad = fn(particles, theta, mode=mode, weighted=weighted)
        chex.assert_shape(k_value, (N,))
        chex.assert_trees_all_equal_shapes_and_dtypes(k_grad, particles)
        chex.assert_tree_all_finite((k_value, k_grad))
        chex.assert_trees_all_close(
            (k_value, k_grad), _repulsion_jit(particles, theta, mode=mode, weighted=weighted), rtol=1e-5, atol=1e-7)
        ref_value, ref_grad = _repulsion_reference(mode, weighted)
        chex.assert_trees_all_close(k_value, ref_value, rtol=1e-4, atol=1e-6)
        chex.assert_trees_all_close(k_grad, ref_grad, rtol=1e-4, atol=1e-6)

    @chex.variants(with_jit=True)
    @parameterized.parameters("exp", "cos")
    def test_relabelling_particles_relabels_k(self, mode):
        rng = _rng(4)
        particles = _leaves(rng, SHAPES, 0.0, 1.0, lead=(N,))
        theta = _leaves(rng, SHAPES)
        perm = np.array([2, 0, 1])
        fn = self.variant(repulsion_lib.repulsion, **REPULSION_STATIC)
        k_value, k_grad = fn(particles, theta, mode=mode, weighted=True)
        k_perm, grad_perm = fn([m[perm] for m in particles], theta, mode=mode, weighted=True)
        chex.assert_trees_all_close(k_perm, k_value[perm], rtol=1e-5)
        chex.assert_trees_all_close(grad_perm, [g[perm] for g in k_grad], rtol=1e-5, atol=1e-7)


def _vote_fn(variant, mode, voters, momentum, target=0.5, scope="global", score="mp"):
    """``(scores, particles, theta, energy) -> new scores`` through ``variant``."""
    fn = variant(voting.vote, **VOTE_STATIC)
    return lambda *args: fn(*args, mode=mode, score=score, voters=voters, momentum=momentum,
                            target_density=target, scope=scope)


class VoteTest(chex.TestCase):
    """S <- mean of the voters' scores + mu S (core.voting.vote)."""

    def _inputs(self, seed):
        rng = _rng(seed)
        return (_leaves(rng, SHAPES, 0.0, 1.0), _leaves(rng, SHAPES, -1.0, 1.0, lead=(N,)),
                _leaves(rng, SHAPES), jnp.asarray(rng.permutation(N), jnp.float32))

    @chex.variants(**ALL_VARIANTS)
    @parameterized.parameters(("mp",), ("m",))
    def test_soft_vote_of_all_particles_is_their_mean_score(self, score):
        scores, particles, theta, energy = self._inputs(5)
        new = _vote_fn(self.variant, "soft", N, 0.3, score=score)(scores, particles, theta, energy)
        chex.assert_trees_all_equal_shapes_and_dtypes(new, scores)
        reference = _vote_jit(scores, particles, theta, energy, mode="soft", score=score, voters=N,
                              momentum=0.3, target_density=0.5, scope="global")
        chex.assert_trees_all_close(new, reference, rtol=1e-5)
        for s_new, s_old, m, t in zip(new, scores, particles, theta):
            weight = np.abs(t) if score == "mp" else 1.0
            expected = np.mean(np.abs(np.asarray(m)) * weight, axis=0) + 0.3 * np.asarray(s_old)
            np.testing.assert_allclose(s_new, expected, rtol=1e-5, atol=1e-7)

    @chex.variants(**JIT_VARIANTS)
    @parameterized.parameters("soft", "hard")
    def test_only_the_lowest_energy_particles_count(self, mode):
        scores, particles, theta, energy = self._inputs(6)
        fn = _vote_fn(self.variant, mode, 2, 0.1)
        worst = int(np.argmax(energy))
        # The highest-energy particle does not vote: moving it changes nothing.
        moved = [m.at[worst].set(jnp.full(m.shape[1:], 7.0, m.dtype)) for m in particles]
        chex.assert_trees_all_close(fn(scores, moved, theta, energy), fn(scores, particles, theta, energy))
        # A voter's move does change the vote.
        best = int(np.argmin(energy))
        moved = [m.at[best].set(jnp.full(m.shape[1:], 7.0, m.dtype)) for m in particles]
        with pytest.raises(AssertionError):
            chex.assert_trees_all_close(fn(scores, moved, theta, energy), fn(scores, particles, theta, energy))

    @chex.variants(**JIT_VARIANTS)
    @parameterized.parameters(0.25, 0.6)
    def test_hard_vote_of_one_voter_keeps_its_top_entries(self, target):
        scores, particles, theta, energy = self._inputs(7)
        zeros = [jnp.zeros_like(s) for s in scores]
        new = _vote_fn(self.variant, "hard", 1, 0.0, target=target)(zeros, particles, theta, energy)
        chex.assert_tree_all_finite(new)
        total = sum(math.prod(s) for s in SHAPES)
        removed = math.floor((1 - target) * total)
        kept = np.concatenate([np.ravel(s) for s in new]) != 0
        assert np.sum(kept) <= total - removed
        # What is kept is the voter's own largest |m theta|, unchanged.
        best = int(np.argmin(energy))
        own = np.concatenate([np.ravel(np.abs(m[best]) * np.abs(t)) for m, t in zip(particles, theta)])
        assert np.min(own[kept]) > np.max(own[~kept])
        np.testing.assert_allclose(np.concatenate([np.ravel(s) for s in new])[kept], own[kept], rtol=1e-6)

    @chex.variants(**JIT_VARIANTS)
    def test_scores_carry_over_with_the_momentum(self):
        scores, particles, theta, energy = self._inputs(8)
        fn = _vote_fn(self.variant, "soft", 2, 0.4)
        zeros = [jnp.zeros_like(s) for s in scores]
        diff = jax.tree.map(jnp.subtract, fn(scores, particles, theta, energy), fn(zeros, particles, theta, energy))
        chex.assert_trees_all_close(diff, [0.4 * s for s in scores], rtol=1e-5, atol=1e-7)


# Parameters of a small two-layer model: a dense kernel + bias and a conv kernel.
PARAMS = {
    "Conv_0": {"kernel": jnp.asarray(_rng(9).normal(size=(2, 2, 1, 3)), jnp.float32)},
    "Dense_0": {"kernel": jnp.asarray(_rng(10).normal(size=(4, 3)), jnp.float32),
                "bias": jnp.asarray(_rng(11).normal(size=(3,)), jnp.float32)},
}


class UpdateTest(chex.TestCase):
    """One step of all particles (sfpk_jax.sfpk.sfpk_update)."""

    def _setup(self, seed, **changes):
        config = SFPKConfig(**{"steps": 50, "particles": N, **changes})
        layout = MaskLayout.from_params(PARAMS)
        assert list(layout.mask_shapes) == SHAPES
        state = sfpk_jax.sfpk.initial_state(layout, config)
        rng = _rng(seed)
        energy = jnp.asarray(rng.uniform(1.0, 2.0, N), jnp.float32)
        grads = [0.1 * g for g in _leaves(rng, layout.mask_shapes, lead=(N,))]
        theta = layout.gather(PARAMS)
        return config, layout, state, energy, grads, theta

    @chex.variants(**ALL_VARIANTS)
    @parameterized.parameters("global", "local")
    def test_update_agrees_across_variants_and_moves_g_by_dt(self, scope):
        config, layout, state, energy, grads, theta = self._setup(12, scope=scope)
        fn = self.variant(sfpk_jax.sfpk.sfpk_update, **UPDATE_STATIC)
        new, trace = fn(state, energy, grads, theta, config=config, target=0.4)
        ref_new, ref_trace = _update_jit(state, energy, grads, theta, config=config, target=0.4)
        chex.assert_trees_all_close((new, trace), (ref_new, ref_trace), rtol=1e-5, atol=1e-6)

        chex.assert_tree_all_finite((new, trace))
        chex.assert_trees_all_equal_shapes_and_dtypes(new.particles, state.particles)
        chex.assert_trees_all_equal_shapes_and_dtypes(new.scores, state.scores)
        chex.assert_type(new.step, jnp.int32)
        assert int(new.step) == int(state.step) + 1
        chex.assert_shape(list(trace), (N,))
        np.testing.assert_array_equal(trace.faults, np.zeros(N))
        np.testing.assert_array_equal(trace.E, energy)
        # The state starts dense, where G = 1 (per layer too).
        chex.assert_trees_all_close(trace.G, jnp.ones(N), rtol=1e-6)
        # The step is built so that G falls by dt to first order; what is left
        # is second order in dt (dt ~ 1e-2 here).
        node = [1] * len(theta)
        g_after = jax.vmap(lambda *m: functional.g(list(m), config.sparsity_fn, scope, node))(*new.particles)
        g_after = g_after if scope == "global" else jnp.mean(g_after, axis=-1)
        assert 0.001 < float(jnp.min(trace.dt)) < 0.05
        np.testing.assert_allclose(trace.G - g_after, trace.dt, rtol=2e-2)

    @chex.variants(with_jit=True)
    def test_a_non_finite_gradient_leaves_the_state_alone(self):
        config, layout, state, energy, grads, theta = self._setup(13)
        grads[1] = grads[1].at[1].set(jnp.nan)
        fn = self.variant(sfpk_jax.sfpk.sfpk_update, **UPDATE_STATIC)
        new, trace = fn(state, energy, grads, theta, config=config, target=0.4)
        chex.assert_trees_all_close(new, state)
        faults = np.asarray(trace.faults)
        # Bit 1 (energy gradient) for particle 1, nothing for the others.
        assert faults[1] & 2 and not faults[1] & 1
        np.testing.assert_array_equal(faults[[0, 2]], 0)

    @chex.variants(with_jit=True)
    def test_the_vote_goes_to_the_moved_particles(self):
        config, layout, state, energy, grads, theta = self._setup(14, vote_momentum=0.0,
                                                                   vote_ratio=1.0)
        fn = self.variant(sfpk_jax.sfpk.sfpk_update, **UPDATE_STATIC)
        new, _ = fn(state, energy, grads, theta, config=config, target=0.4)
        expected = [jnp.mean(jnp.abs(m) * jnp.abs(t)[None], axis=0) for m, t in zip(new.particles, theta)]
        chex.assert_trees_all_close(new.scores, expected, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------- compile once









