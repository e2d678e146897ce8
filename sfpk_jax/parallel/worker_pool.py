"""Local worker processes, one single-threaded JAX per core, that run one exported function.

One XLA:CPU process keeps only about 1.5 cores busy with the convolutions of
a small model; one single-threaded process pinned to each core keeps them all
busy. :class:`WorkerPool` starts such processes (the script
:mod:`sfpk_jax.parallel.worker_main`), hands them a function serialized
with :mod:`jax.export` and the arguments every call shares, and maps it over
items, each worker taking a contiguous block. The processes end with the
pool (``with WorkerPool(...) as pool``); one that dies makes the next call
raise :class:`WorkerError`.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax

from sfpk_jax.parallel import compile_cache
from sfpk_jax.runtime.cores import local_cores, max_workers

SCRIPT = Path(__file__).with_name("worker_main.py")
# One thread per worker: the worker is the unit of parallelism.
WORKER_XLA_FLAG = "--xla_cpu_multi_thread_eigen=false"


class WorkerError(RuntimeError):
    """A worker process died, or its function raised (the message says which, and why).

    Attributes:
      worker: the worker's index in its pool (None: the pool as a whole).
      pid: its process id, when known.
      code: its exit code (None: still running, or not known).
      directory: for a simulation that checkpoints, the folder of the
        checkpoints written so far (they are kept).
    """

    def __init__(self, message: str, *, worker: int | None = None, pid: int | None = None,
                 code: int | None = None, directory=None):
        super().__init__(message)
        self.worker, self.pid, self.code, self.directory = worker, pid, code, directory


def _worker_env() -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith(("--xla_cpu_multi_thread_eigen", "--xla_force_host_platform"))]
    env["XLA_FLAGS"] = " ".join([*flags, WORKER_XLA_FLAG])
    env["JAX_PLATFORMS"] = "cpu"
    # Eigen and the BLAS below it read these when they start.
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


class WorkerPool:
    """``count`` worker processes (default: one per core), each pinned to one core.

    Args:
      count: how many workers, at most :func:`max_workers`; one per core is
        the useful most.
      pin: pin worker k to the k-th core (else the scheduler places them).

    Raises:
      ValueError: ``count`` is not an integer in [1, :func:`max_workers`].
    """

    def __init__(self, count: int | None = None, pin: bool = True):
        cores = local_cores()
        count = len(cores) if count is None else count
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= max_workers():
            raise ValueError(f"WorkerPool needs a worker count in [1, {max_workers()}] (4 per "
                             f"core), got {count!r}")
        self._logs = [tempfile.TemporaryFile() for _ in range(count)]
        env = _worker_env()
        self._procs = [
            subprocess.Popen([sys.executable, str(SCRIPT), str(cores[k % len(cores)] if pin else -1)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env)
            for k, log in enumerate(self._logs)
        ]

    @property
    def size(self) -> int:
        """The number of workers."""
        return len(self._procs)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Ends every worker (closing its input; killing it if it does not end in 10 s)."""
        for proc in self._procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        for log in self._logs:
            log.close()
        self._procs, self._logs = [], []

    def _died(self, k: int) -> WorkerError:
        proc = self._procs[k]
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        log = self._logs[k]
        log.seek(0)
        tail = log.read().decode(errors="replace").strip().splitlines()[-5:]
        return WorkerError(
            f"worker process {k} (pid {proc.pid}) died (exit code {code})"
            + (f"; its last output: {' | '.join(tail)}" if tail else ""),
            worker=k, pid=proc.pid, code=code)

    def _send(self, k: int, message: Any) -> None:
        if not self._procs:
            raise WorkerError("the worker pool is closed")
        try:
            pickle.dump(message, self._procs[k].stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._procs[k].stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._died(k) from None

    def _receive(self, k: int) -> Any:
        try:
            status, value = pickle.load(self._procs[k].stdout)
        except (EOFError, pickle.UnpicklingError, OSError):
            raise self._died(k) from None
        if status != "ok":
            raise WorkerError(f"worker process {k} failed:\n{value}", worker=k,
                              pid=self._procs[k].pid)
        return value

    def load(self, exported: bytes, shared: tuple) -> None:
        """Gives every worker the function (``jax.export`` bytes) and its shared first arguments.

        The workers cache the compiled function on disk
        (:func:`sfpk_jax.parallel.compile_cache.for_workers`), so that a later
        pool loads it instead of compiling it again. With a cache, worker 0
        loads first and the others then find its program there; without
        one, all compile at once.
        """
        folder = compile_cache.for_workers()
        options = None if folder is None else compile_cache.settings(folder)
        shared = jax.device_get(shared)
        first = [0] if options is not None else range(self.size)
        for group in (first, range(len(first), self.size)):
            for k in group:
                self._send(k, ("load", exported, shared, options))
            for k in group:
                self._receive(k)

    def map(self, items: list[tuple]) -> list:
        """``fn(*shared, *item)`` for every item, in order, the items split over the workers.

        Worker k takes the k-th contiguous block (sizes differing by at most one).

        Raises:
          WorkerError: a worker died or the function raised in it.
        """
        items = [jax.device_get(item) for item in items]
        bounds = [len(items) * k // self.size for k in range(self.size + 1)]
        busy = [k for k in range(self.size) if bounds[k] < bounds[k + 1]]
        for k in busy:
            self._send(k, ("run", items[bounds[k]:bounds[k + 1]]))
        return [out for k in busy for out in self._receive(k)]
