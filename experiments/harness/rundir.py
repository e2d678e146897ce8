"""A run's output folder on disk: its lock, and creating it without losing earlier results."""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None


class OutputExistsError(RuntimeError):
    """The output directory already holds finished results."""


class DirectoryBusyError(RuntimeError):
    """Another process is running in the output directory."""


LOCK_NAME = ".lock"
# Locked directories of this process: resolved path -> open descriptor.
_held: dict[str, int] = {}


def lock_dir(path: str | os.PathLike) -> None:
    """Marks ``path`` as in use by this process until it ends (or locks another directory).

    An exclusive ``flock`` on ``path/.lock``: the system drops it when the
    process dies, even by SIGKILL, so a killed run never leaves a stale
    lock. Two runs started on the same ``--out`` (e.g. a job submitted
    twice) cannot both write there.

    Raises:
      DirectoryBusyError: another process holds the lock.
    """
    key = str(Path(path).resolve())
    if key in _held or fcntl is None:
        return
    fd = os.open(os.path.join(key, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise DirectoryBusyError(
            f"another process is running in {path} (it holds {Path(path) / LOCK_NAME}); wait "
            "for it to end, or stop it first") from None
    release_locks()  # one run at a time in this process
    _held[key] = fd


def release_locks() -> None:
    """Drops this process's :func:`lock_dir` lock (for callers that run several runs)."""
    for key in list(_held):
        os.close(_held.pop(key))


def is_busy(path: str | os.PathLike) -> bool:
    """Whether another process holds :func:`lock_dir`'s lock on ``path``."""
    key = str(Path(path).resolve())
    lock = os.path.join(key, LOCK_NAME)
    if key in _held or fcntl is None or not os.path.exists(lock):
        return False
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def prepare_out_dir(path: str | os.PathLike, *, overwrite: bool, marker: str = "results.json") -> Path:
    """Creates ``path`` or checks that reusing it loses nothing.

    Args:
      path: the run's output directory.
      overwrite: allow replacing the results of an earlier finished run.
      marker: the file whose presence means a run finished there.

    Returns:
      The directory as a Path.

    Raises:
      OutputExistsError: when ``marker`` exists and ``overwrite`` is False.
      PermissionError: when the directory cannot be written.
    """
    out = Path(path)
    if (out / marker).exists() and not overwrite:
        raise OutputExistsError(
            f"{out} already holds results ({marker}); choose another --out or pass --overwrite"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"cannot create output directory {out}: {err}; choose another --out") from None
    if not os.access(out, os.W_OK):
        raise PermissionError(f"output directory {out} is not writable; choose another --out")
    return out
