"""Re-estimating batch-norm running statistics after masking.

Masking changes every activation downstream, so the running statistics
collected by the dense model no longer match. Like torch's
``torch.optim.swa_utils.update_bn``, the statistics are reset and replaced by
the plain average of the per-batch statistics over a few batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sfpk_jax.models.registry import ApplyFn

PyTree = Any


def _batch_statistics(apply_fn: ApplyFn, variables: dict, images: jax.Array) -> tuple[PyTree, PyTree]:
    """Per-batch statistics and BN momenta, recovered from two train-mode runs.

    Flax updates ``ra <- m * ra + (1 - m) * s``. Starting from ``ra = 0`` gives
    ``(1 - m) * s``; starting from ``ra = 1`` gives ``m + (1 - m) * s``. Their
    difference is ``m``, whatever momentum each layer was built with.
    """

    def run(fill: float) -> PyTree:
        stats = jax.tree.map(lambda a: jnp.full_like(a, fill), variables["batch_stats"])
        _, updated = apply_fn({**variables, "batch_stats": stats}, images, True)
        return updated["batch_stats"]

    from_zeros, from_ones = run(0.0), run(1.0)
    momentum = jax.tree.map(jnp.subtract, from_ones, from_zeros)
    stats = jax.tree.map(lambda z, m: z / (1.0 - m), from_zeros, momentum)
    return stats, momentum


def _images(batch: Any) -> Any:
    return batch["image"] if isinstance(batch, Mapping) else batch


def _check_momentum(momentum: PyTree) -> None:
    # A momentum of 1 freezes the running statistics: the batch statistic
    # cannot be recovered (and the layer would ignore it anyway).
    worst = max(float(np.max(np.asarray(m))) for m in jax.tree_util.tree_leaves(momentum))
    if worst > 1.0 - 1e-4:
        raise ValueError(
            f"a batch-norm layer has momentum {worst:.6f} (about 1): its running "
            "statistics never move, so they cannot be re-estimated"
        )


def recompute_batch_stats(apply_fn: ApplyFn, variables: dict, images_iterable: Iterable[Any]) -> dict:
    """Replaces the running statistics by the average of per-batch statistics.

    Args:
      apply_fn: ``apply_fn(variables, x, train) -> (logits, updated_variables)``
        as returned by :func:`sfpk_jax.models.build`.
      variables: the (typically masked) model variables.
      images_iterable: batches of images, or batch dicts with an ``"image"``
        entry (as yielded by :func:`sfpk_jax.data.batch_iterator`).

    Returns:
      ``variables`` with ``batch_stats`` set to the equal-weight mean over the
      batches of each layer's batch mean and variance; ``variables``
      unchanged when the model has no batch norm.
    """
    if "batch_stats" not in variables:
        return variables
    per_batch = jax.jit(lambda v, x: _batch_statistics(apply_fn, v, x))
    total, count, momentum = None, 0, None
    for batch in images_iterable:
        stats, momentum = per_batch(variables, _images(batch))
        total = stats if total is None else jax.tree.map(jnp.add, total, stats)
        count += 1
    if count == 0:
        raise ValueError("images_iterable is empty: pass at least one batch of training images")
    _check_momentum(momentum)
    return {**variables, "batch_stats": jax.tree.map(lambda t: t / count, total)}
