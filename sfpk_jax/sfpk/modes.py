"""How the n particles go through the model: the compiled particle modes.

``loop`` dispatches one jitted energy call per particle (asynchronously) and
then the jitted update; ``vmap``, ``map`` (chunked ``lax.map``) and ``shard``
(particles over a device mesh, ``shard_map``) compile the whole step into one
program. Vmapping different masks through a convolution turns it into a
grouped convolution, which is much slower than a loop on some backends: that
is why ``loop`` and ``shard`` exist beside ``vmap``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sfpk_jax.core.masks import MaskLayout
from sfpk_jax.parallel import conv_chunks, sharding
from sfpk_jax.sfpk import auto
from sfpk_jax.sfpk import energy as energy_lib
from sfpk_jax.sfpk.config import SFPKConfig
from sfpk_jax.sfpk.energy import EnergyFn
from sfpk_jax.sfpk.execution import Execution
from sfpk_jax.sfpk.state import SFPKState, StepTrace
from sfpk_jax.sfpk.update import sfpk_update


def stack_outputs(outputs) -> tuple[jax.Array, list]:
    """One ``(E, grad E)`` per particle -> ``(E (n,), grad leaves (n, ...))``."""
    energy = jnp.stack([e for e, _ in outputs])
    grads = [jnp.stack(leaf) for leaf in zip(*(g for _, g in outputs))]
    return energy, grads


def all_particles(energy_fn: EnergyFn, mode: str, chunk: int) -> EnergyFn:
    """E and grad E for every particle at once (``vmap`` or chunked ``map``).

    Particle i uses slice i of every batch leaf; params, and any arguments
    after the batch (handed on to ``energy_fn``), are shared.
    """
    if mode == "vmap":
        return lambda params, particles, batch, *rest: jax.vmap(
            energy_fn, in_axes=(None, 0, 0) + (None,) * len(rest)
        )(params, particles, batch, *rest)
    if mode == "map":
        return lambda params, particles, batch, *rest: jax.lax.map(
            lambda xs: energy_fn(params, *xs, *rest), (particles, batch), batch_size=chunk
        )
    raise ValueError(f"particle mode {mode!r} is not traceable; 'loop' is driven by the caller")


def sharded_energies(energy_fn: EnergyFn, mesh: Mesh):
    """E and grad E of every particle, the particles split over the mesh.

    Same contract as :func:`all_particles`: the returned function
    maps ``(params, particles, batch, *rest)`` (every particle leaf and batch
    leaf with leading axis n; particle i uses slice i of the batch; ``rest``
    replicated and handed on to ``energy_fn``) to ``(energy (n,), grads)``,
    each grad leaf of shape ``(n, ...)``.

    Inside ``shard_map`` over the ``"particles"`` axis each device gets n/d
    particles and evaluates them one ``energy_fn`` call at a time (a Python
    loop, unrolled into one program): one particle at a time keeps the
    model's convolutions plain, whereas vmapping per-particle masks through
    them makes slow grouped convolutions. Params are replicated; the outputs
    come back as global arrays sharded over ``"particles"``.

    When the mesh's ``"batch"`` axis is longer than 1, each particle's
    mini-batch (axis 1 of every batch leaf of rank >= 2) is split over it.
    That axis is left to the compiler (``shard_map`` is manual over
    ``"particles"`` only), so a loss with train-mode batch norm still
    normalises with the whole mini-batch's statistics (the compiler inserts
    the all-reduces): averaging per-shard gradients with ``lax.pmean`` would
    instead give per-shard batch statistics, a different function.

    The returned function is not jitted (like ``all_particles``); call it
    inside ``jax.jit``. Its program is unrolled n/d times, so compile time
    grows with the particles per device.

    Args:
      energy_fn: the one-particle energy, from :func:`sfpk_jax.sfpk.energy.make_energy_fn`.
      mesh: a mesh from :func:`sfpk_jax.parallel.sharding.particle_mesh` (axes ``"particles"`` and
        optionally ``"batch"``, both of type Auto).

    Returns:
      ``(params, particles, batch) -> (energy, grads)``.

    Raises:
      ValueError: (when called) if n is not a multiple of the
        ``"particles"`` axis length, or a batch leaf's per-particle batch is
        not a multiple of the ``"batch"`` axis length.
    """
    sharding.check_mesh(mesh)
    n_dev = sharding.axis_size(mesh, sharding.PARTICLES)
    n_batch = sharding.axis_size(mesh, sharding.BATCH)

    def local(params, particles, batch, *rest):
        per_device = particles[0].shape[0]
        outputs = [
            energy_fn(params, [m[i] for m in particles], jax.tree.map(lambda x: x[i], batch), *rest)
            for i in range(per_device)
        ]
        return stack_outputs(outputs)

    # Built per call for the number of shared arguments after the batch.
    mapped = lambda count: jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(sharding.PARTICLES), P(sharding.PARTICLES)) + (P(),) * count,
        out_specs=P(sharding.PARTICLES),
        # Manual over the particles only: the batch axis stays with the
        # compiler, which keeps cross-example reductions (batch norm) exact.
        axis_names=frozenset({sharding.PARTICLES}),
        # The polarizers' quantile search is a fori_loop whose carry starts as
        # a constant and becomes particle-varying, which the varying-axes type
        # check rejects; the outputs are per-particle anyway, nothing is
        # differentiated through the shard_map, so the check adds nothing here.
        check_vma=False,
    )
    batch_sharding = NamedSharding(mesh, P(sharding.PARTICLES, sharding.BATCH))

    def energies(params, particles, batch, *rest):
        particles = list(particles)
        if not particles:
            raise ValueError("sharded_energies got no particle leaves")
        n = particles[0].shape[0]
        for name, leaf in sharding.named_leaves(particles, "particles"):
            if leaf.ndim == 0 or leaf.shape[0] != n:
                raise ValueError(
                    f"particle leaf {name} has shape {leaf.shape}; every particle leaf "
                    f"needs the same leading axis n={n}"
                )
        if n % n_dev:
            raise ValueError(
                f"{n} particles do not split evenly over the {n_dev} devices of the mesh's "
                f"{sharding.PARTICLES!r} axis: use a number of particles that is a multiple of "
                f"{n_dev}, or build the mesh over fewer devices "
                "(particle_mesh(devices=jax.devices()[:k]) with k dividing n)"
            )
        for name, leaf in sharding.named_leaves(batch, "batch"):
            if np.ndim(leaf) == 0 or np.shape(leaf)[0] != n:
                raise ValueError(
                    f"batch leaf {name} has shape {np.shape(leaf)}, but its leading axis "
                    f"must be the particle count n={n}"
                )
            if n_batch > 1 and np.ndim(leaf) >= 2 and np.shape(leaf)[1] % n_batch:
                raise ValueError(
                    f"batch leaf {name} has {np.shape(leaf)[1]} examples per particle, which "
                    f"do not split evenly over the mesh's {sharding.BATCH!r} axis of {n_batch} "
                    f"devices; use a per-particle batch size that is a multiple of {n_batch}"
                )
        if n_batch > 1:
            # Tells the compiler to split each particle's examples over "batch".
            batch = jax.tree.map(
                lambda x: jax.lax.with_sharding_constraint(x, batch_sharding) if x.ndim >= 2 else x,
                batch,
            )
        return mapped(len(rest))(params, particles, batch, *rest)

    return energies


class Stepper(NamedTuple):
    """The jitted pieces of one step; every one takes params explicitly.

    Attributes:
      step: ``(params, state, batch) -> (state, trace)``, the whole step.
      energies: ``(params, particles, batch) -> (E, grad E)`` for all particles.
    """

    step: Callable[[Any, SFPKState, Any], tuple[SFPKState, StepTrace]]
    energies: Callable[[Any, list, Any], tuple[jax.Array, list]]


# Steppers kept for reuse (see make_stepper); each holds its compiled programs.
CACHE_SIZE = 16


def make_stepper(
    loss_fn: Callable,
    layout: MaskLayout,
    config: SFPKConfig,
    target: float,
    execution: Execution = Execution(),
) -> Stepper:
    """Builds the jitted SFPK step for ``execution.particle_mode``.

    ``vmap``, ``map`` and ``shard`` compile the whole step (energies, update,
    vote) into one program. ``loop`` dispatches one jitted energy call per
    particle (asynchronously: nothing waits on the host) followed by the
    jitted update. The state's buffers are donated to the update.

    Compiled once: the jitted functions are kept (the last
    :data:`CACHE_SIZE`), keyed by the loss function, the layout, the
    config's and the execution's fields that shape the program, and the
    mesh; the target density and a
    :class:`~sfpk_jax.sfpk.energy.StatefulLoss`'s state are arguments of the
    programs. So another call with the same loss (or the same
    ``StatefulLoss.fn``) and shapes, e.g. the next round of gradual pruning,
    compiles nothing. A plain ``loss_fn`` is keyed by identity, as
    ``jax.jit`` keys functions: it must be pure.

    Args:
      loss_fn: pure ``loss_fn(params, batch) -> scalar``, or a
        :class:`~sfpk_jax.sfpk.energy.StatefulLoss`.
      layout: where the prunable leaves are.
      config: the hyper-parameters.
      target: the target mask density.
      execution: how the particles run (not ``processes``: see
        :func:`sfpk_jax.sfpk.particle_workers.process_stepper`).
    """
    if execution.particle_mode == "processes":
        raise ValueError("particle_mode='processes' needs its worker processes: sfpk_prune starts "
                         "them, or use sfpk_jax.sfpk.particle_workers.process_stepper inside "
                         "`with WorkerPool(...)`")
    execution = auto.choose(execution, config, allow_processes=False).execution
    fn, loss_state = loss_parts(loss_fn)
    execution = program_execution(execution)
    if execution.particle_mode == "shard":
        execution = execution.replace(
            mesh=execution.mesh or sharding.default_mesh(config.particles))
        loss_state = sharding.replicate(loss_state, execution.mesh)
    programs = _programs(fn, loss_state is not None, layout, program_config(config), execution)
    # Weakly typed, as the Python float it stands for: it takes the particles' dtype.
    target = jnp.asarray(float(target))
    return Stepper(
        step=lambda params, state, batch: programs.step(params, loss_state, target, state, batch),
        energies=lambda params, particles, batch: programs.energies(
            params, particles, batch, loss_state),
    )


def loss_parts(loss_fn: Callable) -> tuple[Callable, Any]:
    """``(fn, state)`` of a :class:`~sfpk_jax.sfpk.energy.StatefulLoss`, ``(loss_fn, None)`` else."""
    if isinstance(loss_fn, energy_lib.StatefulLoss):
        return loss_fn.fn, loss_fn.state
    return loss_fn, None


def three_arguments(fn: Callable, stateful: bool, conv_chunk: int = 0) -> Callable:
    """``fn`` as ``(params, batch, state)`` (a plain loss ignores the state, None), its
    convolutions over chunks of ``conv_chunk`` examples (0: whole batches)."""
    three = fn if stateful else (lambda params, batch, _: fn(params, batch))
    return conv_chunks.chunk_convolutions(three, conv_chunk)


def program_config(config: SFPKConfig) -> SFPKConfig:
    """``config`` less the fields the host loop alone reads, which must not split the caches."""
    return config.replace(early_stop=True)


def program_execution(execution: Execution) -> Execution:
    """``execution`` less the fields the host loop alone reads, which must not split the caches."""
    return Execution(particle_mode=execution.particle_mode,
                     particle_chunk=execution.particle_chunk, mesh=execution.mesh,
                     conv_chunk=execution.conv_chunk, compute_dtype=execution.compute_dtype)


class _Programs(NamedTuple):
    """``step(params, loss_state, target, state, batch)`` and
    ``energies(params, particles, batch, loss_state)``."""

    step: Callable
    energies: Callable


@functools.lru_cache(maxsize=CACHE_SIZE)
def combine_program(layout: MaskLayout, config: SFPKConfig) -> Callable:
    """The jitted ``(params, target, state, outputs) -> (state, trace)`` of the modes that
    evaluate the particles one call each: ``outputs`` holds one ``(E, grad E)`` per particle."""

    def combine(params, target, state, outputs):
        return sfpk_update(state, *stack_outputs(outputs), layout.gather(params), config=config,
                           target=target)

    return jax.jit(combine, donate_argnums=2)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _programs(fn: Callable, stateful: bool, layout: MaskLayout, config: SFPKConfig,
              execution: Execution) -> _Programs:
    """The jitted functions of :func:`make_stepper`, for ``fn(params, batch[, state])``."""
    energy_fn = energy_lib.make_energy_fn(three_arguments(fn, stateful, execution.conv_chunk),
                                          layout, config, execution.compute_dtype)
    mode, mesh = execution.particle_mode, execution.mesh

    def update(params, target, state, energy, grads):
        return sfpk_update(
            state, energy, grads, layout.gather(params), config=config, target=target
        )

    if mode == "loop":

        @jax.jit
        def one_particle(params, particles, batch, i, loss_state):
            take = lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False)
            return energy_fn(params, [take(m) for m in particles], jax.tree.map(take, batch),
                             loss_state)

        def outputs(params, particles, batch, loss_state):
            n = particles[0].shape[0]
            # One host-to-device copy of the step's batch, not one per particle.
            batch = jax.device_put(batch)
            return tuple(one_particle(params, particles, batch, jnp.int32(i), loss_state)
                         for i in range(n))

        combine = combine_program(layout, config)
        stack = jax.jit(stack_outputs)
        return _Programs(
            step=lambda params, loss_state, target, state, batch: combine(
                params, target, state, outputs(params, state.particles, batch, loss_state)
            ),
            energies=lambda *args: stack(outputs(*args)),
        )

    if mode != "shard":
        batched = all_particles(energy_fn, mode, execution.particle_chunk)

        @functools.partial(jax.jit, donate_argnums=3)
        def fused(params, loss_state, target, state, batch):
            return update(params, target, state, *batched(params, state.particles, batch,
                                                          loss_state))

        return _Programs(step=fused, energies=jax.jit(batched))

    batched = sharded_energies(energy_fn, mesh)
    # The state keeps one placement (particles split, the rest replicated, the
    # trace replicated for the host), so the step compiles once, not again
    # when the first step's outputs come back sharded.
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.PARTICLES))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    placement = SFPKState([split] * len(layout.paths), [whole] * len(layout.paths), whole, whole)

    @functools.partial(jax.jit, donate_argnums=3, out_shardings=(placement, whole))
    def sharded(params, loss_state, target, state, batch):
        return update(params, target, state, *batched(params, state.particles, batch, loss_state))

    place = functools.partial(sharding.shard_particle_batch, mesh=mesh)
    energies = jax.jit(batched)
    return _Programs(
        step=lambda params, loss_state, target, state, batch: sharded(
            params, loss_state, target, jax.device_put(state, placement), place(batch)),
        energies=lambda params, particles, batch, loss_state: energies(
            params, particles, place(batch), loss_state),
    )
