"""Checkpoints of model variables, masks and run state, through orbax."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


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
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, tree, force=overwrite)
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
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path, target)
    except (ValueError, KeyError, OSError, TypeError) as err:
        raise ValueError(
            f"checkpoint {path} is incomplete or does not match the model: {err}"
        ) from None
