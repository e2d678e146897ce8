"""``particle_mode="processes"``: the particles' energies in local worker processes.

Every worker (:class:`sfpk_jax.parallel.worker_pool.WorkerPool`, one single-threaded
JAX pinned to each core) gets the one-particle energy, exported with
:mod:`jax.export` for the step's shapes, the parameters and the loss's state
once per call, then every step its block of particles (their masks and
mini-batches); it sends back E and grad E. The update runs here, jitted, as
in ``loop`` mode. The workers compile the same program as ``loop``'s energy,
single-threaded: the energies agree with ``loop``'s to float rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sfpk_jax.core.masks import MaskLayout
from sfpk_jax.parallel.worker_pool import WorkerPool
from sfpk_jax.sfpk import auto, modes
from sfpk_jax.sfpk import energy as energy_lib
from sfpk_jax.sfpk.config import SFPKConfig
from sfpk_jax.sfpk.execution import ComputeDtype, Execution


def _signature(tree: Any) -> tuple:
    """Hashable structure, shapes and dtypes of ``tree``."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((np.shape(x), str(jnp.result_type(x))) for x in leaves)


@functools.lru_cache(maxsize=modes.CACHE_SIZE)
def _exported(fn: Callable, stateful: bool, layout: MaskLayout, config: SFPKConfig,
              conv_chunk: int, compute_dtype: ComputeDtype, signature: tuple) -> bytes:
    """The serialized ``(params, loss_state, mask, batch) -> (E, grad E)`` for these shapes."""
    treedef, leaves = signature
    shapes = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaves])
    energy_fn = energy_lib.make_energy_fn(modes.three_arguments(fn, stateful, conv_chunk),
                                          layout, config, compute_dtype)
    one = jax.jit(lambda params, loss_state, mask, batch: energy_fn(params, mask, batch,
                                                                    loss_state))
    return jax.export.export(one, platforms=["cpu"])(*shapes).serialize()


def process_stepper(loss_fn: Callable, layout: MaskLayout, config: SFPKConfig, target: float,
                    pool: WorkerPool, execution: Execution = Execution("processes")
                    ) -> modes.Stepper:
    """The step of ``particle_mode="processes"``, its energies computed by ``pool``.

    The first step hands the workers the exported energy and the parameters
    (held fixed for the stepper's life: pass the same ``params`` every step).
    The compiled pieces are cached as :func:`sfpk_jax.sfpk.modes.make_stepper`'s.

    Args:
      loss_fn: as for :func:`sfpk_jax.sfpk.modes.make_stepper`.
      layout: where the prunable leaves are.
      config: the hyper-parameters.
      target: the target mask density.
      pool: the open worker pool.
      execution: its ``compute_dtype`` and ``conv_chunk`` are the workers' (the rest is the
        pool's).

    Returns:
      A :class:`~sfpk_jax.sfpk.modes.Stepper`.
    """
    fn, loss_state = modes.loss_parts(loss_fn)
    program_config = modes.program_config(config)
    # The workers run on the CPU, whatever the parent's backend.
    conv_chunk = (auto.conv_chunk("cpu") if execution.conv_chunk == "auto"
                  else execution.conv_chunk)
    combine = modes.combine_program(layout, program_config)
    stack = jax.jit(modes.stack_outputs)
    target = jnp.asarray(float(target))
    loaded = []

    def outputs(params, particles, batch):
        particles, batch = jax.device_get((list(particles), batch))
        items = [([m[i] for m in particles], jax.tree.map(lambda x, i=i: x[i], batch))
                 for i in range(particles[0].shape[0])]
        shared = (params, loss_state)
        signature = _signature((*shared, *items[0]))
        if loaded != [signature]:  # the first step, or new shapes
            pool.load(_exported(fn, loss_state is not None, layout, program_config, conv_chunk,
                                execution.compute_dtype, signature), shared)
            loaded[:] = [signature]
        return tuple(pool.map(items))

    return modes.Stepper(
        step=lambda params, state, batch: combine(
            params, target, state, outputs(params, state.particles, batch)),
        energies=lambda params, particles, batch: stack(outputs(params, particles, batch)),
    )
