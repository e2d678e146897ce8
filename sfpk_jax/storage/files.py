"""Files written atomically: a temporary file in the same folder, then a rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


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
