"""From a score function to a pruner: the one path every score-based pruner takes.

A score function maps ``(layout, params, batches, key, **options)`` to one
score array per prunable leaf, higher kept. :func:`score_pruner` wraps it
into a registered-pruner signature that builds the layout, scores, and turns
the scores into exact-count masks (or N:M masks, ``mask_dim="2:4"``), never
keeping a weight that is already 0.
"""

from __future__ import annotations

from collections.abc import Callable

from sfpk_jax.core.masks import MaskLayout
from sfpk_jax.core.topk import alive_weights, masks_from_scores
from sfpk_jax.pruners.registry import PruneResult

ScoreFn = Callable[..., list]


def score_pruner(score_fn: ScoreFn, *, tiebreak: bool = True) -> Callable[..., PruneResult]:
    """A pruner (see :mod:`sfpk_jax.pruners.registry`) that keeps the highest scores.

    Args:
      score_fn: ``score_fn(layout, params, batches, key, **options) -> scores``.
      tiebreak: pass ``key`` to the top-k to break exact ties; False keeps
        ties by position (the key may then be the scores' own randomness).

    Returns:
      ``pruner(loss_fn, params, batches, sparsity, *, prunable, scope, key,
      mask_dim, **options) -> PruneResult``.
    """

    def pruner(loss_fn, params, batches, sparsity, *, prunable, scope, key, mask_dim,
               **options) -> PruneResult:
        layout = MaskLayout.from_params(params, prunable, mask_dim)
        scores = score_fn(layout, params, batches, key, loss_fn=loss_fn, **options)
        return PruneResult(masks_from_scores(
            layout, scores, sparsity, scope=scope, key=key if tiebreak else None,
            alive=alive_weights(layout, params)))

    pruner.__doc__ = score_fn.__doc__
    pruner.__name__ = getattr(score_fn, "__name__", "pruner")
    return pruner
