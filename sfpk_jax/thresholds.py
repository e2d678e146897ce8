"""k-th smallest thresholds and exact top-k masks over lists of leaves.

Global scope treats all leaves as one vector; local scope treats each leaf on
its own. Every threshold of the spec (polarizer, hard vote, final mask) is the
k-th smallest value of such a vector, so they all come from here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp


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
    return (rank >= remove) & (scores > 0)


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
        leaf (local scope).
      scope: ``"global"`` or ``"local"``.
      key: optional PRNG key for tie-breaking.

    Returns:
      float32 0/1 arrays shaped like ``scores``.
    """
    def noise(size, i):
        if key is None:
            return jnp.arange(size, dtype=jnp.float32)
        return jax.random.uniform(jax.random.fold_in(key, i), (size,))

    if scope == "global":
        flat = _flat(scores)
        keep = _keep_top(flat, int(remove), noise(flat.size, 0)).astype(jnp.float32)
        splits = list(jnp.cumsum(jnp.asarray([s.size for s in scores]))[:-1])
        parts = jnp.split(keep, [int(x) for x in splits])
        return [p.reshape(s.shape) for p, s in zip(parts, scores)]
    return [
        _keep_top(jnp.ravel(s), int(r), noise(s.size, i)).astype(jnp.float32).reshape(s.shape)
        for i, (s, r) in enumerate(zip(scores, remove))
    ]
