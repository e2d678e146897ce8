"""The losses the library trains and prunes with: cross-entropy, and the loss of params alone."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

from sfpk_jax.core.layers import Layers, trace_layers
from sfpk_jax.sfpk.energy import StatefulLoss

if TYPE_CHECKING:  # the model registry loads only when a model is built
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


@dataclasses.dataclass(frozen=True)
class TrainingLoss:
    """``fn(params, batch, state)``: the training-mode loss of a model, its state explicit.

    Equal (and hashing alike) for the same ``apply_fn``, so that
    :func:`sfpk_jax.sfpk_prune` reuses its compiled step across calls whose
    variables differ (see :class:`sfpk_jax.sfpk.energy.StatefulLoss`).

    Attributes:
      apply_fn: ``apply_fn(variables, x, train) -> (logits, updated_variables)``.
    """

    apply_fn: ApplyFn

    def __call__(self, params: PyTree, batch: dict, state: dict) -> jax.Array:
        logits, _ = self.apply_fn({**state, "params": params}, batch["image"], True)
        return cross_entropy(logits, batch["label"])


def make_loss_fn(apply_fn: ApplyFn, variables: dict) -> StatefulLoss:
    """The training-mode loss as a function of the parameters alone.

    Batch norm normalises with the batch's statistics (training mode); the
    running statistics in ``variables`` are neither used nor changed.

    Args:
      apply_fn: ``apply_fn(variables, x, train) -> (logits, updated_variables)``.
      variables: model variables; everything except ``params`` is held fixed.

    Returns:
      ``loss_fn(params, batch) -> scalar`` where ``batch`` holds ``"image"``
      and ``"label"``: a :class:`~sfpk_jax.sfpk.energy.StatefulLoss` whose
      state is every collection but ``params``, so that SFPK compiles its
      step once for every call with the same ``apply_fn``.
    """
    state = {k: v for k, v in variables.items() if k != "params"}
    return StatefulLoss(TrainingLoss(apply_fn), state)


def layers_of(apply_fn: ApplyFn, variables: dict, image_shape: tuple[int, ...]) -> Layers:
    """The layers of a model of the zoo's convention (what channel masks need).

    Read off its training loss (:func:`make_loss_fn`) on shapes alone:
    ``variables`` may be ``jax.ShapeDtypeStruct`` leaves, and nothing is
    computed.

    Args:
      apply_fn: ``apply_fn(variables, x, train) -> (logits, updated_variables)``.
      variables: its variables (arrays or shapes).
      image_shape: one example's shape, e.g. ``(32, 32, 3)``.

    Returns:
      The :class:`~sfpk_jax.core.layers.Layers`.
    """
    batch = {"image": jax.ShapeDtypeStruct((2, *image_shape), jnp.float32),
             "label": jax.ShapeDtypeStruct((2,), jnp.int32)}
    state = {k: v for k, v in variables.items() if k != "params"}
    loss = TrainingLoss(apply_fn)
    # The state goes in as an argument, beside the batch: shapes cannot be closed over.
    return trace_layers(lambda params, both: loss(params, *both), variables["params"],
                        (batch, state))
