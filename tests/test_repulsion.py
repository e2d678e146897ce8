"""The interaction energy K and its gradient, against a direct implementation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfpk_jax.core.repulsion import repulsion

pytestmark = pytest.mark.strict_promotion

LAYOUTS = st.sampled_from([((5, 3),), ((2, 2, 1, 3), (4,), (3, 2))])
MODES = [("exp", True), ("exp", False), ("cos", True), ("cos", False)]


def _spec_k(m_i, others, theta, mode, weighted):
    """K(m_i) written from the spec: others (all n particles) and S held constant."""
    w = [jnp.abs(t) if weighted else jnp.ones_like(t) for t in theta]
    strength = lambda m: sum(jnp.sum(jnp.square(x) * wl) for x, wl in zip(m, w))
    s_i = jax.lax.stop_gradient(strength(m_i))
    total = 0.0
    for m_j in others:
        m_j = [jax.lax.stop_gradient(x) for x in m_j]
        scale = jnp.sqrt(s_i * strength(m_j) + 1e-12)
        if mode == "exp":
            dist = sum(jnp.sum(jnp.square(wl) * jnp.square(a - b)) for a, b, wl in zip(m_i, m_j, w))
            total = total + jnp.exp(-dist / scale)
        else:
            total = total + sum(jnp.sum(a * b * wl) for a, b, wl in zip(m_i, m_j, w)) / scale
    return total / len(others)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _spec_all(particles, theta, mode, weighted):
    n = particles[0].shape[0]
    others = [[x[j] for x in particles] for j in range(n)]
    ks, grads = [], []
    for i in range(n):
        k, g = jax.value_and_grad(_spec_k)([x[i] for x in particles], others, theta, mode, weighted)
        ks.append(k)
        grads.append(g)
    return jnp.stack(ks), [jnp.stack(leaf) for leaf in zip(*grads)]


@functools.partial(jax.jit, static_argnums=(2, 3))
def _core(particles, theta, mode, weighted):
    return repulsion(particles, theta, mode=mode, weighted=weighted)


def _draw(seed, shapes, n, spread):
    rng = np.random.default_rng(seed)
    theta = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    # Particles near a common mask so that the exp kernel is not vanishingly small.
    base = [rng.uniform(0.3, 1.0, s) for s in shapes]
    particles = [
        jnp.asarray(b[None] + spread * rng.normal(size=(n,) + s), jnp.float32) for b, s in zip(base, shapes)
    ]
    return particles, theta


@pytest.mark.parametrize("mode,weighted", MODES)
@settings(max_examples=10)
@given(shapes=LAYOUTS, n=st.sampled_from([1, 3]), seed=st.integers(0, 2**31 - 1), spread=st.floats(0.01, 0.3))
def test_value_and_gradient_match_the_spec(mode, weighted, shapes, n, seed, spread):
    particles, theta = _draw(seed, shapes, n, spread)
    k, grad = _core(particles, theta, mode, weighted)
    k_ref, grad_ref = _spec_all(particles, theta, mode, weighted)
    assert k.shape == (n,)
    np.testing.assert_allclose(np.asarray(k), np.asarray(k_ref), rtol=1e-5, atol=1e-7)
    assert [g.shape for g in grad] == [p.shape for p in particles]
    scale = max(float(np.max(np.abs(np.asarray(g)))) for g in grad_ref) + 1e-12
    for g, r in zip(grad, grad_ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5 * scale)
    if mode == "exp":
        # Every kernel value is in (0, 1] and the self term contributes 1/n.
        assert np.all(np.asarray(k) <= 1.0 + 1e-6)
        assert np.all(np.asarray(k) >= 1.0 / n - 1e-6)


@pytest.mark.parametrize("weighted", [True, False])
@settings(max_examples=10)
@given(shapes=LAYOUTS, n=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_coinciding_particles_feel_no_force(weighted, shapes, n, seed):
    particles, theta = _draw(seed, shapes, 1, 0.0)
    particles = [jnp.repeat(p, n, axis=0) for p in particles]
    k, grad = _core(particles, theta, "exp", weighted)
    np.testing.assert_allclose(np.asarray(k), 1.0, rtol=1e-6)
    for g in grad:
        np.testing.assert_allclose(np.asarray(g), 0.0, atol=1e-7)
    # Same-direction particles are maximally similar in cos mode too.
    k_cos, _ = _core(particles, theta, "cos", weighted)
    np.testing.assert_allclose(np.asarray(k_cos), 1.0, rtol=1e-5)


def test_repulsion_pushes_particles_apart():
    # -grad K points away from the other particle.
    theta = [jnp.ones((3,))]
    particles = [jnp.asarray([[1.0, 1.0, 1.0], [0.9, 1.0, 1.0]])]
    _, grad = repulsion(particles, theta, mode="exp", weighted=True)
    step = -np.asarray(grad[0])
    assert step[0, 0] > 0 and step[1, 0] < 0
    np.testing.assert_allclose(step[:, 1:], 0.0, atol=1e-7)


def test_weighting_ignores_entries_with_zero_theta():
    theta = [jnp.asarray([0.0, 2.0])]
    particles = [jnp.asarray([[1.0, 1.0], [0.0, 1.0]])]
    k, grad = repulsion(particles, theta, mode="exp", weighted=True)
    # The particles differ only where theta = 0: weighted, they coincide.
    np.testing.assert_allclose(np.asarray(k), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad[0]), 0.0, atol=1e-7)
    k_unweighted, _ = repulsion(particles, theta, mode="exp", weighted=False)
    assert np.all(np.asarray(k_unweighted) < 1.0)


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="rbf"):
        repulsion([jnp.ones((2, 3))], [jnp.ones((3,))], mode="rbf", weighted=True)
