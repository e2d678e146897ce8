"""Polarizers: the point at which a particle's energy gradient is taken.

A particle m is continuous; the loss is evaluated with weights theta * P(m).
The default ``onehot`` polarizer binarises m by keeping the entries whose
|m * theta| is among the top G(m) fraction and passes the gradient straight
through, so grad E(m) is the loss gradient at the binary mask b while m itself
is left unchanged. The others are the reference code's options.

In local scope every layer is cut on its own; ``at`` says at which density
(:data:`DENSITY_AT`): each layer's own G_l (the spec's reading), or one
density for every layer, as the reference hands its polarizers: the global G
when its dynamics are global, the sum of the layer densities sum_l G_l when
they are layer-wise (``Methods/sfpk.py``, ``SFPKSystem._calc_E``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.scipy.special import logit
from jax.scipy.stats import norm

from sfpk_jax.core import channels, functional, topk

EPS = 1e-12

# "scope": G of the polarizer's scope (global G, or each layer's G_l);
# "global": every layer at the global G; "sum": every layer at sum_l G_l.
DENSITY_AT = ("scope", "global", "sum")


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


def _density(mask, theta, kind: str, scope: str, at: str):
    """G as the polarizer reads it: a scalar (global scope) or one value per layer."""
    if at not in DENSITY_AT or (scope == "global" and at == "sum"):
        raise ValueError(f"the polarizer's density at={at!r} is not one of {DENSITY_AT} "
                         "('sum' only in local scope)")
    node = [channels.node_size(t.shape, m.shape) for m, t in zip(mask, theta)]
    if at == "scope":
        g = functional.g(mask, kind, scope, node)
    elif at == "global":
        g = functional.global_g(mask, kind, node)
    else:
        g = jnp.sum(functional.layer_g(mask, kind, node))
    if scope == "local":
        g = jnp.broadcast_to(g, (len(mask),))
    return jax.lax.stop_gradient(g)


def _binary(mask, theta, kind: str, scope: str, at: str):
    """b = 1[|m theta| >= tau] and k, the number of mask entries G says to remove."""
    density = _density(mask, theta, kind, scope, at)
    k = topk.counts([m.size for m in mask], density, scope)
    b = topk.at_or_above_kth(jax.lax.stop_gradient(_context(mask, theta)), k, scope)
    return b, k


def _unless_nothing_to_remove(k, scope, at, polarized, mask):
    # With k < 1 the reference leaves the mask as it is. Its layer-wise
    # polarizers, handed one density for every layer, already do so at k = 1
    # (Methods/mask_processor.py, OneHot / OneHotHard.forward: prune_num <= 1).
    least = 2 if scope == "local" and at != "scope" else 1
    ks = [k] * len(mask) if scope == "global" else [k[l] for l in range(len(mask))]
    return [jnp.where(kl >= least, p, m) for kl, p, m in zip(ks, polarized, mask)]


def onehot(mask, theta, *, kind, scope, at, **_):
    """Hard one-hot with a straight-through gradient (the default)."""
    b, k = _binary(mask, theta, kind, scope, at)
    return _unless_nothing_to_remove(
        k, scope, at, [straight_through(m, bi) for m, bi in zip(mask, b)], mask
    )


def onehot_soft(mask, theta, *, kind, scope, at, **_):
    """One-hot values b, gradient b / m (the reference's ``oh``)."""
    b, k = _binary(mask, theta, kind, scope, at)
    soft = []
    for m, bi in zip(mask, b):
        safe = jax.lax.stop_gradient(jnp.where(m == 0, 1.0, m))
        soft.append(bi * m / safe)
    return _unless_nothing_to_remove(k, scope, at, soft, mask)


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


def quantile_sigmoid(mask, theta, *, kind, scope, at, eps, ratio):
    """Sigmoid between the (1-G)*ratio and (1-G) quantiles of |m theta| (``qt``).

    ``jnp.quantile`` clamps q into [0, 1] (where the reference's
    ``torch.quantile`` raises, e.g. at the dense start when G rounds above 1).
    """
    g = _density(mask, theta, kind, scope, at)
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


def gauss_sigmoid(mask, theta, *, kind, scope, at, eps, ratio):
    """Like ``quantile_sigmoid`` with Gaussian quantiles of |m theta| (``gau``).

    Where q = 1 - G + 1e-12 leaves (0, 1) (at the dense start G can round
    just above 1 in float32, and sum_l G_l > 1 when the polarizer reads the
    sum) the quantile is NaN; it becomes -1e12, as the reference's Python
    ``max(-1e12, .)`` of the quantile makes it (``Methods/mask_processor.py``,
    ``GaussSigmoid.forward``). ``jnp.maximum`` would keep the NaN.
    """
    g = _density(mask, theta, kind, scope, at)
    ctx = _context(mask, theta)

    def band(values, density):
        q = 1.0 - density + EPS
        z_lo = jnp.fmax(norm.ppf(q * ratio), -1e12)
        z_hi = jnp.fmax(norm.ppf(q), -1e12)
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
    at: str = "scope",
) -> list[jax.Array]:
    """P(m) for one particle with the named polarizer.

    Args:
      name: a key of :data:`POLARIZERS`.
      mask: the particle's mask leaves.
      theta: the parameters of those leaves.
      kind: the density functional, ``l2`` or ``l1``.
      scope: where the top entries are taken: ``global`` or per layer (``local``).
      eps: the sigmoid polarizers' band, [logit(1 - eps), logit(eps)].
      ratio: the sigmoid polarizers' lower band edge, a fraction of 1 - G.
      at: the density the cut is taken at (:data:`DENSITY_AT`): ``scope``,
        or, in local scope, one density for every layer (``global`` G or the
        ``sum`` of the layer densities) as the reference hands it, a layer
        then being left as it is while its k_l <= 1.

    Returns:
      The gradient point, one array per leaf.
    """
    return POLARIZERS[name](list(mask), list(theta), kind=kind, scope=scope, at=at, eps=eps,
                            ratio=ratio)
