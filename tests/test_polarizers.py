"""Polarized energy E and its straight-through gradient."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sfpk_jax import SFPKConfig
from sfpk_jax.core.masks import MaskLayout
from sfpk_jax.core.polarizers import polarize
from sfpk_jax.sfpk.energy import make_energy_fn

pytestmark = pytest.mark.strict_promotion

SEEDS = st.integers(0, 2**31 - 1)


@functools.lru_cache(maxsize=None)
def _energy(model, **config):
    layout = MaskLayout.from_params(model.params)
    return layout, jax.jit(make_energy_fn(model.loss_fn, layout, SFPKConfig(**config)))


@functools.lru_cache(maxsize=None)
def _loss_grad_at(model):
    """m -> (loss(theta * m), grad), written without the package's energy code."""
    layout = MaskLayout.from_params(model.params)

    def f(point, params, batch):
        theta = layout.gather(params)
        return model.loss_fn(layout.replace(params, [t * p for t, p in zip(theta, point)]), batch)

    return jax.jit(jax.value_and_grad(f))


def _spec_density(mask, kind):
    flat = np.concatenate([np.ravel(m) for m in mask]).astype(np.float64)
    if kind == "l2":
        return math.sqrt(float(np.sum(flat**2)) + 1e-12) / math.sqrt(flat.size)
    return float(np.sum(np.abs(flat))) / flat.size


def _spec_point(mask, theta, kind, scope):
    """The spec's b = 1[|m theta| >= tau] with k = floor((1 - G) D), or m when k < 1.

    Returns the gradient point and whether floor() sat too close to an integer
    for float32 to decide it reproducibly.
    """
    groups = [list(range(len(mask)))] if scope == "global" else [[l] for l in range(len(mask))]
    point = [None] * len(mask)
    fragile = False
    for group in groups:
        ms = [np.asarray(mask[l], np.float64) for l in group]
        score = np.concatenate([np.ravel(np.abs(mask[l] * theta[l])) for l in group])
        size = score.size
        raw = (1.0 - _spec_density(ms, kind)) * size
        # Near an integer j >= 1, float32 and float64 may floor to j - 1 and j.
        fragile |= round(raw) >= 1 and abs(raw - round(raw)) < 1e-3 * max(1.0, size / 100)
        k = math.floor(raw)
        if k < 1:
            for l, m in zip(group, ms):
                point[l] = m
            continue
        tau = np.sort(score)[k - 1]
        if np.sum(score == tau) > 1:
            fragile = True
        for l in group:
            point[l] = (np.abs(mask[l] * theta[l]) >= tau).astype(np.float64)
    return point, fragile


def _check_energy(model, mask, kind, scope, seed, in_property=False):
    # The spec's per-layer reading (each layer at its own G_l); the local
    # default, the reference's, is tested in test_local_structured.py.
    layout, energy_fn = _energy(model, sparsity_fn=kind, scope=scope, local_polarizer="layer")
    theta = [np.asarray(t) for t in layout.gather(model.params)]
    batch = model.batch(np.random.default_rng(seed), 16)
    point, fragile = _spec_point(mask, theta, kind, scope)
    if in_property:
        assume(not fragile)
    else:
        assert not fragile
    e, grad = energy_fn(model.params, [jnp.asarray(m) for m in mask], batch)
    e_ref, grad_ref = _loss_grad_at(model)([jnp.asarray(p, jnp.float32) for p in point], model.params, batch)
    np.testing.assert_allclose(float(e), float(e_ref), rtol=1e-5)
    assert len(grad) == len(mask)
    for g, r, m in zip(grad, grad_ref, mask):
        assert g.shape == m.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)
    return point


@pytest.mark.parametrize("kind", ["l2", "l1"])
@pytest.mark.parametrize("scope", ["global", "local"])
@settings(max_examples=10)
@given(seed=SEEDS, low=st.floats(-0.5, 0.5))
def test_onehot_gradient_is_the_loss_gradient_at_the_binarised_mask(model, kind, scope, seed, low):
    layout = MaskLayout.from_params(model.params)
    rng = np.random.default_rng(seed)
    mask = [rng.uniform(low, 1.0, s).astype(np.float32) for s in layout.shapes]
    point = _check_energy(model, mask, kind, scope, seed, in_property=True)
    # The binarised point really prunes something here.
    assert sum(float(np.sum(p == 0)) for p in point) >= 1


