"""The SFPK simulation: n mask particles carried from density 1 to the target.

One step, for every particle i at once (spec, "One SFPK step"):
  g = -grad G(m_i); e = -grad E(m_i) - lambda grad K(m_i);
  delta_i = x e + y g (closed form, radius r); m_i <- m_i + dt_t delta_i;
then the lowest-energy particles vote into the running scores. The final mask
keeps the top (1 - sparsity) fraction of the scores.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sfpk_jax import direction as direction_lib
from sfpk_jax import energy as energy_lib
from sfpk_jax import repulsion as repulsion_lib
from sfpk_jax import schedules, sharding, structure
from sfpk_jax import sparsity as sparsity_lib
from sfpk_jax import thresholds
from sfpk_jax import voting
from sfpk_jax.config import SFPKConfig
from sfpk_jax.masks import MaskLayout, Prunable, path_to_str
from sfpk_jax.resume import CheckpointPolicy, SimulationCheckpoints, fingerprint

TRACE_FIELDS = ("sparsity", "energy", "repulsion", "dt")

# Bit i of StepTrace.faults: which of a particle's values was NaN or Inf.
FAULTS = ("energy", "energy gradient", "direction")


class SFPKState(NamedTuple):
    """Everything the simulation carries from one step to the next.

    Attributes:
      particles: one array per prunable leaf, leading axis n.
      scores: the running vote S, one array per prunable leaf.
      step: index of the next step (int32 scalar).
      start: the density the run started from (scalar, or (L,) in local scope).
    """

    particles: list
    scores: list
    step: jax.Array
    start: jax.Array


class StepTrace(NamedTuple):
    """Per-particle record of one step, each of shape (n,).

    ``sparsity`` is G before the update (the mean over layers in local scope),
    ``energy`` E before the update, ``repulsion`` K, ``dt`` the step size (mean
    over layers in local scope), ``faults`` the particle's non-finite values as
    bits (:data:`FAULTS`; 0 when all is finite).
    """

    sparsity: jax.Array
    energy: jax.Array
    repulsion: jax.Array
    dt: jax.Array
    faults: jax.Array


class SFPKResult(NamedTuple):
    """What :func:`sfpk_prune` returns.

    Attributes:
      masks: 0/1 float32 masks, a tree mirroring params (None where not pruned).
      scores: the final vote S, same structure as ``masks``.
      particles: the continuous particles, same structure, leading axis n.
      trace: dict of numpy arrays of shape (steps run, n) with keys
        ``sparsity``, ``energy``, ``repulsion``, ``dt``.
    """

    masks: Any
    scores: Any
    particles: Any
    trace: dict


def _per_particle(fn, *args):
    """vmaps ``fn`` over the particle axis of list-of-leaves arguments."""
    return jax.vmap(fn)(*args)


def _not_finite(leaves: list) -> jax.Array:
    """(n,) True where any entry of a particle's leaves is NaN or Inf."""
    bad = [~jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim))) for x in leaves]
    return jnp.any(jnp.stack(bad), axis=0)


