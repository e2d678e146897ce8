"""The losses the library trains and prunes with: cross-entropy, and the loss of params alone."""

from __future__ import annotations

from typing import Any

import jax
import optax

from sfpk_jax.models import ApplyFn

PyTree = Any


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy against integer labels.

    Args:
      logits: ``(batch, classes)``.
      labels: ``(batch,)`` integer class indices.
      label_smoothing: mass spread uniformly over the classes, in [0, 1).

    Returns:
      The scalar mean loss.
    """
    if label_smoothing > 0.0:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        return optax.softmax_cross_entropy(logits, targets).mean()
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_loss_fn(apply_fn: ApplyFn, variables: dict):
    """The training-mode loss as a function of the parameters alone.

    Batch norm normalises with the batch's statistics (training mode); the
    running statistics in ``variables`` are neither used nor changed.

    Args:
      apply_fn: ``apply_fn(variables, x, train) -> (logits, updated_variables)``.
      variables: model variables; everything except ``params`` is held fixed.

    Returns:
      ``loss_fn(params, batch) -> scalar`` where ``batch`` holds ``"image"``
      and ``"label"``.
    """

    def loss_fn(params: PyTree, batch: dict) -> jax.Array:
        logits, _ = apply_fn({**variables, "params": params}, batch["image"], True)
        return cross_entropy(logits, batch["label"])

    return loss_fn
