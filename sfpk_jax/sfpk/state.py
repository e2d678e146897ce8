"""What the simulation carries and returns: its state, per-step trace and result."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sfpk_jax.core import functional
from sfpk_jax.core.masks import MaskLayout
from sfpk_jax.sfpk.config import SFPKConfig
from sfpk_jax.sfpk.execution import Execution

# The spec's symbols: the functional G, the polarized energy E, the repulsion K, the step dt.
TRACE_FIELDS = ("G", "E", "K", "dt")

# Bit i of StepTrace.faults: which of a particle's values was NaN or Inf.
FAULTS = ("energy", "energy gradient", "direction")


class SFPKState(NamedTuple):
    """Everything the simulation carries from one step to the next.

    Attributes:
      particles: one array per prunable leaf, leading axis n.
      scores: the running vote S, one array per prunable leaf.
      step: index of the next step (int32 scalar).
      start: the density the run started from: a scalar, or one per layer
        (L,) when the mask's scope is local (the step sizes are per layer then).
    """

    particles: list
    scores: list
    step: jax.Array
    start: jax.Array


class StepTrace(NamedTuple):
    """Per-particle record of one step, each of shape (n,), named by the spec's symbols.

    Attributes:
      G: the dynamics' functional G before the update (1 for a dense
        particle; the mean over layers when the dynamics are layer-wise).
      E: the polarized energy before the update.
      K: the repulsion.
      dt: the step size (the mean over layers when the mask's scope is local).
      faults: the particle's non-finite values as bits (:data:`FAULTS`; 0
        when all is finite).
    """

    G: jax.Array
    E: jax.Array
    K: jax.Array
    dt: jax.Array
    faults: jax.Array


class SFPKResult(NamedTuple):
    """What :func:`sfpk_jax.sfpk_prune` returns (a :class:`sfpk_jax.pruners.PruningResult`).

    One-shot pruners return :class:`sfpk_jax.PruneResult`; this type also
    carries the particle system, which gradual pruning continues (``init=``)
    and which the trace plots read.

    Attributes:
      masks: 0/1 float32 masks, a tree mirroring params (None where not pruned).
      scores: the final vote S, same structure as ``masks``; the final mask
        keeps its highest entries.
      particles: the continuous particles, same structure, leading axis n.
      trace: a dict of numpy arrays of shape (steps run, n), keys
        :data:`TRACE_FIELDS`: ``G``, ``E``, ``K`` and ``dt``.
      execution: how the simulation ran: the :class:`~sfpk_jax.Execution`
        given, its ``"auto"`` fields resolved (see :mod:`sfpk_jax.sfpk.auto`).
    """

    masks: Any
    scores: Any
    particles: Any
    trace: dict
    execution: Execution | None = None


def initial_state(
    layout: MaskLayout, config: SFPKConfig, init: SFPKResult | None = None
) -> SFPKState:
    """The state before the first step: dense particles (m = 1) and zero scores.

    Args:
      layout: where the prunable leaves are.
      config: the hyper-parameters (particle count, density functional, scope).
      init: an earlier result to continue from (gradual pruning): its
        particles and scores, copied.

    Returns:
      The state; its ``start`` is the particles' mean G, per layer when the
      mask's scope is local (each layer's step sizes start from it).
    """
    n = config.particles
    if init is None:
        return _dense_state(layout, config)
    particles, scores = layout.gather(init.particles), layout.gather(init.scores)
    for path, shape, p in zip(layout.paths, layout.mask_shapes, particles):
        if np.shape(p) != (n,) + shape:
            raise ValueError(
                f"init particles for {path} have shape {np.shape(p)}, expected {(n,) + shape}: "
                "resume with the same params tree and number of particles"
            )
    return _state(layout, config, particles, scores)


def _dtype():
    # float32, or float64 under jax_enable_x64 (for exact comparisons).
    return jax.dtypes.canonicalize_dtype(jnp.float64)


# One compiled program each (not one small one per operation): start-up time.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _state(layout: MaskLayout, config: SFPKConfig, particles: list, scores: list) -> SFPKState:
    # New buffers (jit copies what it returns): the step donates its state, and an
    # ``init`` result of the caller's must survive.
    particles = [jnp.array(x, _dtype(), copy=True) for x in particles]
    scores = [jnp.array(x, _dtype(), copy=True) for x in scores]
    g = jax.vmap(
        lambda *m: functional.g(list(m), config.sparsity_fn, config.scope, layout.node_sizes)
    )(*particles)
    return SFPKState(particles, scores, jnp.int32(0), jnp.mean(g, axis=0))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _dense_state(layout: MaskLayout, config: SFPKConfig) -> SFPKState:
    particles = [jnp.ones((config.particles,) + s, _dtype()) for s in layout.mask_shapes]
    scores = [jnp.zeros(s, _dtype()) for s in layout.mask_shapes]
    return _state(layout, config, particles, scores)
