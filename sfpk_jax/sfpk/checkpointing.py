"""Checkpoints of a running SFPK simulation, so that a killed run resumes where it stopped.

A checkpoint holds the whole simulation state (particles, scores, step, start
density), the trace so far and a *fingerprint* of what the run depends on
(config, sparsity, the prunable leaves and a digest of their weights, the
particle count). Resuming restores the latest checkpoint after checking the
fingerprint, and the run then ends with exactly the masks and scores of an
uninterrupted run, provided the batches of step t are the same (see
:func:`sfpk_jax.data.particle_loader` and its ``start``).

Orbax writes each checkpoint to a temporary folder and renames it when
complete, so a run killed while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from sfpk_jax.parallel import sharding
from sfpk_jax.storage import checkpoints

# Fields that change how the work is scheduled, not what is computed. The
# particle mode may still change float rounding: bit-for-bit resumption needs
# the same mode, but resuming under another one is allowed.
_SCHEDULING_FIELDS = ("progress", "particle_mode", "particle_chunk")


class ResumeError(ValueError):
    """A simulation checkpoint is missing, unreadable, or from a different run."""


@dataclasses.dataclass(frozen=True)
class CheckpointPolicy:
    """Where and how often :func:`sfpk_jax.sfpk_prune` checkpoints, and whether it resumes.

    Attributes:
      directory: folder of this simulation's checkpoints (created if needed).
      every: steps between checkpoints; the final state is always saved.
      resume: continue from the latest checkpoint in ``directory``. Without
        it, a directory that already holds checkpoints is an error, so an
        earlier run is never silently overwritten.
    """

    directory: str | os.PathLike
    every: int = 10
    resume: bool = False

    def __post_init__(self):
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"CheckpointPolicy.every={self.every!r} must be an integer >= 1 (steps)")
        if not isinstance(self.resume, bool):
            raise ValueError(f"CheckpointPolicy.resume={self.resume!r} must be True or False")


def fingerprint(config, sparsity: float, paths, theta, mask_shapes, target: float) -> dict[str, Any]:
    """What a resumed simulation must share with the one that wrote the checkpoint.

    Args:
      config: the :class:`sfpk_jax.SFPKConfig`.
      sparsity: the target sparsity.
      paths: '/'-joined paths of the prunable leaves.
      theta: the prunable weights (their bytes are digested).
      mask_shapes: the mask shape of every prunable leaf.
      target: the simulation's target density (for channel masks it depends
        on the model's parameter count too).

    Returns:
      A JSON-able dict.
    """
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in _SCHEDULING_FIELDS}
    return {
        "config": fields,
        "sparsity": sparsity,
        "target": target,
        "leaves": {p: list(s) for p, s in zip(paths, mask_shapes)},
        "weights_sha256": checkpoints.tree_digest(list(theta)),
    }


class SimulationCheckpoints:
    """The checkpoints of one simulation (used by :func:`sfpk_jax.sfpk_prune`).

    A :class:`sfpk_jax.storage.checkpoints.Series` whose steps are simulation steps
    and whose records hold the fingerprint and the trace so far.
    """

    def __init__(self, policy: CheckpointPolicy, fingerprint: dict[str, Any]):
        """Opens ``policy.directory``; refuses to overwrite an earlier run.

        Raises:
          ResumeError: the directory holds checkpoints and ``resume`` is False,
            or it cannot be used.
        """
        self.policy = policy
        self.fingerprint = fingerprint
        self.series = checkpoints.Series(policy.directory)
        self.directory = self.series.directory
        try:
            latest = self.series.latest()
        except checkpoints.CheckpointError as err:
            raise ResumeError(f"{err}; choose a writable folder for SFPK checkpoints") from None
        if latest is not None and not policy.resume:
            self.series.close()
            raise ResumeError(
                f"{self.directory} already holds SFPK checkpoints (up to step {latest}) of an "
                "earlier run: resume it (resume=True, --resume), or remove the folder to start "
                "again (--overwrite)"
            )

    def restore(self, template) -> tuple[Any, dict[str, list]] | None:
        """The latest state and trace, or None when there is no checkpoint yet.

        Args:
          template: a state of the expected structure, shapes and dtypes.

        Raises:
          ResumeError: the checkpoint is unreadable, damaged or from a
            different run.
        """
        step = self.series.latest()
        if step is None:
            return None
        fix = "remove it to resume from the one before, or start again with --overwrite"
        try:
            record = self.series.record(step)
            diffs = checkpoints.differences(record["fingerprint"], self.fingerprint)
            if diffs:
                raise ResumeError(
                    f"SFPK checkpoint {self.directory / str(step)} is from a different run: "
                    + "; ".join(diffs)
                    + ". Resume with the original settings, or start again with --overwrite"
                )
            state, _ = self.series.restore(step, template)
        except checkpoints.CheckpointError as err:
            raise ResumeError(f"SFPK {err}; {fix}") from None
        return state, record["trace"]

    def save(self, step: int, state, trace: dict[str, list]) -> None:
        """Checkpoints ``state`` (after ``step`` steps) and the trace so far.

        The save is complete on disk when this returns, so the caller may
        donate the state's buffers to the next step right away.
        """
        if step == self.series.latest():
            return  # the simulation is deterministic: this state is already saved
        trace_json = {k: np.asarray(v).tolist() for k, v in trace.items()}
        # On the host: with several processes no one process holds every particle.
        self.series.save(step, sharding.to_host(state),
                         {"fingerprint": self.fingerprint, "trace": trace_json})

    def close(self) -> None:
        """Releases the checkpoint manager."""
        self.series.close()
