"""One SFPK step for all n particles at once, given E and grad E (pure, jittable).

The spec's step, for every particle i:
  g_i = -grad G(m_i)                          (density descent)
  e_i = -grad E(m_i) - lambda grad K(m_i)     (energy descent plus repulsion)
  delta_i = x e_i + y g_i                     (closed form, radius r)
  m_i <- m_i + dt_t delta_i
then the lowest-energy particles vote into the running scores S.

Two scopes, as in the reference: G, g and the norms of delta follow the
dynamics' scope (``config.dynamics``); dt, the vote and the final mask
follow the mask's (``config.scope``). The reference's channel pruning runs
global dynamics with per-layer step sizes, each layer from its own start
density (``Methods/sfpk.py``, ``SFPKSystem._calc_dt`` with list targets).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sfpk_jax.core import channels, functional, schedules, voting
from sfpk_jax.core import direction as direction_lib
from sfpk_jax.core import repulsion as repulsion_lib
from sfpk_jax.sfpk.config import SFPKConfig
from sfpk_jax.sfpk.state import SFPKState, StepTrace


def _not_finite(leaves: list) -> jax.Array:
    """(n,) True where any entry of a particle's leaves is NaN or Inf."""
    bad = [~jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim))) for x in leaves]
    return jnp.any(jnp.stack(bad), axis=0)


def _per_particle(step: jax.Array, leaf: jax.Array, layer: int, scope: str) -> jax.Array:
    """dt (n,) or (n, L) as a column that broadcasts over one particle leaf."""
    step = step if scope == "global" else step[:, layer]
    return step.reshape((-1,) + (1,) * (leaf.ndim - 1))


def _layer_mean(x: jax.Array, scope: str) -> jax.Array:
    """(n,) values as they are, (n, L) ones averaged over the layers."""
    return x if scope == "global" else jnp.mean(x, axis=-1)


def sfpk_update(
    state: SFPKState,
    energy: jax.Array,
    energy_grad: list,
    theta: list,
    *,
    config: SFPKConfig,
    target: float,
) -> tuple[SFPKState, StepTrace]:
    """Moves every particle one step, given E and grad E at the step's start.

    Args:
      state: positions and scores at the start of the step.
      energy: (n,) polarized energies.
      energy_grad: grad E per prunable leaf, leading axis n.
      theta: the prunable parameters.
      config: the hyper-parameters.
      target: the simulation's target density (for channel masks the
        renormalised one, see :func:`sfpk_jax.core.channels.simulation_density`).

    Returns:
      The state after the step and the step's trace. When any particle's
      energy, gradient or direction is not finite (``trace.faults`` says which)
      the state is returned unchanged, so the caller still holds the last good
      state.
    """
    scope, dynamics, m = config.scope, config.dynamics, state.particles
    node = [channels.node_size(t.shape, p.shape[1:]) for p, t in zip(m, theta)]

    density, g = jax.vmap(lambda *mi: functional.g_and_descent(
        list(mi), config.sparsity_fn, dynamics, node))(*m)
    k, k_grad = repulsion_lib.repulsion(
        m, theta, mode=config.repulsion_mode, weighted=config.repulsion_weighted,
        structured=channels.is_channel(config.mask_dim))
    e = [-de - config.repulsion * dk for de, dk in zip(energy_grad, k_grad)]
    delta = jax.vmap(lambda gi, ei: direction_lib.direction(gi, ei, config.radius, dynamics))(g, e)
    # The adaptive schedules re-plan from the dynamics' G: with global dynamics
    # and per-layer steps, every layer from the one global G, as the reference.
    current = density[:, None] if dynamics != scope else density
    dt = jnp.broadcast_to(
        schedules.step_size(config.schedule, state.step, config.steps, state.start, target,
                            current),
        density.shape[:1] if scope == "global" else (density.shape[0], len(m)))
    moved = [mi + _per_particle(dt, mi, l, scope) * di for l, (mi, di) in enumerate(zip(m, delta))]

    scores = voting.vote(
        state.scores, moved, theta, energy, mode=config.vote_mode, score=config.score,
        voters=config.voters, momentum=config.vote_momentum, target_density=target, scope=scope)

    faults = sum(
        bad.astype(jnp.int32) << bit
        for bit, bad in enumerate([~jnp.isfinite(energy), _not_finite(energy_grad),
                                   _not_finite(delta)]))
    trace = StepTrace(G=_layer_mean(density, dynamics), E=energy, K=k,
                      dt=_layer_mean(dt, scope), faults=faults)
    moved_state = SFPKState(moved, scores, state.step + 1, state.start)
    # A select rather than a host round-trip: the step stays one async program.
    kept = jax.tree.map(lambda new, old: jnp.where(jnp.any(faults != 0), old, new),
                        moved_state, state)
    return kept, trace
