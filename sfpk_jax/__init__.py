"""sfpk-jax: SFPK pruning (interacting mask particles) for any JAX model.

The public API, by layer (the README's "How the code is laid out" says where
each idea lives):

* masks: :class:`MaskLayout`, :func:`apply_masks`, :func:`density`,
  :func:`count_prunable`, :func:`ones_like_masks`, :func:`masks_from_scores`;
* SFPK: :class:`SFPKConfig`, :func:`sfpk_prune`, :func:`spode_prune` and
  the pure step (:func:`initial_state`, :func:`sfpk_update`,
  :func:`make_stepper`, :class:`SFPKState`, :class:`StepTrace`), a loss
  with explicit batch-norm state (:class:`StatefulLoss`), results
  (:class:`SFPKResult`) and checkpoints (:class:`CheckpointPolicy`);
* pruners by name: :func:`prune`, :func:`register_pruner`,
  :func:`magnitude_prune`;
* your own model and loop: :func:`split_nnx`, :func:`split_equinox` (Linen
  needs nothing), :func:`keep_masked` (masked training as an optax
  transformation), :func:`density_report`, :func:`save_masked` and
  :func:`load_masked` (safetensors).
"""

from sfpk_jax.core.masks import (
    MaskLayout,
    apply_masks,
    count_prunable,
    density,
    ones_like_masks,
)
from sfpk_jax.core.topk import masks_from_scores
from sfpk_jax.interop import split_equinox, split_nnx
from sfpk_jax.pruners import (
    PRUNERS,
    PruneResult,
    PrunerSpec,
    magnitude_prune,
    prune,
    register_pruner,
)
from sfpk_jax.sfpk.checkpointing import CheckpointPolicy, ResumeError
from sfpk_jax.sfpk.config import SFPKConfig, spode_config
from sfpk_jax.sfpk.energy import StatefulLoss
from sfpk_jax.sfpk.modes import make_stepper
from sfpk_jax.sfpk.simulation import sfpk_prune, spode_prune
from sfpk_jax.sfpk.state import SFPKResult, SFPKState, StepTrace, initial_state
from sfpk_jax.sfpk.update import sfpk_update
from sfpk_jax.tools.export import load_masked, save_masked
from sfpk_jax.tools.report import density_report
from sfpk_jax.train.masked import keep_masked

__all__ = [
    "CheckpointPolicy",
    "MaskLayout",
    "PRUNERS",
    "PruneResult",
    "PrunerSpec",
    "ResumeError",
    "SFPKConfig",
    "SFPKResult",
    "SFPKState",
    "StatefulLoss",
    "StepTrace",
    "apply_masks",
    "count_prunable",
    "density",
    "density_report",
    "initial_state",
    "keep_masked",
    "load_masked",
    "magnitude_prune",
    "make_stepper",
    "masks_from_scores",
    "ones_like_masks",
    "prune",
    "register_pruner",
    "save_masked",
    "sfpk_prune",
    "sfpk_update",
    "split_equinox",
    "split_nnx",
    "spode_config",
    "spode_prune",
]

__version__ = "0.1.0"
