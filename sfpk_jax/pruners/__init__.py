"""Pruners by name: the registry, the score-to-mask adapter and the built-in pruners.

* :func:`prune` runs any registered pruner by name; :func:`names` lists them
  and :func:`spec` says what one needs (data, a ``logits_fn``, ...).
* :func:`register_pruner` adds one; :func:`score_pruner` turns a score
  function into one, through :func:`masks_from_scores` (exact-count top-k,
  or every group's top N for N:M masks).
* Every pruner returns a :class:`PruningResult`: :class:`PruneResult`, or
  :class:`sfpk_jax.SFPKResult` for the particle simulations.
"""

from sfpk_jax.core.topk import masks_from_scores
from sfpk_jax.pruners import builtin as _builtin  # noqa: F401  (registers the built-in pruners)
from sfpk_jax.pruners.adapter import score_pruner
from sfpk_jax.pruners.magnitude import magnitude_prune
from sfpk_jax.pruners.registry import (
    PruneResult,
    PrunerOutputError,
    PrunerSpec,
    PruningResult,
    names,
    prune,
    register_pruner,
    spec,
    unregister_pruner,
)

__all__ = ["PruneResult", "PrunerOutputError", "PrunerSpec", "PruningResult", "magnitude_prune",
           "masks_from_scores", "names", "prune", "register_pruner", "score_pruner", "spec",
           "unregister_pruner"]
