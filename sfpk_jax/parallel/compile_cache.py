"""JAX's persistent compilation cache: where sfpk_jax keeps it and how it is turned on.

A process that finds a program in the cache loads it from disk instead of
compiling it. Worker processes (:mod:`sfpk_jax.parallel.worker_pool`) always
use one: the folder this process caches in, else :func:`default_dir`, so
that every pool after the first starts without compiling. The folder is the
environment variable :data:`ENV` (a folder, or ``off``), else
``$XDG_CACHE_HOME/sfpk_jax/jax`` (``~/.cache/sfpk_jax/jax`` without it).
This process's own cache is the user's choice (:func:`enable`).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

ENV = "SFPK_JAX_COMPILE_CACHE"
OFF = "off"


def default_dir() -> Path | None:
    """The folder :data:`ENV` names (None when it says ``off``), else the user's cache folder."""
    named = os.environ.get(ENV)
    if named is not None:
        return None if named.strip().lower() in (OFF, "") else Path(named).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sfpk_jax" / "jax"


def settings(directory: str | os.PathLike) -> dict[str, object]:
    """The ``jax.config`` values that cache every program in ``directory``.

    JAX's defaults store only programs that took over a second to compile;
    on a CPU most of a run's compile time is in many smaller ones, so every
    program is stored.
    """
    return {"jax_compilation_cache_dir": str(directory),
            "jax_persistent_cache_min_compile_time_secs": 0.0,
            "jax_persistent_cache_min_entry_size_bytes": -1}


def apply(values: dict[str, object]) -> None:
    """Sets :func:`settings`' values in this process; takes effect even after programs were compiled."""
    for name, value in values.items():
        jax.config.update(name, value)
    # JAX decides once per process whether the cache is used; decide again.
    compilation_cache.reset_cache()


def enable(directory: str | os.PathLike) -> Path:
    """Turns the persistent cache on in ``directory`` (made if missing), for every program.

    Args:
      directory: the cache folder.

    Returns:
      The folder.

    Raises:
      OSError: the folder cannot be made.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    apply(settings(directory))
    return directory


def for_workers() -> Path | None:
    """The cache folder of worker processes: this process's, else :func:`default_dir`.

    Returns:
      The folder, or None: :data:`ENV` says ``off``, or the folder cannot be
      made (the workers then compile, as without a cache).
    """
    own = jax.config.jax_compilation_cache_dir
    if own:
        return Path(own)
    folder = default_dir()
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK) else None
