"""SFPKConfig: the spec's defaults and validation of every field."""

from __future__ import annotations

import dataclasses
import math

import pytest

from sfpk_jax import Execution, SFPKConfig
from sfpk_jax.sfpk import spode

pytestmark = pytest.mark.strict_promotion

SPEC_DEFAULTS = dict(
    steps=100,
    particles=10,
    repulsion=0.2,
    radius=1.1,
    schedule="exp",
    sparsity_fn="l2",
    polarizer="onehot",
    repulsion_mode="exp",
    repulsion_weighted=True,
    vote_mode="soft",
    vote_ratio=1.0,
    vote_momentum=0.1,
    score="mp",
    scope="global",
)


def test_defaults_are_the_specs():
    config = SFPKConfig()
    for name, value in SPEC_DEFAULTS.items():
        assert getattr(config, name) == value, name
    assert config.voters == 10


INVALID = [
    ("steps", 0), ("steps", -3), ("steps", 2.5), ("steps", True), ("steps", "10"),
    ("particles", 0), ("particles", 1.0), ("particles", None),
    ("repulsion", -0.1), ("repulsion", math.nan), ("repulsion", math.inf), ("repulsion", "0.2"),
    ("radius", 0.99), ("radius", -1.0), ("radius", math.nan), ("radius", True),
    ("vote_momentum", -0.5), ("vote_momentum", math.inf),
    ("vote_ratio", 0.0), ("vote_ratio", 1.01), ("vote_ratio", -1.0),
    ("polarizer_eps", 0.5), ("polarizer_eps", 1.0), ("polarizer_eps", 0.2),
    ("polarizer_ratio", 0.0), ("polarizer_ratio", 1.0),
    ("schedule", "cosine"), ("schedule", "EXP"),
    ("sparsity_fn", "l0"),
    ("polarizer", "sigmoid"),
    ("repulsion_mode", "rbf"),
    ("vote_mode", "majority"),
    ("score", "p"),
    ("scope", "layer"),
    ("mask_dim", "channels"),
    ("local_polarizer", "own"),
]


@pytest.mark.parametrize("field,value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SFPKConfig\.{field}="):
        SFPKConfig(**{field: value})


BOOL_FIELDS = ["repulsion_weighted", "early_stop"]


@pytest.mark.parametrize("field", BOOL_FIELDS)
def test_non_bool_switches_are_rejected(field):
    # repulsion_weighted="False" would silently mean True.
    for value in ("False", None, 0.5):
        with pytest.raises(ValueError, match=rf"SFPKConfig\.{field}="):
            SFPKConfig(**{field: value})


@pytest.mark.parametrize(
    "changes",
    [
        dict(radius=1.0), dict(repulsion=0.0), dict(vote_momentum=0.0), dict(vote_ratio=1e-3),
        dict(polarizer_eps=0.99), dict(steps=1, particles=1), dict(radius=5), dict(repulsion=1),
    ],
)
def test_edge_values_are_accepted(changes):
    config = SFPKConfig(**changes)
    for name, value in changes.items():
        assert getattr(config, name) == value


@pytest.mark.parametrize("ratio,n,voters", [(1.0, 10, 10), (0.5, 10, 5), (0.3, 10, 3), (0.25, 10, 3), (0.01, 10, 1), (0.5, 3, 2)])
def test_voters_is_ceil_of_ratio_times_n(ratio, n, voters):
    assert SFPKConfig(vote_ratio=ratio, particles=n).voters == voters


def test_frozen_and_replace_validates():
    config = SFPKConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 5
    assert config.replace(steps=7).steps == 7
    assert config.steps == 100
    with pytest.raises(ValueError, match="SFPKConfig.radius="):
        config.replace(radius=0.5)


def test_spode_config_is_one_particle_without_repulsion():
    config = spode(SFPKConfig(steps=20))
    assert (config.particles, config.repulsion, config.steps) == (1, 0.0, 20)
    assert config.radius == SPEC_DEFAULTS["radius"]


def test_what_is_computed_and_how_it_runs_are_apart():
    # A field in both would be fingerprinted and free to change on resume at once.
    computed = {f.name for f in dataclasses.fields(SFPKConfig)}
    executed = {f.name for f in dataclasses.fields(Execution)}
    assert not computed & executed
    assert {"particle_mode", "workers", "compute_dtype", "progress"} <= executed
