"""The interaction energy K that keeps particles apart.

With w = |theta| (weighted) or 1, S(m) = sum m^2 w (held constant) and
s_ij = sqrt(S_i S_j + 1e-12):
  exp: K_i = 1/n sum_j exp(-sum theta_w^2 (m_i - m_j)^2 / s_ij)
  cos: K_i = 1/n sum_j sum m_i m_j w / s_ij
The sum runs over every particle, i itself included, at the positions of the
start of the step; only m_i moves in grad K_i. Gradients are written in closed
form so memory stays at n x D (no n x n x D intermediate).

For channel masks the reference's ``exp`` kernel divides by S_j + 1e-12, the
other particle's strength alone (``Methods/sfpk.py``,
``MaskSystem._calc_similarity_struct_exp``); its ``cos`` kernel keeps s_ij.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from sfpk_jax.core import channels

EPS = 1e-12


def _weights(particles, theta, weighted: bool):
    """w (for S) and w^2 summed over the entries each mask entry covers.

    A leading axis of 1 lets them broadcast over the particle axis. Unweighted,
    both are the node size; unstructured and weighted, |theta| and theta^2.
    """
    w, w2 = [], []
    for m, t in zip(particles, theta):
        shape = m.shape[1:]
        if weighted:
            w.append(channels.abs_weight(t, shape)[None])
            w2.append(channels.sq_weight(t, shape)[None])
        else:
            node = jnp.full((1, *shape), channels.node_size(t.shape, shape), m.dtype)
            w.append(node)
            w2.append(node)
    return w, w2


def _particle(m: jax.Array, j) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(m, j, keepdims=True)


def _per_particle_sum(x: jax.Array) -> jax.Array:
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def _pairwise(pairs, fn) -> jax.Array:
    """(n, n) matrix: sum over leaves and entries of fn(m_i, w, m_j).

    ``pairs`` holds (particle leaf, weight leaf); columns are filled one j at a
    time so no n x n x D intermediate exists.
    """
    n = pairs[0][0].shape[0]

    def column(j, out):
        col = sum(_per_particle_sum(fn(m, w, _particle(m, j))) for m, w in pairs)
        return out.at[:, j].set(col)

    return jax.lax.fori_loop(0, n, column, jnp.zeros((n, n), pairs[0][0].dtype))


def repulsion(
    particles: Sequence[jax.Array],
    theta: Sequence[jax.Array],
    *,
    mode: str,
    weighted: bool,
    structured: bool = False,
) -> tuple[jax.Array, list[jax.Array]]:
    """K_i and grad K_i for every particle.

    Args:
      particles: one array per prunable leaf, leading axis n.
      theta: the parameters of those leaves (no particle axis).
      mode: ``exp`` or ``cos``.
      weighted: weight by |theta| (True) or by 1.
      structured: channel masks: the ``exp`` kernel divides by S_j + 1e-12
        instead of sqrt(S_i S_j + 1e-12), as the reference's structured
        kernel does.

    Returns:
      K of shape (n,) and grad K as a list shaped like ``particles``.
    """
    w, sq_w = _weights(particles, theta, weighted)
    n = particles[0].shape[0]
    strength = jnp.stack([_per_particle_sum(jnp.square(m) * wl) for m, wl in zip(particles, w)]).sum(0)
    if structured and mode == "exp":
        scale = jnp.broadcast_to(strength[None, :] + EPS, (n, n))  # row i, column j: S_j
    else:
        scale = jnp.sqrt(strength[:, None] * strength[None, :] + EPS)
    pairs = list(zip(particles, w))
    if mode == "exp":
        dist = _pairwise(
            list(zip(particles, sq_w)), lambda m, w2, mj: w2 * jnp.square(m - mj)
        )
        kernel = jnp.exp(-dist / scale)
        k_value = jnp.mean(kernel, axis=1)
        coef = kernel / scale  # d/d(dist) of exp(-dist/s), up to sign

        def grad_leaf(m, w2):
            def add(j, acc):
                c = coef[:, j].reshape((n,) + (1,) * (m.ndim - 1))
                return acc + c * (m - _particle(m, j))

            pulled = jax.lax.fori_loop(0, n, add, jnp.zeros_like(m))
            return -2.0 / n * w2 * pulled

        return k_value, [grad_leaf(m, w2) for m, w2 in zip(particles, sq_w)]
    if mode == "cos":
        dots = _pairwise(pairs, lambda m, wl, mj: m * mj * wl)
        k_value = jnp.mean(dots / scale, axis=1)
        inv = 1.0 / scale
        grads = [
            wl * jnp.tensordot(inv, m, axes=1) / n for m, wl in pairs
        ]
        return k_value, grads
    raise ValueError(f"unknown repulsion mode {mode!r}")
