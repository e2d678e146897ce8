"""Masks as pytrees that mirror the prunable parameters.

A mask tree has the structure of the params tree; prunable leaves hold an
array that broadcasts against the parameter (same shape for unstructured
masks), every other leaf is ``None``. Masking multiplies, nothing else.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from sfpk_jax.core import channels

PyTree = Any
Prunable = Union[None, str, Callable[[str, Any], bool]]


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def path_to_str(path) -> str:
    """Joins a jax key path into ``'Conv_0/kernel'`` form."""
    return "/".join(_key_name(e) for e in path)


def _is_none(x) -> bool:
    return x is None


def default_rule(paths: Sequence[str], leaves: Sequence[Any]) -> list[bool]:
    """The spec's rule: conv/dense kernels and dense biases are prunable.

    Flax names weights ``kernel``; a kernel of rank 2 is a dense layer, so the
    ``bias`` next to it is prunable too. Conv biases, normalisation scales and
    biases and embeddings are not.
    """
    rank_of_kernel = {}
    for p, leaf in zip(paths, leaves):
        parent, _, name = p.rpartition("/")
        if name == "kernel":
            rank_of_kernel[parent] = np.ndim(leaf)
    selected = []
    for p, leaf in zip(paths, leaves):
        parent, _, name = p.rpartition("/")
        if name == "kernel":
            selected.append(np.ndim(leaf) >= 2)
        elif name == "bias":
            selected.append(rank_of_kernel.get(parent) == 2)
        else:
            selected.append(False)
    return selected


def select(params: PyTree, prunable: Prunable = None) -> list[bool]:
    """Which leaves of ``params`` (in flatten order) are prunable.

    Args:
      params: the parameter pytree.
      prunable: ``None`` for the spec's default rule, a regex matched
        (``re.search``) against the '/'-joined path, or a callable
        ``(path, leaf) -> bool``.

    Returns:
      One bool per leaf of ``params``.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_to_str(p) for p, _ in flat]
    leaves = [leaf for _, leaf in flat]
    if prunable is None:
        return default_rule(paths, leaves)
    if isinstance(prunable, str):
        pattern = re.compile(prunable)
        return [bool(pattern.search(p)) for p in paths]
    if callable(prunable):
        return [bool(prunable(p, leaf)) for p, leaf in zip(paths, leaves)]
    raise TypeError(
        f"prunable must be None, a regex string or a callable (path, leaf) -> bool, "
        f"got {type(prunable).__name__}"
    )


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
    """

    treedef: Any
    index: tuple[int, ...]
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    mask_shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_params(
        cls, params: PyTree, prunable: Prunable = None, mask_dim: str | None = None
    ) -> "MaskLayout":
        """The layout of ``params``.

        Args:
          params: the parameter pytree.
          prunable: leaf selection (see :func:`select`).
          mask_dim: None for unstructured masks, ``"out"`` or ``"in"`` for
            one mask entry per output or input channel of every kernel.

        Returns:
          The layout.
        """
        if mask_dim not in (None, *channels.MASK_DIMS):
            raise ValueError(f"mask_dim={mask_dim!r} is not one of None, {channels.MASK_DIMS}")
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        chosen = select(params, prunable)
        index = tuple(i for i, c in enumerate(chosen) if c)
        if not index:
            paths = ", ".join(path_to_str(p) for p, _ in flat[:8]) or "(empty tree)"
            raise ValueError(
                "no prunable parameters: the rule selected none of the leaves "
                f"({paths}{', ...' if len(flat) > 8 else ''}); pass `prunable=` a regex "
                "or callable that selects the weights to prune"
            )
        paths = tuple(path_to_str(flat[i][0]) for i in index)
        shapes = tuple(tuple(np.shape(flat[i][1])) for i in index)
        return cls(
            treedef=treedef,
            index=index,
            paths=paths,
            shapes=shapes,
            mask_shapes=tuple(
                channels.mask_shape(s, mask_dim, p.rpartition("/")[2] == "kernel" and len(s) >= 2)
                for p, s in zip(paths, shapes)
            ),
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

    def gather(self, tree: PyTree) -> list:
        """The prunable leaves of a params or mask tree, in layout order."""
        leaves = jax.tree_util.tree_leaves(tree, is_leaf=_is_none)
        if len(leaves) != self.treedef.num_leaves:
            raise ValueError(
                f"tree has {len(leaves)} leaves but the params tree has "
                f"{self.treedef.num_leaves}; masks must mirror the params tree"
            )
        return [leaves[i] for i in self.index]

    def replace(self, tree: PyTree, leaves: Sequence[Any]) -> PyTree:
        """``tree`` (shaped like params) with its prunable leaves swapped for ``leaves``."""
        full = jax.tree_util.tree_leaves(tree, is_leaf=_is_none)
        for i, leaf in zip(self.index, leaves):
            full[i] = leaf
        return jax.tree_util.tree_unflatten(self.treedef, full)

    def scatter(self, leaves: Sequence[Any]) -> PyTree:
        """A tree shaped like params with ``leaves`` at prunable spots, None elsewhere."""
        full = [None] * self.treedef.num_leaves
        for i, leaf in zip(self.index, leaves):
            full[i] = leaf
        return jax.tree_util.tree_unflatten(self.treedef, full)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """Multiplies each prunable parameter by its mask (broadcasting).

    Args:
      params: the parameter pytree.
      masks: a tree mirroring ``params`` with arrays at prunable leaves and
        ``None`` elsewhere (as returned by :func:`sfpk_jax.sfpk_prune`).

    Returns:
      The masked parameters, same structure and dtypes as ``params``.
    """

    def mul(m, p):
        if m is None:
            return p
        return p * jnp.asarray(m, dtype=p.dtype)

    try:
        return jax.tree.map(mul, masks, params, is_leaf=_is_none)
    except ValueError as err:
        raise ValueError(
            "masks do not mirror params: build them from the same params tree "
            f"(use None for leaves that are not pruned). Details: {err}"
        ) from None


def density(masks: PyTree, params: PyTree | None = None) -> float:
    """Fraction of prunable entries that are kept (non-zero in the mask).

    Args:
      masks: a mask tree (``None`` at non-prunable leaves).
      params: needed only for masks that broadcast over their parameter
        (channel masks): each mask entry then counts for the entries it covers.

    Returns:
      kept / total over all masked parameters, as a Python float.
    """
    if params is None:
        leaves = [m for m in jax.tree_util.tree_leaves(masks) if m is not None]
        kept = sum(float(np.count_nonzero(np.asarray(m))) for m in leaves)
        total = sum(int(np.size(m)) for m in leaves)
    else:
        pairs = jax.tree.map(
            lambda m, p: None if m is None else (m, p), masks, params, is_leaf=_is_none
        )
        kept = total = 0
        for m, p in jax.tree_util.tree_leaves(pairs, is_leaf=lambda x: isinstance(x, tuple)):
            covered = np.broadcast_to(np.asarray(m) != 0, np.shape(p))
            kept += float(np.count_nonzero(covered))
            total += int(np.size(p))
    if total == 0:
        raise ValueError("density of an empty mask tree: no leaf holds a mask")
    return kept / total


def count_prunable(params: PyTree, prunable: Prunable = None) -> int:
    """Number of prunable entries under the spec's rule (or ``prunable``)."""
    return MaskLayout.from_params(params, prunable).total


def ones_like_masks(params: PyTree, prunable: Prunable = None, mask_dim: str | None = None) -> PyTree:
    """The dense mask (all ones) for the prunable leaves of ``params``."""
    layout = MaskLayout.from_params(params, prunable, mask_dim)
    return layout.scatter([jnp.ones(s, jnp.float32) for s in layout.mask_shapes])
