"""``Execution(particle_mode="auto", conv_chunk="auto")``: the fastest execution here.

What ``auto`` resolves to (each measured on the machines named in
``benchmarks/RESULTS.md``):

* **Several processes** (``jax.distributed``): ``shard``, the only mode that
  spans them.
* **An accelerator** (GPU, TPU): ``shard`` over the local devices when the
  particles split evenly over two or more of them, else ``vmap`` (one
  program for all the particles).
* **A CPU with one core**: ``loop``.
* **A CPU with several cores**: ``processes`` (one single-threaded worker per
  core, at most one per particle) when the run is long enough to earn the
  workers' start: each compiles the one-particle program, unless the
  persistent compilation cache already holds it. The run's work is
  estimated as 3 x the forward pass's FLOPs (XLA's cost analysis of the
  loss on the first batch) x particles x steps; from
  :data:`PROCESSES_MIN_FLOPS` on, about a minute of one process's work on
  the 2-core dev CPU, the workers win. Shorter runs: ``loop``.
* **Convolutions**: on a CPU, those whose input exceeds
  :data:`sfpk_jax.parallel.conv_chunks.MIN_BYTES` run in chunks of
  :data:`CPU_CONV_CHUNK` examples; on an accelerator, whole.

An explicit ``particle_mode`` or ``conv_chunk`` is kept as given. The
choice is logged once (logger ``sfpk_jax.sfpk.auto``, level INFO), shown on
the progress bar, and returned in :attr:`sfpk_jax.SFPKResult.execution`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from sfpk_jax.parallel.conv_chunks import MIN_BYTES
from sfpk_jax.runtime.cores import local_cores
from sfpk_jax.sfpk.config import SFPKConfig
from sfpk_jax.sfpk.execution import Execution

_LOG = logging.getLogger(__name__)
# The run's estimated work (FLOPs) from which worker processes pay for their start.
PROCESSES_MIN_FLOPS = 3e12
# Examples per convolution chunk on a CPU (benchmarks/RESULTS.md, "Chunked convolutions").
CPU_CONV_CHUNK = 32
# Forward and backward pass: about 3 forward passes.
_BACKWARD_FACTOR = 3
_announced: set[str] = set()


class Choice(NamedTuple):
    """A concrete :class:`Execution` and why it was chosen.

    Attributes:
      execution: no field left ``"auto"``.
      reason: one sentence (empty when nothing was ``"auto"``).
    """

    execution: Execution
    reason: str


def estimate_work(loss_fn: Callable, params: Any, batch: Any, config: SFPKConfig) -> float | None:
    """FLOPs of the whole simulation: 3 x the loss's forward pass x particles x steps.

    Args:
      loss_fn: ``loss_fn(params, batch)``.
      params: the parameters.
      batch: one particle's batch.
      config: the particles and steps.

    Returns:
      The estimate, or None when XLA gives no cost analysis for the loss.
    """
    try:
        cost = jax.jit(lambda p, b: loss_fn(p, b)).lower(params, batch).cost_analysis()
    except Exception:  # noqa: BLE001 - no estimate is an answer: then no workers
        return None
    flops = (cost or {}).get("flops")
    if not flops or flops < 0:
        return None
    return _BACKWARD_FACTOR * float(flops) * config.particles * config.steps


def conv_chunk(backend: str | None = None) -> int:
    """``conv_chunk="auto"`` on ``backend`` (default: JAX's): :data:`CPU_CONV_CHUNK` on a
    CPU, else 0."""
    return CPU_CONV_CHUNK if (backend or jax.default_backend()) == "cpu" else 0


def _mode(config: SFPKConfig, backend: str, work: Callable[[], float | None] | None
          ) -> tuple[dict, str]:
    n = config.particles
    if jax.process_count() > 1:
        return {"particle_mode": "shard"}, f"{jax.process_count()} processes share the particles"
    if backend != "cpu":
        devices = len(jax.local_devices())
        split = max((d for d in range(2, devices + 1) if n % d == 0), default=1)
        if split > 1:
            return {"particle_mode": "shard"}, (f"{n} particles split evenly over {split} of "
                                                f"the {devices} {backend} devices")
        return {"particle_mode": "vmap"}, f"one {backend} device runs all {n} particles at once"
    cores = len(local_cores())
    if cores < 2:
        return {"particle_mode": "loop"}, "a CPU with one core"
    flops = None if work is None else work()
    if flops is None:
        return {"particle_mode": "loop"}, (f"a {cores}-core CPU, but the run's work is not known, "
                                           "so no worker processes are started")
    if flops < PROCESSES_MIN_FLOPS:
        return {"particle_mode": "loop"}, (
            f"a short run on a {cores}-core CPU (about {flops:.1e} FLOPs): worker processes "
            "would not earn back their start")
    workers = min(cores, n)
    return {"particle_mode": "processes", "workers": workers}, (
        f"a long run on a {cores}-core CPU (about {flops:.1e} FLOPs): {workers} worker "
        "processes, one per core, keep every core busy")


def choose(execution: Execution, config: SFPKConfig, *,
           work: Callable[[], float | None] | None = None,
           allow_processes: bool = True) -> Choice:
    """Resolves the ``"auto"`` fields of ``execution`` (see the module doc).

    Args:
      execution: as given by the user.
      config: the run (particles, steps).
      work: called, only when needed, for the run's estimated FLOPs
        (:func:`estimate_work`); None: not known (no worker processes).
      allow_processes: False where worker processes cannot run (a bare
        :func:`~sfpk_jax.sfpk.make_stepper`, which starts none).

    Returns:
      The :class:`Choice`.
    """
    backend = jax.default_backend()
    changes, reasons = {}, []
    if execution.particle_mode == "auto":
        mode, why = _mode(config, backend, work if allow_processes else None)
        changes.update(mode)
        reasons.append(why)
    if execution.conv_chunk == "auto":
        changes["conv_chunk"] = conv_chunk(backend)
        if changes["conv_chunk"]:
            reasons.append(f"on a CPU, convolutions over more than {MIN_BYTES / 2**20:g} MiB "
                           f"in chunks of {CPU_CONV_CHUNK} examples, which fit in its caches")
    if not changes:
        return Choice(execution, "")
    return Choice(execution.replace(**changes), "; ".join(reasons))


def summary(execution: Execution) -> str:
    """A few words for ``execution``: ``processes x2, conv chunks 32``."""
    words = execution.particle_mode
    if execution.particle_mode == "processes":
        words += f" x{execution.workers}" if execution.workers else ""
    if execution.conv_chunk:
        words += f", conv chunks {execution.conv_chunk}"
    return words


def announce(choice: Choice) -> None:
    """Logs an automatic choice, once per process for each different choice."""
    if not choice.reason:
        return
    line = f"SFPK runs {summary(choice.execution)} (auto: {choice.reason})"
    if line not in _announced:
        _announced.add(line)
        _LOG.info("%s; pass execution=sfpk_jax.Execution(...) to choose otherwise", line)
