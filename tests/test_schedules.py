"""Step-size schedules dt_t from the start density s to the target f."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfpk_jax.core import schedules

pytestmark = pytest.mark.strict_promotion

TARGET = st.floats(0.01, 0.9)
STEPS = st.integers(1, 200)


def _start_above(target, frac):
    # A start density strictly between the target and 1.
    return target + (1.0 - target) * (0.05 + 0.95 * frac)


@functools.partial(jax.jit, static_argnums=0)
def _all_steps(kind, steps, start, target):
    # Every argument traced (steps too), over a fixed t = 0..199: one compile.
    t = jnp.arange(200)
    return schedules.step_size(kind, t, steps, start, target, start)


def _steps(kind, steps, start, target):
    dt = _all_steps(kind, jnp.float32(steps), jnp.float32(start), jnp.float32(target))
    return np.broadcast_to(np.asarray(dt, np.float64), (200,))[:steps]


@settings(max_examples=25)
@given(target=TARGET, frac=st.floats(0.0, 1.0), steps=STEPS)
def test_exp_steps_follow_the_geometric_path(target, frac, steps):
    start = _start_above(target, frac)
    dt = _steps("exp", steps, start, target)
    assert dt.shape == (steps,)
    assert np.all(dt > 0)
    np.testing.assert_allclose(dt.sum(), start - target, rtol=1e-5, atol=1e-6)
    path = start - np.cumsum(dt)
    planned = start * (target / start) ** ((np.arange(steps) + 1.0) / steps)
    np.testing.assert_allclose(path, planned, rtol=2e-5, atol=1e-6)
    # Geometric: each step removes the same fraction of what is left.
    ratios = path / np.concatenate([[start], path[:-1]])
    np.testing.assert_allclose(ratios, (target / start) ** (1.0 / steps), rtol=1e-4)


@settings(max_examples=25)
@given(target=TARGET, frac=st.floats(0.0, 1.0), steps=STEPS)
def test_lin_steps_are_equal(target, frac, steps):
    start = _start_above(target, frac)
    dt = _steps("lin", steps, start, target)
    # float32: (s - f) loses digits when s is close to f, hence the atol.
    np.testing.assert_allclose(dt, (start - target) / steps, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dt.sum(), start - target, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["ada_lin", "ada_exp"])
@settings(max_examples=20)
@given(
    target=TARGET,
    frac=st.floats(0.0, 1.0),
    steps=st.integers(1, 60),
    seed=st.integers(0, 2**31 - 1),
)
def test_adaptive_schedules_reach_the_target_from_the_current_g(kind, target, frac, steps, seed):
    rng = np.random.default_rng(seed)
    start = _start_above(target, frac)
    g = start
    for t in range(steps):
        dt = float(schedules.step_size(kind, t, steps, start, target, g))
        assert dt > 0
        g = g - dt
        if t < steps - 1:
            # The particle misses the plan (G is convex: it lags behind);
            # the adaptive schedule re-plans from wherever it is.
            g = min(g + rng.uniform(0.0, 0.3) * dt, 1.0)
    np.testing.assert_allclose(g, target, rtol=1e-5)


@settings(max_examples=15)
@given(target=TARGET, frac=st.floats(0.0, 1.0), steps=st.integers(1, 60))
def test_ada_exp_on_plan_is_the_exp_path(target, frac, steps):
    start = _start_above(target, frac)
    g = start
    for t in range(steps):
        g = g - float(schedules.step_size("ada_exp", t, steps, start, target, g))
        planned = start * (target / start) ** ((t + 1.0) / steps)
        np.testing.assert_allclose(g, planned, rtol=1e-5)


@pytest.mark.parametrize("kind", ["exp", "lin", "ada_exp", "ada_lin"])
def test_per_layer_arrays_broadcast(kind):
    # Local scope: start (L,), current (n, L).
    start = jnp.asarray([1.0, 0.8, 0.6])
    current = jnp.asarray([[1.0, 0.8, 0.6], [0.9, 0.7, 0.55]])
    dt = schedules.step_size(kind, jnp.int32(0), 10, start, 0.1, current)
    dt = np.broadcast_to(np.asarray(dt), (2, 3))
    for layer in range(3):
        for i in range(2):
            one = schedules.step_size(kind, 0, 10, float(start[layer]), 0.1, float(current[i, layer]))
            np.testing.assert_allclose(dt[i, layer], float(one), rtol=1e-6)


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="cosine"):
        schedules.step_size("cosine", 0, 10, 1.0, 0.1, 1.0)


def test_traced_step_index_under_jit():
    f = jax.jit(lambda t: schedules.step_size("exp", t, 10, 1.0, 0.1, 1.0))
    eager = [float(schedules.step_size("exp", t, 10, 1.0, 0.1, 1.0)) for t in range(10)]
    np.testing.assert_allclose([float(f(jnp.int32(t))) for t in range(10)], eager, rtol=1e-6)
