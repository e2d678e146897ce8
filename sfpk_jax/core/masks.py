"""Masks as pytrees that mirror the prunable parameters.

A mask tree has the structure of the params tree; prunable leaves hold an
array that broadcasts against the parameter (same shape for unstructured
masks), every other leaf is ``None``. Masking multiplies, nothing else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sfpk_jax.core import channels
from sfpk_jax.core.mask_checks import check_values, named_masks, path_to_str
from sfpk_jax.core.n_m import NM, check_groups, from_mask_dim
from sfpk_jax.core.selection import Prunable, select

PyTree = Any


def _is_none(x) -> bool:
    return x is None


@dataclasses.dataclass(frozen=True)
class MaskLayout:
    """Where the prunable leaves sit in a params tree (static, hashable).

    Attributes:
      treedef: structure of the params tree.
      index: positions of the prunable leaves among the flattened leaves.
      paths: their '/'-joined paths.
      shapes: the parameter shapes of the prunable leaves.
      mask_shapes: the masks' shapes: the parameter shapes (unstructured) or
        channel shapes that broadcast over the kernels (see
        :mod:`sfpk_jax.core.channels`).
      tied: ``(position among the flattened leaves, kernel position in
        index, shape)`` of the biases whose masks follow their kernel's
        channel mask (channel masks ``"out"``): no prunable leaves of their own.
      n_m: the N:M pattern of N:M masks (``mask_dim="N:M"``), else None.
      in_axes: with N:M masks, every prunable leaf's input axis (its groups
        run along it); else empty.
    """

    treedef: Any
    index: tuple[int, ...]
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    mask_shapes: tuple[tuple[int, ...], ...]
    tied: tuple[tuple[int, int, tuple[int, ...]], ...] = ()
    n_m: NM | None = None
    in_axes: tuple[int, ...] = ()

    @classmethod
    def from_params(
        cls, params: PyTree, prunable: Prunable = None, mask_dim: str | None = None
    ) -> "MaskLayout":
        """The layout of ``params``.

        Args:
          params: the parameter pytree.
          prunable: leaf selection (see :func:`sfpk_jax.core.selection.select`):
            None, a regex, a callable, or the model's layers
            (:func:`sfpk_jax.core.layers.trace_layers`), which channel masks need.
          mask_dim: None for unstructured masks, ``"out"`` or ``"in"`` for
            one mask entry per output or input channel of every kernel, or
            ``"N:M"`` (e.g. ``"2:4"``) for N:M masks of the kernels (see
            :mod:`sfpk_jax.core.n_m`).

        Returns:
          The layout.

        Raises:
          ValueError: a bad ``mask_dim``, nothing is selected, channel or N:M
            masks cannot be applied (see :func:`sfpk_jax.core.selection.select`),
            or a kernel's input size is not a multiple of M (named).
        """
        pattern = from_mask_dim(mask_dim)
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        chosen = select(params, prunable, mask_dim)
        if not chosen.index:
            paths = ", ".join(path_to_str(p) for p, _ in flat[:8]) or "(empty tree)"
            raise ValueError(
                "no prunable parameters: the rule selected none of the leaves "
                f"({paths}{', ...' if len(flat) > 8 else ''}); pass `prunable=` a regex "
                "or callable that selects the weights to prune"
            )
        paths = tuple(path_to_str(flat[i][0]) for i in chosen.index)
        shapes = tuple(tuple(np.shape(flat[i][1])) for i in chosen.index)
        in_axes = () if pattern is None else tuple(axes[1] for axes in chosen.axes)
        for path, shape, axis in zip(paths, shapes, in_axes):
            check_groups(path, shape, axis, pattern)
        return cls(
            treedef=treedef,
            index=chosen.index,
            paths=paths,
            shapes=shapes,
            mask_shapes=tuple(channels.mask_shape(s, mask_dim, axes)
                              for s, axes in zip(shapes, chosen.axes)),
            tied=chosen.tied,
            n_m=pattern,
            in_axes=in_axes,
        )

    @property
    def sizes(self) -> tuple[int, ...]:
        """Parameter entries per prunable leaf."""
        return tuple(int(np.prod(s)) for s in self.shapes)

    @property
    def total(self) -> int:
        """D: all prunable parameter entries."""
        return sum(self.sizes)

    @property
    def mask_sizes(self) -> tuple[int, ...]:
        """Mask entries per prunable leaf (channels, when structured)."""
        return tuple(int(np.prod(s)) for s in self.mask_shapes)

    @property
    def node_sizes(self) -> tuple[int, ...]:
        """Parameter entries each mask entry covers, per leaf (1 when unstructured)."""
        return tuple(channels.node_size(p, m) for p, m in zip(self.shapes, self.mask_shapes))

    def _leaves(self, tree: PyTree) -> list:
        # Up to the params' structure: a mask tree's None leaves and the None
        # nodes of a partitioned (Equinox) params tree both line up.
        try:
            return self.treedef.flatten_up_to(tree)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"tree does not have the structure of the params tree ({err}); masks must "
                "mirror the params tree (None at leaves that are not pruned)") from None

    def gather(self, tree: PyTree) -> list:
        """The prunable leaves of a params or mask tree, in layout order."""
        leaves = self._leaves(tree)
        return [leaves[i] for i in self.index]

    def replace(self, tree: PyTree, leaves: Sequence[Any]) -> PyTree:
        """``tree`` (shaped like params) with its prunable leaves swapped for ``leaves``."""
        full = self._leaves(tree)
        for i, leaf in zip(self.index, leaves):
            full[i] = leaf
        return jax.tree_util.tree_unflatten(self.treedef, full)

    def _tied(self, leaves: Sequence[Any]) -> list[tuple[int, Any]]:
        """``(leaf position, value)`` of every tied bias: its kernel's channel value in the
        bias's shape (leading axes, a particle axis say, kept)."""
        out = []
        for i, k, shape in self.tied:
            value = leaves[k]
            lead = value.shape[:value.ndim - len(self.mask_shapes[k])]
            out.append((i, value.reshape(lead + shape)))
        return out

    def scatter(self, leaves: Sequence[Any]) -> PyTree:
        """A tree shaped like params with ``leaves`` at prunable spots (and tied biases),
        None elsewhere."""
        full = [None] * self.treedef.num_leaves
        for i, leaf in zip(self.index, leaves):
            full[i] = leaf
        for i, value in self._tied(leaves):
            full[i] = value
        return jax.tree_util.tree_unflatten(self.treedef, full)

    def apply(self, tree: PyTree, points: Sequence[Any]) -> PyTree:
        """``tree`` (shaped like params) with every prunable leaf multiplied by its point
        (a mask, or a polarized particle), broadcast, and every tied bias by its kernel's."""
        full = self._leaves(tree)
        for i, point in zip(self.index, points):
            full[i] = full[i] * point
        for i, value in self._tied(points):
            full[i] = full[i] * value
        return jax.tree_util.tree_unflatten(self.treedef, full)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """Multiplies each prunable parameter by its mask (broadcasting).

    Example:

    >>> import jax.numpy as jnp, sfpk_jax
    >>> params = {"dense": {"kernel": jnp.array([[0.1, -2.0], [0.5, 3.0]])}}
    >>> masks = {"dense": {"kernel": jnp.array([[0.0, 1.0], [1.0, 1.0]])}}
    >>> sfpk_jax.apply_masks(params, masks)["dense"]["kernel"]
    Array([[ 0. , -2. ],
           [ 0.5,  3. ]], dtype=float32)

    Args:
      params: the parameter pytree.
      masks: a tree mirroring ``params`` with arrays at prunable leaves and
        ``None`` elsewhere (as returned by :func:`sfpk_jax.sfpk_prune`).

    Returns:
      The masked parameters, same structure, shapes and dtypes as ``params``.

    Raises:
      ValueError: the trees differ, or a mask does not broadcast over its
        parameter without changing its shape, or holds other values than 0
        and 1 (the leaf is named; see :mod:`sfpk_jax.core.mask_checks`).
    """

    by_path = named_masks(masks, params)

    def mul(path, p):
        name = path_to_str(path)
        if name not in by_path:
            return p
        return p * jnp.asarray(by_path[name][0], dtype=p.dtype)

    return jax.tree_util.tree_map_with_path(mul, params)


