"""The polarized energy E(m) and its gradient, for one particle or all of them.

E(m) = loss of the model with weights theta * P(m) on the particle's own
mini-batch; grad E is taken through the polarizer P (straight-through for the
default one-hot). Particles go through the model all at once (``vmap``), in
chunks (``map``), or one jitted call each (``loop``, driven by the simulation):
vmapping different masks through a convolution turns it into a grouped
convolution, which is much slower than a loop on some backends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sfpk_jax.core.masks import MaskLayout
from sfpk_jax.core.polarizers import polarize
from sfpk_jax.sfpk.config import SFPKConfig

EnergyFn = Callable[[Any, list, Any], tuple[jax.Array, list]]


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
) -> EnergyFn:
    """``(params, mask leaves, batch) -> (E, grad E)`` for a single particle.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, pure.
      layout: where the prunable leaves are.
      config: polarizer, sparsity functional and scopes (see :func:`polarizer_density`).

    Returns:
      A function of the parameters theta (held fixed: no gradient is taken
      with respect to them), one particle's mask leaves and its batch.
    """

    at = polarizer_density(config)

    def energy(mask, params, batch):
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
        masked = layout.replace(params, [t * p for t, p in zip(theta, point)])
        if config.compute_dtype == "float32":
            return loss_fn(masked, batch)
        # The casts sit inside the differentiated function, so grad E still
        # arrives in the particles' float32.
        masked, batch = _cast_floats((masked, batch), config.compute_dtype)
        return loss_fn(masked, batch).astype(jnp.float32)

    grad_fn = jax.value_and_grad(energy)
    return lambda params, mask, batch: grad_fn(list(mask), params, batch)


def _cast_floats(tree: Any, dtype: str) -> Any:
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree
    )
