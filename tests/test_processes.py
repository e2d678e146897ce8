"""``particle_mode="processes"``: the particles' energies in local worker processes.

* The result equals ``loop``'s: the same masks, scores and trace within 1e-5
  (a model with batch norm, its state passed as a ``StatefulLoss``).
* The workers end with the call, and a killed worker stops the simulation
  with an error that names the dead worker and the checkpoint kept.
* A worker pool refuses a bad worker count; ``make_stepper`` sends the mode
  to ``sfpk_prune`` (which starts the workers).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import sfpk_jax
from sfpk_jax import CheckpointPolicy, MaskLayout, SFPKConfig
from sfpk_jax.parallel.workers import WorkerError, WorkerPool


def _workers() -> list[int]:
    """Pids of this process's children that run the worker script."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == os.getpid() and b"worker_process.py" in cmdline:
            pids.append(int(entry.name))
    return pids


def _stateful_loss(model):
    def fn(params, batch, state):
        logits, _ = model.module.apply({**state, "params": params}, batch["x"], True,
                                       mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    return sfpk_jax.StatefulLoss(fn, model.extra)


def test_processes_give_loop_s_result_and_end_with_the_call(cnn):
    loss = _stateful_loss(cnn)
    results = {}
    for mode in ("loop", "processes"):
        config = SFPKConfig(steps=4, particles=3, particle_mode=mode, particle_workers=2,
                            progress=False)
        results[mode] = sfpk_jax.sfpk_prune(loss, cnn.params, cnn.particle_batches(3, seed=5),
                                            0.6, config)
    assert _workers() == []
    loop, procs = results["loop"], results["processes"]
    for a, b in zip(jax.tree.leaves(loop.masks), jax.tree.leaves(procs.masks)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(loop.scores), jax.tree.leaves(procs.scores)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for field in ("energy", "density", "repulsion"):
        np.testing.assert_allclose(loop.trace[field], procs.trace[field], rtol=1e-5, atol=1e-7)


def test_a_killed_worker_stops_the_run_with_a_clear_error(mlp, tmp_path):
    config = SFPKConfig(steps=6, particles=2, particle_mode="processes", particle_workers=2,
                        early_stop=False, progress=False)

    def batches():
        for step, batch in enumerate(mlp.particle_batches(2, seed=1)):
            if step == 3:
                for pid in _workers():
                    os.kill(pid, signal.SIGKILL)
            yield batch

    with pytest.raises(WorkerError, match=r"worker process \d \(pid \d+\) died.*last checkpoint"):
        sfpk_jax.sfpk_prune(mlp.loss_fn, mlp.params, batches(), 0.6, config,
                            checkpoint=CheckpointPolicy(tmp_path / "sim", every=1))
    assert _workers() == []
    # The steps before the kill are checkpointed, and a resumed run finishes.
    resumed = sfpk_jax.sfpk_prune(mlp.loss_fn, mlp.params, mlp.particle_batches(2, seed=1), 0.6,
                                  config.replace(particle_mode="loop"),
                                  checkpoint=CheckpointPolicy(tmp_path / "sim", every=1,
                                                              resume=True))
    assert resumed.trace["energy"].shape == (6, 2)


def test_bad_worker_counts_and_make_stepper_are_refused(mlp):
    with pytest.raises(ValueError, match="worker count >= 1"):
        WorkerPool(0)
    with pytest.raises(ValueError, match="particle_workers"):
        SFPKConfig(particle_mode="processes", particle_workers=0)
    config = SFPKConfig(particles=2, particle_mode="processes")
    with pytest.raises(ValueError, match="sfpk_prune starts them"):
        sfpk_jax.make_stepper(mlp.loss_fn, MaskLayout.from_params(mlp.params), config, 0.3)
