"""Every pruner behind one call: ``prune(method, loss_fn, params, batches, sparsity)``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax

from sfpk_jax.config import SFPKConfig
from sfpk_jax.magnitude import magnitude_prune
from sfpk_jax.masks import Prunable
from sfpk_jax.simulation import SFPKResult, sfpk_prune


class PruneResult(NamedTuple):
    """The masks of a one-shot pruner (a tree mirroring params, None where not pruned)."""

    masks: Any


def _sfpk(loss_fn, params, batches, sparsity, *, prunable, scope, key, config=None, init=None):
    """SFPK (Mo, Shi & Pan, ICLR 2025), the spec's defaults unless ``config`` says otherwise."""
    config = (config or SFPKConfig()).replace(scope=scope)
    return sfpk_prune(loss_fn, params, batches, sparsity, config, prunable, key, init)


def _spode(loss_fn, params, batches, sparsity, *, config=None, **kwargs):
    """SpODE (Mo et al., ICML 2023): SFPK with one particle and no repulsion."""
    config = (config or SFPKConfig()).replace(particles=1, repulsion=0.0)
    return _sfpk(loss_fn, params, batches, sparsity, config=config, **kwargs)


def _magnitude(loss_fn, params, batches, sparsity, *, prunable, scope, key):
    """Global (or layer-wise) magnitude pruning; ignores the data."""
    del loss_fn, batches, key
    return PruneResult(magnitude_prune(params, sparsity, prunable, scope))


PRUNERS: dict[str, Callable[..., Any]] = {"sfpk": _sfpk, "spode": _spode, "magnitude": _magnitude}


def prune(
    method: str,
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batches: Iterable[Any] | None,
    sparsity: float,
    *,
    prunable: Prunable = None,
    scope: str = "global",
    key: jax.Array | None = None,
    **options,
) -> SFPKResult | PruneResult:
    """Prunes ``params`` with the named method.

    Args:
      method: one of :data:`PRUNERS` (``sfpk``, ``spode``, ``magnitude``).
      loss_fn: pure ``loss_fn(params, batch) -> scalar``.
      params: the trained parameter pytree.
      batches: per-step batches with a leading particle axis (SFPK, SpODE);
        ignored by data-free methods.
      sparsity: fraction of prunable entries to remove.
      prunable: leaf selection, as in :func:`sfpk_jax.sfpk_prune`.
      scope: ``global`` or ``local`` (layer-wise) top-k.
      key: PRNG key (tie-breaking for SFPK).
      **options: method options: ``config`` (an :class:`SFPKConfig`) and
        ``init`` (an earlier result) for ``sfpk`` and ``spode``.

    Returns:
      A result with ``.masks``.
    """
    if method not in PRUNERS:
        raise ValueError(f"unknown pruner {method!r}; choose one of {', '.join(PRUNERS)}")
    return PRUNERS[method](loss_fn, params, batches, sparsity, prunable=prunable, scope=scope,
                           key=key, **options)
