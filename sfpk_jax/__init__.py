"""sfpk-jax: SFPK pruning (interacting mask particles) for any Flax model."""

from sfpk_jax.config import SFPKConfig, spode_config
from sfpk_jax.magnitude import magnitude_prune
from sfpk_jax.pruners import PRUNERS, PruneResult, prune
from sfpk_jax.masks import (
    MaskLayout,
    apply_masks,
    count_prunable,
    density,
    ones_like_masks,
)
from sfpk_jax.resume import CheckpointPolicy, ResumeError
from sfpk_jax.simulation import (
    SFPKResult,
    SFPKState,
    StepTrace,
    make_stepper,
    sfpk_prune,
    sfpk_update,
    spode_prune,
)

__all__ = [
    "CheckpointPolicy",
    "MaskLayout",
    "PRUNERS",
    "PruneResult",
    "ResumeError",
    "SFPKConfig",
    "SFPKResult",
    "SFPKState",
    "StepTrace",
    "apply_masks",
    "count_prunable",
    "density",
    "magnitude_prune",
    "make_stepper",
    "ones_like_masks",
    "prune",
    "sfpk_prune",
    "sfpk_update",
    "spode_config",
    "spode_prune",
]

__version__ = "0.1.0"
