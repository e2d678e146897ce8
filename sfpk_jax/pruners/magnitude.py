"""Magnitude pruning: keep the largest |theta| (the classic baseline)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from sfpk_jax.core.channels import MaskDim
from sfpk_jax.core.masks import MaskLayout, Prunable
from sfpk_jax.core.topk import Scope, alive_weights, masks_from_scores


def magnitude_scores(layout: MaskLayout, params: Any) -> list:
    """|theta| per prunable leaf (the official ``Mag``: ``w.abs()``, top kept)."""
    return [jnp.abs(t) for t in layout.gather(params)]


def magnitude_prune(
    params: Any,
    sparsity: float,
    *,
    prunable: Prunable = None,
    scope: Scope = "global",
    mask_dim: MaskDim | str | None = None,
) -> Any:
    """0/1 masks keeping the ``1 - sparsity`` fraction of largest |theta|.

    Example:

    >>> import jax.numpy as jnp, sfpk_jax
    >>> params = {"dense": {"kernel": jnp.array([[0.1, -2.0], [0.5, 3.0]])}}
    >>> sfpk_jax.magnitude_prune(params, 0.5)["dense"]["kernel"]
    Array([[0., 1.],
           [0., 1.]], dtype=float32)

    Args:
      params: the parameter pytree.
      sparsity: fraction of prunable entries to remove, in (0, 1).
      prunable: leaf selection, as in :func:`sfpk_jax.sfpk_prune`.
      scope: ``global`` (one threshold over all layers) or ``local`` (every
        layer keeps the same fraction).
      mask_dim: None, or ``"out"`` / ``"in"`` to remove whole channels (with
        ``scope="local"``): a channel scores its summed |theta|; or ``"N:M"``
        (``"2:4"``, say; any scope, and ``sparsity`` must be 1 - N/M): every
        group of M consecutive weights along a kernel's input axis keeps its
        N largest |theta| (see :mod:`sfpk_jax.core.n_m`). Both need the
        kernels' axes: pass ``prunable=`` the model's layers
        (:func:`sfpk_jax.core.layers.trace_layers`), or a regex of rank-2
        ``kernel`` / ``weight`` leaves.

    Returns:
      A mask tree mirroring ``params`` (None where not pruned); the kept
      count is exact, as for SFPK (ties go by position; zero weights are
      never kept).
    """
    layout = MaskLayout.from_params(params, prunable, mask_dim)
    return masks_from_scores(layout, magnitude_scores(layout, params), sparsity, scope=scope,
                             alive=alive_weights(layout, params))
