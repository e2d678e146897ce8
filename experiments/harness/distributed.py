"""One process per host: ``jax.distributed`` from the launch flags, and which process writes.

Every process runs the same command (its own ``--process-id``) and takes part
in every computation and in every orbax checkpoint (orbax writes each array
once); only process 0 touches the rest of ``--out``: the lock, config.json,
metrics, results, plots and log lines. Where process 0 alone decides (the
state of ``--out``), :func:`main_first` tells the others the outcome, so that a
refusal stops every process with process 0's one line. See docs/many_devices.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from experiments.harness.flags import fail

T = TypeVar("T")
# Whether this process joined a group (launch), and so must leave it (leave).
_joined = []


def launch(args: argparse.Namespace) -> None:
    """Joins the group of ``--num-processes`` processes (nothing to do for one).

    The flags are those of :func:`experiments.harness.flags.add_common_flags`'s
    "processes" group.

    Must run before anything asks JAX for its devices. CPU devices talk over
    gloo (JAX has no other CPU collectives); accelerators use their own.

    Raises:
      SystemExit: (exit 2, one line) the launch flags are inconsistent, or the
        coordinator cannot be reached.
    """
    count, index, address = args.num_processes, args.process_id, args.coordinator_address
    if isinstance(count, bool) or count < 1:
        fail(f"--num-processes={count!r} is not allowed: expected an integer >= 1")
    if not 0 <= index < count:
        fail(f"--process-id={index!r} is not allowed: expected an integer in [0, {count - 1}] "
             f"(one per process of --num-processes={count})")
    if count == 1:
        return
    if not address or ":" not in address:
        fail(f"--coordinator-address={address!r} is not allowed: --num-processes={count} needs "
             "HOST:PORT of process 0, the same on every host (e.g. 10.0.0.1:1234)")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(address, num_processes=count, process_id=index)
        _joined.append(True)
    except Exception as err:  # noqa: BLE001 - XLA's runtime errors have no common type
        fail(f"process {index} could not join the {count} processes at --coordinator-address="
             f"{address} ({' '.join(str(err).split())[:300]}): start every process with the same "
             "address, reachable from every host, and process 0 listening there")


def leave() -> None:
    """Leaves the group with the others, for a refusal that stops every process alike.

    Without it, process 0 (which hosts the coordinator) may exit first and
    the others abort (SIGABRT) on losing it before printing their own line.
    A process that stops alone must not call it: it would wait for the others.
    """
    if _joined:
        _joined.clear()
        jax.distributed.shutdown()


def is_main() -> bool:
    """Whether this process writes the outputs (process 0)."""
    return jax.process_index() == 0


def main_first(fn: Callable[[], T]) -> T | None:
    """``fn()`` on process 0; the others wait for it and stop as it stops.

    For what only process 0 may do (prepare ``--out``) or decide. A
    ``SystemExit`` there (a refusal: one line, exit 2; or nothing to do:
    exit 0) ends every process with the same code.

    Returns:
      ``fn()``'s value on process 0, None on the others.
    """
    if jax.process_count() == 1:
        return fn()
    code, stop, result = 0, None, None
    if is_main():
        try:
            result = fn()
        except SystemExit as err:
            stop = err
            code = 1 + (err.code if isinstance(err.code, int) else 1)
    code = int(multihost_utils.broadcast_one_to_all(np.int32(code)))
    if stop is not None:
        raise stop
    if code:
        if code - 1:
            print(f"error: process 0 stopped the run (exit {code - 1}); its output says why",
                  file=sys.stderr)
        raise SystemExit(code - 1)
    return result


def local(tree: Any) -> Any:
    """numpy copies of a tree whose arrays are whole on every process (replicated).

    Cheap (no collective): each process reads its own replica, so it can
    evaluate or save the model by itself.
    """
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(
        lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)
