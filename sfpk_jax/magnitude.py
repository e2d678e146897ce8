"""Magnitude pruning: keep the largest |theta| (the classic baseline)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from sfpk_jax import thresholds
from sfpk_jax.config import SCOPES
from sfpk_jax.masks import MaskLayout, Prunable
from sfpk_jax.simulation import check_sparsity


def magnitude_prune(
    params: Any, sparsity: float, prunable: Prunable = None, scope: str = "global"
) -> Any:
    """0/1 masks keeping the ``1 - sparsity`` fraction of largest |theta|.

    Args:
      params: the parameter pytree.
      sparsity: fraction of prunable entries to remove, in (0, 1).
      prunable: leaf selection, as in :func:`sfpk_jax.sfpk_prune`.
      scope: ``global`` (one threshold over all layers) or ``local`` (every
        layer keeps the same fraction).

    Returns:
      A mask tree mirroring ``params`` (None where not pruned); the kept
      count is exact, as for SFPK.
    """
    sparsity = check_sparsity(sparsity)
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not one of {SCOPES}")
    layout = MaskLayout.from_params(params, prunable)
    scores = [jnp.abs(t) for t in layout.gather(params)]
    remove = thresholds.remove_counts(layout.sizes, sparsity, scope)
    return layout.scatter(thresholds.topk_mask(scores, remove, scope))
