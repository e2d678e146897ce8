"""N:M masks: N weights kept of every M consecutive weights along a kernel's input axis.

2:4 is the pattern that the sparse tensor cores of current NVIDIA GPUs run
faster (through cuSPARSELt and TensorRT). A group is M consecutive entries
along the kernel's input axis, all other indices fixed: axis -2 of a Flax
``(..., in, out)`` kernel, axis 1 of an Equinox or PyTorch ``(out, in, ...)``
weight (:func:`sfpk_jax.core.channels.channel_axes`; the selection reads the
axes off the model, see :mod:`sfpk_jax.core.selection`).

A pruner is asked for N:M masks with ``mask_dim="N:M"``, 0 < N < M. The masks
have their kernels' full shape (they are unstructured masks with one
constraint per group), so everything that takes an unstructured mask takes
them; only kernels take them, every other leaf (biases, norms) stays dense.
Every group keeps its N highest scores (:func:`top_n`), so the density is
N/M by construction and ``sparsity`` must be 1 - N/M (:func:`check_sparsity`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sfpk_jax.core import channels
from sfpk_jax.core.mask_checks import check_values, named_masks, path_to_str

PyTree = Any

_PATTERN = re.compile(r"([0-9]+):([0-9]+)")
# How far a sparsity may be from 1 - N/M: room for a decimal such as 0.6667 (2:6 is 2/3).
_SPARSITY_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class NM:
    """An N:M pattern: ``n`` weights kept of every ``m`` consecutive ones (0 < n < m).

    Attributes:
      n: N, the weights kept per group.
      m: M, the group's size.
    """

    n: int
    m: int

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def sparsity(self) -> float:
        """1 - N/M: the fraction of a kernel's weights that the pattern removes."""
        return 1.0 - self.n / self.m


def parse(value: Any, name: str = "n_m", *, others: tuple = ()) -> NM:
    """The :class:`NM` that ``"N:M"`` text stands for.

    Args:
      value: the text, e.g. ``"2:4"``.
      name: the argument's name, for the error.
      others: the argument's other valid values, for the error.

    Returns:
      The pattern.

    Raises:
      ValueError: ``value`` is no ``"N:M"`` text, or not 0 < N < M.
    """
    match = _PATTERN.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        alternatives = f"one of {', '.join(map(repr, others))} or " if others else ""
        raise ValueError(f"{name}={value!r} is not {alternatives}an 'N:M' pattern such as "
                         "'2:4' (N kept of every M weights)")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"{name}={value!r} must keep 0 < N < M of every M weights "
                         f"({'N = 0 keeps none' if n == 0 else 'N >= M keeps all'}), e.g. '2:4'")
    return NM(n, m)


def from_mask_dim(mask_dim: Any) -> NM | None:
    """The N:M pattern ``mask_dim`` asks for; None for unstructured (None) or channel masks.

    Raises:
      ValueError: ``mask_dim`` is none of None, ``"out"``, ``"in"``, ``"N:M"``
        with 0 < N < M.
    """
    if mask_dim is None or channels.is_channel(mask_dim):
        return None
    return parse(mask_dim, "mask_dim", others=(None, *channels.MASK_DIMS))


def has_sparsity(pattern: NM, sparsity: float) -> bool:
    """Whether ``sparsity`` is the pattern's 1 - N/M (as far as a written decimal can say)."""
    return math.isclose(sparsity, pattern.sparsity, rel_tol=0.0, abs_tol=_SPARSITY_TOLERANCE)


def check_sparsity(pattern: NM, sparsity: float) -> None:
    """Refuses a ``sparsity`` other than 1 - N/M: an N:M mask removes exactly that.

    Raises:
      ValueError: naming the sparsity to pass.
    """
    if not has_sparsity(pattern, sparsity):
        raise ValueError(f"mask_dim='{pattern}' keeps {pattern.n} of every {pattern.m} weights: "
                         f"pass sparsity={pattern.sparsity!r} (1 - N/M), not {sparsity!r}")


def check_groups(path: str, shape: tuple[int, ...], in_axis: int, pattern: NM) -> None:
    """Refuses a kernel whose input axis does not split into groups of M.

    Raises:
      ValueError: naming the leaf, its shape and M.
    """
    if shape[in_axis] % pattern.m:
        raise ValueError(
            f"{path} (shape {shape}) has {shape[in_axis]} inputs along axis {in_axis}, not a "
            f"multiple of M={pattern.m}, so mask_dim='{pattern}' cannot group them: leave it out "
            "of prunable (a regex, or layers.restrict(...)) or choose an M that divides it")


