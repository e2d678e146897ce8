"""Where a run's numbers came from: package versions, commit, backend, devices and CPU.

Recorded under ``environment`` in every config.json, apart from the flags:
``--resume`` compares the flags only, so a run may be resumed after an
upgrade or on another machine (its config.json keeps the first start's
environment).
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import jax

# The distributions whose versions can change the numbers.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
KEY = "environment"


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


_PACKAGE = Path(__file__).resolve().parents[1]


def _git(*command: str) -> str | None:
    """``git <command>`` in the package's folder; None outside a checkout or without git."""
    try:
        done = subprocess.run(["git", *command], cwd=_PACKAGE, capture_output=True, text=True,
                              timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _own_checkout() -> bool:
    """The package sits in its own git checkout (not, say, in a venv inside another repo)."""
    top = _git("rev-parse", "--show-toplevel")
    return top is not None and Path(top).resolve() / _PACKAGE.name == _PACKAGE


def cpu_model() -> str:
    """The CPU's model name (Linux: from /proc/cpuinfo), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Versions, git commit, backend, devices and machine, as JSON-able values.

    ``git_commit`` is None when the package is not in a git checkout;
    ``git_dirty`` says whether tracked files differ from that commit.
    """
    commit = _git("rev-parse", "HEAD") if _own_checkout() else None
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "python": platform.python_version(),
        **{name: _version(name) for name in PACKAGES},
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices()],
        "cpu": cpu_model(),
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "platform": platform.platform(),
    }
