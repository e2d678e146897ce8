"""Output directories and result files: never overwrite silently, never half-write."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Files get the usual permissions (mkstemp's are 0600). Read once, at import.
_FILE_MODE = 0o666 & ~_umask()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` atomically: a temporary file in the same folder, then a rename.

    The temporary file (``.NAME.*.tmp``) is flushed to disk before it is
    renamed over ``path``, so a reader (or a later run) sees either the old
    complete file or the new complete file, never a part, even when the
    writer is killed. A killed writer may leave its temporary file behind;
    nothing reads those.

    Raises:
      OSError: the file cannot be written (full disk, no permission); its
        ``filename`` is ``path``.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _named(err, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _named(err, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_dir(path.parent)


def _named(err: OSError, path: Path) -> OSError:
    """``err`` naming ``path`` (a failed ``write()``, e.g. on a full disk, names no file)."""
    return err if err.filename else type(err)(err.errno, err.strerror, str(path))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) atomically, as :func:`write_bytes` does."""
    write_bytes(path, text.encode())


def _sync_dir(folder: Path) -> None:
    """Makes a rename in ``folder`` durable (best effort; not every platform can)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
