"""The functional G of the spec: a differentiable density of a continuous mask.

The paper calls G the sparsity functional; its value is a density: G(1) = 1,
and on a 0/1 mask G is the fraction of entries kept (``l1``) or its square
root (``l2``). Its descent direction g = -grad G is what lowers the density.
``l2``: sqrt(sum m^2 + 1e-12) / sqrt(D); ``l1``: sum |m| / D. In local scope
each layer has its own G_l over its own D_l.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

EPS = 1e-12


def _layer_power_sums(mask: Sequence[jax.Array], kind: str, node: Sequence[int]) -> jax.Array:
    # Each mask entry counts once per parameter entry it covers (its node size).
    if kind == "l2":
        return jnp.stack([n * jnp.sum(jnp.square(m)) for m, n in zip(mask, node)])
    return jnp.stack([n * jnp.sum(jnp.abs(m)) for m, n in zip(mask, node)])


def _nodes(mask, node):
    return (1,) * len(mask) if node is None else tuple(node)


def global_g(mask: Sequence[jax.Array], kind: str, node: Sequence[int] | None = None) -> jax.Array:
    """G over all prunable entries of one particle (scalar).

    Args:
      mask: the particle's mask leaves.
      kind: ``l2`` or ``l1``.
      node: parameter entries covered by one mask entry, per leaf (channel
        masks); None for unstructured masks.

    Returns:
      The scalar G.
    """
    node = _nodes(mask, node)
    total = sum(m.size * n for m, n in zip(mask, node))
    s = jnp.sum(_layer_power_sums(mask, kind, node))
    if kind == "l2":
        return jnp.sqrt(s + EPS) / jnp.sqrt(float(total))
    return s / total


def layer_g(mask: Sequence[jax.Array], kind: str, node: Sequence[int] | None = None) -> jax.Array:
    """G_l for every layer of one particle, shape (L,)."""
    node = _nodes(mask, node)
    sizes = jnp.asarray([m.size * n for m, n in zip(mask, node)], mask[0].dtype)
    s = _layer_power_sums(mask, kind, node)
    if kind == "l2":
        return jnp.sqrt(s + EPS) / jnp.sqrt(sizes)
    return s / sizes


def g(
    mask: Sequence[jax.Array], kind: str, scope: str, node: Sequence[int] | None = None
) -> jax.Array:
    """G in the given scope: a scalar (global) or one value per layer (local)."""
    if scope == "global":
        return global_g(mask, kind, node)
    return layer_g(mask, kind, node)


def g_and_descent(
    mask: Sequence[jax.Array], kind: str, scope: str, node: Sequence[int] | None = None
) -> tuple[jax.Array, list[jax.Array]]:
    """G and g = -grad G for one particle.

    In local scope the gradient of sum_l G_l is, layer by layer, the
    gradient of that layer's own G_l, which is what the per-layer step needs.
    """
    def total(m):
        value = g(m, kind, scope, node)
        return jnp.sum(value), value

    grad, g_value = jax.grad(total, has_aux=True)(list(mask))
    return g_value, [-x for x in grad]
