"""JAX's persistent compilation cache for the experiments (and the test suite).

A second run with the same shapes loads its XLA programs from disk instead of
compiling them again. The folder is, in order: ``--compile-cache DIR``, the
environment variable :data:`ENV` (a folder, or ``off``), or
``$XDG_CACHE_HOME/sfpk_jax/jax`` (``~/.cache/sfpk_jax/jax`` without it).
``--no-compile-cache`` (or ``SFPK_JAX_COMPILE_CACHE=off``) leaves it off.
"""

from __future__ import annotations

import argparse
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


def enable(directory: str | os.PathLike) -> Path:
    """Turns the persistent cache on in ``directory`` (made if missing), for every program.

    JAX's defaults store only programs that took over a second to compile;
    on a CPU most of a run's compile time is in many smaller ones, so every
    program is stored. Takes effect even after programs were compiled.

    Args:
      directory: the cache folder.

    Returns:
      The folder.

    Raises:
      OSError: the folder cannot be made.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    # JAX decides once per process whether the cache is used; decide again.
    compilation_cache.reset_cache()
    return directory


def add_flags(group, path_type=str) -> None:
    """``--compile-cache DIR`` and ``--no-compile-cache``; ``path_type`` reads the folder."""
    group.add_argument("--compile-cache", default=None, metavar="DIR", type=path_type,
                       help=f"folder of JAX's persistent compilation cache (default: ${ENV}, else "
                            "$XDG_CACHE_HOME/sfpk_jax/jax or ~/.cache/sfpk_jax/jax); a second "
                            "run with the same shapes skips most compilation")
    group.add_argument("--no-compile-cache", action="store_true",
                       help=f"leave the persistent compilation cache off (as {ENV}=off does)")


def directory(args: argparse.Namespace) -> Path | None:
    """The cache folder the flags of :func:`add_flags` name (None: off)."""
    if args.no_compile_cache:
        return None
    return Path(args.compile_cache) if args.compile_cache else default_dir()


def configure(args: argparse.Namespace) -> Path | None:
    """Turns the cache on as the flags of :func:`add_flags` say; returns its folder or None."""
    folder = directory(args)
    return None if folder is None else enable(folder)
