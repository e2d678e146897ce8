"""The closed-form SFPK step direction.

Given g = -grad G and e = -grad E - lambda grad K, the direction
delta = x e + y g satisfies <delta, g> = 1 (G falls by dt to first order) and
|delta| = r / |g|: the step is r times longer than the shortest one that
lowers G by dt, the extra length going along loss descent orthogonal to g.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

EPS = 1e-12


def coefficients(a: jax.Array, b: jax.Array, c: jax.Array, radius) -> tuple[jax.Array, jax.Array]:
    """x and y from a = |g|, b = |e|, c = <g, e> (any matching shapes)."""
    x = jnp.sqrt((radius**2 - 1.0 + EPS) / ((a * b) ** 2 - c**2 + EPS) + EPS)
    y = (1.0 - x * c) / (a**2 + EPS)
    return x, y


def direction(
    g: Sequence[jax.Array], e: Sequence[jax.Array], radius, scope: str
) -> list[jax.Array]:
    """delta for one particle; norms and products are global or per layer."""
    gg = jnp.stack([jnp.sum(x * x) for x in g])
    ee = jnp.stack([jnp.sum(x * x) for x in e])
    ge = jnp.stack([jnp.sum(x * y) for x, y in zip(g, e)])
    if scope == "global":
        gg, ee, ge = jnp.sum(gg), jnp.sum(ee), jnp.sum(ge)
        x, y = coefficients(jnp.sqrt(gg), jnp.sqrt(ee), ge, radius)
        return [x * ei + y * gi for gi, ei in zip(g, e)]
    x, y = coefficients(jnp.sqrt(gg), jnp.sqrt(ee), ge, radius)
    return [x[l] * ei + y[l] * gi for l, (gi, ei) in enumerate(zip(g, e))]
