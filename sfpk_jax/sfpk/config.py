"""Hyper-parameters of the SFPK simulation, with the spec's defaults."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from sfpk_jax.core.channels import MASK_DIMS
from sfpk_jax.core.topk import SCOPES

SCHEDULES = ("exp", "lin", "ada_exp", "ada_lin")
SPARSITY_FNS = ("l2", "l1")
POLARIZERS = ("onehot", "onehot_soft", "identity", "quantile_sigmoid", "gauss_sigmoid")
REPULSION_MODES = ("exp", "cos")
VOTE_MODES = ("soft", "hard")
SCORES = ("mp", "m")
PARTICLE_MODES = ("loop", "vmap", "map", "shard", "processes")
COMPUTE_DTYPES = ("float32", "bfloat16")
LOCAL_POLARIZERS = ("sum", "layer")


class ConfigError(ValueError):
    """A field of :class:`SFPKConfig` was given a value it does not allow.

    Attributes:
      field: the field's name.
      value: the value given.
      expected: what the field allows, e.g. ``"an integer >= 1"``.
    """

    def __init__(self, field: str, value: Any, expected: str):
        super().__init__(f"SFPKConfig.{field}={value!r} must be {expected}")
        self.field, self.value, self.expected = field, value, expected


def _field(default: Any, text: str, choices: tuple | None = None) -> Any:
    """A config field whose metadata holds its one-line ``help`` and, for a choice, ``choices``."""
    metadata = {"help": text} if choices is None else {"help": text, "choices": choices}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class SFPKConfig:
    """Every knob of the spec (``docs/algorithm.md``), defaults as there.

    Each field's metadata holds a one-line ``help`` and, for a field with a
    fixed set of values, its ``choices``: the experiments make their flags
    from these. An invalid value raises :class:`ConfigError`.

    Attributes:
      steps: K, the number of simulation steps (100 on CIFAR, 150 on ImageNet).
      particles: n, the number of mask particles.
      repulsion: lambda, weight of the interaction energy K (0 disables it).
      radius: r >= 1, the localization radius of each step.
      schedule: step sizes ``exp`` (geometric density path), ``lin``, or the
        adaptive ``ada_exp`` / ``ada_lin`` that re-plan from the current G.
      sparsity_fn: the sparsity functional G, ``l2`` or ``l1``.
      polarizer: how the energy's gradient point is obtained from a particle:
        ``onehot`` (hard, straight-through at the binarised mask),
        ``onehot_soft``, ``identity``, ``quantile_sigmoid``, ``gauss_sigmoid``.
      polarizer_eps: sigmoid polarizers map their band onto
        [logit(1 - eps), logit(eps)].
      polarizer_ratio: sigmoid polarizers' lower band edge, as a fraction of
        the quantile 1 - G.
      repulsion_mode: ``exp`` (Gaussian kernel) or ``cos`` similarity.
      repulsion_weighted: weight the repulsion by |theta| (True) or by 1.
      vote_mode: ``soft`` (average scores) or ``hard`` (each particle votes
        with its own top entries).
      vote_ratio: fraction v of the lowest-energy particles that vote (1: all).
      momentum: mu, weight of the previous scores in the running vote.
      score: ``mp`` scores |m * theta|, ``m`` scores |m|.
      scope: the scope of the mask: ``global`` (one density over all
        prunable entries) or ``local`` (every layer is pruned to the target
        density on its own). It sets where the final mask and the polarizer
        take their top entries, and whether the step size dt is one number
        or one per layer (each from its layer's start density), as the
        reference's pruning scope does.
      mask_dim: None for unstructured masks, ``"out"`` or ``"in"`` for one
        mask entry per output or input channel of every kernel. Channel
        masks are layer-wise (need ``scope="local"``); the final mask keeps
        sqrt(1 - sparsity) of every layer's channels, and the simulation
        aims at the density renormalised over all of the model's parameters
        (see :func:`sfpk_jax.core.channels.simulation_density`), as the
        reference does.
      dynamics_scope: the scope of the dynamics: G, the norms of the step
        direction delta, the adaptive schedules' current G and the early
        stop read all prunable entries at once (``global``) or every layer
        on its own (``local``). None follows the
        reference: ``global`` for channel masks (``main.py --structural``
        keeps ``ode_scope=global``), otherwise the same as ``scope``. Local
        dynamics need ``scope="local"``.
      local_polarizer: the density at which a layer-wise polarizer
        (``scope="local"``) cuts each layer. ``sum``, the reference's: every
        layer at the dynamics' G (the global G, or the sum of the layer
        densities sum_l G_l when the dynamics are local), a layer left
        unpolarized while its k_l <= 1; with local dynamics the energy is
        therefore taken at the continuous mask until sum_l G_l < 1. ``layer``:
        every layer at its own G_l, left unpolarized while k_l < 1.
      particle_mode: how particles go through the model: ``loop`` (one jitted
        call per particle, dispatched asynchronously), ``vmap`` (all at once),
        ``map`` (``lax.map`` in chunks of ``particle_chunk``) or ``shard``
        (split over the devices of a mesh, see :mod:`sfpk_jax.parallel.sharding`)
        or ``processes`` (split over local single-threaded worker processes,
        one per core, CPU only; see :mod:`sfpk_jax.sfpk.processes`).
      particle_chunk: particles per chunk in ``map`` mode (bounds memory).
      particle_workers: worker processes of ``processes`` mode; None: one per core.
      compute_dtype: dtype of the model's forward and backward passes in the
        energy: ``float32``, or ``bfloat16`` (faster on accelerators with
        bf16 units); particles, scores and updates stay float32.
      early_stop: stop once the particles' mean G reaches the target density.
      progress: show a progress bar over the steps.
    """

    steps: int = _field(100, "simulation steps K")
    particles: int = _field(10, "particles n")
    repulsion: float = _field(0.2, "repulsion weight lambda")
    radius: float = _field(1.1, "localization radius r")
    schedule: str = _field("exp", "step-size schedule", SCHEDULES)
    sparsity_fn: str = _field("l2", "sparsity functional G", SPARSITY_FNS)
    polarizer: str = _field("onehot", "how a particle becomes the energy's gradient point",
                            POLARIZERS)
    polarizer_eps: float = _field(0.9, "sigmoid polarizers' band: [logit(1 - eps), logit(eps)]")
    polarizer_ratio: float = _field(0.9, "sigmoid polarizers' lower band edge, a fraction of 1 - G")
    repulsion_mode: str = _field("exp", "repulsion kernel", REPULSION_MODES)
    repulsion_weighted: bool = _field(True, "weight the repulsion by |theta|")
    vote_mode: str = _field("soft", "how the voters' scores combine", VOTE_MODES)
    vote_ratio: float = _field(1.0, "fraction of particles voting")
    momentum: float = _field(0.1, "score momentum mu")
    score: str = _field("mp", "what a particle scores: |m * theta| or |m|", SCORES)
    scope: str = _field("global", "scope of the mask's top-k (for SFPK also of the polarizer's "
                        "cut and the step sizes)", SCOPES)
    mask_dim: str | None = _field(None, "prune whole output or input channels (structured; needs "
                                  "scope local)", (None, *MASK_DIMS))
    dynamics_scope: str | None = _field(None, "scope of G and the step direction (default: global "
                                        "for channel masks, else the scope)", (None, *SCOPES))
    local_polarizer: str = _field("sum", "density a layer-wise polarizer cuts at: the dynamics' G "
                                  "(sum of layer densities when local; the reference's) or each "
                                  "layer's own", LOCAL_POLARIZERS)
    particle_mode: str = _field("loop", "how particles go through the model (shard: split over "
                                "the devices; processes: over one worker process per core)",
                                PARTICLE_MODES)
    particle_chunk: int = _field(1, "particles per chunk in map mode (bounds memory)")
    particle_workers: int | None = _field(None, "worker processes of processes mode (default: "
                                          "one per core)")
    compute_dtype: str = _field("float32", "dtype of the forward/backward passes", COMPUTE_DTYPES)
    early_stop: bool = _field(True, "stop once the particles' mean G reaches the target density")
    progress: bool = _field(True, "show a progress bar over the steps")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            allowed = f.metadata.get("choices")
            if allowed is not None and getattr(self, f.name) not in allowed:
                raise ConfigError(f.name, getattr(self, f.name),
                                  f"one of {', '.join(map(repr, allowed))}")
        if self.mask_dim is not None and self.scope != "local":
            raise ConfigError("mask_dim", self.mask_dim,
                              "None unless scope='local' (channel masks keep a share of every "
                              "layer's channels, as in the reference; the dynamics stay global "
                              "unless dynamics_scope='local')")
        if self.scope == "global" and self.dynamics_scope == "local":
            # The reference's combination starts its single dt from the sum of
            # the layer densities (Methods/sfpk.py, SFPKSystem.simulation).
            raise ConfigError("dynamics_scope", self.dynamics_scope,
                              "None or 'global' when scope='global' (layer-wise dynamics need "
                              "layer-wise step sizes and masks)")
        names = ("steps", "particles", "particle_chunk")
        if self.particle_workers is not None:
            names += ("particle_workers",)
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, value, "an integer >= 1")
        for name in ("repulsion_weighted", "early_stop", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, getattr(self, name), "True or False")
        _check_real(self.radius, "radius", lo=1.0, lo_open=False, what="r >= 1")
        _check_real(self.repulsion, "repulsion", lo=0.0, lo_open=False, what=">= 0")
        _check_real(self.momentum, "momentum", lo=0.0, lo_open=False, what=">= 0")
        _check_real(self.vote_ratio, "vote_ratio", lo=0.0, hi=1.0, what="in (0, 1]")
        _check_real(self.polarizer_eps, "polarizer_eps", lo=0.5, hi=1.0, hi_open=True,
                    what="in (0.5, 1)")
        _check_real(self.polarizer_ratio, "polarizer_ratio", lo=0.0, hi=1.0,
                    hi_open=True, what="in (0, 1)")

    @property
    def dynamics(self) -> str:
        """The scope of the dynamics: ``dynamics_scope``, or the default it stands for."""
        if self.dynamics_scope is not None:
            return self.dynamics_scope
        return "global" if self.mask_dim is not None else self.scope

    @property
    def voters(self) -> int:
        """ceil(v * n): how many of the lowest-energy particles vote."""
        return max(1, math.ceil(self.vote_ratio * self.particles - 1e-9))

    def replace(self, **changes) -> "SFPKConfig":
        return dataclasses.replace(self, **changes)


def _check_real(value, name, *, lo=None, hi=None, lo_open=True, hi_open=False, what=""):
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if not bad and lo is not None:
        bad = value <= lo if lo_open else value < lo
    if not bad and hi is not None:
        bad = value >= hi if hi_open else value > hi
    if bad:
        raise ConfigError(name, value, f"a finite number {what}")


def spode(config: SFPKConfig | None = None) -> SFPKConfig:
    """SpODE (Mo et al., ICML 2023): ``config`` with one particle and no repulsion."""
    return (config or SFPKConfig()).replace(particles=1, repulsion=0.0)


def spode_config(**changes) -> SFPKConfig:
    """The SpODE config with ``changes`` to its other fields (see :func:`spode`)."""
    return spode(SFPKConfig(**changes))
