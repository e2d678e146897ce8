"""Step sizes dt_t that carry the density from ``start`` to ``target`` in K steps.

``exp``: the planned density after step t is s (f/s)^((t+1)/K);
``lin``: equal steps (s - f)/K; the adaptive ``ada_exp`` / ``ada_lin`` re-plan
the remaining journey from the particle's current G at every step.
All functions broadcast, so local scope passes per-layer arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def step_size(kind: str, t: jax.Array, steps: int, start, target, current) -> jax.Array:
    """dt for step t (0-based) of ``steps``.

    Args:
      kind: ``exp``, ``lin``, ``ada_exp`` or ``ada_lin``.
      t: the step index.
      steps: K.
      start: density at the start of the run (s).
      target: target density (f).
      current: the particle's G at the start of this step (used by the
        adaptive schedules).

    Returns:
      dt, broadcast over ``start``, ``target`` and ``current``.
    """
    t = jnp.asarray(t).astype(jnp.result_type(current))
    if kind == "exp":
        ratio = start / target
        return target * (ratio ** (1.0 - t / steps) - ratio ** (1.0 - (t + 1.0) / steps))
    if kind == "lin":
        return (start - target) / steps
    remaining = jnp.maximum(steps - t, 1.0)
    if kind == "ada_lin":
        return (current - target) / remaining
    if kind == "ada_exp":
        # The next point of the geometric path from the current G to the target
        # over the remaining steps. (The reference's adaExp returns a density,
        # not a step: f (G/f)^(1/(K-t)), used as dt it overshoots and the run
        # stops early (Methods/sfpk.py, SFPKSystem._calc_dt); we take the step
        # that path implies.)
        return current - target * (current / target) ** (1.0 - 1.0 / remaining)
    raise ValueError(f"unknown schedule {kind!r}")
