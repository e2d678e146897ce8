"""Execution: how the simulation runs, validated field by field."""

from __future__ import annotations

import jax
import pytest

from sfpk_jax import ConfigError, Execution
from sfpk_jax.parallel import sharding
from sfpk_jax.runtime.cores import local_cores, max_workers

INVALID = [
    ("particle_mode", "pmap"), ("particle_mode", None), ("compute_dtype", "float16"),
    ("particle_chunk", 0), ("particle_chunk", False), ("particle_chunk", 1.5),
    ("progress", "yes"), ("progress", None),
    ("mesh", "cpu"),
]


@pytest.mark.parametrize("field,value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"Execution\.{field}=") as caught:
        Execution(**{field: value})
    assert (caught.value.owner, caught.value.field, caught.value.value) == ("Execution", field, value)


@pytest.mark.parametrize("workers", [0, -1, 2.0, True])
def test_workers_must_be_a_positive_int(workers):
    with pytest.raises(ConfigError, match=r"Execution\.workers="):
        Execution(particle_mode="processes", workers=workers)


def test_workers_are_bounded_by_four_per_core():
    assert max_workers() == 4 * len(local_cores())
    assert Execution(particle_mode="processes", workers=max_workers()).workers == max_workers()
    for mode in ("processes", "loop"):  # the bound is said whatever the mode
        with pytest.raises(ConfigError, match=r"in \[1, \d+\] \(4 worker processes per core"):
            Execution(particle_mode=mode, workers=max_workers() + 1)


def test_workers_and_mesh_belong_to_their_mode():
    with pytest.raises(ConfigError, match="None unless particle_mode='processes'"):
        Execution(particle_mode="loop", workers=2)
    mesh = sharding.particle_mesh(jax.devices()[:1])
    with pytest.raises(ConfigError, match="None unless particle_mode='shard'"):
        Execution(particle_mode="vmap", mesh=mesh)
    assert Execution(particle_mode="shard", mesh=mesh).mesh is mesh


def test_describe_is_json_able_and_replace_validates():
    mesh = sharding.particle_mesh(jax.devices()[:1])
    described = Execution(particle_mode="shard", mesh=mesh, progress=False).describe()
    assert described == {"particle_mode": "shard", "workers": None, "particle_chunk": 1,
                         "conv_chunk": "auto", "compute_dtype": "float32",
                         "mesh": {sharding.PARTICLES: 1, sharding.BATCH: 1}}
    with pytest.raises(ConfigError, match="particle_chunk"):
        Execution().replace(particle_chunk=0)
