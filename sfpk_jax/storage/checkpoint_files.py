"""Checkpoints of model variables, masks and run state, through orbax.

Two kinds:

* :func:`save` / :func:`restore`: one pytree in one folder (``dense``,
  ``pruned``, ``final``, ...), the outputs a run hands on.
* :class:`Series`: numbered steps of a resumable computation (the epochs of a
  training phase, a pruner's result), each a pytree plus a JSON record that
  carries the sha256 of the arrays, so a damaged step is detected on restore.

Orbax writes every checkpoint to a temporary folder and renames it when
complete, so an interrupted save never leaves a checkpoint that reads as valid.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np


def _orbax():
    """``orbax.checkpoint``, imported on first use: it loads tensorstore, a second of start-up."""
    import orbax.checkpoint as ocp

    return ocp


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, damaged, or from a different run."""


def _brief(err: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, shortened (orbax errors run to pages)."""
    text = " ".join(str(err).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _host_local(tree: Any) -> Any:
    """``tree`` with the arrays on this process's devices as numpy arrays.

    With several processes orbax refuses a jax array that lives on one
    process's device (each process has its own); as numpy, process 0 writes
    it. Arrays spread over several processes' devices stay as they are.
    """
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array)
                        and x.is_fully_addressable else x, tree)


def save(path: str | os.PathLike, tree: Any, *, overwrite: bool = False) -> None:
    """Writes ``tree`` (any pytree; None leaves allowed) to the folder ``path``.

    Orbax writes to a temporary folder and renames it when complete, so an
    interrupted save never leaves a checkpoint that reads as valid.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"checkpoint {path} exists; pass overwrite=True to replace it")
    with _orbax().StandardCheckpointer() as checkpointer:
        checkpointer.save(path, _host_local(tree), force=overwrite)
        checkpointer.wait_until_finished()


def restore(path: str | os.PathLike, target: Any | None = None) -> Any:
    """Reads a checkpoint written by :func:`save`.

    Args:
      path: the checkpoint folder.
      target: optional pytree of the expected structure (arrays or
        ``jax.ShapeDtypeStruct``); shapes and dtypes are checked against it.

    Returns:
      The restored pytree.

    Raises:
      FileNotFoundError: no checkpoint at ``path``.
      ValueError: the folder is not a complete checkpoint, or does not match
        ``target``.
    """
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with _orbax().StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path, target)
    except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many types for bad folders
        raise ValueError(
            f"checkpoint {path} is incomplete or does not match the model ({_brief(err)})"
        ) from None


def tree_digest(tree: Any) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes (None leaves skipped)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """``key: checkpoint X, now Y`` for every entry where two fingerprints differ.

    Nested dicts are compared entry by entry (``config.radius: ...``).
    """
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key, "<absent>"), now.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return out


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


class Series:
    """Numbered checkpoints of one resumable computation, the last ``keep`` kept.

    Step ``s`` holds a pytree (``state``) and a JSON-able dict (``record``);
    the record also stores the state's :func:`tree_digest`, checked on
    restore. Saves are synchronous: when :meth:`save` returns, the step is
    complete on disk.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        self.directory = Path(directory).absolute()
        self.keep = keep
        self._manager = None

    def _open(self):
        if self._manager is None:
            ocp = _orbax()
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self.keep, create=True, enable_async_checkpointing=False)
            try:
                self._manager = ocp.CheckpointManager(self.directory, options=options)
            except OSError as err:
                raise CheckpointError(f"cannot use {self.directory} for checkpoints "
                                      f"({_brief(err)})") from None
        return self._manager

    def steps(self) -> list[int]:
        """The complete steps on disk, oldest first (none when the folder is absent)."""
        if not self.directory.is_dir():
            return []
        return sorted(self._open().all_steps())

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, record: dict) -> None:
        """Writes step ``step`` (replacing an existing one of that number)."""
        state = _host_local(state)
        record = {**record, "state_sha256": tree_digest(state)}
        args = _orbax().args
        self._open().save(step, args=args.Composite(
            state=args.StandardSave(state), record=args.JsonSave(record)), force=True)
        self._manager.wait_until_finished()

    def record(self, step: int) -> dict:
        """The JSON record of ``step`` alone (cheap: no arrays are read).

        Raises:
          CheckpointError: the record is missing or unreadable.
        """
        where = self.directory / str(step)
        try:
            args = _orbax().args
            return self._open().restore(
                step, args=args.Composite(record=args.JsonRestore())).record
        except Exception as err:  # noqa: BLE001 - see restore
            raise CheckpointError(f"checkpoint {where} is unreadable ({_brief(err)})") from None

    def restore(self, step: int, target: Any | None = None) -> tuple[Any, dict]:
        """``(state, record)`` of ``step``.

        Args:
          step: a step from :meth:`steps`.
          target: a pytree of the expected structure, shapes and dtypes
            (arrays or ``ShapeDtypeStruct``); None restores what is there.

        Raises:
          CheckpointError: the step is unreadable, truncated, or its arrays
            differ from the ones saved (their sha256 does not match).
        """
        where = self.directory / str(step)
        record = self.record(step)
        args = _orbax().args
        wanted = args.StandardRestore(None if target is None else _abstract(target))
        try:
            state = self._open().restore(step, args=args.Composite(state=wanted)).state
        except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many types
            raise CheckpointError(
                f"checkpoint {where} is truncated, damaged or of another model ({_brief(err)})"
            ) from None
        if record.get("state_sha256") != tree_digest(state):
            raise CheckpointError(
                f"checkpoint {where} is damaged: its arrays do not match the sha256 recorded "
                "when it was written")
        return state, record

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def __enter__(self) -> "Series":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
