"""A mask is checked wherever it enters: 0/1 values, numbers, a shape that fits its parameter.

A mask that looks right but is not (0.5 where 1 was meant, a NaN, a
transposed or stacked array, a mask for a leaf the model lacks) would train
or report silently wrong, so every entry point (:func:`~sfpk_jax.apply_masks`,
:func:`~sfpk_jax.keep_masked`, :func:`~sfpk_jax.sparsity_of`,
:func:`~sfpk_jax.sparsity_report`, :func:`~sfpk_jax.load_masked` and what a
pruner returns to :func:`~sfpk_jax.prune`) goes through :func:`named_masks`,
and every error names the leaf. Masks are matched to parameters by path, so
the masks of an NNX ``State`` also fit the plain arrays ``nnx.Optimizer``
passes.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import numpy as np

PyTree = Any


def _is_none(x) -> bool:
    return x is None


def path_to_str(path) -> str:
    """Joins a jax key path into ``'Conv_0/kernel'`` form.

    A trailing ``.value`` attribute (how Flax NNX variables flatten) is
    dropped, so that a rule reads the same path on Linen, NNX and Equinox.
    """
    path = tuple(path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return "/".join(_key_name(e) for e in path)


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def check_params(params: PyTree) -> None:
    """Raises, in one line saying what to pass, when ``params`` is not a tree of parameters.

    The slips this catches: a Flax NNX module itself, or an ``nnx.State``
    holding batch statistics, where the parameters belong; an Equinox module
    with its functions and other non-arrays (rather than
    :func:`~sfpk_jax.split_equinox`'s arrays); a result where the masks belong.
    """
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(params, nnx.Module):
        raise TypeError(
            f"got the nnx.Module {type(params).__name__} where its parameters belong: pass "
            "split = sfpk_jax.split_nnx(model); split.params (and rebuild the model in the loss "
            "with split.merge(params))")
    if nnx is not None and isinstance(params, nnx.State):
        flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(
            x, nnx.Variable))[0]
        other = next(((p, v) for p, v in flat if isinstance(v, nnx.Variable)
                      and not isinstance(v, nnx.Param)), None)
        if other is not None:
            raise TypeError(
                f"the params hold {type(other[1]).__name__} variables (at {path_to_str(other[0])}), "
                "not parameters alone: pass sfpk_jax.split_nnx(model).params, or nnx.state(model, "
                "nnx.Param)")
    if hasattr(params, "masks") and hasattr(params, "_fields"):
        raise TypeError(f"got a {type(params).__name__} where a tree of arrays belongs: pass its "
                        ".masks")
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not hasattr(leaf, "shape") and not isinstance(leaf, (int, float)):
            raise TypeError(
                f"the params hold a {type(leaf).__name__} at {path_to_str(path) or '<root>'}, not "
                "an array: pass the model's arrays alone (for Equinox, "
                "sfpk_jax.split_equinox(model).params)")


def check_mask_values(name: str, mask: Any) -> None:
    """Raises unless ``mask`` holds only 0s and 1s (numbers; NaN and 0.5 are refused).

    A traced mask (inside ``jit``) cannot be read; it was checked where it
    was made concrete, so it passes.
    """
    if isinstance(mask, jax.core.Tracer):
        return
    values = np.asarray(mask)
    if values.dtype.kind not in "biuf":
        raise ValueError(f"the mask of {name or '<root>'} has dtype {values.dtype}; masks hold "
                         "the numbers 0 and 1 (float, int or bool arrays)")
    other = values[(values != 0) & (values != 1)]
    if other.size:
        raise ValueError(
            f"the mask of {name or '<root>'} holds {float(other.flat[0])!r} ({other.size} "
            f"{'entry' if other.size == 1 else 'entries'} neither 0 nor 1): masks are 0/1; pass "
            "the masks (e.g. result.masks), not params, scores or particles")


def check_mask_shape(name: str, param_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> None:
    """Raises unless a mask of ``mask_shape`` broadcasts over ``param_shape`` keeping it.

    Same rank, each axis equal or 1: so a stack of particles, a scalar or a
    transposed mask is refused rather than silently reshaping the parameter.
    """
    if len(mask_shape) != len(param_shape) or any(
            b not in (1, a) for a, b in zip(param_shape, mask_shape)):
        raise ValueError(
            f"the mask of {name or '<root>'} has shape {tuple(mask_shape)}, which does not "
            f"broadcast to the parameter's shape {tuple(param_shape)} (same rank, each axis "
            "equal or 1): pass the masks of these params (e.g. result.masks, not particles)")


def check_values(masks: PyTree) -> None:
    """:func:`check_mask_values` for every mask of a tree (no params needed)."""
    if hasattr(masks, "masks") and hasattr(masks, "_fields"):  # a pruner's result
        raise TypeError(f"got a {type(masks).__name__} where the masks belong: pass its .masks")
    for path, m in jax.tree_util.tree_flatten_with_path(masks, is_leaf=_is_none)[0]:
        if m is not None:
            check_mask_values(path_to_str(path), m)


def named_masks(masks: PyTree, params: PyTree, *, values: bool = True
                ) -> dict[str, tuple[Any, Any]]:
    """``{path: (mask, parameter)}`` for the masked leaves, every mask checked against ``params``.

    Args:
      masks: a tree mirroring ``params``: a 0/1 array at each masked leaf,
        ``None`` elsewhere.
      params: the parameter pytree.
      values: also check the masks' values (False where they were checked
        before and are read again on a hot path).

    Returns:
      The masked leaves by '/'-joined path, in the params' order.

    Raises:
      ValueError: naming the first leaf of ``params`` the masks lack, a mask
        with no parameter, a mask that does not broadcast over its parameter
        without changing its shape, or one whose values are not 0/1 numbers.
    """
    check_params(params)
    if hasattr(masks, "masks") and hasattr(masks, "_fields"):  # a pruner's result
        raise TypeError(f"got a {type(masks).__name__} where the masks belong: pass its .masks")
    leaves = [(path_to_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]
    try:
        flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=_is_none)[0]
    except TypeError as err:  # e.g. a model object where a tree of arrays belongs
        raise ValueError(f"the masks are not a tree of arrays ({err})") from None
    named = {path_to_str(p): m for p, m in flat}
    for name, _ in leaves:
        if name not in named:
            raise ValueError(
                f"the masks have no leaf {name or '<root>'} of the params: build the masks from "
                "the same params tree (None at leaves that are not pruned), e.g. result.masks")
    shapes = dict(leaves)
    out = {}
    for name, m in named.items():
        if m is None:
            continue
        if name not in shapes:
            raise ValueError(f"the masks hold {name or '<root>'}, which the params do not have: "
                             "pass the masks of these params")
        check_mask_shape(name, np.shape(shapes[name]), np.shape(m))
        if values:
            check_mask_values(name, m)
        out[name] = (m, shapes[name])
    return {name: out[name] for name, _ in leaves if name in out}
