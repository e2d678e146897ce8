"""Exporting a pruned model: masked parameters and their masks in one safetensors file.

Tensors are named by the parameters' '/'-joined paths: ``params/<path>``
holds the masked parameter, ``masks/<path>`` its mask (pruned leaves only);
the metadata lists the masked paths, so a mask lost from the file is noticed.
:func:`load_masked` reads them back into a params tree of the same model
(Linen ``params``, an NNX ``nnx.State``, or an Equinox model's array part).
The file is written atomically and never over an existing one unless asked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sfpk_jax.core.mask_checks import named_masks
from sfpk_jax.core.masks import apply_masks, path_to_str
from sfpk_jax.storage import files

PyTree = Any

FORMAT = "sfpk-jax masked params"
PARAMS, MASKS = "params/", "masks/"


def _named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    return [(path_to_str(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def save_masked(path: str | os.PathLike, params: PyTree, masks: PyTree, *,
                overwrite: bool = False) -> None:
    """Writes ``apply_masks(params, masks)`` and ``masks`` to a safetensors file.

    Example:

    >>> import os, tempfile, jax, jax.numpy as jnp, sfpk_jax
    >>> params = {"dense": {"kernel": jnp.array([[0.1, -2.0], [0.5, 3.0]])}}
    >>> masks = sfpk_jax.magnitude_prune(params, 0.5)
    >>> path = os.path.join(tempfile.mkdtemp(), "pruned.safetensors")
    >>> sfpk_jax.save_masked(path, params, masks)
    >>> like = jax.tree.map(jnp.zeros_like, params)  # a fresh model of the same shapes
    >>> loaded, loaded_masks = sfpk_jax.load_masked(path, like)
    >>> loaded["dense"]["kernel"].tolist(), loaded_masks["dense"]["kernel"].tolist()
    ([[0.0, -2.0], [0.0, 3.0]], [[0.0, 1.0], [0.0, 1.0]])

    Args:
      path: the file to write.
      params: the parameters (any pytree of arrays).
      masks: their mask tree (``None`` at leaves that are not pruned).
      overwrite: replace an existing file.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
      ValueError: a parameter holds NaN or Inf (named), or the masks do not
        mirror the params.
    """
    import safetensors.numpy  # on first use: most imports of the package never export

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    masked = apply_masks(params, masks)
    tensors = {}
    for name, leaf in _named_leaves(masked):
        array = np.asarray(leaf)
        if not np.all(np.isfinite(array)):
            raise ValueError(f"parameter {name} holds NaN or Inf values; a pruned model with "
                             "non-finite weights is not exported")
        tensors[PARAMS + name] = np.ascontiguousarray(array)
    treedef = jax.tree_util.tree_structure(params)
    masked = []
    for (name, _), mask in zip(_named_leaves(params), treedef.flatten_up_to(masks)):
        if mask is not None:
            tensors[MASKS + name] = np.ascontiguousarray(np.asarray(mask))
            masked.append(name)
    metadata = {"format": FORMAT, "masked": json.dumps(masked)}
    files.write_bytes(path, safetensors.numpy.save(tensors, metadata=metadata))


def load_masked(path: str | os.PathLike, like: PyTree) -> tuple[PyTree, PyTree]:
    """Reads a file of :func:`save_masked` into the structure of ``like``.

    Args:
      path: the safetensors file.
      like: a params tree of the same model (e.g. freshly initialised): it
        gives the structure, and every leaf's shape and dtype must match.

    Returns:
      ``(params, masks)``, both with the structure of ``like`` (``None`` in
      ``masks`` where the file has no mask).

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: not such a file; a mask it lists is missing, or one is not
        listed; a parameter is missing, extra, of another shape or dtype, or
        holds NaN or Inf; a mask is for a parameter the model lacks, does not
        fit its parameter, or is not 0/1 (each named).
    """
    import safetensors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, safetensors.SafetensorError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} was not written by sfpk_jax.tools.export.save_masked "
                         f"(metadata {metadata}); load plain weights with safetensors instead")
    try:
        listed = set(json.loads(metadata["masked"]))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path} does not list its masks in its metadata: the file is "
                         "damaged, or was not written by this version of save_masked") from None
    present = {k.removeprefix(MASKS) for k in tensors if k.startswith(MASKS)}
    if listed != present:
        lost, unlisted = sorted(listed - present), sorted(present - listed)
        raise ValueError(f"{path} is damaged: its masks do not match its listing (missing: "
                         f"{lost[:5]}, not listed: {unlisted[:5]}); export the model again")
    named = _named_leaves(like)
    expected = {PARAMS + name for name, _ in named}
    extra = sorted(k for k in tensors if k.startswith(PARAMS) and k not in expected)
    extra += sorted(k for k in tensors if k.startswith(MASKS)
                    and PARAMS + k.removeprefix(MASKS) not in expected)
    if extra:
        raise ValueError(f"{path} holds tensors for parameters this model does not have: "
                         f"{extra[:5]}: is it from another model?")
    params, masks = [], []
    for name, leaf in named:
        key = PARAMS + name
        if key not in tensors:
            raise ValueError(f"{path} has no parameter {name}: is it from another model?")
        value = tensors[key]
        if value.shape != np.shape(leaf) or value.dtype != np.asarray(leaf).dtype:
            raise ValueError(f"parameter {name} in {path} is {value.dtype}{list(value.shape)}, "
                             f"the model's is {np.asarray(leaf).dtype}{list(np.shape(leaf))}")
        if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
            raise ValueError(f"parameter {name} in {path} holds "
                             f"{int(np.sum(~np.isfinite(value)))} NaN or Inf values: the file "
                             "is damaged, or was not written by save_masked (which refuses them)")
        params.append(jnp.asarray(value))
        mask = tensors.get(MASKS + name)
        masks.append(None if mask is None else jnp.asarray(mask))
    treedef = jax.tree_util.tree_structure(like)
    params, masks = (jax.tree_util.tree_unflatten(treedef, params),
                     jax.tree_util.tree_unflatten(treedef, masks))
    try:
        named_masks(masks, params)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return params, masks
