"""The two scopes of SFPK, one step written out against :func:`sfpk_jax.sfpk.sfpk_update`.

As in the official code (``Methods/sfpk.py``), G, g and the norms of the step
direction delta follow the scope of the dynamics (``ode_scope``), while the
step size dt is one per layer, each from its layer's own start density, when
the mask is layer-wise (a list of targets in ``SFPKSystem._calc_dt``). Its
default for channel masks (``main.py --structural``) is global dynamics with
layer-wise masks. The step below is the reference's rules written out in
numpy for channel masks, with the ``exp`` repulsion's channel normaliser
S_j + 1e-12.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import flax_axes

import sfpk_jax
from sfpk_jax import SFPKConfig
from sfpk_jax.core import channels, functional
from sfpk_jax.core.masks import MaskLayout
from sfpk_jax.sfpk.state import SFPKState

PARAMS = {"Conv_0": {"kernel": np.linspace(-1.0, 1.2, 12).reshape(2, 2, 1, 3)},
          "Dense_0": {"kernel": np.linspace(0.9, -1.3, 12).reshape(3, 4),
                      "bias": np.array([0.3, -0.2, 0.5, 0.1])}}


def _numpy_step(particles, grads, theta, start, target, config, t):
    """One step of the reference's rules, written out (n particles, channel masks, l2)."""
    n = particles[0].shape[0]
    shapes = [p.shape[1:] for p in particles]
    node = [channels.node_size(th.shape, s) for th, s in zip(theta, shapes)]
    absw = [np.asarray(channels.abs_weight(jnp.asarray(th), s)) for th, s in zip(theta, shapes)]
    sqw = [np.asarray(channels.sq_weight(jnp.asarray(th), s)) for th, s in zip(theta, shapes)]
    sizes = [th.size for th in theta]
    moved = [np.empty_like(p) for p in particles]
    strength = np.array([sum(np.sum(p[i] ** 2 * w) for p, w in zip(particles, absw))
                         for i in range(n)])
    for i in range(n):
        # g = -grad G, over all layers (global) or layer by layer.
        if config.dynamics == "global":
            total = math.sqrt(sum(nd * np.sum(p[i] ** 2) for nd, p in zip(node, particles)) + 1e-12)
            g = [-nd * p[i] / (total * math.sqrt(sum(sizes))) for nd, p in zip(node, particles)]
        else:
            g = [-nd * p[i] / (math.sqrt(nd * np.sum(p[i] ** 2) + 1e-12) * math.sqrt(d))
                 for nd, p, d in zip(node, particles, sizes)]
        # grad K_i with the channel normaliser S_j + 1e-12.
        kernel = [math.exp(-sum(np.sum(w2 * (p[i] - p[j]) ** 2) for p, w2 in zip(particles, sqw))
                           / (strength[j] + 1e-12)) for j in range(n)]
        dk = [sum(-kernel[j] / (strength[j] + 1e-12) * 2 * w2 * (p[i] - p[j]) for j in range(n)) / n
              for p, w2 in zip(particles, sqw)]
        e = [-de[i] - config.repulsion * d for de, d in zip(grads, dk)]
        groups = [list(range(len(g)))] if config.dynamics == "global" else [[l] for l in range(len(g))]
        delta = [None] * len(g)
        for group in groups:
            gv = np.concatenate([g[l].ravel() for l in group])
            ev = np.concatenate([e[l].ravel() for l in group])
            a, b, c = np.linalg.norm(gv), np.linalg.norm(ev), gv @ ev
            x = math.sqrt((config.radius**2 - 1 + 1e-12) / ((a * b) ** 2 - c**2 + 1e-12) + 1e-12)
            y = (1 - x * c) / (a**2 + 1e-12)
            for l in group:
                delta[l] = x * e[l] + y * g[l]
        for l in range(len(g)):
            ratio = start[l] / target
            dt = target * (ratio ** (1 - t / config.steps) - ratio ** (1 - (t + 1) / config.steps))
            moved[l][i] = particles[l][i] + dt * delta[l]
    return moved


