"""The cores this process may use, and how many worker processes they bear."""

from __future__ import annotations

import os

# The bound on worker processes, per core (see max_workers).
WORKERS_PER_CORE = 4


def local_cores() -> list[int]:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def max_workers() -> int:
    """The most worker processes a pool may start: 4 per core this process may use.

    Each worker is a whole process (for SFPK's particles, a JAX runtime of a
    few hundred MB); beyond one per core they only time-share the cores, and
    beyond a few per core they only exhaust the machine.
    """
    return WORKERS_PER_CORE * len(local_cores())
