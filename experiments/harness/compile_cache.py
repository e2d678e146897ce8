"""JAX's persistent compilation cache for the experiments (and the test suite): its flags.

A second run with the same shapes loads its XLA programs from disk instead of
compiling them again. The folder is, in order: ``--compile-cache DIR``, the
environment variable :data:`ENV` (a folder, or ``off``), or
``$XDG_CACHE_HOME/sfpk_jax/jax`` (``~/.cache/sfpk_jax/jax`` without it).
``--no-compile-cache`` (or ``SFPK_JAX_COMPILE_CACHE=off``) leaves it off.
The folder rules and the switch are the library's
(:mod:`sfpk_jax.parallel.compile_cache`, which worker processes use too).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sfpk_jax.parallel.compile_cache import ENV, default_dir, enable

__all__ = ["ENV", "add_flags", "configure", "default_dir", "directory", "enable"]


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
