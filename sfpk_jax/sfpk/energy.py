"""The polarized energy E(m) and its gradient, for one particle or all of them.

E(m) = loss of the model with weights theta * P(m) on the particle's own
mini-batch; grad E is taken through the polarizer P (straight-through for the
default one-hot). :mod:`sfpk_jax.sfpk.modes` runs it over the particles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sfpk_jax.core.masks import MaskLayout
from sfpk_jax.core.polarizers import polarize
from sfpk_jax.sfpk.config import SFPKConfig
from sfpk_jax.sfpk.execution import ComputeDtype

EnergyFn = Callable[..., tuple[jax.Array, list]]


@dataclasses.dataclass(frozen=True, eq=False)
class StatefulLoss:
    """A loss whose non-parameter state (e.g. batch-norm statistics) is an argument.

    ``StatefulLoss(fn, state)(params, batch) == fn(params, batch, state)``, so it
    goes wherever a ``loss_fn(params, batch)`` does. :func:`sfpk_jax.sfpk_prune`
    passes ``state`` to its compiled step as an argument rather than baking it
    in as a constant, and keys its compiled steppers on ``fn``: calls with a
    new ``state`` (another pruning round, the batch-norm statistics
    recomputed) and the same ``fn`` reuse the compiled step.

    Attributes:
      fn: pure ``fn(params, batch, state) -> scalar``; give every call the
        same (hashable) object, e.g. one made once per model.
      state: the pytree ``fn`` reads besides the parameters.
    """

    fn: Callable[[Any, Any, Any], jax.Array]
    state: Any

    def __call__(self, params: Any, batch: Any) -> jax.Array:
        return self.fn(params, batch, self.state)


def polarizer_density(config: SFPKConfig) -> str:
    """The density the polarizer cuts at (:data:`sfpk_jax.core.polarizers.DENSITY_AT`).

    A global polarizer reads the global G. A layer-wise one reads each
    layer's own G_l with ``local_polarizer="layer"``; by default it reads
    what the reference hands it, the dynamics' G for every layer: the global
    G, or sum_l G_l when the dynamics are layer-wise.
    """
    if config.scope == "global" or config.local_polarizer == "layer":
        return "scope"
    return "global" if config.dynamics == "global" else "sum"


def make_energy_fn(
    loss_fn: Callable[[Any, Any], jax.Array],
    layout: MaskLayout,
    config: SFPKConfig,
    compute_dtype: ComputeDtype = "float32",
) -> EnergyFn:
    """``(params, mask leaves, batch) -> (E, grad E)`` for a single particle.

    Args:
      loss_fn: ``loss_fn(params, batch, *loss_args) -> scalar``, pure.
      layout: where the prunable leaves are.
      config: polarizer, functional G and scopes (see :func:`polarizer_density`).
      compute_dtype: the dtype of the model's passes (``Execution.compute_dtype``).

    Returns:
      A function of the parameters theta (held fixed: no gradient is taken
      with respect to them), one particle's mask leaves, its batch and any
      further ``loss_args`` (handed to ``loss_fn`` after the batch).
    """

    at = polarizer_density(config)

    def energy(mask, params, batch, *loss_args):
        theta = layout.gather(params)
        point = polarize(
            config.polarizer,
            mask,
            theta,
            kind=config.sparsity_fn,
            scope=config.scope,
            eps=config.polarizer_eps,
            ratio=config.polarizer_ratio,
            at=at,
        )
        masked = layout.apply(params, point)
        if compute_dtype == "float32":
            return loss_fn(masked, batch, *loss_args)
        # The casts sit inside the differentiated function, so grad E still
        # arrives in the particles' float32.
        masked, batch = _cast_floats((masked, batch), compute_dtype)
        return loss_fn(masked, batch, *loss_args).astype(jnp.float32)

    grad_fn = jax.value_and_grad(energy)
    return lambda params, mask, batch, *loss_args: grad_fn(list(mask), params, batch, *loss_args)


def _cast_floats(tree: Any, dtype: str) -> Any:
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree
    )
