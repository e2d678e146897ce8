"""Every pruner behind one call: ``prune(method, loss_fn, params, batches, sparsity)``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import numpy as np

from sfpk_jax import baselines
from sfpk_jax.config import SFPKConfig
from sfpk_jax.magnitude import magnitude_prune
from sfpk_jax.masks import MaskLayout, Prunable
from sfpk_jax.simulation import SFPKResult, sfpk_prune


class PruneResult(NamedTuple):
    """The masks of a one-shot pruner (a tree mirroring params, None where not pruned)."""

    masks: Any


def _sfpk(loss_fn, params, batches, sparsity, *, prunable, scope, key, mask_dim, config=None,
          init=None, checkpoint=None, mesh=None):
    """SFPK (Mo, Shi & Pan, ICLR 2025), the spec's defaults unless ``config`` says otherwise."""
    config = config or SFPKConfig()
    config = config.replace(scope=scope, mask_dim=mask_dim or config.mask_dim)
    return sfpk_prune(loss_fn, params, batches, sparsity, config, prunable, key, init, checkpoint,
                      mesh)


def _spode(loss_fn, params, batches, sparsity, *, config=None, **kwargs):
    """SpODE (Mo et al., ICML 2023): SFPK with one particle and no repulsion."""
    config = (config or SFPKConfig()).replace(particles=1, repulsion=0.0)
    return _sfpk(loss_fn, params, batches, sparsity, config=config, **kwargs)


def _magnitude(loss_fn, params, batches, sparsity, *, prunable, scope, key, mask_dim):
    """Global (or layer-wise) magnitude pruning; ignores the data."""
    del loss_fn, batches, key
    return PruneResult(magnitude_prune(params, sparsity, prunable, scope, mask_dim))


def _require(method: str, name: str, value: Any, what: str) -> None:
    if value is None:
        raise ValueError(f"{method} needs the option {name}=...: {what}")


def _random(loss_fn, params, batches, sparsity, *, prunable, scope, key, mask_dim):
    """Random scores (the official ``Randn``); ``key`` is required, data ignored."""
    del loss_fn, batches
    _require("random", "key", key, "a PRNG key, e.g. key=jax.random.key(0)")
    layout = MaskLayout.from_params(params, prunable, mask_dim)
    scores = baselines.random_scores(layout, params, key)
    return PruneResult(baselines._masks_from_scores(
        layout, scores, sparsity, scope, None, baselines.alive_weights(layout, params)))


def _snip(loss_fn, params, batches, sparsity, *, prunable, scope, key, mask_dim, num_batches=1):
    """SNIP (Lee et al., ICLR 2019): |dL/dm| over ``num_batches`` batches (all particle slices)."""
    layout = MaskLayout.from_params(params, prunable, mask_dim)
    scores = baselines.snip_scores(loss_fn, params, layout, batches, num_batches)
    return PruneResult(baselines._masks_from_scores(
        layout, scores, sparsity, scope, key, baselines.alive_weights(layout, params)))


def _grasp(loss_fn, params, batches, sparsity, *, prunable, scope, key, mask_dim, logits_fn=None,
           num_batches=1, temperature=baselines.GRASP_TEMPERATURE, input_key="image",
           label_key="label"):
    """GraSP (Wang et al., ICLR 2020): keeps the largest theta * Hg (official sign)."""
    del loss_fn
    _require("grasp", "logits_fn", logits_fn,
             "the model's logits_fn(params, x) -> logits (GraSP divides the logits by T=200)")
    layout = MaskLayout.from_params(params, prunable, mask_dim)
    scores = baselines.grasp_scores(logits_fn, params, layout, batches, num_batches,
                                    temperature=temperature, input_key=input_key,
                                    label_key=label_key)
    return PruneResult(baselines._masks_from_scores(
        layout, scores, sparsity, scope, key, baselines.alive_weights(layout, params)))


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


PRUNERS: dict[str, Callable[..., Any]] = {
    "sfpk": _sfpk,
    "spode": _spode,
    "magnitude": _magnitude,
    "random": _random,
    "snip": _snip,
    "grasp": _grasp,
    "synflow": _synflow,
}


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
    mask_dim: str | None = None,
    **options,
) -> SFPKResult | PruneResult:
    """Prunes ``params`` with the named method.

    Args:
      method: one of :data:`PRUNERS` (``sfpk``, ``spode``, ``magnitude``,
        ``random``, ``snip``, ``grasp``, ``synflow``).
      loss_fn: pure ``loss_fn(params, batch) -> scalar``.
      params: the trained parameter pytree.
      batches: per-step batches with a leading particle axis (SFPK, SpODE,
        SNIP, GraSP; for the last two every particle slice is one mini-batch);
        ignored by data-free methods (SynFlow reads only the input shape).
      sparsity: fraction of prunable entries to remove.
      prunable: leaf selection, as in :func:`sfpk_jax.sfpk_prune`.
      scope: ``global`` or ``local`` (layer-wise) top-k.
      mask_dim: None (unstructured), or ``"out"`` / ``"in"`` to prune whole
        output or input channels (needs ``scope="local"``; every layer keeps
        sqrt(1 - sparsity) of its channels, as the reference does).
      key: PRNG key: the scores of ``random`` (required there); tie-breaking
        for the others (ties go by position without it; magnitude ignores it).
      **options: method options:

        * ``sfpk``, ``spode``: ``config`` (an :class:`SFPKConfig`),
          ``init`` (an earlier result), ``checkpoint`` (a
          :class:`sfpk_jax.resume.CheckpointPolicy`) and ``mesh`` (for
          ``particle_mode="shard"``); ``batches`` may also be
          a function ``start -> iterable`` (see :func:`sfpk_jax.sfpk_prune`).
        * ``snip``: ``num_batches`` (default 1).
        * ``grasp``: ``logits_fn(params, x) -> logits`` (required),
          ``num_batches`` (1), ``temperature`` (200), ``input_key``
          (``"image"``) and ``label_key`` (``"label"``) of the batches.
        * ``synflow``: ``logits_fn(params, x)`` (required), ``input_shape``
          (per example; read from the first batch's ``input_key`` if
          omitted), ``iterations`` (1, as the official code; the paper: 100).

        See :mod:`sfpk_jax.baselines`.

    Returns:
      A result with ``.masks``.
    """
    if method not in PRUNERS:
        raise ValueError(f"unknown pruner {method!r}; choose one of {', '.join(PRUNERS)}")
    return PRUNERS[method](loss_fn, params, batches, sparsity, prunable=prunable, scope=scope,
                           key=key, mask_dim=mask_dim, **options)
