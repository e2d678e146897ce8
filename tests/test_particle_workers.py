"""``particle_mode="processes"``: the particles' energies in local worker processes.

* The result equals ``loop``'s: the same masks, scores and trace within 1e-5
  (a model with batch norm, its state passed as a ``StatefulLoss``).
* The workers end with the call, and a killed worker stops the simulation
  with an error that names the dead worker and the checkpoint kept.
* A simulation checkpointed under worker processes resumes under another
  execution (``loop``, other worker counts), which is announced, and ends
  with the masks of an uninterrupted run.
* Workers cache their compiled program on disk (the parent's cache folder,
  else the default one): a second pool loads it instead of compiling.
* A worker pool refuses a bad worker count; ``make_stepper`` sends the mode
  to ``sfpk_prune`` (which starts the workers).
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import sfpk_jax
from sfpk_jax import CheckpointPolicy, Execution, SFPKConfig
from sfpk_jax.core.masks import MaskLayout
from sfpk_jax.parallel import compile_cache
from sfpk_jax.parallel.worker_pool import WorkerError, WorkerPool

pytestmark = pytest.mark.slow


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
        if ppid == os.getpid() and b"worker_main.py" in cmdline:
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
    for execution in (Execution("loop"), Execution("processes", workers=2)):
        results[execution.particle_mode] = sfpk_jax.sfpk_prune(
            loss, cnn.params, cnn.particle_batches(3, seed=5), 0.6,
            config=SFPKConfig(steps=4, particles=3), execution=execution)
    assert _workers() == []
    loop, procs = results["loop"], results["processes"]
    for a, b in zip(jax.tree.leaves(loop.masks), jax.tree.leaves(procs.masks)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(loop.scores), jax.tree.leaves(procs.scores)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for field in ("E", "G", "K"):
        np.testing.assert_allclose(loop.trace[field], procs.trace[field], rtol=1e-5, atol=1e-7)


def test_a_killed_worker_stops_the_run_with_a_clear_error(mlp, tmp_path):
    config = SFPKConfig(steps=6, particles=2, early_stop=False)
    workers = Execution("processes", workers=2)

    def batches():
        for step, batch in enumerate(mlp.particle_batches(2, seed=1)):
            if step == 3:
                for pid in _workers():
                    os.kill(pid, signal.SIGKILL)
            yield batch

    with pytest.raises(WorkerError, match=r"worker process \d \(pid \d+\) died.*last checkpoint"):
        sfpk_jax.sfpk_prune(mlp.loss_fn, mlp.params, batches(), 0.6, config=config,
                            execution=workers, checkpoint=CheckpointPolicy(tmp_path / "sim", every=1))
    assert _workers() == []
    # The steps before the kill are checkpointed, and a resumed run finishes.
    resumed = sfpk_jax.sfpk_prune(mlp.loss_fn, mlp.params, mlp.particle_batches(2, seed=1), 0.6,
                                  config=config, execution=Execution("loop"),
                                  checkpoint=CheckpointPolicy(tmp_path / "sim", every=1,
                                                              resume=True))
    assert resumed.trace["E"].shape == (6, 2)


class _Records(logging.Handler):
    """Collects what one logger says (whether or not it propagates to the root)."""

    def __init__(self, name: str):
        super().__init__(logging.WARNING)
        self.logger, self.messages = logging.getLogger(name), []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)


def test_a_checkpoint_of_two_workers_resumes_under_loop_and_four_workers(cnn, tmp_path):
    """The execution is not part of the simulation's fingerprint: a run
    checkpointed in processes mode with 2 workers continues under ``loop`` and
    under 4 workers (more than the cores here), announcing the change, and
    ends with the masks of an uninterrupted run."""
    loss, steps = _stateful_loss(cnn), 6
    config = SFPKConfig(steps=steps, particles=4, early_stop=False)
    two = Execution("processes", workers=2)

    def run(execution, folder, stop=None, resume=False):
        batches = cnn.particle_batches(4, seed=8)
        if stop is not None:  # the batches run out: the run stops there, checkpointed
            batches = (b for _, b in zip(range(stop), batches))
        return sfpk_jax.sfpk_prune(loss, cnn.params, batches, 0.7, config=config,
                                   execution=execution,
                                   checkpoint=CheckpointPolicy(folder, every=1, resume=resume))

    whole = run(two, tmp_path / "whole")
    for name, resumed_under in (("loop", Execution("loop")),
                                ("four", Execution("processes", workers=4))):
        folder = tmp_path / name
        with pytest.raises(ValueError, match="batches ran out at step 3"):
            run(two, folder, stop=3)
        with _Records("sfpk_jax.sfpk.resume") as records:
            resumed = run(resumed_under, folder, resume=True)
        announced = " ".join(records.messages)
        assert "under another execution" in announced and "at step 3" in announced, announced
        assert resumed.trace["G"].shape == (steps, 4)
        for a, b in zip(jax.tree.leaves(whole.masks), jax.tree.leaves(resumed.masks)):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(jax.tree.leaves(whole.scores), jax.tree.leaves(resumed.scores)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert _workers() == []


def test_a_changed_config_is_refused_naming_the_field(mlp, tmp_path):
    config = SFPKConfig(steps=4, particles=2, early_stop=False)
    folder = tmp_path / "sim"
    batches = (b for _, b in zip(range(2), mlp.particle_batches(2, seed=1)))
    with pytest.raises(ValueError, match="batches ran out"):
        sfpk_jax.sfpk_prune(mlp.loss_fn, mlp.params, batches, 0.6, config=config,
                            checkpoint=CheckpointPolicy(folder, every=1))
    with pytest.raises(sfpk_jax.ResumeError, match=r"config\.radius: checkpoint 1\.1, now 1\.2"):
        sfpk_jax.sfpk_prune(mlp.loss_fn, mlp.params, mlp.particle_batches(2, seed=1), 0.6,
                            config=config.replace(radius=1.2),
                            checkpoint=CheckpointPolicy(folder, every=1, resume=True))


def test_bad_worker_counts_and_make_stepper_are_refused(mlp):
    with pytest.raises(ValueError, match=r"worker count in \[1, \d+\]"):
        WorkerPool(0)
    with pytest.raises(ValueError, match=r"worker count in \[1, \d+\]"):
        WorkerPool(4 * len(os.sched_getaffinity(0)) + 1)
    config = SFPKConfig(particles=2)
    with pytest.raises(ValueError, match="sfpk_prune starts them"):
        sfpk_jax.sfpk.make_stepper(mlp.loss_fn, MaskLayout.from_params(mlp.params), config, 0.3,
                                   Execution("processes"))


@pytest.fixture
def own_cache(tmp_path):
    """This process caches its programs in a fresh folder for the test."""
    before = jax.config.jax_compilation_cache_dir
    compile_cache.enable(tmp_path / "cache")
    yield tmp_path / "cache"
    compile_cache.apply({"jax_compilation_cache_dir": before})


def _entries(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_a_second_pool_loads_the_program_from_the_cache(own_cache):
    # A constant of this test's own, so that no earlier program matches.
    fn = jax.jit(lambda w, x: (w * x).sum() + 0.123456)
    exported = jax.export.export(fn)(np.ones(3, np.float32), np.ones(3, np.float32)).serialize()
    with WorkerPool(2) as pool:
        pool.load(exported, (np.full(3, 2.0, np.float32),))
        assert pool.map([(np.ones(3, np.float32),)] * 2) == pytest.approx([6.123456] * 2)
    written = _entries(own_cache)
    assert written, "the workers wrote no program to the parent's cache folder"
    with WorkerPool(2) as pool:
        pool.load(exported, (np.full(3, 2.0, np.float32),))
        assert pool.map([(np.ones(3, np.float32),)]) == pytest.approx([6.123456])
    # A miss would compile and write the entry again.
    assert _entries(own_cache) == written


def test_workers_cache_in_the_parents_folder_else_the_default(monkeypatch, tmp_path, own_cache):
    assert compile_cache.for_workers() == own_cache
    compile_cache.apply({"jax_compilation_cache_dir": None})
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
    assert compile_cache.for_workers() == tmp_path / "env"
    assert (tmp_path / "env").is_dir()
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.for_workers() is None
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "file"))
    assert compile_cache.for_workers() is None
