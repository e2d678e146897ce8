"""What the SFPK simulation computes: its hyper-parameters, with the spec's defaults.

How the work is carried out (particle modes, worker processes, precision,
progress) is :class:`sfpk_jax.sfpk.execution.Execution`'s: a checkpointed
simulation resumes under another execution, but only under the same config.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from sfpk_jax.core import channels, n_m
from sfpk_jax.core.channels import MaskDim
from sfpk_jax.core.topk import Scope
from sfpk_jax.sfpk import fields
from sfpk_jax.sfpk.fields import ConfigError, field

Schedule = Literal["exp", "lin", "ada_exp", "ada_lin"]
SparsityFn = Literal["l2", "l1"]
Polarizer = Literal["onehot", "onehot_soft", "identity", "quantile_sigmoid", "gauss_sigmoid"]
RepulsionMode = Literal["exp", "cos"]
VoteMode = Literal["soft", "hard"]
Score = Literal["mp", "m"]
LocalPolarizer = Literal["sum", "layer"]


@dataclasses.dataclass(frozen=True)
class SFPKConfig:
    """What the simulation computes: every knob of the spec (``docs/algorithm.md``), its defaults.

    Each field's metadata holds a one-line ``help``; a field typed with a
    ``Literal`` takes exactly those values. An invalid value raises
    :class:`ConfigError`. A checkpointed simulation resumes only under an
    equal config (its fingerprint is this whole dataclass).

    Example:

    >>> import sfpk_jax
    >>> config = sfpk_jax.SFPKConfig(steps=50, particles=4)
    >>> config.voters, config.radius
    (4, 1.1)
    >>> sfpk_jax.SFPKConfig(radius=0.5)
    Traceback (most recent call last):
    ...
    sfpk_jax.sfpk.fields.ConfigError: SFPKConfig.radius=0.5 must be a finite number r >= 1

    Attributes:
      steps: K, the number of simulation steps (100 on CIFAR, 150 on ImageNet).
      particles: n, the number of mask particles.
      repulsion: lambda, weight of the interaction energy K (0 disables it).
      radius: r >= 1, the localization radius of each step.
      schedule: step sizes ``exp`` (geometric density path), ``lin``, or the
        adaptive ``ada_exp`` / ``ada_lin`` that re-plan from the current G.
      sparsity_fn: the functional G, ``l2`` or ``l1``.
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
      vote_momentum: mu, weight of the previous scores in the running vote.
      score: ``mp`` scores |m * theta|, ``m`` scores |m|.
      scope: the scope of the mask: ``global`` (one ranking over all
        prunable entries) or ``local`` (every layer is pruned to the target
        sparsity on its own). It sets where the final mask and the polarizer
        take their top entries, and whether the step size dt is one number
        or one per layer (each from its layer's start density), as the
        reference's pruning scope does.
      mask_dim: None for unstructured masks, ``"out"`` or ``"in"`` for one
        mask entry per output or input channel of every kernel. Channel
        masks are layer-wise (need ``scope="local"``); the final mask keeps
        sqrt(1 - sparsity) of every layer's channels, and the simulation
        aims at the density renormalised over all of the model's parameters
        (see :func:`sfpk_jax.core.channels.simulation_density`), as the
        reference does. ``"N:M"`` with 0 < N < M (``"2:4"``, say) keeps N of
        every M consecutive weights along each kernel's input axis (any
        scope; the sparsity must be 1 - N/M): the simulation runs
        unstructured toward density N/M, and the final mask takes every
        group's top N of the voted scores (see :mod:`sfpk_jax.core.n_m`).
      dynamics_scope: the scope of the dynamics: G, the norms of the step
        direction delta, the adaptive schedules' current G and the early
        stop read all prunable entries at once (``global``) or every layer
        on its own (``local``). None follows the reference: ``global`` for
        channel masks (the reference's structural mode keeps ``ode_scope=global``),
        otherwise the same as ``scope``. Local dynamics need ``scope="local"``.
      local_polarizer: the density at which a layer-wise polarizer
        (``scope="local"``) cuts each layer. ``sum``, the reference's: every
        layer at the dynamics' G (the global G, or the sum of the layer
        densities sum_l G_l when the dynamics are local), a layer left
        unpolarized while its k_l <= 1; with local dynamics the energy is
        therefore taken at the continuous mask until sum_l G_l < 1. ``layer``:
        every layer at its own G_l, left unpolarized while k_l < 1.
      early_stop: stop once the particles' mean G reaches the target density.
    """

    steps: int = field(100, "simulation steps K")
    particles: int = field(10, "particles n")
    repulsion: float = field(0.2, "repulsion weight lambda")
    radius: float = field(1.1, "localization radius r")
    schedule: Schedule = field("exp", "step-size schedule")
    sparsity_fn: SparsityFn = field("l2", "the functional G")
    polarizer: Polarizer = field("onehot", "how a particle becomes the energy's gradient point")
    polarizer_eps: float = field(0.9, "sigmoid polarizers' band: [logit(1 - eps), logit(eps)]")
    polarizer_ratio: float = field(0.9, "sigmoid polarizers' lower band edge, a fraction of 1 - G")
    repulsion_mode: RepulsionMode = field("exp", "repulsion kernel")
    repulsion_weighted: bool = field(True, "weight the repulsion by |theta|")
    vote_mode: VoteMode = field("soft", "how the voters' scores combine")
    vote_ratio: float = field(1.0, "fraction of particles voting")
    vote_momentum: float = field(0.1, "weight mu of the previous scores in the running vote")
    score: Score = field("mp", "what a particle scores: |m * theta| or |m|")
    scope: Scope = field("global", "scope of the mask's top-k (for SFPK also of the polarizer's "
                         "cut and the step sizes)")
    mask_dim: MaskDim | str | None = field(None, "prune whole output or input channels (out, "
                                           "in; needs scope local), or keep N of every M "
                                           "weights along each kernel's input axis (N:M, e.g. "
                                           "2:4)")
    dynamics_scope: Scope | None = field(None, "scope of G and the step direction (default: "
                                         "global for channel masks, else the scope)")
    local_polarizer: LocalPolarizer = field("sum", "density a layer-wise polarizer cuts at: the "
                                            "dynamics' G (sum of layer densities when local; the "
                                            "reference's) or each layer's own")
    early_stop: bool = field(True, "stop once the particles' mean G reaches the target density")

    def __post_init__(self):
        fields.check_choices(self)
        try:
            n_m.from_mask_dim(self.mask_dim)
        except ValueError:
            raise ConfigError("SFPKConfig", "mask_dim", self.mask_dim,
                              "None, 'out', 'in' or 'N:M' with 0 < N < M, e.g. '2:4'") from None
        if channels.is_channel(self.mask_dim) and self.scope != "local":
            raise ConfigError("SFPKConfig", "mask_dim", self.mask_dim,
                              "None unless scope='local' (channel masks keep a share of every "
                              "layer's channels, as in the reference; the dynamics stay global "
                              "unless dynamics_scope='local')")
        if self.scope == "global" and self.dynamics_scope == "local":
            # The reference's combination starts its single dt from the sum of
            # the layer densities (Methods/sfpk.py, SFPKSystem.simulation).
            raise ConfigError("SFPKConfig", "dynamics_scope", self.dynamics_scope,
                              "None or 'global' when scope='global' (layer-wise dynamics need "
                              "layer-wise step sizes and masks)")
        for name in ("steps", "particles"):
            fields.check_int(self, name)
        for name in ("repulsion_weighted", "early_stop"):
            fields.check_bool(self, name)
        fields.check_real(self, "radius", lo=1.0, lo_open=False, what="r >= 1")
        fields.check_real(self, "repulsion", lo=0.0, lo_open=False, what=">= 0")
        fields.check_real(self, "vote_momentum", lo=0.0, lo_open=False, what=">= 0")
        fields.check_real(self, "vote_ratio", lo=0.0, hi=1.0, what="in (0, 1]")
        fields.check_real(self, "polarizer_eps", lo=0.5, hi=1.0, hi_open=True, what="in (0.5, 1)")
        fields.check_real(self, "polarizer_ratio", lo=0.0, hi=1.0, hi_open=True,
                          what="in (0, 1)")

    @property
    def dynamics(self) -> str:
        """The scope of the dynamics: ``dynamics_scope``, or the default it stands for."""
        if self.dynamics_scope is not None:
            return self.dynamics_scope
        return "global" if channels.is_channel(self.mask_dim) else self.scope

    @property
    def voters(self) -> int:
        """ceil(v * n): how many of the lowest-energy particles vote."""
        return max(1, math.ceil(self.vote_ratio * self.particles - 1e-9))

    def replace(self, **changes) -> "SFPKConfig":
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)


def spode(config: SFPKConfig | None = None) -> SFPKConfig:
    """SpODE (Mo et al., ICML 2023): ``config`` with one particle and no repulsion."""
    return (config or SFPKConfig()).replace(particles=1, repulsion=0.0)
