"""One SFPK step for all n particles at once, given E and grad E (pure, jittable).

The spec's step, for every particle i:
  g_i = -grad G(m_i)                          (density descent)
  e_i = -grad E(m_i) - lambda grad K(m_i)     (energy descent plus repulsion)
  delta_i = x e_i + y g_i                     (closed form, radius r)
  m_i <- m_i + dt_t delta_i
then the lowest-energy particles vote into the running scores S.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sfpk_jax.core import channels, schedules, voting
from sfpk_jax.core import density as density_lib
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
      target: target density f.

    Returns:
      The state after the step and the step's trace. When any particle's
      energy, gradient or direction is not finite (``trace.faults`` says which)
      the state is returned unchanged, so the caller still holds the last good
      state.
    """
    scope, m = config.scope, state.particles
    node = [channels.node_size(t.shape, p.shape[1:]) for p, t in zip(m, theta)]

    density, g = jax.vmap(
        lambda *mi: density_lib.density_and_descent(list(mi), config.sparsity_fn, scope, node))(*m)
    k, k_grad = repulsion_lib.repulsion(
        m, theta, mode=config.repulsion_mode, weighted=config.repulsion_weighted)
    e = [-de - config.repulsion * dk for de, dk in zip(energy_grad, k_grad)]
    delta = jax.vmap(lambda gi, ei: direction_lib.direction(gi, ei, config.radius, scope))(g, e)
    dt = jnp.broadcast_to(
        schedules.step_size(config.schedule, state.step, config.steps, state.start, target,
                            density),
        density.shape)
    moved = [mi + _per_particle(dt, mi, l, scope) * di for l, (mi, di) in enumerate(zip(m, delta))]

    scores = voting.vote(
        state.scores, moved, theta, energy, mode=config.vote_mode, score=config.score,
        voters=config.voters, momentum=config.momentum, target_density=target, scope=scope)

    faults = sum(
        bad.astype(jnp.int32) << bit
        for bit, bad in enumerate([~jnp.isfinite(energy), _not_finite(energy_grad),
                                   _not_finite(delta)]))
    layer_mean = (lambda x: x) if scope == "global" else (lambda x: jnp.mean(x, axis=-1))
    trace = StepTrace(density=layer_mean(density), energy=energy, repulsion=k, dt=layer_mean(dt),
                      faults=faults)
    moved_state = SFPKState(moved, scores, state.step + 1, state.start)
    # A select rather than a host round-trip: the step stays one async program.
    kept = jax.tree.map(lambda new, old: jnp.where(jnp.any(faults != 0), old, new),
                        moved_state, state)
    return kept, trace
