"""Checkpoints of a running SFPK simulation, so that a killed run resumes where it stopped.

A checkpoint holds the whole simulation state (particles, scores, step, start
density), the trace so far, the :class:`~sfpk_jax.Execution` it ran under and
a *fingerprint* of what is computed: the whole :class:`~sfpk_jax.SFPKConfig`,
the sparsity, the prunable leaves and a digest of their weights. Resuming
restores the latest checkpoint after checking the fingerprint; another
execution (particle mode, workers, precision) is accepted and announced, since
it changes how the steps run, not what they compute. With the same execution
the run ends with exactly the masks and scores of an uninterrupted run,
provided the batches of step t are the same (see
:func:`sfpk_jax.data.particle_loader` and its ``start``).

Orbax writes each checkpoint to a temporary folder and renames it when
complete, so a run killed while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np

from sfpk_jax.parallel import sharding
from sfpk_jax.sfpk.config import SFPKConfig
from sfpk_jax.sfpk.execution import Execution

_LOG = logging.getLogger(__name__)


class ResumeError(ValueError):
    """A simulation checkpoint is missing, unreadable, or from a different run.

    Attributes:
      problem: what is wrong, without the advice (a caller with its own
        vocabulary, such as a command line, adds its own).
      directory: the checkpoint folder.
    """

    def __init__(self, problem: str, directory, advice: str):
        super().__init__(f"{problem}; {advice}")
        self.problem, self.directory = problem, directory


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


def fingerprint(config: SFPKConfig, sparsity: float, paths, theta, mask_shapes,
                target: float) -> dict[str, Any]:
    """What a resumed simulation must share with the one that wrote the checkpoint.

    Args:
      config: the :class:`sfpk_jax.SFPKConfig`, every field of it.
      sparsity: the target sparsity.
      paths: '/'-joined paths of the prunable leaves.
      theta: the prunable weights (their bytes are digested).
      mask_shapes: the mask shape of every prunable leaf.
      target: the simulation's target density (for channel masks it depends
        on the model's parameter count too).

    Returns:
      A JSON-able dict.
    """
    from sfpk_jax.storage import checkpoint_files

    return {
        "config": dataclasses.asdict(config),
        "sparsity": sparsity,
        "target": target,
        "leaves": {p: list(s) for p, s in zip(paths, mask_shapes)},
        "weights_sha256": checkpoint_files.tree_digest(list(theta)),
    }


class SimulationCheckpoints:
    """The checkpoints of one simulation (used by :func:`sfpk_jax.sfpk_prune`).

    A :class:`sfpk_jax.storage.checkpoint_files.Series` whose steps are
    simulation steps and whose records hold the fingerprint, the execution
    and the trace so far.
    """

    def __init__(self, policy: CheckpointPolicy, fingerprint: dict[str, Any],
                 execution: Execution):
        """Opens ``policy.directory``; refuses to overwrite an earlier run.

        Raises:
          ResumeError: the directory holds checkpoints and ``resume`` is False,
            or it cannot be used.
        """
        from sfpk_jax.storage import checkpoint_files

        self._files = checkpoint_files
        self.policy = policy
        self.fingerprint = fingerprint
        self.execution = execution.describe()
        self.series = checkpoint_files.Series(policy.directory)
        self.directory = self.series.directory
        try:
            latest = self.series.latest()
        except checkpoint_files.CheckpointError as err:
            raise ResumeError(str(err), self.directory,
                              "choose a writable folder for SFPK checkpoints") from None
        if latest is not None and not policy.resume:
            self.series.close()
            raise ResumeError(
                f"{self.directory} already holds SFPK checkpoints (up to step {latest}) of an "
                "earlier run", self.directory,
                "resume it (CheckpointPolicy(..., resume=True)), or remove the folder to start again")

    def restore(self, template) -> tuple[Any, dict[str, list]] | None:
        """The latest state and trace, or None when there is no checkpoint yet.

        A checkpoint written under another execution is restored, and the
        change is logged (``sfpk_jax.sfpk.resume``, WARNING): from here on the
        run may differ from an uninterrupted one by float rounding.

        Args:
          template: a state of the expected structure, shapes and dtypes.

        Raises:
          ResumeError: the checkpoint is unreadable, damaged or from a
            different run (the message names every field that differs).
        """
        step = self.series.latest()
        if step is None:
            return None
        try:
            record = self.series.record(step)
            diffs = self._files.differences(record["fingerprint"], self.fingerprint)
            if diffs:
                raise ResumeError(
                    f"SFPK checkpoint {self.directory / str(step)} is from a different run: "
                    + "; ".join(diffs), self.directory,
                    "resume with the original config, sparsity and weights, or remove the "
                    "folder to start again")
            state, _ = self.series.restore(step, template)
        except self._files.CheckpointError as err:
            raise ResumeError(f"SFPK {err}", self.directory,
                              "remove that step to resume from the one before, or remove the "
                              "folder to start again") from None
        changed = self._files.differences(record.get("execution", {}), self.execution)
        if changed:
            _LOG.warning("resuming the SFPK simulation in %s at step %d under another execution "
                         "(%s): the steps from here on may differ from an uninterrupted run's by "
                         "float rounding", self.directory, step, "; ".join(changed))
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
                         {"fingerprint": self.fingerprint, "execution": self.execution,
                          "trace": trace_json})

    def close(self) -> None:
        """Releases the checkpoint manager."""
        self.series.close()