def _broadcast_step(dt: jax.Array, leaf: jax.Array, layer: int, scope: str) -> jax.Array:
    step = dt if scope == "global" else dt[:, layer]
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
    scope = config.scope
    particles = state.particles
    node = [t.size // m[0].size for m, t in zip(particles, theta)]
    density, g = _per_particle(
        lambda *m: sparsity_lib.sparsity_and_descent(list(m), config.sparsity_fn, scope, node),
        *particles,
    )
    k_value, k_grad = repulsion_lib.repulsion(
        particles, theta, mode=config.repulsion_mode, weighted=config.repulsion_weighted
    )
    e = [-de - config.repulsion * dk for de, dk in zip(energy_grad, k_grad)]
    delta = jax.vmap(
        lambda gi, ei: direction_lib.direction(gi, ei, config.radius, scope)
    )(g, e)
    dt = jnp.broadcast_to(
        schedules.step_size(config.schedule, state.step, config.steps, state.start, target, density),
        density.shape,
    )
    moved = [
        m + _broadcast_step(dt, m, l, scope) * d
        for l, (m, d) in enumerate(zip(particles, delta))
    ]
    scores = voting.vote(
        state.scores,
        moved,
        theta,
        energy,
        mode=config.vote_mode,
        score=config.score,
        voters=config.voters,
        momentum=config.momentum,
        target_density=target,
        scope=scope,
    )
    per_particle = (lambda x: x) if scope == "global" else (lambda x: jnp.mean(x, axis=-1))
    faults = sum(
        bad.astype(jnp.int32) << bit
        for bit, bad in enumerate([~jnp.isfinite(energy), _not_finite(energy_grad), _not_finite(delta)])
    )
    trace = StepTrace(
        sparsity=per_particle(density),
        energy=energy,
        repulsion=k_value,
        dt=per_particle(dt),
        faults=faults,
    )
    moved_state = SFPKState(moved, scores, state.step + 1, state.start)
    # A select rather than a host round-trip: the step stays one async program.
    kept = jax.tree.map(lambda new, old: jnp.where(jnp.any(faults != 0), old, new), moved_state, state)
    return kept, trace


class Stepper(NamedTuple):
    """The jitted pieces of one step; every one takes params explicitly.

    Attributes:
      step: ``(params, state, batch) -> (state, trace)``, the whole step.
      energies: ``(params, particles, batch) -> (E, grad E)`` for all particles.
    """

    step: Callable[[Any, SFPKState, Any], tuple[SFPKState, StepTrace]]
    energies: Callable[[Any, list, Any], tuple[jax.Array, list]]


def make_stepper(
    loss_fn: Callable,
    layout: MaskLayout,
    config: SFPKConfig,
    target: float,
    mesh: jax.sharding.Mesh | None = None,
) -> Stepper:
    """Builds the jitted SFPK step for ``config.particle_mode``.

    ``vmap``, ``map`` and ``shard`` compile the whole step (energies, update,
    vote) into one program. ``loop`` dispatches one jitted energy call per
    particle (asynchronously: nothing waits on the host) followed by the
    jitted update. The state's buffers are donated to the update.

    Args:
      loss_fn: pure ``loss_fn(params, batch) -> scalar``.
      layout: where the prunable leaves are.
      config: the hyper-parameters.
      target: the target mask density.
      mesh: the devices of ``shard`` mode (see :func:`default_mesh`).
    """
    energy_fn = energy_lib.make_energy_fn(loss_fn, layout, config)

    def update(params, state, energy, grads):
        return sfpk_update(
            state, energy, grads, layout.gather(params), config=config, target=target
        )

    if config.particle_mode == "loop":

        @jax.jit
        def one_particle(params, particles, batch, i):
            take = lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False)
            return energy_fn(params, [take(m) for m in particles], jax.tree.map(take, batch))

        def outputs(params, particles, batch):
            n = particles[0].shape[0]
            # One host-to-device copy of the step's batch, not one per particle.
            batch = jax.device_put(batch)
            return tuple(one_particle(params, particles, batch, jnp.int32(i)) for i in range(n))

        combine = jax.jit(
            lambda params, state, outs: update(params, state, *energy_lib.stack_outputs(outs)),
            donate_argnums=1,
        )
        stack = jax.jit(energy_lib.stack_outputs)
        return Stepper(
            step=lambda params, state, batch: combine(
                params, state, outputs(params, state.particles, batch)
            ),
            energies=lambda params, particles, batch: stack(outputs(params, particles, batch)),
        )

    if config.particle_mode != "shard":
        batched = energy_lib.all_particles(energy_fn, config.particle_mode, config.particle_chunk)

        @functools.partial(jax.jit, donate_argnums=1)
        def fused(params, state, batch):
            return update(params, state, *batched(params, state.particles, batch))

        return Stepper(step=fused, energies=jax.jit(batched))

    mesh = mesh or default_mesh(config.particles)
    batched = sharding.sharded_energies(energy_fn, mesh)
    # The state keeps one placement (particles split, the rest replicated, the
    # trace replicated for the host), so the step compiles once, not again
    # when the first step's outputs come back sharded.
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.PARTICLES))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    placement = SFPKState([split] * len(layout.paths), [whole] * len(layout.paths), whole, whole)

    @functools.partial(jax.jit, donate_argnums=1, out_shardings=(placement, whole))
    def sharded(params, state, batch):
        return update(params, state, *batched(params, state.particles, batch))

    place = functools.partial(sharding.shard_particle_batch, mesh=mesh)
    energies = jax.jit(batched)
    return Stepper(
        step=lambda params, state, batch: sharded(
            params, jax.device_put(state, placement), place(batch)),
        energies=lambda params, particles, batch: energies(params, particles, place(batch)),
    )


