"""Output directories and result files: never overwrite silently, never half-write."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


class OutputExistsError(RuntimeError):
    """The output directory already holds finished results."""


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


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
