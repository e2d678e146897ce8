"""Splitting an NNX or Equinox model into the params to prune and a rebuild function.

The params are a plain pytree that every part of the library takes as it
is; ``merge(params)`` rebuilds the model around them, so a pure
``loss_fn(params, batch)`` can call the model and ``merge(apply_masks(params,
masks))`` writes a pruned model back. Batch norm: run the rebuilt model in
training mode inside the loss, as the spec asks; the running statistics
that it updates belong to the rebuilt copy (NNX) or to the state the loss
returns and drops (Equinox), so the caller's stay unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

PyTree = Any


class SplitModel(NamedTuple):
    """A model as the params to prune and the function that rebuilds it.

    Attributes:
      params: the trainable arrays, a pytree (``nnx.State`` of ``nnx.Param``,
        or the array part of an Equinox module with ``None`` elsewhere).
      merge: ``merge(params) -> model``, a new model holding ``params``.
    """

    params: PyTree
    merge: Callable[[PyTree], Any]


def split_nnx(model) -> SplitModel:
    """Splits a Flax NNX module into its ``nnx.Param`` state and a rebuild function.

    Example:

    >>> import sfpk_jax
    >>> from flax import nnx
    >>> model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    >>> split = sfpk_jax.split_nnx(model)
    >>> masks = sfpk_jax.magnitude_prune(split.params, 0.5, prunable="kernel$")
    >>> pruned = split.merge(sfpk_jax.apply_masks(split.params, masks))  # a new model
    >>> int((pruned.kernel[...] == 0).sum()), int((model.kernel[...] == 0).sum())
    (4, 0)

    Args:
      model: an ``nnx.Module``. Call ``model.train()`` first so that the
        rebuilt models normalise with batch statistics in the loss.

    Returns:
      A :class:`SplitModel`; ``merge`` copies the non-parameter state (batch
      statistics, RNG counters), so calling a rebuilt model in a jitted loss
      never writes into ``model``. ``nnx.update(model, params)`` writes
      (masked) params back into ``model`` itself.
    """
    from flax import nnx  # only users of NNX need it loaded

    if not isinstance(model, nnx.Module):
        raise TypeError(f"split_nnx takes an nnx.Module, got {type(model).__name__}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return SplitModel(params, lambda p: nnx.merge(graphdef, p, rest, copy=True))


def split_equinox(model) -> SplitModel:
    """Splits an Equinox module into its floating-point arrays and a rebuild function.

    Example:

    >>> import equinox as eqx, jax, sfpk_jax
    >>> model = eqx.nn.Linear(4, 2, key=jax.random.key(0))
    >>> split = sfpk_jax.split_equinox(model)
    >>> masks = sfpk_jax.magnitude_prune(split.params, 0.5, prunable="weight$")
    >>> pruned = split.merge(sfpk_jax.apply_masks(split.params, masks))
    >>> int((pruned.weight == 0).sum())
    4

    Args:
      model: an ``eqx.Module``. Stateful layers (``eqx.nn.BatchNorm``) keep
        their running statistics in the separate ``eqx.nn.State``: a loss
        that calls the model in training mode and drops the returned state
        leaves them unchanged.

    Returns:
      A :class:`SplitModel` from ``eqx.partition(model, eqx.is_inexact_array)``;
      ``merge`` is ``eqx.combine`` with the static part.
    """
    import equinox as eqx  # an optional dependency: only its users need it

    if not isinstance(model, eqx.Module):
        raise TypeError(f"split_equinox takes an eqx.Module, got {type(model).__name__}")
    params, static = eqx.partition(model, eqx.is_inexact_array)
    return SplitModel(params, lambda p: eqx.combine(p, static))
