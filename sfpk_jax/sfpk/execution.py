"""How the SFPK simulation is carried out: particle modes, worker processes, precision, progress.

None of it changes what is computed, only how (and so, at most, float
rounding): a checkpointed simulation resumes under another
:class:`Execution`, and says so, while its :class:`~sfpk_jax.SFPKConfig`
must stay the same.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax

from sfpk_jax.runtime.cores import max_workers
from sfpk_jax.sfpk import fields
from sfpk_jax.sfpk.fields import ConfigError, field

ParticleMode = Literal["auto", "loop", "vmap", "map", "shard", "processes"]
ComputeDtype = Literal["float32", "bfloat16"]


@dataclasses.dataclass(frozen=True)
class Execution:
    """How :func:`sfpk_jax.sfpk_prune` runs the particles through the model.

    Example:

    >>> import sfpk_jax
    >>> sfpk_jax.Execution(particle_mode="processes", workers=2).describe()["workers"]
    2

    Attributes:
      particle_mode: ``auto`` (the default: chosen from the machine and the
        run, see :mod:`sfpk_jax.sfpk.auto`), ``loop`` (one jitted call per
        particle, dispatched asynchronously), ``vmap`` (all at once), ``map``
        (``lax.map`` in chunks of ``particle_chunk``), ``shard`` (split over
        the devices of ``mesh``, see :mod:`sfpk_jax.parallel.sharding`) or
        ``processes`` (split over local single-threaded worker processes,
        CPU only; see :mod:`sfpk_jax.sfpk.particle_workers`).
      workers: worker processes of ``processes`` mode; None: one per core.
        At most :func:`~sfpk_jax.runtime.cores.max_workers` (4 per
        core): each is a whole JAX runtime, and more only time-share the cores.
      particle_chunk: particles per chunk in ``map`` mode (bounds memory).
      mesh: the devices of ``shard`` mode (a
        :func:`sfpk_jax.parallel.sharding.particle_mesh`); None: as many
        devices as evenly share the particles.
      conv_chunk: run the model's convolutions over chunks of this many
        examples (:mod:`sfpk_jax.parallel.conv_chunks`: the same function up
        to float rounding, faster on a CPU); 0: whole batches; ``auto``: 32
        on a CPU, 0 on an accelerator.
      compute_dtype: dtype of the model's forward and backward passes in the
        energy: ``float32``, or ``bfloat16`` (faster on accelerators with
        bf16 units); particles, scores and updates stay float32.
      progress: show a progress bar over the steps (on a terminal; elsewhere
        one log line every 10 steps instead).
    """

    particle_mode: ParticleMode = field("auto", "how particles go through the model (auto: "
                                        "chosen from the machine and the run; shard: split "
                                        "over the devices; processes: over worker processes)")
    workers: int | None = field(None, "worker processes of processes mode (default: one per core; "
                                      "at most 4 per core)")
    particle_chunk: int = field(1, "particles per chunk in map mode (bounds memory)")
    mesh: Any = field(None, "the devices of shard mode (default: as many as evenly share the "
                            "particles)")
    conv_chunk: int | Literal["auto"] = field("auto", "examples per convolution chunk (0: whole "
                                                      "batches; auto: 32 on a CPU, 0 elsewhere)")
    compute_dtype: ComputeDtype = field("float32", "dtype of the forward/backward passes")
    progress: bool = field(True, "show a progress bar over the steps")

    def __post_init__(self):
        fields.check_choices(self)
        fields.check_int(self, "particle_chunk")
        fields.check_bool(self, "progress")
        if self.conv_chunk != "auto":
            fields.check_int(self, "conv_chunk", low=0, why=" (0: whole batches) or 'auto'")
        if self.workers is not None:
            # The bound first: a count that is wrong anyway is not sent to change modes.
            fields.check_int(self, "workers", high=max_workers(),
                             why=" (4 worker processes per core at most)")
            if self.particle_mode != "processes":
                raise ConfigError("Execution", "workers", self.workers,
                                  "None unless particle_mode='processes' (it counts that mode's "
                                  "worker processes; auto chooses them itself)")
        if self.mesh is not None:
            if not isinstance(self.mesh, jax.sharding.Mesh):
                raise ConfigError("Execution", "mesh", self.mesh, "None or a jax.sharding.Mesh")
            if self.particle_mode != "shard":
                raise ConfigError("Execution", "mesh", self.mesh,
                                  "None unless particle_mode='shard' (the mesh that mode splits "
                                  "the particles over)")

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (the mesh as its axis sizes), as checkpoints record it."""
        described = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                     if f.name not in ("mesh", "progress")}
        described["mesh"] = None if self.mesh is None else dict(self.mesh.shape)
        return described

    def replace(self, **changes) -> "Execution":
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)


# A pytree without leaves, so that tree maps over an SFPKResult skip its execution.
jax.tree_util.register_static(Execution)
