"""The SFPK simulation: what it computes, how it runs, its pure step and its host loop.

Most users call :func:`sfpk_jax.sfpk_prune`. This package also holds the pure
step, for those who drive the loop themselves::

    state = initial_state(layout, config)             # dense particles, zero scores
    state, trace = sfpk_update(state, E, grad_E, theta, config=config, target=f)
    stepper = make_stepper(loss_fn, layout, config, f)  # the whole step, compiled

and :func:`spode_prune` (SpODE: one particle, no repulsion).
"""

from sfpk_jax.sfpk.config import SFPKConfig, spode
from sfpk_jax.sfpk.energy import StatefulLoss
from sfpk_jax.sfpk.execution import Execution
from sfpk_jax.sfpk.fields import ConfigError
from sfpk_jax.sfpk.modes import Stepper, make_stepper
from sfpk_jax.sfpk.resume import CheckpointPolicy, ResumeError
from sfpk_jax.sfpk.simulation import sfpk_prune, spode_prune
from sfpk_jax.sfpk.state import SFPKResult, SFPKState, StepTrace, initial_state
from sfpk_jax.sfpk.update import sfpk_update

__all__ = ["CheckpointPolicy", "ConfigError", "Execution", "ResumeError", "SFPKConfig",
           "SFPKResult", "SFPKState", "StatefulLoss", "StepTrace", "Stepper", "initial_state",
           "make_stepper", "sfpk_prune", "sfpk_update", "spode", "spode_prune"]
