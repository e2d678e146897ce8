"""Exact top-k: k-th smallest thresholds, and masks from scores with the exact kept count.

Global scope treats all leaves as one vector; local scope treats each leaf on
its own. Every threshold of the spec (polarizer, hard vote, final mask) is the
k-th smallest value of such a vector, so they all come from here, and so does
:func:`masks_from_scores`, the one step from any pruner's scores to its masks
(unstructured, channel or N:M masks; N:M masks keep every group's top N,
:func:`n_m_masks`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

from sfpk_jax.core import channels, n_m
from sfpk_jax.core.masks import MaskLayout

# Where a top-k ranks: all prunable entries at once, or every layer on its own.
Scope = Literal["global", "local"]
SCOPES: tuple[str, ...] = get_args(Scope)

PyTree = Any


def _flat(leaves: Sequence[jax.Array]) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x) for x in leaves])


def _bit_layout(dtype) -> tuple:
    # float64 needs 64-bit keys (only available with jax_enable_x64); every
    # narrower float is compared exactly as float32.
    if jnp.dtype(dtype) == jnp.float64:
        return jnp.float64, jnp.uint64, 64
    return jnp.float32, jnp.uint32, 32


def ordered_keys(values: jax.Array) -> jax.Array:
    """Unsigned keys whose integer order is the float order of ``values``."""
    ftype, utype, width = _bit_layout(values.dtype)
    bits = jax.lax.bitcast_convert_type(values.astype(ftype), utype)
    sign = utype(1 << (width - 1))
    return jnp.where((bits & sign) != 0, ~bits, bits | sign)


def _from_ordered_keys(keys: jax.Array, dtype) -> jax.Array:
    ftype, utype, width = _bit_layout(dtype)
    sign = utype(1 << (width - 1))
    bits = jnp.where((keys & sign) != 0, keys & ~sign, ~keys)
    return jax.lax.bitcast_convert_type(bits, ftype)


def kth_smallest(values: jax.Array, k: jax.Array) -> jax.Array:
    """The k-th smallest entry (1-based) of a flat vector; k is clipped to [1, size].

    A bisection over the float bit patterns (one pass per bit): exact, and
    O(32 D) instead of a sort, which XLA runs slowly on CPU.
    """
    k = jnp.clip(k, 1, values.size).astype(jnp.int32)
    keys = ordered_keys(values)
    _, utype, width = _bit_layout(values.dtype)

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(keys <= mid, dtype=jnp.int32) >= k
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    lo, _ = jax.lax.fori_loop(0, width, halve, (utype(0), ~utype(0)))
    return _from_ordered_keys(lo, values.dtype)


def counts(sizes: Sequence[int], density: jax.Array, scope: str) -> jax.Array:
    """k = floor((1 - density) * D), globally (scalar) or per leaf (shape (L,))."""
    if scope == "global":
        return jnp.floor((1.0 - density) * sum(sizes)).astype(jnp.int32)
    return jnp.floor((1.0 - density) * jnp.asarray(sizes, jnp.result_type(density))).astype(jnp.int32)


def at_or_above_kth(
    values: Sequence[jax.Array], k: jax.Array, scope: str
) -> list[jax.Array]:
    """1 where a value is >= the k-th smallest (its scope's), in the values' dtype.

    With k < 1 nothing would be removed, so every entry passes.
    """
    if scope == "global":
        tau = kth_smallest(_flat(values), k)
        return [jnp.where(k >= 1, v >= tau, True).astype(v.dtype) for v in values]
    return [
        jnp.where(k[i] >= 1, v >= kth_smallest(jnp.ravel(v), k[i]), True).astype(v.dtype)
        for i, v in enumerate(values)
    ]


def above_kth(values: Sequence[jax.Array], k: jax.Array, scope: str) -> list[jax.Array]:
    """``values`` zeroed where they are <= their scope's k-th smallest (k >= 1)."""
    if scope == "global":
        tau = kth_smallest(_flat(values), k)
        return [jnp.where((k >= 1) & (v <= tau), 0.0, v) for v in values]
    return [
        jnp.where((k[i] >= 1) & (v <= kth_smallest(jnp.ravel(v), k[i])), 0.0, v)
        for i, v in enumerate(values)
    ]


def remove_counts(sizes: Sequence[int], sparsity: float, scope: str) -> int | list[int]:
    """How many entries the final mask drops: floor(sparsity * D), globally or per layer."""
    if scope == "global":
        return math.floor(sparsity * sum(sizes))
    return [math.floor(sparsity * d) for d in sizes]


def _keep_top(scores: jax.Array, remove: int, tiebreak: jax.Array) -> jax.Array:
    # Lexicographic rank by (score, tiebreak): exactly `remove` entries fall below.
    order = jnp.lexsort((tiebreak, scores))
    rank = jnp.empty_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
    return (rank >= jnp.asarray(remove, rank.dtype)) & (scores > 0)


def _tiebreak(key: jax.Array | None, size: int, i: int) -> jax.Array:
    """What breaks exact ties among ``size`` entries (leaf or vector ``i``): uniform noise
    from ``key``, else the position (the later one is kept)."""
    if key is None:
        return jnp.arange(size, dtype=jnp.float32)
    return jax.random.uniform(jax.random.fold_in(key, i), (size,))


def topk_mask(
    scores: Sequence[jax.Array],
    remove: Sequence[int] | int,
    scope: str,
    key: jax.Array | None = None,
) -> list[jax.Array]:
    """The final 0/1 masks: drop the ``remove`` lowest scores (per scope).

    Matches the spec's ``1[S > tau]`` wherever the scores have no ties at the
    threshold; ties are broken by ``key`` (uniform noise) or, without a key,
    by position, so the kept count is exact. Entries with score <= 0 (pruned
    weights, theta = 0) are never kept.

    Args:
      scores: non-negative scores, one array per prunable leaf.
      remove: how many entries to remove: an int (global scope) or one int per
        leaf (local scope); concrete or traced (a jitted caller then compiles
        once for every count).
      scope: ``"global"`` or ``"local"``.
      key: optional PRNG key for tie-breaking.

    Returns:
      float32 0/1 arrays shaped like ``scores``.
    """
    if scope == "global":
        flat = _flat(scores)
        keep = _keep_top(flat, remove, _tiebreak(key, flat.size, 0)).astype(jnp.float32)
        splits = np.cumsum([s.size for s in scores])[:-1]
        parts = jnp.split(keep, [int(x) for x in splits])
        return [p.reshape(s.shape) for p, s in zip(parts, scores)]
    return [
        _keep_top(jnp.ravel(s), r, _tiebreak(key, s.size, i)).astype(jnp.float32).reshape(s.shape)
        for i, (s, r) in enumerate(zip(scores, remove))
    ]


def check_sparsity(sparsity) -> float:
    """Validates a sparsity (fraction removed) and returns it as a float."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.floating)):
        raise TypeError(f"sparsity must be a number in (0, 1), got {type(sparsity).__name__}")
    if not (0.0 < float(sparsity) < 1.0):
        raise ValueError(
            f"sparsity={sparsity!r} is outside (0, 1): it is the fraction of prunable "
            "entries to remove, e.g. 0.95 keeps 5%"
        )
    return float(sparsity)


def positive_keys(scores: Sequence[jax.Array], alive: Sequence[jax.Array]) -> list[jax.Array]:
    """Order-preserving map of real scores to unsigned keys >= 1 (0 where not alive).

    :func:`topk_mask` never keeps a score <= 0; the keys let signed
    scores (random, GraSP) and zero scores of live weights (SNIP, SynFlow)
    compete, while dead weights still cannot come back. Equal scores get
    equal keys (-0 counts as 0), so ties stay ties for the top-k to break.
    """
    wide = any(jnp.dtype(s.dtype) == jnp.float64 for s in scores)
    ftype = jnp.float64 if wide else jnp.float32
    out = []
    for s, a in zip(scores, alive):
        value = s.astype(ftype)
        keys = ordered_keys(jnp.where(value == 0, ftype(0), value))
        out.append(jnp.where(a, keys, jnp.zeros_like(keys)))
    return out


def n_m_masks(
    layout: MaskLayout,
    scores: Sequence[jax.Array],
    alive: Sequence[jax.Array],
    key: jax.Array | None = None,
) -> list[jax.Array]:
    """N:M masks: in every group of M along each leaf's input axis, its N highest scores.

    Args:
      layout: a layout of N:M masks (``layout.n_m`` set).
      scores: real scores (any sign), one array per prunable leaf; higher is kept.
      alive: bool arrays: an entry that is False is never kept, so a group
        with fewer than N live entries keeps only those.
      key: optional PRNG key breaking exact ties (else the later position).

    Returns:
      float32 0/1 arrays shaped like ``scores``: N per group (of its live entries).
    """
    return [n_m.top_n(k, axis, layout.n_m, _tiebreak(key, k.size, i).reshape(k.shape))
            for i, (k, axis) in enumerate(zip(positive_keys(scores, alive), layout.in_axes))]


def masks_from_scores(
    layout: MaskLayout,
    scores: Sequence[jax.Array],
    sparsity: float,
    *,
    scope: Scope = "global",
    key: jax.Array | None = None,
    alive: Sequence[jax.Array] | None = None,
) -> PyTree:
    """Exact-count 0/1 masks keeping the highest scores.

    Args:
      layout: where the prunable leaves sit.
      scores: real scores (any sign), one array per prunable leaf; higher is kept.
      sparsity: fraction of prunable entries to remove, in (0, 1); for N:M
        masks exactly 1 - N/M.
      scope: ``global`` (one ranking) or ``local`` (every leaf keeps the same
        fraction); N:M masks take either (every group keeps its top N alone).
      key: optional PRNG key breaking exact ties (else by position).
      alive: optional bool arrays; entries that are False are never kept
        (pass ``theta != 0`` so already-pruned weights stay pruned).

    Returns:
      A float32 mask tree mirroring params (None where not pruned); exactly
      ``floor(sparsity * D)`` entries (per leaf in local scope; for N:M
      masks M - N of every group) are removed unless fewer than the kept
      count are alive.
    """
    sparsity = check_sparsity(sparsity)
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not one of {SCOPES}")
    if layout.n_m is not None:
        n_m.check_sparsity(layout.n_m, sparsity)
    scores = [jnp.asarray(s) for s in scores]
    for path, shape, s in zip(layout.paths, layout.shapes, scores):
        if s.shape != shape:
            raise ValueError(f"scores for {path} have shape {s.shape}, expected {shape}")
        if bool(jnp.any(jnp.isnan(s))):
            raise ValueError(
                f"scores for {path} contain NaN: check the parameters and the data "
                "(SynFlow can overflow in float32 on very deep networks)"
            )
    if alive is None:
        alive = [jnp.ones(s.shape, bool) for s in scores]
    if layout.n_m is not None:
        return layout.scatter(n_m_masks(layout, scores, alive, key))
    sizes = layout.sizes
    if channels.is_structured(layout.mask_shapes, layout.shapes):
        if scope != "local":
            raise ValueError("channel masks need scope='local': channel pruning is layer-wise")
        # A channel scores the sum of its entries' scores and lives while any entry does.
        scores = [channels.covered_sum(s, m) for s, m in zip(scores, layout.mask_shapes)]
        alive = [channels.covered_sum(a.astype(jnp.int32), m) > 0
                 for a, m in zip(alive, layout.mask_shapes)]
        sparsity, sizes = channels.mask_sparsity(sparsity, True), layout.mask_sizes
    remove = remove_counts(sizes, sparsity, scope)
    keys = positive_keys(scores, alive)
    return layout.scatter(topk_mask(keys, remove, scope, key))


def alive_weights(layout: MaskLayout, params: PyTree) -> list[jax.Array]:
    """``theta != 0`` for every prunable leaf (zeros are weights pruned earlier)."""
    return [t != 0 for t in layout.gather(params)]
