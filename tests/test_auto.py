"""``Execution``'s ``auto``: what it resolves to where, said once, overridden by any explicit choice.

* A multi-core CPU: worker processes when the run's estimated work earns
  their start, ``loop`` otherwise (and on one core, and when the work is not
  known); convolution chunks of 32.
* An accelerator: ``shard`` when the particles split over two or more
  devices, else ``vmap``; whole convolutions. Several processes: ``shard``.
* An explicit mode or chunk is kept, and the work is then never estimated.
* The choice is logged once and returned in ``SFPKResult.execution``.
"""

from __future__ import annotations

import logging

import jax
import pytest

import sfpk_jax
from sfpk_jax import ConfigError, Execution, SFPKConfig
from sfpk_jax.sfpk import auto

CONFIG = SFPKConfig(particles=10, steps=100)


@pytest.fixture
def machine(monkeypatch):
    """Sets the backend, cores, local devices and process count ``auto`` sees."""

    def set_(backend="cpu", cores=2, devices=1, processes=1):
        monkeypatch.setattr(auto.jax, "default_backend", lambda: backend)
        monkeypatch.setattr(auto, "local_cores", lambda: list(range(cores)))
        monkeypatch.setattr(auto.jax, "local_devices", lambda: [object()] * devices)
        monkeypatch.setattr(auto.jax, "process_count", lambda: processes)

    return set_


def _never():
    raise AssertionError("the work was estimated, though no worker processes could be chosen")


def test_a_multicore_cpu_starts_workers_only_for_a_long_run(machine):
    machine(cores=2)
    long = auto.choose(Execution(), CONFIG, work=lambda: 10 * auto.PROCESSES_MIN_FLOPS)
    assert long.execution.particle_mode == "processes" and long.execution.workers == 2
    assert long.execution.conv_chunk == auto.CPU_CONV_CHUNK
    assert "long run" in long.reason and "chunks of 32" in long.reason
    short = auto.choose(Execution(), CONFIG, work=lambda: auto.PROCESSES_MIN_FLOPS / 10)
    assert short.execution.particle_mode == "loop" and "short run" in short.reason
    unknown = auto.choose(Execution(), CONFIG, work=lambda: None)
    assert unknown.execution.particle_mode == "loop" and "not known" in unknown.reason
    # Never more workers than particles.
    machine(cores=16)
    few = auto.choose(Execution(), SFPKConfig(particles=3),
                      work=lambda: 10 * auto.PROCESSES_MIN_FLOPS)
    assert few.execution.workers == 3


def test_one_core_and_bare_steppers_loop_without_estimating(machine):
    machine(cores=1)
    assert auto.choose(Execution(), CONFIG, work=_never).execution.particle_mode == "loop"
    machine(cores=8)
    bare = auto.choose(Execution(), CONFIG, work=_never, allow_processes=False)
    assert bare.execution.particle_mode == "loop"


def test_accelerators_shard_or_vmap_with_whole_convolutions(machine):
    machine(backend="gpu", devices=8)
    shard = auto.choose(Execution(), CONFIG, work=_never)
    assert shard.execution.particle_mode == "shard" and shard.execution.conv_chunk == 0
    assert "5 of the 8 gpu devices" in shard.reason
    machine(backend="gpu", devices=6)  # 7 particles split over none of 2..6 devices
    odd = auto.choose(Execution(), SFPKConfig(particles=7), work=_never)
    assert odd.execution.particle_mode == "vmap"
    machine(backend="tpu", devices=1)
    assert auto.choose(Execution(), CONFIG, work=_never).execution.particle_mode == "vmap"
    machine(backend="cpu", processes=2)
    assert auto.choose(Execution(), CONFIG, work=_never).execution.particle_mode == "shard"


def test_explicit_choices_are_kept(machine):
    machine(cores=2)
    given = Execution(particle_mode="vmap", conv_chunk=0)
    assert auto.choose(given, CONFIG, work=_never) == (given, "")
    half = auto.choose(Execution(particle_mode="processes", workers=1), CONFIG, work=_never)
    assert half.execution.workers == 1 and half.execution.conv_chunk == auto.CPU_CONV_CHUNK
    chunk = auto.choose(Execution(conv_chunk=16), CONFIG, work=lambda: None).execution
    assert chunk.conv_chunk == 16


def test_bad_conv_chunks_are_refused():
    for bad in (-1, "fast", True, 2.0):
        with pytest.raises(ConfigError, match="conv_chunk"):
            Execution(conv_chunk=bad)


def test_the_work_estimate_scales_with_particles_and_steps(mlp):
    batch = next(iter(mlp.particle_batches(1)))
    one = jax.tree.map(lambda x: x[0], batch)
    base = auto.estimate_work(mlp.loss_fn, mlp.params, one, SFPKConfig(particles=2, steps=10))
    more = auto.estimate_work(mlp.loss_fn, mlp.params, one, SFPKConfig(particles=4, steps=30))
    assert base > 0 and more == pytest.approx(6 * base)


def test_the_choice_is_said_once_and_returned(mlp, caplog, monkeypatch):
    monkeypatch.setattr(auto, "_announced", set())
    config = SFPKConfig(steps=2, particles=2)
    with caplog.at_level(logging.INFO, logger=auto.__name__):
        results = [sfpk_jax.sfpk_prune(mlp.loss_fn, mlp.params, mlp.particle_batches(2), 0.5,
                                       config=config, execution=Execution(progress=False))
                   for _ in range(2)]
    said = [r.getMessage() for r in caplog.records if r.name == auto.__name__]
    assert len(said) == 1 and "(auto: " in said[0] and "Execution(...)" in said[0]
    chosen = results[0].execution
    assert chosen.particle_mode in ("loop", "processes") and isinstance(chosen.conv_chunk, int)
    assert auto.summary(chosen) in said[0]
    explicit = sfpk_jax.sfpk_prune(mlp.loss_fn, mlp.params, mlp.particle_batches(2), 0.5,
                                   config=config,
                                   execution=Execution("vmap", conv_chunk=0, progress=False))
    assert explicit.execution == Execution("vmap", conv_chunk=0, progress=False)
