"""Re-estimating batch-norm running statistics after pruning, for any framework.

Masking changes every activation downstream, so the running statistics the
dense model collected no longer fit: right after pruning, a model with batch
norm scores far below what it can. Like torch's
``torch.optim.swa_utils.update_bn``, the statistics are replaced by the plain
average of the per-batch statistics over a few batches.

The model is reached through one function, ``forward(stats, batch) ->
stats``: one training-mode step from the running statistics ``stats`` on
``batch``, returning the updated ones (Flax Linen: ``apply(...,
mutable=["batch_stats"])``; Flax NNX: a merged copy of the model called in
train mode; Equinox: the model vmapped with its ``State``). Every batch norm
updates ``r <- m * r + (1 - m) * s`` with its batch statistic ``s`` and
momentum ``m``; two steps, from ``r = 0`` and from ``r = 1``, give ``(1 - m) s``
and ``m + (1 - m) s``, hence ``m`` and ``s`` exactly, whatever momentum each
layer has. Equinox's ``BatchNorm(mode="batch")`` also counts its steps and
reads ``r / (1 - m^count)``: its count is set as after a long training, so
that it reads the average. Its ``mode="ema"`` normalises with the running
statistics while training, so each layer's statistic depends on the others'
state: that is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _filled(stats: PyTree, value: float) -> PyTree:
    return jax.tree.map(lambda x: jnp.full_like(x, value) if _is_float(x) else x, stats)


def _batch_statistics(forward: Callable, stats: PyTree, batch: Any) -> tuple[PyTree, PyTree, PyTree]:
    """One batch's statistics, the momenta, and the statistics after a step from ``stats``."""
    from_zeros = forward(_filled(stats, 0.0), batch)
    from_ones = forward(_filled(stats, 1.0), batch)
    momentum = jax.tree.map(lambda o, z: o - z if _is_float(z) else None, from_ones, from_zeros)
    statistic = jax.tree.map(lambda z, m: z / (1.0 - m) if _is_float(z) else z,
                             from_zeros, momentum)
    return statistic, momentum, forward(stats, batch)


def recompute_batch_stats(forward: Callable[[PyTree, Any], PyTree], stats: PyTree,
                          batches: Iterable[Any]) -> PyTree:
    """The running batch-norm statistics re-estimated as the average of per-batch statistics.

    Example (a Flax Linen layer; docs/your_model.md has Linen, NNX and Equinox models):

    >>> import flax.linen as nn, jax, jax.numpy as jnp, sfpk_jax
    >>> model = nn.BatchNorm(use_running_average=False, momentum=0.9)
    >>> variables = model.init(jax.random.key(0), jnp.ones((8, 3)))
    >>> def forward(stats, x):  # one training-mode step; returns the new statistics
    ...     _, new = model.apply({**variables, "batch_stats": stats}, x, mutable=["batch_stats"])
    ...     return new["batch_stats"]
    >>> x = 1.0 + jax.random.normal(jax.random.key(1), (2, 8, 3))  # two batches of 8
    >>> stats = sfpk_jax.recompute_batch_stats(forward, variables["batch_stats"], x)
    >>> bool(jnp.allclose(stats["mean"], x.mean(axis=(0, 1)), atol=1e-5))  # both batches alike
    True

    Args:
      forward: ``forward(stats, batch) -> stats``: one training-mode step of
        the model from the running statistics ``stats`` on ``batch``,
        returning the updated statistics (any pytree of the model's batch
        norms, e.g. Linen's ``batch_stats`` collection).
      stats: the current running statistics (their structure and dtypes).
      batches: a few training batches, as ``forward`` takes them.

    Returns:
      ``stats`` with every float leaf the equal-weight mean, over the
      batches, of its per-batch statistic; step counters (integer leaves a
      step moves) at :data:`LONG_TRAINING`; other leaves as they were.

    Raises:
      ValueError: ``batches`` is empty; a batch norm's momentum is about 1
        (its statistics never move); or the statistics of one batch norm
        depend on another's running state (Equinox's ``mode="ema"``: use
        ``mode="batch"``).
    """
    step = jax.jit(lambda s, b: _batch_statistics(forward, s, b))
    total, count, momentum, last = None, 0, None, None
    for batch in batches:
        statistic, momentum, last = step(stats, batch)
        total = statistic if total is None else jax.tree.map(jnp.add, total, statistic)
        count += 1
    if count == 0:
        raise ValueError("batches is empty: pass at least one batch of training data")
    _check_momentum(momentum)
    return jax.tree.map(lambda old, t, new: t / count if _is_float(t) else _counter(old, new),
                        stats, total, last)


def _check_momentum(momentum: PyTree) -> None:
    """Each leaf's entries share one momentum in [0, 1): else the statistics cannot be read."""
    for path, m in jax.tree_util.tree_flatten_with_path(momentum)[0]:
        m = np.asarray(m)
        if not m.size:
            continue
        if np.ptp(m) > 1e-3 or not 0.0 <= float(m.flat[0]) <= 1.0 + 1e-4:
            raise ValueError(
                f"the statistics at {jax.tree_util.keystr(path)} depend on the running "
                "statistics of other batch norms (a step from all zeros and one from all ones "
                "do not differ by one momentum): a batch norm that normalises with its running "
                "statistics while training, as Equinox's BatchNorm(mode='ema'), cannot be "
                "re-estimated; use BatchNorm(mode='batch')")
        if float(np.max(m)) > 1.0 - 1e-4:
            raise ValueError(
                f"a batch-norm layer has momentum {float(np.max(m)):.6f} (about 1): its running "
                "statistics never move, so they cannot be re-estimated")


# A step counter's value after re-estimation: as after a long training, so that a
# zero-debiased reading r / (1 - m^count) is r (0.99^(2^30) is 0 in floats).
LONG_TRAINING = 2**30


def _counter(old, new):
    """An integer leaf: a counter a step moved is set to :data:`LONG_TRAINING`."""
    moved = jnp.issubdtype(jnp.result_type(old), jnp.integer) and not np.array_equal(old, new)
    return jnp.full_like(new, LONG_TRAINING) if moved else new


def zoo_forward(apply_fn: Callable, variables: dict) -> Callable[[PyTree, Any], PyTree]:
    """The ``forward`` of :func:`recompute_batch_stats` for a model of the zoo's convention.

    Args:
      apply_fn: ``apply_fn(variables, x, train) -> (logits, updated_variables)``
        (see :func:`sfpk_jax.models.build`).
      variables: the model's variables, with a ``batch_stats`` collection.

    Returns:
      ``forward(batch_stats, batch) -> batch_stats``; ``batch`` is an image
      array or a dict with an ``"image"`` entry.
    """
    def forward(stats, batch):
        images = batch["image"] if isinstance(batch, dict) else batch
        _, updated = apply_fn({**variables, "batch_stats": stats}, images, True)
        return updated["batch_stats"]

    return forward