def sparsity_of(masks: PyTree, params: PyTree | None = None) -> float:
    """The fraction of prunable entries that the masks remove (0.95: 5% kept).

    The same quantity as the ``sparsity`` a pruner is asked for, so
    ``sparsity_of(prune(..., sparsity=0.95).masks) == 0.95`` up to rounding.
    It counts the masks, not the weights: a model trained without
    :func:`sfpk_jax.keep_masked` can hold non-zero pruned entries that this
    does not see; :func:`sfpk_jax.sparsity_report` counts those (``regrown``).

    Example:

    >>> import numpy as np, sfpk_jax
    >>> sfpk_jax.sparsity_of({"dense": {"kernel": np.array([[0.0, 1.0], [1.0, 1.0]])}})
    0.25

    Args:
      masks: a mask tree (``None`` at non-prunable leaves).
      params: needed for masks that broadcast over their parameter (channel
        masks): each mask entry then counts for the entries it covers; with
        it, the masks are checked against the params as everywhere else.

    Returns:
      removed / total over all masked parameters, as a Python float.

    Raises:
      ValueError: a mask holds other values than 0 and 1, or does not fit
        ``params`` (the leaf is named), or no leaf holds a mask.
    """
    if params is None:
        check_values(masks)
        leaves = [np.asarray(m) for m in jax.tree_util.tree_leaves(masks)]
        kept = sum(int(np.count_nonzero(m)) for m in leaves)
        total = sum(int(np.size(m)) for m in leaves)
    else:
        kept = total = 0
        for m, p in named_masks(masks, params).values():
            kept += int(np.count_nonzero(np.broadcast_to(np.asarray(m) != 0, np.shape(p))))
            total += int(np.size(p))
    if total == 0:
        raise ValueError("sparsity_of an empty mask tree: no leaf holds a mask")
    return (total - kept) / total


def count_prunable(params: PyTree, prunable: Prunable = None) -> int:
    """Number of prunable entries under the spec's rule (or ``prunable``)."""
    return MaskLayout.from_params(params, prunable).total


def ones_like_masks(params: PyTree, prunable: Prunable = None,
                    mask_dim: str | None = None) -> PyTree:
    """The dense mask (all ones) for the prunable leaves of ``params``."""
    layout = MaskLayout.from_params(params, prunable, mask_dim)
    return layout.scatter([jnp.ones(s, jnp.float32) for s in layout.mask_shapes])
