"""The registry of pruners by name, and ``prune(method, ...)`` that runs any of them.

A pruner is a function with the signature of :data:`PrunerFn`::

    fn(loss_fn, params, batches, sparsity, *, prunable, scope, key, mask_dim, **options)
        -> a result with ``.masks`` (a mask tree mirroring params)

registered with what it needs (:class:`PrunerSpec`), so that a caller such
as the experiment harness can prepare exactly that: data, a ``logits_fn``,
the input shape, or the options of a particle simulation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import numpy as np

from sfpk_jax.core import n_m
from sfpk_jax.core.channels import MaskDim
from sfpk_jax.core.layers import layers_from_batches
from sfpk_jax.core.mask_checks import named_masks
from sfpk_jax.core.masks import MaskLayout, Prunable
from sfpk_jax.core.topk import Scope, check_sparsity

PrunerFn = Callable[..., "PruningResult"]


@runtime_checkable
class PruningResult(Protocol):
    """What every pruner returns: at least the masks.

    :class:`PruneResult` (one-shot pruners) and :class:`sfpk_jax.SFPKResult`
    (SFPK and SpODE, which also carry scores, particles and trace) both
    follow it, and so must a pruner added with :func:`register_pruner`.

    Attributes:
      masks: 0/1 float32 masks, a tree mirroring the params (None at leaves
        that are not pruned; channel masks broadcast over their kernels).
    """

    @property
    def masks(self) -> Any: ...


class PrunerOutputError(ValueError):
    """A pruner returned something that is not a result with 0/1 masks fitting the params.

    Attributes:
      pruner: the pruner's registered name.
    """

    def __init__(self, pruner: str, problem: str):
        super().__init__(f"pruner {pruner!r} returned {problem}")
        self.pruner = pruner


class PruneResult(NamedTuple):
    """What a one-shot pruner returns (a :class:`PruningResult`).

    Attributes:
      masks: the mask tree mirroring params, None where not pruned.
    """

    masks: Any


class PrunerSpec(NamedTuple):
    """A registered pruner and what it needs from its caller.

    Attributes:
      fn: the pruner (signature :data:`PrunerFn`).
      needs_data: it reads ``batches`` (leading particle axis on every leaf).
      simulation: a particle simulation (SFPK-like): it takes the options
        ``config``, ``execution``, ``init`` and ``checkpoint``, ``batches`` may be
        a function ``start -> iterable``, and it returns an
        :class:`sfpk_jax.SFPKResult`.
      particles: the leading axis of its batches: an int, or None for the
        ``particles`` of its ``config``.
      needs_logits: it needs the option ``logits_fn(params, x) -> logits``.
      needs_input_shape: it needs the option ``input_shape`` (per example).
      needs_key: it needs ``key`` (a PRNG key).
      options: the names of the further options it accepts.
    """

    fn: PrunerFn
    needs_data: bool = False
    simulation: bool = False
    particles: int | None = 1
    needs_logits: bool = False
    needs_input_shape: bool = False
    needs_key: bool = False
    options: tuple[str, ...] = ()


_REGISTRY: dict[str, PrunerSpec] = {}


def register_pruner(name: str, fn: PrunerFn | None = None, **needs) -> Any:
    """Registers ``fn`` under ``name`` for :func:`prune` (and so for the experiments).

    Args:
      name: the pruner's name; an existing name is refused.
      fn: the pruner (signature :data:`PrunerFn`). Without it, returns a
        decorator.
      **needs: the fields of :class:`PrunerSpec` besides ``fn``, e.g.
        ``needs_data=True``.

    Returns:
      ``fn`` (or the decorator).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a pruner's name must be a non-empty string, got {name!r}")
    if fn is None:
        return lambda f: register_pruner(name, f, **needs)
    if name in _REGISTRY:
        raise ValueError(f"a pruner named {name!r} is already registered; choose another name")
    if not callable(fn):
        raise TypeError(f"pruner {name!r} must be callable, got {type(fn).__name__}")
    unknown = set(needs) - set(PrunerSpec._fields[1:])
    if unknown:
        raise TypeError(f"unknown pruner needs {sorted(unknown)}; choose from "
                        f"{', '.join(PrunerSpec._fields[1:])}")
    _REGISTRY[name] = PrunerSpec(fn, **needs)
    return fn


def unregister_pruner(name: str) -> None:
    """Removes the pruner registered as ``name`` (e.g. one a test added).

    Raises:
      ValueError: no pruner of that name is registered.
    """
    spec(name)
    del _REGISTRY[name]


def names() -> tuple[str, ...]:
    """The registered pruners' names, in the order they were registered."""
    return tuple(_REGISTRY)


