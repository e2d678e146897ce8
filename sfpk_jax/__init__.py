"""sfpk-jax: SFPK pruning (interacting mask particles) for any JAX model.

Prune with :func:`sfpk_prune` (or any pruner by name with :func:`prune`), then
retrain in your own optax loop under :func:`keep_masked`::

    result = sfpk_jax.sfpk_prune(loss_fn, params, batches, sparsity=0.9)
    tx = sfpk_jax.keep_masked(optax.adamw(1e-3), result.masks)

The public API:

* pruning: :func:`sfpk_prune` with :class:`SFPKConfig` (what is computed) and
  :class:`Execution` (how it runs), :class:`CheckpointPolicy`,
  :class:`StatefulLoss`; :func:`prune` and :func:`register_pruner` for every
  pruner by name, :func:`magnitude_prune`; results :class:`SFPKResult` and
  :class:`PruneResult` (both have ``.masks``);
* masks: :func:`apply_masks`, :func:`sparsity_of`, :func:`sparsity_report`,
  :func:`is_n_m` (which kernels break an N:M pattern such as 2:4);
* your own model and loop: :func:`split_nnx`, :func:`split_equinox` (Linen
  needs nothing), :func:`keep_masked` (masked training as an optax
  transformation), :func:`recompute_batch_stats` (batch norm after pruning),
  :func:`save_masked` and :func:`load_masked`;
* errors: :class:`ConfigError`, :class:`ResumeError`, :class:`WorkerError`.

The pure step (``initial_state``, ``sfpk_update``, ``make_stepper``) is in
:mod:`sfpk_jax.sfpk`; layouts and exact top-k in :mod:`sfpk_jax.core`; the
pruner registry's details in :mod:`sfpk_jax.pruners`; datasets, the model
zoo and training loops in :mod:`sfpk_jax.data`, :mod:`sfpk_jax.models` and
:mod:`sfpk_jax.train`, loaded only when imported.
"""

from sfpk_jax.core.masks import apply_masks, sparsity_of
from sfpk_jax.core.n_m import is_n_m
from sfpk_jax.interop import split_equinox, split_nnx
from sfpk_jax.parallel.worker_pool import WorkerError
from sfpk_jax.pruners import PruneResult, magnitude_prune, prune, register_pruner
from sfpk_jax.sfpk import (
    CheckpointPolicy,
    ConfigError,
    Execution,
    ResumeError,
    SFPKConfig,
    SFPKResult,
    StatefulLoss,
    sfpk_prune,
)
from sfpk_jax.tools.export import load_masked, save_masked
from sfpk_jax.tools.sparsity_report import sparsity_report
from sfpk_jax.train.batchnorm import recompute_batch_stats
from sfpk_jax.train.masked import keep_masked

__all__ = [
    "CheckpointPolicy",
    "ConfigError",
    "Execution",
    "PruneResult",
    "ResumeError",
    "SFPKConfig",
    "SFPKResult",
    "StatefulLoss",
    "WorkerError",
    "apply_masks",
    "is_n_m",
    "keep_masked",
    "load_masked",
    "magnitude_prune",
    "prune",
    "recompute_batch_stats",
    "register_pruner",
    "save_masked",
    "sfpk_prune",
    "sparsity_of",
    "sparsity_report",
    "split_equinox",
    "split_nnx",
]

__version__ = "0.1.0"
