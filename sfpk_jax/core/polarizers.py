"""Polarizers: the point at which a particle's energy gradient is taken.

A particle m is continuous; the loss is evaluated with weights theta * P(m).
The default ``onehot`` polarizer binarises m by keeping the entries whose
|m * theta| is among the top G(m) fraction and passes the gradient straight
through, so grad E(m) is the loss gradient at the binary mask b while m itself
is left unchanged. The others are the reference code's options.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.scipy.special import logit
from jax.scipy.stats import norm

from sfpk_jax.core import channels, topk
from sfpk_jax.core import density as density_lib

EPS = 1e-12


@jax.custom_jvp
def straight_through(m: jax.Array, b: jax.Array) -> jax.Array:
    """Returns b exactly; its derivative is the identity in m."""
    del m
    return b


@straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    return primals[1], tangents[0]


def _context(mask, theta):
    # Scores that decide which entries survive: |m| times the |theta| each mask
    # entry covers (theta held fixed); |m * theta| for unstructured masks.
    return [jnp.abs(m) * channels.abs_weight(jax.lax.stop_gradient(t), m.shape)
            for m, t in zip(mask, theta)]


def _density(mask, theta, kind: str, scope: str):
    node = [channels.node_size(t.shape, m.shape) for m, t in zip(mask, theta)]
    return jax.lax.stop_gradient(density_lib.density(mask, kind, scope, node))


def _binary(mask, theta, kind: str, scope: str):
    """b = 1[|m theta| >= tau] and k, the number of mask entries G says to remove."""
    density = _density(mask, theta, kind, scope)
    k = topk.counts([m.size for m in mask], density, scope)
    b = topk.at_or_above_kth(jax.lax.stop_gradient(_context(mask, theta)), k, scope)
    return b, k


def _unless_nothing_to_remove(k, scope, polarized, mask):
    # With k < 1 the reference leaves the mask as it is.
    ks = [k] * len(mask) if scope == "global" else [k[l] for l in range(len(mask))]
    return [jnp.where(kl >= 1, p, m) for kl, p, m in zip(ks, polarized, mask)]


def onehot(mask, theta, *, kind, scope, **_):
    """Hard one-hot with a straight-through gradient (the default)."""
    b, k = _binary(mask, theta, kind, scope)
    return _unless_nothing_to_remove(
        k, scope, [straight_through(m, bi) for m, bi in zip(mask, b)], mask
    )


def onehot_soft(mask, theta, *, kind, scope, **_):
    """One-hot values b, gradient b / m (the reference's ``oh``)."""
    b, k = _binary(mask, theta, kind, scope)
    soft = []
    for m, bi in zip(mask, b):
        safe = jax.lax.stop_gradient(jnp.where(m == 0, 1.0, m))
        soft.append(bi * m / safe)
    return _unless_nothing_to_remove(k, scope, soft, mask)


def identity(mask, theta, **_):
    """No polarization: the gradient is taken at m itself."""
    del theta
    return list(mask)


def _sigmoid_band(mask, theta, lower, upper, eps):
    # Maps [lower, upper] of |m theta| onto [logit(1 - eps), logit(eps)].
    hi, lo = logit(eps), logit(1.0 - eps)
    return [
        jax.nn.sigmoid((c - lower + EPS) / (upper - lower + EPS) * (hi - lo) + lo)
        for c in _context(mask, theta)
    ]


def quantile_sigmoid(mask, theta, *, kind, scope, eps, ratio):
    """Sigmoid between the (1-G)*ratio and (1-G) quantiles of |m theta| (``qt``)."""
    g = _density(mask, theta, kind, scope)
    ctx = _context(mask, theta)
    if scope == "global":
        flat = jnp.concatenate([jnp.ravel(c) for c in ctx])
        upper, lower = jnp.quantile(flat, 1.0 - g), jnp.quantile(flat, (1.0 - g) * ratio)
        return _sigmoid_band(mask, theta, lower, upper, eps)
    out = []
    for l, (m, t, c) in enumerate(zip(mask, theta, ctx)):
        upper = jnp.quantile(jnp.ravel(c), 1.0 - g[l])
        lower = jnp.quantile(jnp.ravel(c), (1.0 - g[l]) * ratio)
        out += _sigmoid_band([m], [t], lower, upper, eps)
    return out


def gauss_sigmoid(mask, theta, *, kind, scope, eps, ratio):
    """Like ``quantile_sigmoid`` with Gaussian quantiles of |m theta| (``gau``)."""
    g = _density(mask, theta, kind, scope)
    ctx = _context(mask, theta)

    def band(values, density):
        q = 1.0 - density + EPS
        z_lo = jnp.maximum(norm.ppf(q * ratio), -1e12)
        z_hi = jnp.maximum(norm.ppf(q), -1e12)
        mean, std = jnp.mean(values), jnp.std(values, ddof=1)
        return mean + z_lo * std, mean + z_hi * std

    if scope == "global":
        lower, upper = band(jnp.concatenate([jnp.ravel(c) for c in ctx]), g)
        return _sigmoid_band(mask, theta, lower, upper, eps)
    out = []
    for l, (m, t, c) in enumerate(zip(mask, theta, ctx)):
        lower, upper = band(jnp.ravel(c), g[l])
        out += _sigmoid_band([m], [t], lower, upper, eps)
    return out


POLARIZERS = {
    "onehot": onehot,
    "onehot_soft": onehot_soft,
    "identity": identity,
    "quantile_sigmoid": quantile_sigmoid,
    "gauss_sigmoid": gauss_sigmoid,
}


def polarize(
    name: str,
    mask: Sequence[jax.Array],
    theta: Sequence[jax.Array],
    *,
    kind: str,
    scope: str,
    eps: float,
    ratio: float,
) -> list[jax.Array]:
    """P(m) for one particle with the named polarizer."""
    return POLARIZERS[name](list(mask), list(theta), kind=kind, scope=scope, eps=eps, ratio=ratio)