def spec(method: str) -> PrunerSpec:
    """The registered :class:`PrunerSpec` of ``method``.

    Raises:
      ValueError: no pruner of that name is registered.
    """
    if method not in _REGISTRY:
        raise ValueError(f"unknown pruner {method!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[method]


def prune(
    method: str,
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batches: Iterable[Any] | None,
    sparsity: float,
    *,
    prunable: Prunable = None,
    scope: Scope = "global",
    key: jax.Array | None = None,
    mask_dim: MaskDim | str | None = None,
    **options,
) -> PruningResult:
    """Prunes ``params`` with the named method.

    Example:

    >>> import jax, sfpk_jax
    >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (8, 4)),
    ...                     "bias": jax.random.normal(jax.random.key(1), (4,))}}
    >>> result = sfpk_jax.prune("random", None, params, None, 0.5, key=jax.random.key(2))
    >>> sfpk_jax.sparsity_of(result.masks)
    0.5

    Args:
      method: a registered name: ``sfpk``, ``spode``, ``magnitude``,
        ``random``, ``snip``, ``grasp``, ``synflow``, or one added with
        :func:`register_pruner`.
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
        sqrt(1 - sparsity) of its channels, as the reference does). The
        model's layers are then read off ``loss_fn`` on the first batch
        (which ``batches`` must hold, unless ``prunable`` gives them): the
        classes and the input channels are kept, and biases follow their
        kernels (see :mod:`sfpk_jax.core.selection`). Or ``"N:M"`` with
        0 < N < M (``"2:4"``, say): every group of M consecutive weights
        along a kernel's input axis keeps its N highest scores, in any scope;
        ``sparsity`` must then be 1 - N/M. The layers are read off the loss
        as for channel masks; the input layers and every leaf that is no
        kernel (biases, norms) stay dense (see :mod:`sfpk_jax.core.n_m`).
      key: PRNG key: the scores of ``random`` (required there); tie-breaking
        for the others (ties go by position without it; magnitude ignores it).
      **options: method options:

        * ``sfpk``, ``spode``: ``config`` (an :class:`sfpk_jax.SFPKConfig`),
          ``execution`` (an :class:`sfpk_jax.Execution`), ``init`` (an
          earlier result), ``checkpoint`` (a :class:`sfpk_jax.CheckpointPolicy`)
          and ``total_params`` (the model's parameter count, for channel
          masks); ``batches`` may also be a function ``start -> iterable``
          (see :func:`sfpk_jax.sfpk_prune`).
        * ``snip``: ``num_batches`` (default 1).
        * ``grasp``: ``logits_fn(params, x) -> logits`` (required),
          ``num_batches`` (1), ``temperature`` (200), ``input_key``
          (``"image"``) and ``label_key`` (``"label"``) of the batches.
        * ``synflow``: ``logits_fn(params, x)`` (required), ``input_shape``
          (per example; read from the first batch's ``input_key`` if
          omitted), ``iterations`` (1, as the official code; the paper: 100).

        See :mod:`sfpk_jax.pruners.baselines`.

    Returns:
      A :class:`PruningResult`: its ``.masks`` mirror ``params``, 0/1 (checked).

    Raises:
      ValueError: a bad ``mask_dim``, or a sparsity other than 1 - N/M for N:M masks.
      PrunerOutputError: the pruner returned no ``.masks``, or masks that do
        not fit ``params`` or hold other values than 0 and 1 (NaN included),
        or break the N:M pattern asked for; the message names the pruner and
        the leaf.
    """
    pattern = n_m.from_mask_dim(mask_dim)  # refused before the layers are read
    if pattern is not None:
        n_m.check_sparsity(pattern, check_sparsity(sparsity))
    if mask_dim is not None and prunable is None:
        prunable, batches = layers_from_batches(loss_fn, params, batches)
    result = spec(method).fn(loss_fn, params, batches, sparsity, prunable=prunable, scope=scope,
                             key=key, mask_dim=mask_dim, **options)
    if not isinstance(result, PruningResult):
        raise PrunerOutputError(method, f"a {type(result).__name__}, not a result with .masks "
                                        "(return a PruneResult(masks))")
    try:
        named_masks(result.masks, params)
    except ValueError as err:
        raise PrunerOutputError(method, f"masks that are not usable: {err}") from None
    if pattern is not None:
        _check_n_m(method, result.masks, MaskLayout.from_params(params, prunable, mask_dim))
    return result


def _check_n_m(method: str, masks: Any, layout: MaskLayout) -> None:
    """Refuses masks that break the layout's N:M pattern (a pruner that ignored ``mask_dim``)."""
    leaves = zip(layout.paths, layout.gather(masks), layout.shapes, layout.in_axes)
    broken = [path for path, mask, shape, axis in leaves if mask is None or n_m.broken_groups(
        np.broadcast_to(np.asarray(mask), shape), axis, layout.n_m)]
    if broken:
        raise PrunerOutputError(method, f"masks that break mask_dim='{layout.n_m}' (at most "
                                        f"{layout.n_m.n} of every {layout.n_m.m} kept) at "
                                        f"{', '.join(broken)}")
