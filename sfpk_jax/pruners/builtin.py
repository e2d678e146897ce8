"""The pruners that ship with sfpk-jax, registered by name.

``sfpk`` and ``spode`` are particle simulations; ``magnitude`` ignores the
data; ``random``, ``snip``, ``grasp`` and ``synflow`` are score functions of
:mod:`sfpk_jax.pruners.baselines` behind the one adapter,
:func:`sfpk_jax.pruners.adapter.score_pruner`. Each docstring names the paper.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sfpk_jax.core.masks import MaskLayout
from sfpk_jax.pruners import baselines
from sfpk_jax.pruners.adapter import score_pruner
from sfpk_jax.pruners.magnitude import magnitude_prune
from sfpk_jax.pruners.registry import PruneResult, register_pruner
from sfpk_jax.sfpk.config import SFPKConfig, spode
from sfpk_jax.sfpk.execution import Execution
from sfpk_jax.sfpk.simulation import sfpk_prune

_SIMULATION = {"needs_data": True, "simulation": True, "particles": None,
               "options": ("config", "execution", "init", "checkpoint", "total_params")}


def _require(method: str, name: str, value: Any, what: str) -> None:
    if value is None:
        raise ValueError(f"{method} needs the option {name}=...: {what}")


@register_pruner("sfpk", **_SIMULATION)
def _sfpk(loss_fn, params, batches, sparsity, *, prunable, scope, key, mask_dim, config=None,
          execution=None, init=None, checkpoint=None, total_params=None):
    """SFPK (Mo, Shi & Pan, ICLR 2025), the spec's defaults unless ``config`` says otherwise.

    ``scope`` is the mask's; the dynamics' scope stays ``config.dynamics_scope``
    (by default global for channel masks, as in the reference's structural mode).
    ``total_params`` is the model's parameter count for channel masks (see
    :func:`sfpk_jax.sfpk_prune`).
    """
    config = config or SFPKConfig()
    config = config.replace(scope=scope, mask_dim=mask_dim or config.mask_dim)
    return sfpk_prune(loss_fn, params, batches, sparsity, config=config,
                      execution=execution or Execution(), prunable=prunable, key=key, init=init,
                      checkpoint=checkpoint, total_params=total_params)


@register_pruner("spode", **{**_SIMULATION, "particles": 1})
def _spode(loss_fn, params, batches, sparsity, *, config=None, **kwargs):
    """SpODE (Mo et al., ICML 2023): SFPK with one particle and no repulsion."""
    return _sfpk(loss_fn, params, batches, sparsity, config=spode(config), **kwargs)


@register_pruner("magnitude")
def _magnitude(loss_fn, params, batches, sparsity, *, prunable, scope, key, mask_dim):
    """Global (or layer-wise) magnitude pruning; ignores the data."""
    del loss_fn, batches, key
    return PruneResult(magnitude_prune(params, sparsity, prunable=prunable, scope=scope,
                                       mask_dim=mask_dim))


def _random_scores(layout, params, batches, key, *, loss_fn):
    """Random scores (the official ``Randn``); ``key`` is required, data ignored."""
    del batches, loss_fn
    _require("random", "key", key, "a PRNG key, e.g. key=jax.random.key(0)")
    return baselines.random_scores(layout, params, key)


def _snip_scores(layout, params, batches, key, *, loss_fn, num_batches=1):
    """SNIP (Lee et al., ICLR 2019): |dL/dm| over ``num_batches`` batches (all particle slices)."""
    del key
    return baselines.snip_scores(loss_fn, params, layout, batches, num_batches)


def _grasp_scores(layout, params, batches, key, *, loss_fn, logits_fn=None, num_batches=1,
                  temperature=baselines.GRASP_TEMPERATURE, input_key="image", label_key="label"):
    """GraSP (Wang et al., ICLR 2020): keeps the largest theta * Hg (official sign)."""
    del key, loss_fn
    _require("grasp", "logits_fn", logits_fn,
             "the model's logits_fn(params, x) -> logits (GraSP divides the logits by T=200)")
    return baselines.grasp_scores(logits_fn, params, layout, batches, num_batches,
                                  temperature=temperature, input_key=input_key,
                                  label_key=label_key)


# Random's key makes the scores; reusing it to break ties would correlate the two.
register_pruner("random", score_pruner(_random_scores, tiebreak=False), needs_key=True)
register_pruner("snip", score_pruner(_snip_scores), needs_data=True, options=("num_batches",))
register_pruner("grasp", score_pruner(_grasp_scores), needs_data=True, needs_logits=True,
                options=("num_batches", "temperature", "input_key", "label_key"))


@register_pruner("synflow", needs_logits=True, needs_input_shape=True,
                 options=("input_key", "iterations"))
def _synflow(loss_fn, params, batches, sparsity, *, prunable, scope, key, mask_dim, logits_fn=None,
             input_shape=None, input_key="image", iterations=1):
    """SynFlow (Tanaka et al., NeurIPS 2020): one shot (official) or ``iterations`` rounds."""
    del loss_fn
    _require("synflow", "logits_fn", logits_fn,
             "the model's logits_fn(params, x) -> output, run on an all-ones input")
    if input_shape is None:
        if batches is None:
            raise ValueError(
                "synflow needs the option input_shape=... (per-example shape, e.g. (32, 32, 3)) "
                "or batches to read it from"
            )
        first = next(iter(batches))
        input_shape = np.shape(first[input_key])[2:]  # (particle, batch, ...)
    layout = MaskLayout.from_params(params, prunable, mask_dim)
    return PruneResult(baselines.synflow_masks(logits_fn, params, layout, input_shape, sparsity,
                                               scope, key, iterations))
