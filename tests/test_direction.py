"""The closed-form step direction: <delta, g> = 1 and |delta| = r / |g|."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfpk_jax.core import direction as direction_lib

pytestmark = pytest.mark.strict_promotion

LAYOUTS = st.sampled_from([((3, 4),), ((2, 3, 1, 4), (5,), (4, 2)), ((7,), (3, 3, 2, 2), (6,))])


@functools.partial(jax.jit, static_argnums=(3,))
def _direction(g, e, radius, scope):
    return direction_lib.direction(g, e, radius, scope)


def _draw(seed, shapes, dtype):
    rng = np.random.default_rng(seed)
    # g and e of different scales, not parallel.
    g = [jnp.asarray(rng.normal(0.0, rng.uniform(0.1, 3.0), s), dtype) for s in shapes]
    e = [jnp.asarray(rng.normal(0.0, rng.uniform(0.1, 3.0), s), dtype) for s in shapes]
    return g, e


def _dot(a, b):
    return sum(float(np.sum(np.asarray(x, np.float64) * np.asarray(y, np.float64))) for x, y in zip(a, b))


def _check(g, e, delta, radius, rtol):
    inner = _dot(delta, g)
    norm = np.sqrt(_dot(delta, delta))
    np.testing.assert_allclose(inner, 1.0, rtol=rtol)
    np.testing.assert_allclose(norm, radius / np.sqrt(_dot(g, g)), rtol=rtol)
    # The extra length goes along loss descent: delta's component orthogonal to
    # g points the way e's does (x >= 0).
    c, a2 = _dot(g, e), _dot(g, g)
    e_perp = [ei - c / a2 * gi for gi, ei in zip(g, e)]
    if radius > 1.0 + 1e-3:
        assert _dot(delta, e_perp) > 0.0


@settings(max_examples=20)
@given(shapes=LAYOUTS, seed=st.integers(0, 2**31 - 1), radius=st.floats(1.0, 3.0))
def test_global_direction_float32(shapes, seed, radius):
    g, e = _draw(seed, shapes, jnp.float32)
    delta = _direction(g, e, jnp.float32(radius), "global")
    assert [d.shape for d in delta] == [x.shape for x in g]
    assert all(d.dtype == jnp.float32 for d in delta)
    _check(g, e, delta, radius, rtol=1e-4)


@settings(max_examples=10)
@given(shapes=LAYOUTS, seed=st.integers(0, 2**31 - 1), radius=st.floats(1.0, 3.0))
def test_global_direction_float64_tight(shapes, seed, radius):
    with jax.enable_x64(True):
        g, e = _draw(seed, shapes, jnp.float64)
        delta = direction_lib.direction(g, e, radius, "global")
        assert all(d.dtype == jnp.float64 for d in delta)
        # The formula's epsilons (1e-12) shift <delta, g> by ~eps/|g|^2 and
        # |delta|^2 |g|^2 by ~eps (1 + |g|^2 |e|^2): allow for exactly that.
        a2, b2 = _dot(g, g), _dot(e, e)
        _check(g, e, delta, radius, rtol=1e-10 + 2e-12 * (1.0 + a2 * b2 + 1.0 / a2))


@settings(max_examples=20)
@given(shapes=LAYOUTS, seed=st.integers(0, 2**31 - 1), radius=st.floats(1.0, 3.0))
def test_local_direction_holds_per_layer(shapes, seed, radius):
    g, e = _draw(seed, shapes, jnp.float32)
    delta = _direction(g, e, jnp.float32(radius), "local")
    for gl, el, dl in zip(g, e, delta):
        _check([gl], [el], [dl], radius, rtol=1e-4)


def test_radius_one_is_the_shortest_step_along_g():
    g = [jnp.asarray([3.0, 4.0])]
    e = [jnp.asarray([1.0, -2.0])]
    delta = direction_lib.direction(g, e, 1.0, "global")
    # r = 1: delta = g / |g|^2, nothing along e (up to x ~ sqrt(eps) = 1e-6).
    np.testing.assert_allclose(np.asarray(delta[0]), np.array([3.0, 4.0]) / 25.0, atol=1e-5)
    longer = direction_lib.direction(g, e, 2.0, "global")
    assert np.abs(np.asarray(longer[0]) - np.array([3.0, 4.0]) / 25.0).max() > 1e-2


def test_coefficients_closed_form():
    a, b, c, r = 2.0, 3.0, 1.5, 1.4
    x, y = direction_lib.coefficients(jnp.float32(a), jnp.float32(b), jnp.float32(c), r)
    x_ref = np.sqrt((r**2 - 1 + 1e-12) / ((a * b) ** 2 - c**2 + 1e-12) + 1e-12)
    y_ref = (1 - x_ref * c) / (a**2 + 1e-12)
    np.testing.assert_allclose([float(x), float(y)], [x_ref, y_ref], rtol=1e-6)


@pytest.mark.parametrize("scope", ["global", "local"])
def test_parallel_e_gives_finite_step(scope):
    # e parallel to g: (ab)^2 - c^2 = 0; the epsilons keep the step finite.
    g = [jnp.asarray([1.0, 2.0]), jnp.asarray([0.5])]
    e = [2.0 * x for x in g]
    delta = direction_lib.direction(g, e, 1.1, scope)
    assert all(np.all(np.isfinite(np.asarray(d))) for d in delta)