@pytest.mark.parametrize("dynamics", ["global", "local"])
@pytest.mark.parametrize("mask_dim", ["out", "in"])
def test_one_step_splits_the_scopes_as_the_reference(dynamics, mask_dim):
    # Methods/sfpk.py: SFPKSystem._calc_G and _calc_delta follow ode_scope;
    # _calc_dt gives one dt per layer, from its own start, with list targets.
    with jax.enable_x64(True):
        config = SFPKConfig(steps=10, particles=3, radius=1.4, scope="local", mask_dim=mask_dim,
                            dynamics_scope=dynamics)
        params = jax.tree.map(jnp.asarray, PARAMS)
        layout = MaskLayout.from_params(params, flax_axes, mask_dim=mask_dim)
        theta = [np.asarray(t) for t in layout.gather(params)]
        rng = np.random.default_rng(5)
        particles = [rng.uniform(0.5, 1.0, (3, *s)) for s in layout.mask_shapes]
        grads = [0.3 * rng.normal(size=p.shape) for p in particles]
        start = np.array([np.mean(np.sqrt(nd * np.sum(p.reshape(3, -1) ** 2, axis=1) / th.size))
                          for p, nd, th in zip(particles, layout.node_sizes, theta)])
        # The start a continued run takes: each layer's mean G_l (SFPKSystem.simulation).
        resumed = sfpk_jax.sfpk.initial_state(layout, config, sfpk_jax.SFPKResult(
            None, layout.scatter([np.zeros(s) for s in layout.mask_shapes]),
            layout.scatter(particles), {}))
        np.testing.assert_allclose(resumed.start, start, rtol=1e-12)
        state = SFPKState([jnp.asarray(p) for p in particles],
                          [jnp.zeros(s) for s in layout.mask_shapes], jnp.int32(2),
                          jnp.asarray(start))
        target = 0.4
        new, trace = sfpk_jax.sfpk.sfpk_update(state, jnp.asarray([1.0, 2.0, 1.5]),
                                          [jnp.asarray(g) for g in grads],
                                          [jnp.asarray(t) for t in theta],
                                          config=config, target=target)
        expected = _numpy_step(particles, grads, theta, start, target, config, 2)
        for got, want in zip(new.particles, expected):
            np.testing.assert_allclose(got, want, rtol=1e-10)
        # Every particle votes |m| times the |theta| its channel covers.
        for got, want, t in zip(new.scores, expected, theta):
            strength = np.asarray(channels.abs_weight(jnp.asarray(t), want.shape[1:]))
            np.testing.assert_allclose(got, np.mean(np.abs(want) * strength[None], axis=0),
                                       rtol=1e-10)
        # The trace's density is the dynamics' G, its dt the mean of the layers'.
        if dynamics == "global":
            d = layout.total
            g_global = np.sqrt(sum(nd * np.sum(p.reshape(3, -1) ** 2, axis=1)
                                   for p, nd in zip(particles, layout.node_sizes)) / d)
            np.testing.assert_allclose(trace.G, g_global, rtol=1e-10)
        ratio = start / target
        dt = target * (ratio ** (1 - 2 / 10) - ratio ** (1 - 3 / 10))
        np.testing.assert_allclose(trace.dt, np.full(3, np.mean(dt)), rtol=1e-12)


def test_global_dynamics_lower_the_global_density_by_the_layers_dt():
    # From the dense start every layer has G_l = 1, so all dt_l are equal and
    # the global G falls by dt to first order.
    with jax.enable_x64(True):
        config = SFPKConfig(steps=50, particles=2, scope="local", mask_dim="out")
        params = jax.tree.map(jnp.asarray, PARAMS)
        layout = MaskLayout.from_params(params, flax_axes, mask_dim="out")
        state = sfpk_jax.sfpk.initial_state(layout, config)
        np.testing.assert_allclose(state.start, np.ones(len(layout.paths)))
        grads = [0.1 * jnp.asarray(np.random.default_rng(0).normal(size=(2, *s)))
                 for s in layout.mask_shapes]
        new, trace = sfpk_jax.sfpk.sfpk_update(state, jnp.ones(2), grads, layout.gather(params),
                                          config=config, target=0.3)
        after = jax.vmap(lambda *m: functional.global_g(
            list(m), "l2", layout.node_sizes))(*new.particles)
        np.testing.assert_allclose(trace.G - after, trace.dt, rtol=2e-2)
