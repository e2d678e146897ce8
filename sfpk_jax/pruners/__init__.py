"""Pruners by name: the registry, the score-to-mask adapter and the built-in pruners."""

from sfpk_jax.pruners import builtin as _builtin  # noqa: F401  (registers the built-in pruners)
from sfpk_jax.pruners.adapter import score_pruner
from sfpk_jax.pruners.magnitude import magnitude_prune
from sfpk_jax.pruners.registry import PRUNERS, PruneResult, PrunerSpec, prune, register_pruner, spec

__all__ = ["PRUNERS", "PruneResult", "PrunerSpec", "magnitude_prune", "prune", "register_pruner",
           "score_pruner", "spec"]
