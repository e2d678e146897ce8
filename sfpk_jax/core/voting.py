"""The running vote that turns the particle system into pruning scores.

After each step the ceil(v n) particles of lowest energy vote. Each voter's
score is |m_i * theta| (``mp``) or |m_i| (``m``); the soft vote averages them,
the hard vote first zeroes each voter's score outside its own top entries.
Scores accumulate as S <- mean_voters s_i + mu S.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from sfpk_jax.core import channels, topk


def particle_scores(particles, theta, score: str) -> list[jax.Array]:
    """s_i for every particle, shaped like ``particles``."""
    # Expanded over the kernel and summed per mask entry, as the reference
    # scores channels; for unstructured masks these are |m theta| and |m|.
    if score == "mp":
        return [jnp.abs(m) * channels.abs_weight(t, m.shape[1:])[None] for m, t in zip(particles, theta)]
    return [jnp.abs(m) * channels.node_size(t.shape, m.shape[1:]) for m, t in zip(particles, theta)]


def voter_weights(energy: jax.Array, voters: int) -> jax.Array:
    """1/voters for the ``voters`` lowest-energy particles (stable order), else 0."""
    order = jnp.argsort(energy, stable=True)
    rank = jnp.empty_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
    return jnp.where(rank < voters, 1.0 / voters, 0.0).astype(energy.dtype)


def vote(
    scores: Sequence[jax.Array],
    particles: Sequence[jax.Array],
    theta: Sequence[jax.Array],
    energy: jax.Array,
    *,
    mode: str,
    score: str,
    voters: int,
    momentum: float,
    target_density: float,
    scope: str,
) -> list[jax.Array]:
    """S <- mean of the voters' scores + momentum * S.

    Args:
      scores: the running scores S, one array per prunable leaf.
      particles: positions after this step, leading axis n.
      theta: the parameters.
      energy: (n,) energies of this step (before the update), lower is better.
      mode: ``soft`` or ``hard``.
      score: ``mp`` or ``m``.
      voters: how many particles vote.
      momentum: mu.
      target_density: f, the hard vote's kept fraction.
      scope: ``global`` or ``local`` (where the hard vote's top entries are
        taken). The layer-wise hard vote is the spec's reading: the
        reference's crashes in local scope (``Methods/sfpk.py``,
        ``SFPKSystem._update_scores`` computes ``1 - target`` of a list).

    Returns:
      The new running scores.
    """
    s = particle_scores(particles, theta, score)
    if mode == "hard":
        s = [jnp.where(channels.abs_weight(t, x.shape[1:])[None] != 0, x, 0.0) for x, t in zip(s, theta)]
        k = topk.counts([x[0].size for x in s], jnp.asarray(target_density, energy.dtype), scope)
        s = jax.vmap(lambda *leaves: topk.above_kth(list(leaves), k, scope))(*s)
    w = voter_weights(energy, voters)
    return [jnp.tensordot(w, x, axes=1) + momentum * old for x, old in zip(s, scores)]