@pytest.mark.parametrize("scope", ["global", "local"])
def test_dense_mask_is_not_polarized(model, scope):
    # m = 1: G = 1, k < 1, so the gradient is taken at m itself.
    layout = MaskLayout.from_params(model.params)
    ones = [np.ones(s, np.float32) for s in layout.shapes]
    point = _check_energy(model, ones, "l2", scope, seed=3)
    assert all(np.all(p == 1.0) for p in point)


@pytest.mark.parametrize("scope", ["global", "local"])
def test_nothing_to_remove_uses_the_mask_itself(mlp, scope):
    # m slightly above 1 (G > 1, k < 1): E and its gradient are at m, not at 1.
    layout = MaskLayout.from_params(mlp.params)
    rng = np.random.default_rng(0)
    mask = [rng.uniform(1.0, 1.05, s).astype(np.float32) for s in layout.shapes]
    point = _check_energy(mlp, mask, "l2", scope, seed=4)
    assert all(np.array_equal(p, m) for p, m in zip(point, mask))


def test_local_scope_polarizes_layer_by_layer(mlp):
    # Layer 0 has entries to remove, the others do not: only layer 0 is binarised.
    layout = MaskLayout.from_params(mlp.params)
    rng = np.random.default_rng(1)
    mask = [rng.uniform(1.0, 1.05, s).astype(np.float32) for s in layout.shapes]
    mask[0] = rng.uniform(0.0, 1.0, layout.shapes[0]).astype(np.float32)
    point = _check_energy(mlp, mask, "l2", "local", seed=5)
    assert set(np.unique(point[0])) == {0.0, 1.0}
    assert all(np.array_equal(p, m) for p, m in zip(point[1:], mask[1:]))


def _point_and_jacobian_diag(name, mask, theta, **kw):
    cfg = dict(kind="l2", scope="global", eps=0.9, ratio=0.9) | kw
    point = polarize(name, mask, theta, **cfg)
    # Each entry's point depends on its own m through the tangent (straight
    # through) path; the diagonal of the Jacobian is what the gradient uses.
    tangent = [jnp.ones_like(m) for m in mask]
    _, diag = jax.jvp(lambda *m: polarize(name, list(m), theta, **cfg), tuple(mask), tuple(tangent))
    return point, diag


def test_identity_polarizer_is_the_mask():
    rng = np.random.default_rng(2)
    mask = [jnp.asarray(rng.uniform(0, 1, (4, 3)), jnp.float32)]
    theta = [jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)]
    point, diag = _point_and_jacobian_diag("identity", mask, theta)
    np.testing.assert_array_equal(np.asarray(point[0]), np.asarray(mask[0]))
    np.testing.assert_allclose(np.asarray(diag[0]), 1.0)


def test_onehot_soft_values_are_binary_with_gradient_b_over_m():
    rng = np.random.default_rng(3)
    mask = [jnp.asarray(rng.uniform(0.1, 1, (6, 5)), jnp.float32)]
    theta = [jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)]
    hard, hard_diag = _point_and_jacobian_diag("onehot", mask, theta)
    soft, soft_diag = _point_and_jacobian_diag("onehot_soft", mask, theta)
    b = np.asarray(hard[0])
    assert set(np.unique(b)) == {0.0, 1.0}
    np.testing.assert_allclose(np.asarray(soft[0]), b, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(hard_diag[0]), 1.0)  # straight through
    np.testing.assert_allclose(np.asarray(soft_diag[0]), b / np.asarray(mask[0]), rtol=1e-5)


@pytest.mark.parametrize("name", ["quantile_sigmoid", "gauss_sigmoid"])
@pytest.mark.parametrize("scope", ["global", "local"])
def test_sigmoid_polarizers_are_monotone_in_the_score(name, scope):
    rng = np.random.default_rng(4)
    shapes = [(6, 5), (7,)]
    mask = [jnp.asarray(rng.uniform(0.2, 1, s), jnp.float32) for s in shapes]
    theta = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    point, diag = _point_and_jacobian_diag(name, mask, theta, scope=scope)
    groups = [[0, 1]] if scope == "global" else [[0], [1]]
    for group in groups:
        score = np.concatenate([np.ravel(np.abs(mask[l] * theta[l])) for l in group])
        value = np.concatenate([np.ravel(point[l]) for l in group])
        assert np.all((value >= 0) & (value <= 1))
        order = np.argsort(score)
        assert np.all(np.diff(value[order]) >= -1e-6)
        assert value[order][-1] > value[order][0]
    assert all(np.all(np.isfinite(np.asarray(d))) for d in diag)
