"""The dense model from a file, read and checked against ``--model`` before any write.

``--dense-checkpoint`` (an orbax folder) is compared leaf by leaf, paths and
shapes, with the model's variables before anything is restored, so a wrong
checkpoint is one line that names the first differences (never arrays), and
the output folder is left untouched. ``--pretrained-weights`` (safetensors)
is read the same way, before the output folder is prepared.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from experiments.harness.flags import fail
from sfpk_jax.core.masks import path_to_str
from sfpk_jax.models import load_pretrained
from sfpk_jax.storage import checkpoint_files as checkpoints

# Differences of each kind that an error lists before "and N more".
LISTED = 3
# The file in which orbax describes a checkpoint's tree (present in every complete one).
TREE_FILE = "_METADATA"


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """'/'-joined leaf path -> shape, for arrays and orbax's array metadata alike."""
    return {path_to_str(path): tuple(getattr(leaf, "shape", np.shape(leaf)))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _on_disk(path: str) -> dict[str, tuple[int, ...]]:
    """The leaf shapes an orbax checkpoint holds, read from its metadata (no arrays)."""
    with ocp.StandardCheckpointer() as checkpointer:
        meta = checkpointer.metadata(path)
    # StepMetadata.item_metadata.tree in current orbax; older ones return the tree itself.
    item = getattr(meta, "item_metadata", meta)
    return _shapes(getattr(item, "tree", item))


def _listed(kind: str, items: list[str]) -> list[str]:
    more = len(items) - LISTED
    return [f"{kind} {', '.join(items[:LISTED])}" + (f" and {more} more" if more > 0 else "")]


def differences(found: dict[str, tuple], expected: dict[str, tuple]) -> list[str]:
    """What differs between two ``path -> shape`` maps, at most :data:`LISTED` of each kind."""
    missing = sorted(expected.keys() - found.keys())
    extra = sorted(found.keys() - expected.keys())
    shapes = [f"{k} {found[k]} (the model: {expected[k]})"
              for k in sorted(found.keys() & expected.keys()) if found[k] != expected[k]]
    out = []
    for kind, items in (("missing", missing), ("not in the model", extra),
                        ("other shape:", shapes)):
        if items:
            out += _listed(kind, items)
    return out


def read_checkpoint(args: argparse.Namespace, variables: dict) -> dict:
    """``--dense-checkpoint`` restored into the structure of ``variables``, or exit 2.

    Args:
      args: the parsed flags (``dense_checkpoint``, ``model``, ``dataset``).
      variables: the freshly built model's variables (the expected tree).

    Returns:
      The restored variables.
    """
    path = args.dense_checkpoint
    expected = (f"an orbax checkpoint of the variables of --model={args.model} for "
                f"--dataset={args.dataset}, such as OUT/checkpoints/dense of experiments.pretrain")
    if not (Path(path) / TREE_FILE).is_file():
        inside = Path(path) / "checkpoints" / "dense"
        hint = f" (a run's folder? its dense model is {inside})" if inside.is_dir() else ""
        fail(f"--dense-checkpoint={path!r} is not allowed: expected {expected}; the folder holds "
             f"no orbax checkpoint (no {TREE_FILE} file){hint}")
    try:
        found = _on_disk(path)
    except Exception as err:  # noqa: BLE001 - orbax raises many types for a folder it cannot read
        fail(f"--dense-checkpoint={path!r} is not allowed: expected {expected}; it cannot be "
             f"read as one ({type(err).__name__}: {' '.join(str(err).split())[:200]})")
    problems = differences(found, _shapes(variables))
    if problems:
        fail(f"--dense-checkpoint={path!r} is not allowed: expected {expected}; it differs: "
             f"{'; '.join(problems)}")
    try:
        restored = checkpoints.restore(path, variables)
    except (FileNotFoundError, ValueError) as err:
        fail(f"--dense-checkpoint={path!r}: {err}")
    return finite_model("--dense-checkpoint", path, restored)


def finite_model(flag: str, path: str, variables: dict) -> dict:
    """``variables``, or exit 2 naming the first leaf with a NaN or Inf and how many there are."""
    for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        values = np.asarray(leaf)
        if values.dtype.kind in "fc":
            bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
            if bad:
                fail(f"{flag}={path!r} is not allowed: expected a model with finite values; "
                     f"{path_to_str(leaf_path)} holds {bad} NaN/Inf of {np.size(values)} values (did "
                     "its training diverge? Train it again with a smaller --lr)")
    return variables


def read_weights(args: argparse.Namespace, variables: dict) -> dict:
    """``--pretrained-weights`` (safetensors) loaded into ``variables``, or exit 2."""
    try:
        loaded = load_pretrained(args.model, variables, args.pretrained_weights)
    except (OSError, ValueError) as err:
        fail(f"--pretrained-weights={args.pretrained_weights!r} cannot be used with "
             f"--model={args.model}: {err}")
    return finite_model("--pretrained-weights", args.pretrained_weights, loaded)


def from_file(args: argparse.Namespace, variables: dict) -> dict | None:
    """The dense model that a flag names (checkpoint or weights), or None: it is trained here."""
    if args.dense_checkpoint:
        return read_checkpoint(args, variables)
    if getattr(args, "pretrained_weights", None):
        return read_weights(args, variables)
    return None
