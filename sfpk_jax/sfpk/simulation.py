"""The host loop of SFPK: ``sfpk_prune`` runs the compiled steps and makes the final mask.

It validates the inputs, feeds one particle batch per step to the stepper of
:mod:`sfpk_jax.sfpk.modes`, records the trace, checkpoints, stops on the
first non-finite value, and keeps the top (1 - sparsity) fraction of the
voted scores as the final mask.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sfpk_jax.core import channels, n_m, topk
from sfpk_jax.core.layers import first_batch, layers_from_batches
from sfpk_jax.core.masks import MaskLayout, Prunable, path_to_str
from sfpk_jax.parallel import sharding
from sfpk_jax.parallel.worker_pool import WorkerError, WorkerPool
from sfpk_jax.runtime import progress
from sfpk_jax.runtime.cores import local_cores
from sfpk_jax.sfpk import auto
from sfpk_jax.sfpk.config import SFPKConfig, spode
from sfpk_jax.sfpk.execution import Execution
from sfpk_jax.sfpk.modes import Stepper, make_stepper
from sfpk_jax.sfpk.particle_workers import process_stepper
from sfpk_jax.sfpk.resume import CheckpointPolicy, SimulationCheckpoints, fingerprint
from sfpk_jax.sfpk.state import FAULTS, TRACE_FIELDS, SFPKResult, SFPKState, initial_state

_LOG = logging.getLogger(__name__)
# Steps between two log lines when there is no progress bar.
LOG_EVERY = 10


def _check_finite(layout: MaskLayout, theta: list) -> None:
    # On the host: a jnp check would compile one small program per leaf shape.
    for path, t in zip(layout.paths, jax.device_get(theta)):
        if not np.isfinite(t).all():
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
    *,
    config: SFPKConfig = SFPKConfig(),
    execution: Execution = Execution(),
    prunable: Prunable = None,
    key: jax.Array | None = None,
    init: SFPKResult | None = None,
    checkpoint: CheckpointPolicy | None = None,
    desc: str | None = None,
    total_params: int | None = None,
) -> SFPKResult:
    """Prunes ``params`` with SFPK.

    With channel masks (``config.mask_dim``) the simulation aims, as the
    reference's does, at the density renormalised over all of the model's
    parameters, (M - (1 - f) P) / M, where f = sqrt(1 - sparsity) is the kept
    fraction of every layer's channels, M the weights of the masked leaves
    and P every parameter of the model; the final mask keeps f of each
    layer's channels (:func:`sfpk_jax.core.channels.simulation_density`).

    With N:M masks (``config.mask_dim="2:4"``, say) ``sparsity`` must be
    1 - N/M: the simulation runs unstructured (full-shaped particles) toward
    density N/M, and the final mask keeps the N highest voted scores of
    every group of M along each kernel's input axis (see
    :mod:`sfpk_jax.core.n_m`).

    Example (a two-layer model; a real run prunes a trained one):

    >>> import jax, jax.numpy as jnp, numpy as np, sfpk_jax
    >>> params = {"w1": jax.random.normal(jax.random.key(0), (8, 16)),
    ...           "w2": jax.random.normal(jax.random.key(1), (16, 4))}
    >>> def loss_fn(p, batch):
    ...     logits = jnp.tanh(batch["x"] @ p["w1"]) @ p["w2"]
    ...     return jnp.mean((logits - batch["y"]) ** 2)
    >>> rng = np.random.default_rng(0)
    >>> batches = ({"x": rng.normal(size=(2, 32, 8)), "y": rng.normal(size=(2, 32, 4))}
    ...            for _ in range(5))  # one batch per step, leading axis: the 2 particles
    >>> config = sfpk_jax.SFPKConfig(steps=5, particles=2)
    >>> result = sfpk_jax.sfpk_prune(loss_fn, params, batches, 0.75, config=config,
    ...                              prunable=r"^w", execution=sfpk_jax.Execution(progress=False))
    >>> round(sfpk_jax.sparsity_of(result.masks), 4)
    0.75
    >>> sorted(result.trace), result.trace["G"].shape
    (['E', 'G', 'K', 'dt'], (5, 2))

    Args:
      loss_fn: pure ``loss_fn(params, batch) -> scalar`` (batch norm in
        training mode), or a :class:`~sfpk_jax.sfpk.energy.StatefulLoss` that
        takes the other variables (batch-norm state) as an argument. The
        compiled step is reused by later calls with the same loss function
        (for a ``StatefulLoss``, the same ``fn``), shapes, config and
        execution (see :func:`sfpk_jax.sfpk.make_stepper`).
      params: the trained parameter pytree theta.
      batches: yields one batch pytree per step whose leaves have a leading
        axis of size ``config.particles``: particle i uses slice i. Either an
        iterable, or a function ``start -> iterable`` of the batches from step
        ``start`` on, which lets a resumed run skip the steps already done
        without reading them (e.g. ``lambda start: particle_loader(...,
        start=start)``); a plain iterable is advanced past them.
      sparsity: fraction of prunable entries to remove (0.95 keeps 5%).
      config: what is computed: the spec's hyper-parameters.
      execution: how it is computed: particle mode, worker processes,
        precision, progress. With several processes (``jax.distributed``)
        every process calls ``sfpk_prune`` with the same arguments and
        batches, in ``shard`` mode; see :mod:`sfpk_jax.parallel.sharding`.
      prunable: which leaves to prune: None (conv/dense kernels and dense
        biases; with channel or N:M masks, the model's layers read off
        ``loss_fn`` on the first batch; see
        :mod:`sfpk_jax.core.selection`), a regex over '/'-joined paths, a
        callable (path, leaf), or the model's layers
        (:func:`sfpk_jax.core.layers.trace_layers`).
      key: optional PRNG key that breaks exact ties in the final top-k (without
        it ties go by position); the simulation itself is deterministic.
      init: an earlier result to continue from (gradual pruning): its
        particles and scores are the starting point, and the start density is
        the particles' mean G.
      checkpoint: where and how often to checkpoint the simulation, and
        whether to resume from the latest checkpoint there (see
        :class:`sfpk_jax.CheckpointPolicy`). A resumed run ends with exactly
        the masks and scores of an uninterrupted one under the same execution.
      desc: the run's name on the progress bar and in the log lines (default:
        ``SFPK``, followed by the checkpoint folder's name when there is one).
        Without a bar (``execution.progress`` off, or stderr not a terminal),
        one line every 10 steps goes to the ``logging`` logger
        ``sfpk_jax.sfpk.simulation`` at level INFO.
      total_params: P for channel masks (ignored otherwise; see above). By
        default every entry of every leaf of ``params``; pass it when the
        params tree lacks parameters the model has (e.g. to match a PyTorch
        model whose identity shortcuts carry weights, as the reference's
        ``lottery_resnet`` ones do).

    Returns:
      An :class:`SFPKResult`.

    Raises:
      ValueError: bad sparsity, batches or parameters (the message says which).
      WorkerError: in ``processes`` mode, a worker process died or failed
        (the checkpoints written so far are kept).
      ResumeError: the checkpoint folder holds another run, or a damaged one.
      FloatingPointError: a particle's energy, gradient or direction became
        NaN or Inf; the message names the step and particles, and the last
        good state is checkpointed first when ``checkpoint`` is given.
    """
    sparsity = topk.check_sparsity(sparsity)
    if batches is None:
        raise ValueError("SFPK needs data: pass `batches`, one batch pytree per step whose "
                         "leaves have a leading particle axis n (e.g. data.particle_loader)")
    if not isinstance(config, SFPKConfig):
        raise TypeError(f"config must be an SFPKConfig, got {type(config).__name__}")
    if not isinstance(execution, Execution):
        raise TypeError(f"execution must be an Execution, got {type(execution).__name__}")
    pattern = n_m.from_mask_dim(config.mask_dim)
    if pattern is not None:
        n_m.check_sparsity(pattern, sparsity)

    def work() -> float | None:  # only asked for where worker processes could pay off
        nonlocal batches
        first, batches = first_batch(batches)
        return None if first is None else auto.estimate_work(
            loss_fn, params, jax.tree.map(lambda x: x[0], first), config)

    choice = auto.choose(execution, config, work=work)
    auto.announce(choice)
    execution = choice.execution
    mode = execution.particle_mode
    if jax.process_count() > 1 and mode != "shard":
        raise ValueError(
            f"with {jax.process_count()} processes (jax.distributed) SFPK splits the particles "
            f"over every process's devices: use particle_mode='shard', not {mode!r}"
        )
    if mode == "shard":
        mesh = execution.mesh or sharding.default_mesh(config.particles)
        if config.particles % dict(mesh.shape).get(sharding.PARTICLES, 1):
            raise ValueError(
                f"{config.particles} particles do not split evenly over the mesh's "
                f"{dict(mesh.shape)[sharding.PARTICLES]} particle devices: use a multiple of "
                "that many particles or a mesh over fewer devices"
            )
        idle = set(range(jax.process_count())) - {d.process_index for d in mesh.devices.flat}
        if idle:
            raise ValueError(
                f"the mesh has no device of process(es) {sorted(idle)}; every process runs "
                "sfpk_prune, so build the mesh over devices of all of them (default_mesh does)"
            )
        execution = execution.replace(mesh=mesh)
        # Params may live on other devices (e.g. replicated by data-parallel training).
        params = sharding.replicate(params, mesh)
    if config.mask_dim is not None and prunable is None:
        prunable, batches = layers_from_batches(loss_fn, params, batches)
    layout = MaskLayout.from_params(params, prunable, config.mask_dim)
    theta = layout.gather(params)
    _check_finite(layout, theta)
    mask_sparsity = channels.mask_sparsity(sparsity, channels.is_channel(config.mask_dim))
    target = 1.0 - mask_sparsity
    if channels.is_channel(config.mask_dim):
        if total_params is None:
            total_params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
        target = channels.simulation_density(target, layout.total, total_params)
    state = initial_state(layout, config, init)
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
            checkpoint,
            fingerprint(config, sparsity, layout.paths, theta, layout.mask_shapes, target),
            execution,
        )
        restored = checkpoints.restore(state)
        if restored is not None:
            state, saved_trace = restored
            trace = {f: [np.asarray(row, np.float32) for row in saved_trace[f]] for f in TRACE_FIELDS}
    try:
        with contextlib.ExitStack() as stack:
            if mode == "processes":
                # The workers end with the simulation, however it ends; more than
                # one per particle would idle.
                workers = min(execution.workers or len(local_cores()), config.particles)
                pool = stack.enter_context(WorkerPool(workers))
                stepper = process_stepper(loss_fn, layout, config, target, pool, execution)
            else:
                stepper = make_stepper(loss_fn, layout, config, target, execution)
            state = _simulate(stepper, params, state, batches, config, execution, target,
                              trace, checkpoints, desc)
    except WorkerError as err:
        kept = (f"the last checkpoint in {checkpoints.directory} is kept: run again with the same "
                "checkpoint policy to resume from it" if checkpoints is not None
                else "pass checkpoint= to keep the progress of a long run")
        raise WorkerError(f"SFPK (particle_mode='processes'): {err}; {kept}", worker=err.worker,
                          pid=err.pid, code=err.code,
                          directory=None if checkpoints is None else checkpoints.directory) from err
    finally:
        if checkpoints is not None:
            checkpoints.close()
    if mode == "shard":
        # Through the host, so that the (small) result is not committed to the
        # mesh and combines with arrays placed anywhere, like the other modes'.
        state, theta = jax.tree.map(jnp.asarray, sharding.to_host((state, theta)))
    if layout.n_m is None:
        remove = topk.remove_counts(layout.mask_sizes, mask_sparsity, config.scope)
        masks = _final_masks(state.scores, theta, jnp.asarray(remove, jnp.int32), config.scope, key)
    else:
        masks = _final_n_m_masks(layout, state.scores, theta, key)
    return SFPKResult(
        masks=layout.scatter(masks),
        scores=layout.scatter(state.scores),
        particles=layout.scatter(state.particles),
        trace={f: np.stack(v) if v else np.zeros((0, config.particles), np.float32)
               for f, v in trace.items()},
        execution=execution,
    )


@functools.partial(jax.jit, static_argnums=3)
def _final_masks(scores: list, theta: list, remove: jax.Array, scope: str,
                 key: jax.Array | None) -> list:
    """The final 0/1 masks: the highest votes, never a weight that is already 0."""
    final = [jnp.where(channels.abs_weight(t, s.shape) != 0, s, 0.0)
             for s, t in zip(scores, theta)]
    return topk.topk_mask(final, remove, scope, key)


@functools.partial(jax.jit, static_argnums=0)
def _final_n_m_masks(layout: MaskLayout, scores: list, theta: list,
                     key: jax.Array | None) -> list:
    """The final N:M masks: every group's N highest votes among its live weights (a live
    weight voted 0 included, so that every group keeps N)."""
    return topk.n_m_masks(layout, scores, [t != 0 for t in theta], key)


def _simulate(stepper: Stepper, params, state: SFPKState, batches, config: SFPKConfig,
              execution: Execution, target: float, trace: dict[str, list], checkpoints,
              desc: str | None) -> SFPKState:
    """Runs the steps from ``state.step`` on, appending to ``trace``; returns the last state.

    Shows a bar (``progress``, on a terminal) that stays on screen when done
    and is closed however the run ends, or else logs one line every
    :data:`LOG_EVERY` steps (and at the last one).
    """
    first = int(state.step)
    done = first >= config.steps or (
        config.early_stop and bool(trace["G"]) and trace["G"][-1].mean() <= target
    )
    if done:
        return state
    if desc is None:
        desc = "SFPK" + (f" {checkpoints.directory.name}" if checkpoints is not None else "")
    batch_iter = _batch_stream(batches, first)
    bar = None
    if progress.shown(execution.progress):
        bar = progress.bar(True, initial=first, total=config.steps,
                           desc=f"{desc} [{auto.summary(execution)}]")
    try:
        for t in range(first, config.steps):
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
            mean_g, mean_e = float(np.mean(host.G)), float(np.mean(host.E))
            finished = t + 1 == config.steps or (config.early_stop and mean_g <= target)
            if bar is not None:
                # Counted here, not by iterating the bar, so that the last step counts too.
                bar.set_postfix(G=f"{mean_g:.4f}", E=f"{mean_e:.4f}", refresh=False)
                bar.update(1)
            elif finished or (t + 1) % LOG_EVERY == 0:
                _LOG.info("%s: step %d/%d, mean G %.4f (target %.4f), mean energy E %.4f",
                          desc, t + 1, config.steps, mean_g, target, mean_e)
            if checkpoints is not None and (finished or (t + 1) % checkpoints.policy.every == 0):
                checkpoints.save(t + 1, state, trace)
            if finished:
                break
    finally:
        if bar is not None:
            bar.close()
    return state


def spode_prune(loss_fn, params, batches, sparsity, *, config: SFPKConfig | None = None,
                **kwargs) -> SFPKResult:
    """SpODE (Mo et al., ICML 2023): :func:`sfpk_prune` with n = 1 and lambda = 0."""
    return sfpk_prune(loss_fn, params, batches, sparsity, config=spode(config), **kwargs)