@functools.partial(jax.jit, static_argnums=(1, 2))  # one program, not one per operation
def top_n(values: jax.Array, in_axis: int, pattern: NM, tiebreak: jax.Array) -> jax.Array:
    """1 at the N highest ``values`` of every group of M along ``in_axis``, else 0 (float32).

    Ties go to the higher ``tiebreak`` (as :func:`sfpk_jax.core.topk.topk_mask`
    keeps the later position of a tie); an entry whose value is <= 0 (a dead
    weight's key) is never kept, so such a group keeps fewer than N.

    Args:
      values: one leaf's keys, higher kept; its ``in_axis`` a multiple of M.
      in_axis: the leaf's input axis.
      pattern: N:M.
      tiebreak: same shape as ``values``.
    """
    grouped = [jnp.moveaxis(x, in_axis, -1) for x in (values, tiebreak)]
    shape = grouped[0].shape
    keys, ties = (x.reshape(shape[:-1] + (-1, pattern.m)) for x in grouped)
    order = jnp.lexsort((ties, keys), axis=-1)  # ascending within each group
    rank = jnp.argsort(order, axis=-1)
    keep = (rank >= pattern.m - pattern.n) & (keys > 0)
    return jnp.moveaxis(keep.reshape(shape), -1, in_axis).astype(jnp.float32)


def broken_groups(mask: np.ndarray, in_axis: int, pattern: NM) -> int:
    """How many groups of M along ``in_axis`` keep more than N entries of ``mask``.

    An input axis that is not a multiple of M ends in a shorter group, as
    if padded with pruned entries (as the sparse libraries pad).
    """
    kept = np.moveaxis(np.asarray(mask) != 0, in_axis, -1)
    pad = -kept.shape[-1] % pattern.m
    kept = np.concatenate([kept, np.zeros(kept.shape[:-1] + (pad,), bool)], axis=-1)
    counts = kept.reshape(kept.shape[:-1] + (-1, pattern.m)).sum(axis=-1)
    return int(np.count_nonzero(counts > pattern.n))


def input_axis(path: str, shape: tuple[int, ...]) -> int | None:
    """A masked leaf's input axis, by its name (``kernel``: -2, ``weight``: 1); None for others.

    Biases, norm scales and leaves of rank < 2 have none: they take no N:M pattern.
    """
    axes = channels.channel_axes(path.rpartition("/")[2], shape)
    return None if axes is None else axes[1]


def is_n_m(masks: PyTree, n_m: str, params: PyTree | None = None) -> tuple[str, ...]:
    """The masked kernels that break the N:M pattern ``n_m``: () when every one conforms.

    A kernel conforms when no group of M consecutive entries along its input
    axis keeps more than N: what sparse tensor cores need (a group that keeps
    fewer, where weights were already dead, runs as well). The input axis is
    read off the leaf's name, as the frameworks name their weights: a Flax
    ``kernel`` ``(..., in, out)`` groups along axis -2, an Equinox or PyTorch
    ``weight`` ``(out, in, ...)`` along axis 1. Other masked leaves (biases,
    norm scales: rank < 2 or another name) take no pattern and are not checked.

    Example:

    >>> import numpy as np, sfpk_jax
    >>> masks = {"dense": {"kernel": np.array([[1., 0.], [1., 1.], [0., 0.], [0., 1.]])},
    ...          "conv": {"weight": np.array([[1., 1., 1., 0.]])}}
    >>> sfpk_jax.is_n_m(masks, "2:4")  # the Flax kernel groups its 4 rows, the weight its row
    ('conv/weight',)

    Args:
      masks: a mask tree (``None`` at leaves that are not pruned).
      n_m: the pattern, ``"N:M"`` with 0 < N < M, e.g. ``"2:4"``.
      params: the parameters the masks belong to: with them, masks that
        broadcast over their parameter (channel masks) are checked as they
        apply, and the masks are checked to fit; without, as they are.

    Returns:
      The '/'-joined paths of the breaking leaves, in the tree's order.

    Raises:
      ValueError: a bad ``n_m``, or masks that hold other values than 0 and
        1 or do not fit ``params`` (the leaf is named).
    """
    pattern = parse(n_m)
    if params is None:
        check_values(masks)
        flat = jax.tree_util.tree_flatten_with_path(masks)[0]
        named = {path_to_str(path): np.asarray(m) for path, m in flat}
    else:
        named = {name: np.broadcast_to(np.asarray(m), np.shape(p))
                 for name, (m, p) in named_masks(masks, params).items()}
    broken = []
    for path, mask in named.items():
        axis = input_axis(path, mask.shape)
        if axis is not None and broken_groups(mask, axis, pattern):
            broken.append(path)
    return tuple(broken)