def default_mesh(particles: int, batch_axis: int = 1) -> jax.sharding.Mesh:
    """The mesh of ``shard`` mode: as many devices as evenly share the particles.

    Args:
      particles: the number of particles n.
      batch_axis: devices that split each particle's mini-batch (devices of
        one process, so that its all-reduces stay within a host).

    Returns:
      A :func:`sfpk_jax.sharding.particle_mesh` whose particle axis is the
      largest divisor of n that fits the devices, e.g. 5 of 8 devices for 10
      particles. With several processes every process contributes the same
      number of its own devices, ordered by process.

    Raises:
      ValueError: ``batch_axis`` exceeds one process's devices, or (with
        several processes) n is not a multiple of the process count.
    """
    processes, local = jax.process_count(), jax.local_device_count()
    if not 1 <= batch_axis <= local:
        raise ValueError(f"batch_axis={batch_axis} must lie in [1, {local}] (the devices of "
                         "one process)")
    per_process = max(
        (k for k in range(1, local // batch_axis + 1) if particles % (k * processes) == 0), default=0)
    if not per_process:
        raise ValueError(f"{particles} particles do not split evenly over the {processes} "
                         f"processes: use a multiple of {processes} particles")
    devices = [d for p in range(processes)
               for d in [d for d in jax.devices() if d.process_index == p][: per_process * batch_axis]]
    return sharding.particle_mesh(devices, batch_axis=batch_axis)


def check_sparsity(sparsity) -> float:
    """Validates a sparsity (fraction removed) and returns it as a float."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.floating)):
        raise TypeError(f"sparsity must be a number in (0, 1), got {type(sparsity).__name__}")
    if not (0.0 < float(sparsity) < 1.0):
        raise ValueError(
            f"sparsity={sparsity!r} is outside (0, 1): it is the fraction of prunable "
            "entries to remove, e.g. 0.95 keeps 5%"
        )
    return float(sparsity)


def _check_finite(layout: MaskLayout, theta: list) -> None:
    for path, t in zip(layout.paths, theta):
        if not bool(jnp.all(jnp.isfinite(t))):
            raise ValueError(
                f"parameter {path} holds NaN or Inf values; SFPK needs finite trained "
                "weights: check the checkpoint or the training run that produced it"
            )


def _check_batch(batch: Any, n: int, step: int) -> None:
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError(f"step {step}: the batch is empty; yield one batch pytree per step")
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] != n:
            raise ValueError(
                f"step {step}: batch leaf {path_to_str(path) or '<root>'} has shape "
                f"{np.shape(leaf)}, but its leading axis must be the particle count n={n} "
                "(particle i uses slice i)"
            )


def initial_state(
    layout: MaskLayout, params: Any, config: SFPKConfig, init: SFPKResult | None = None
) -> SFPKState:
    """Dense particles (m = 1), or the particles and scores of an earlier run."""
    n = config.particles
    # float32, or float64 under jax_enable_x64 (for exact comparisons).
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
    if init is None:
        particles = [jnp.ones((n,) + s, dtype) for s in layout.mask_shapes]
        scores = [jnp.zeros(s, dtype) for s in layout.mask_shapes]
    else:
        # Copies: the step donates its state, and the caller's result must survive.
        particles = [jnp.array(x, dtype, copy=True) for x in layout.gather(init.particles)]
        scores = [jnp.array(x, dtype, copy=True) for x in layout.gather(init.scores)]
        for path, shape, p in zip(layout.paths, layout.mask_shapes, particles):
            if p.shape != (n,) + shape:
                raise ValueError(
                    f"init particles for {path} have shape {p.shape}, expected {(n,) + shape}: "
                    "resume with the same params tree and number of particles"
                )
    density = jax.vmap(
        lambda *m: sparsity_lib.sparsity(list(m), config.sparsity_fn, config.scope, layout.node_sizes)
    )(*particles)
    return SFPKState(particles, scores, jnp.int32(0), jnp.mean(density, axis=0))


def _batch_stream(batches, start: int) -> Iterator[Any]:
    """The batches from step ``start`` on (see :func:`sfpk_prune`'s ``batches``)."""
    if callable(batches):
        return iter(batches(start))
    stream = iter(batches)
    for _ in range(start):
        next(stream, None)
    return stream


def _fault_message(step: int, faults: np.ndarray, checkpoints: SimulationCheckpoints | None) -> str:
    bad = np.flatnonzero(faults)
    which = "; ".join(
        f"particle {i}: {', '.join(name for bit, name in enumerate(FAULTS) if faults[i] >> bit & 1)}"
        for i in bad
    )
    saved = (
        f"the state before step {step} is checkpointed in {checkpoints.directory} (resume from it "
        "after the fix)" if checkpoints else "pass checkpoint= to keep the last good state"
    )
    return (
        f"SFPK step {step}: non-finite values ({which}). Usual fixes: a smaller radius (closer "
        "to 1), more steps (smaller moves per step), a lower learning rate or fewer epochs in "
        f"the dense training if its weights are extreme; {saved}"
    )


def sfpk_prune(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batches: Iterable[Any] | Callable[[int], Iterable[Any]],
    sparsity: float,
    config: SFPKConfig = SFPKConfig(),
    prunable: Prunable = None,
    key: jax.Array | None = None,
    init: SFPKResult | None = None,
    checkpoint: CheckpointPolicy | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> SFPKResult:
    """Prunes ``params`` with SFPK.

    Args:
      loss_fn: pure ``loss_fn(params, batch) -> scalar`` (close over batch-norm
        state in training mode).
      params: the trained parameter pytree theta.
      batches: yields one batch pytree per step whose leaves have a leading
        axis of size ``config.particles``: particle i uses slice i. Either an
        iterable, or a function ``start -> iterable`` of the batches from step
        ``start`` on, which lets a resumed run skip the steps already done
        without reading them (e.g. ``lambda start: particle_loader(...,
        start=start)``); a plain iterable is advanced past them.
      sparsity: fraction of prunable entries to remove (0.95 keeps 5%).
      config: the hyper-parameters.
      prunable: which leaves to prune: None (conv/dense kernels and dense
        biases), a regex over '/'-joined paths, or a callable (path, leaf).
      key: optional PRNG key that breaks exact ties in the final top-k (without
        it ties go by position); the simulation itself is deterministic.
      init: an earlier result to continue from (gradual pruning): its
        particles and scores are the starting point, and the start density is
        the particles' mean G.
      checkpoint: where and how often to checkpoint the simulation, and
        whether to resume from the latest checkpoint there (see
        :class:`sfpk_jax.resume.CheckpointPolicy`). A resumed run ends with
        exactly the masks and scores of an uninterrupted one.
      mesh: the devices over which ``particle_mode="shard"`` splits the
        particles (a :func:`sfpk_jax.sharding.particle_mesh`); by default as
        many devices as evenly share them (:func:`default_mesh`). With several
        processes (``jax.distributed``) every process calls ``sfpk_prune``
        with the same arguments and batches; see :mod:`sfpk_jax.sharding`.

    Returns:
      An :class:`SFPKResult`.

    Raises:
      ValueError: bad sparsity, batches or parameters (the message says which).
      ResumeError: the checkpoint folder holds another run, or a damaged one.
      FloatingPointError: a particle's energy, gradient or direction became
        NaN or Inf; the message names the step and particles, and the last
        good state is checkpointed first when ``checkpoint`` is given.
    """
    sparsity = check_sparsity(sparsity)
    if not isinstance(config, SFPKConfig):
        raise TypeError(f"config must be an SFPKConfig, got {type(config).__name__}")
    if mesh is not None and config.particle_mode != "shard":
        raise ValueError(f"mesh= is used by particle_mode='shard', not {config.particle_mode!r}")
    if mesh is not None and config.particles % dict(mesh.shape).get(sharding.PARTICLES, 1):
        raise ValueError(
            f"{config.particles} particles do not split evenly over the mesh's "
            f"{dict(mesh.shape)[sharding.PARTICLES]} particle devices: use a multiple of that "
            "many particles or a mesh over fewer devices"
        )
    if jax.process_count() > 1 and config.particle_mode != "shard":
        raise ValueError(
            f"with {jax.process_count()} processes (jax.distributed) SFPK splits the particles "
            f"over every process's devices: use particle_mode='shard', not {config.particle_mode!r}"
        )
    if config.particle_mode == "shard":
        mesh = mesh or default_mesh(config.particles)
        idle = set(range(jax.process_count())) - {d.process_index for d in mesh.devices.flat}
        if idle:
            raise ValueError(
                f"the mesh has no device of process(es) {sorted(idle)}; every process runs "
                "sfpk_prune, so build the mesh over devices of all of them (default_mesh does)"
            )
        # Params may live on other devices (e.g. replicated by data-parallel training).
        params = sharding.replicate(params, mesh)
    layout = MaskLayout.from_params(params, prunable, config.mask_dim)
    theta = layout.gather(params)
    _check_finite(layout, theta)
    mask_sparsity = structure.mask_sparsity(sparsity, config.mask_dim is not None)
    target = 1.0 - mask_sparsity
    state = initial_state(layout, params, config, init)
    start = np.asarray(state.start)
    if np.any(start <= target):
        raise ValueError(
            f"the particles' density {start.round(4).tolist()} is already at or below the "
            f"target density {target:.4f} (sparsity={sparsity}); choose a higher sparsity"
        )
    trace = {f: [] for f in TRACE_FIELDS}
    checkpoints = None
    if checkpoint is not None:
        checkpoints = SimulationCheckpoints(
            checkpoint, fingerprint(config, sparsity, layout.paths, theta, layout.mask_shapes)
        )
        restored = checkpoints.restore(state)
        if restored is not None:
            state, saved_trace = restored
            trace = {f: [np.asarray(row, np.float32) for row in saved_trace[f]] for f in TRACE_FIELDS}
    try:
        state = _simulate(make_stepper(loss_fn, layout, config, target, mesh), params, state, batches,
                          config, target, trace, checkpoints)
    finally:
        if checkpoints is not None:
            checkpoints.close()
    if config.particle_mode == "shard":
        # Through the host, so that the (small) result is not committed to the
        # mesh and combines with arrays placed anywhere, like the other modes'.
        state, theta = jax.tree.map(jnp.asarray, sharding.to_host((state, theta)))
    remove = thresholds.remove_counts(layout.mask_sizes, mask_sparsity, config.scope)
    final = [
        jnp.where(structure.abs_weight(t, s.shape) != 0, s, 0.0)
        for s, t in zip(state.scores, theta)
    ]
    masks = thresholds.topk_mask(final, remove, config.scope, key)
    return SFPKResult(
        masks=layout.scatter(masks),
        scores=layout.scatter(state.scores),
        particles=layout.scatter(state.particles),
        trace={f: np.stack(v) if v else np.zeros((0, config.particles), np.float32)
               for f, v in trace.items()},
    )


def _simulate(stepper: Stepper, params, state: SFPKState, batches, config: SFPKConfig,
              target: float, trace: dict[str, list], checkpoints) -> SFPKState:
    """Runs the steps from ``state.step`` on, appending to ``trace``; returns the last state."""
    first = int(state.step)
    done = first >= config.steps or (
        config.early_stop and bool(trace["sparsity"]) and trace["sparsity"][-1].mean() <= target
    )
    if done:
        return state
    batch_iter = _batch_stream(batches, first)
    bar = tqdm(range(first, config.steps), initial=first, total=config.steps, desc="SFPK",
               disable=not config.progress, leave=False)
    for t in bar:
        try:
            batch = next(batch_iter)
        except StopIteration:
            raise ValueError(
                f"batches ran out at step {t} of {config.steps}: yield one batch per step "
                "(an infinite iterator is easiest)"
            ) from None
        _check_batch(batch, config.particles, t)
        state, step_trace = stepper.step(params, state, batch)
        # The one host transfer of the step: the trace, for the bar, the stop test and faults.
        host = jax.device_get(step_trace)
        if np.any(host.faults):
            if checkpoints is not None:
                checkpoints.save(t, state, trace)
            raise FloatingPointError(_fault_message(t, host.faults, checkpoints))
        for f in TRACE_FIELDS:
            trace[f].append(np.asarray(getattr(host, f)))
        mean_g = float(np.mean(host.sparsity))
        bar.set_postfix(G=f"{mean_g:.4f}", E=f"{float(np.mean(host.energy)):.4f}")
        finished = t + 1 == config.steps or (config.early_stop and mean_g <= target)
        if checkpoints is not None and (finished or (t + 1) % checkpoints.policy.every == 0):
            checkpoints.save(t + 1, state, trace)
        if finished:
            break
    bar.close()
    return state


def spode_prune(loss_fn, params, batches, sparsity, config: SFPKConfig | None = None, **kwargs):
    """SpODE (Mo et al., ICML 2023): :func:`sfpk_prune` with n = 1 and lambda = 0."""
    config = (config or SFPKConfig()).replace(particles=1, repulsion=0.0)
    return sfpk_prune(loss_fn, params, batches, sparsity, config, **kwargs)
