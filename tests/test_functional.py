"""The sparsity functional G and its descent direction g = -grad G."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfpk_jax.core import functional

pytestmark = pytest.mark.strict_promotion

# A few fixed layer layouts (conv, dense, bias, scalar-like): values vary, shapes
# repeat, so every compiled function is reused across examples.
SHAPES = st.sampled_from(
    [((3, 4),), ((2, 3, 1, 4), (5,), (4, 2)), ((7,), (1, 1), (3, 3, 2, 2), (6,))]
)


def spec_global(mask, kind):
    """The spec's formula, over all entries at once."""
    flat = jnp.concatenate([jnp.ravel(m) for m in mask])
    if kind == "l2":
        return jnp.sqrt(jnp.sum(flat**2) + 1e-12) / jnp.sqrt(flat.size)
    return jnp.sum(jnp.abs(flat)) / flat.size


def spec_local(mask, kind):
    return jnp.stack([spec_global([m], kind) for m in mask])


@functools.partial(jax.jit, static_argnums=(1, 2))
def _value_and_descent(mask, kind, scope):
    return functional.g_and_descent(mask, kind, scope)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _spec_value_and_grad(mask, kind, scope):
    if scope == "global":
        return spec_global(mask, kind), jax.grad(lambda m: spec_global(m, kind))(mask)
    # Layer l's descent is the gradient of its own G_l only.
    grads = [jax.grad(lambda x: spec_global([x], kind))(m) for m in mask]
    return spec_local(mask, kind), grads


def random_mask(seed, shapes, low=-0.5, high=1.5):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.uniform(low, high, s), jnp.float32) for s in shapes]


@pytest.mark.parametrize("kind", ["l1", "l2"])
@pytest.mark.parametrize("scope", ["global", "local"])
@settings(max_examples=10)
@given(shapes=SHAPES)
def test_dense_mask_has_density_one(kind, scope, shapes):
    ones = [jnp.ones(s, jnp.float32) for s in shapes]
    g = functional.g(ones, kind, scope)
    expected_shape = () if scope == "global" else (len(shapes),)
    assert g.shape == expected_shape
    np.testing.assert_allclose(np.asarray(g), 1.0, rtol=1e-6)


@pytest.mark.parametrize("kind", ["l1", "l2"])
@settings(max_examples=10)
@given(shapes=SHAPES, seed=st.integers(0, 2**31 - 1))
def test_binary_mask_l1_density_is_kept_fraction(kind, shapes, seed):
    rng = np.random.default_rng(seed)
    mask = [jnp.asarray(rng.random(s) < 0.5, jnp.float32) for s in shapes]
    kept = sum(float(m.sum()) for m in mask)
    total = sum(m.size for m in mask)
    g = float(functional.g(mask, kind, "global"))
    # l1 counts kept entries; l2 is the square root of that fraction.
    expected = kept / total if kind == "l1" else np.sqrt(kept / total)
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["l1", "l2"])
@pytest.mark.parametrize("scope", ["global", "local"])
@settings(max_examples=15)
@given(shapes=SHAPES, seed=st.integers(0, 2**31 - 1))
def test_value_and_descent_match_the_spec_formula(kind, scope, shapes, seed):
    mask = random_mask(seed, shapes)
    value, descent = _value_and_descent(mask, kind, scope)
    expected, grads = _spec_value_and_grad(mask, kind, scope)
    np.testing.assert_allclose(np.asarray(value), np.asarray(expected), rtol=1e-5)
    assert len(descent) == len(mask)
    for d, gr, m in zip(descent, grads, mask):
        assert d.shape == m.shape
        np.testing.assert_allclose(np.asarray(d), -np.asarray(gr), rtol=1e-5, atol=1e-8)
    # The direct call agrees with the value returned alongside the gradient.
    np.testing.assert_allclose(
        np.asarray(functional.g(mask, kind, scope)), np.asarray(value), rtol=1e-6
    )


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_local_scope_holds_per_layer(kind):
    # Layers at different densities: each G_l sees only its own layer.
    mask = [jnp.full((4, 5), 0.5), jnp.ones((7,)), jnp.zeros((3, 3))]
    g = np.asarray(functional.g(mask, kind, "local"))
    np.testing.assert_allclose(g, [0.5, 1.0, 0.0], atol=1e-6)
    # The global G weighs layers by size.
    glob = float(functional.g(mask, kind, "global"))
    d = np.array([20, 7, 9])
    expected = (0.5 * 20 + 7) / d.sum() if kind == "l1" else np.sqrt((0.25 * 20 + 7) / d.sum())
    np.testing.assert_allclose(glob, expected, rtol=1e-6)


def test_l2_gradient_is_finite_at_zero_mask():
    # The 1e-12 keeps sqrt differentiable at m = 0.
    _, descent = functional.g_and_descent([jnp.zeros((3, 2))], "l2", "global")
    assert np.all(np.isfinite(np.asarray(descent[0])))
