"""Checkpointing and resuming the SFPK simulation, and stopping on non-finite values."""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from sfpk_jax import Execution, SFPKConfig, sfpk_prune
from sfpk_jax.sfpk.resume import CheckpointPolicy, ResumeError

pytestmark = pytest.mark.slow

N = 3
STEPS = 20
EVERY = 3


def _config(**changes):
    return SFPKConfig(**{"steps": STEPS, "particles": N, "early_stop": False,
                         **changes})


def _batches(mlp, poison: tuple[int, int] | None = None):
    """A function start -> batches from step start; ``poison=(step, particle)`` puts a NaN there."""

    def from_step(start):
        for step, batch in enumerate(mlp.particle_batches(N, seed=1)):
            if step < start:
                continue
            if poison is not None and step == poison[0]:
                batch = {**batch, "x": batch["x"].copy()}
                batch["x"][poison[1], 0, 0] = np.nan
            yield batch

    return from_step


def _assert_same(a, b):
    for name in ("masks", "scores", "particles"):
        for x, y in zip(jax.tree.leaves(getattr(a, name)), jax.tree.leaves(getattr(b, name))):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
    assert set(a.trace) == set(b.trace)
    for name in a.trace:
        np.testing.assert_array_equal(a.trace[name], b.trace[name], err_msg=name)


def _steps(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


@pytest.fixture(scope="module")
def reference(mlp):
    return sfpk_prune(mlp.loss_fn, mlp.params, _batches(mlp), 0.8, config=_config())


def test_checkpoints_every_k_steps_and_at_the_end(mlp, reference, tmp_path):
    result = sfpk_prune(mlp.loss_fn, mlp.params, _batches(mlp), 0.8, config=_config(),
                        checkpoint=CheckpointPolicy(tmp_path, every=EVERY))
    _assert_same(result, reference)
    # The last two are kept: the final state and the last periodic one.
    assert _steps(tmp_path) == [18, 20]


def _interrupt_at(mlp, stop_at: int, directory: Path) -> None:
    """A run that stops (as if killed) when it asks for the batch of step ``stop_at``."""

    def interrupted(start):
        for step, batch in zip(itertools.count(start), _batches(mlp)(start)):
            if step == stop_at:
                raise KeyboardInterrupt
            yield batch

    with pytest.raises(KeyboardInterrupt):
        sfpk_prune(mlp.loss_fn, mlp.params, interrupted, 0.8, config=_config(),
                   checkpoint=CheckpointPolicy(directory, every=EVERY))


def test_resuming_an_interrupted_run_gives_the_uninterrupted_result(mlp, reference, tmp_path):
    _interrupt_at(mlp, 10, tmp_path)
    assert _steps(tmp_path)[-1] == 9
    resumed = sfpk_prune(mlp.loss_fn, mlp.params, _batches(mlp), 0.8, config=_config(),
                         checkpoint=CheckpointPolicy(tmp_path, every=EVERY, resume=True))
    _assert_same(resumed, reference)


def test_a_plain_iterable_is_advanced_past_the_steps_done(mlp, reference, tmp_path):
    _interrupt_at(mlp, 7, tmp_path)
    assert _steps(tmp_path)[-1] == 6
    resumed = sfpk_prune(mlp.loss_fn, mlp.params, mlp.particle_batches(N, seed=1), 0.8, config=_config(),
                         checkpoint=CheckpointPolicy(tmp_path, every=EVERY, resume=True))
    _assert_same(resumed, reference)


def test_resuming_a_finished_run_runs_no_step(mlp, reference, tmp_path):
    sfpk_prune(mlp.loss_fn, mlp.params, _batches(mlp), 0.8, config=_config(),
               checkpoint=CheckpointPolicy(tmp_path, every=EVERY))
    resumed = sfpk_prune(mlp.loss_fn, mlp.params, iter(()), 0.8, config=_config(),
                         checkpoint=CheckpointPolicy(tmp_path, every=EVERY, resume=True))
    _assert_same(resumed, reference)


def test_existing_checkpoints_are_never_silently_overwritten(mlp, tmp_path):
    sfpk_prune(mlp.loss_fn, mlp.params, _batches(mlp), 0.8, config=_config(steps=3),
               checkpoint=CheckpointPolicy(tmp_path, every=EVERY))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.raises(ResumeError, match=r"already holds SFPK checkpoints \(up to step 3\).*resume=True"):
        sfpk_prune(mlp.loss_fn, mlp.params, _batches(mlp), 0.8, config=_config(steps=3),
                   checkpoint=CheckpointPolicy(tmp_path, every=EVERY))
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_a_checkpoint_of_a_different_run_says_what_differs(mlp, tmp_path):
    sfpk_prune(mlp.loss_fn, mlp.params, _batches(mlp), 0.8, config=_config(steps=3),
               checkpoint=CheckpointPolicy(tmp_path, every=EVERY))
    resume = CheckpointPolicy(tmp_path, every=EVERY, resume=True)
    with pytest.raises(ResumeError, match=r"config.radius: checkpoint 1.1, now 1.2.*sparsity: checkpoint 0.8, now 0.7"):
        sfpk_prune(mlp.loss_fn, mlp.params, _batches(mlp), 0.7, config=_config(steps=3, radius=1.2),
                   checkpoint=resume)
    other = jax.tree.map(lambda p: p * 2, mlp.params)
    with pytest.raises(ResumeError, match="weights_sha256"):
        sfpk_prune(mlp.loss_fn, other, _batches(mlp), 0.8, config=_config(steps=3), checkpoint=resume)
    # How the work is scheduled is not part of the run's identity.
    sfpk_prune(mlp.loss_fn, mlp.params, _batches(mlp), 0.8, config=_config(steps=3),
               execution=Execution(particle_mode="vmap"), checkpoint=resume)


def test_a_damaged_checkpoint_is_reported(mlp, tmp_path):
    sfpk_prune(mlp.loss_fn, mlp.params, _batches(mlp), 0.8, config=_config(steps=3),
               checkpoint=CheckpointPolicy(tmp_path, every=EVERY))
    state_dir = tmp_path / "3" / "state"
    for f in state_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ResumeError, match=r"3 is (truncated|damaged|unreadable).*remove the folder"):
        sfpk_prune(mlp.loss_fn, mlp.params, _batches(mlp), 0.8, config=_config(steps=3),
                   checkpoint=CheckpointPolicy(tmp_path, every=EVERY, resume=True))


def test_policy_validation(tmp_path):
    with pytest.raises(ValueError, match="every=0"):
        CheckpointPolicy(tmp_path, every=0)
    with pytest.raises(ValueError, match="resume"):
        CheckpointPolicy(tmp_path, resume="yes")


def test_a_nan_stops_the_run_naming_step_and_particle_and_keeps_the_last_good_state(mlp, reference, tmp_path):
    policy = CheckpointPolicy(tmp_path, every=100)
    with pytest.raises(FloatingPointError, match=r"step 7: .*particle 1: energy.*smaller radius.*more steps") as err:
        sfpk_prune(mlp.loss_fn, mlp.params, _batches(mlp, poison=(7, 1)), 0.8, config=_config(),
                   checkpoint=policy)
    assert "particle 0" not in str(err.value) and str(tmp_path) in str(err.value)
    assert _steps(tmp_path) == [7]
    # The checkpoint holds the state before the faulty step: resuming on good data is exact.
    resumed = sfpk_prune(mlp.loss_fn, mlp.params, _batches(mlp), 0.8, config=_config(),
                         checkpoint=CheckpointPolicy(tmp_path, every=100, resume=True))
    _assert_same(resumed, reference)


def test_a_nan_without_checkpointing_still_names_the_step(mlp):
    with pytest.raises(FloatingPointError, match=r"step 2: .*particle 0: energy, energy gradient, direction"):
        sfpk_prune(mlp.loss_fn, mlp.params, _batches(mlp, poison=(2, 0)), 0.8, config=_config())


_WORKER = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{tests!r}, {root!r}]
    import numpy as np, jax
    from conftest import TinyMLP, TinyModel, FEATURES
    from sfpk_jax import SFPKConfig, sfpk_prune
    from sfpk_jax.sfpk.resume import CheckpointPolicy

    mode, ckpt, out = sys.argv[1:4]
    mlp = TinyModel("mlp", TinyMLP(), (FEATURES,))

    def batches(start):
        for step, batch in enumerate(mlp.particle_batches({n}, seed=1)):
            if step >= start:
                if mode == "slow":
                    time.sleep(0.15)  # leaves time to kill the run at a random step
                yield batch

    config = SFPKConfig(steps={steps}, particles={n}, early_stop=False)
    policy = None if mode == "plain" else CheckpointPolicy(ckpt, every={every}, resume=mode == "resume")
    result = sfpk_prune(mlp.loss_fn, mlp.params, batches, 0.8, config=config, checkpoint=policy)
    arrays = {{f"{{k}}_{{i}}": np.asarray(x) for k in ("masks", "scores", "particles")
              for i, x in enumerate(jax.tree.leaves(getattr(result, k)))}}
    arrays.update({{f"trace_{{k}}": v for k, v in result.trace.items()}})
    np.savez(out, **arrays)
""")


def test_sigkill_at_a_random_step_then_resume_is_bit_for_bit(tmp_path):
    worker = tmp_path / "worker.py"
    here = Path(__file__).parent
    worker.write_text(_WORKER.format(tests=str(here), root=str(here.parent), n=N, steps=STEPS, every=EVERY))
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def run(mode, out):
        subprocess.run([sys.executable, str(worker), mode, str(ckpt), str(out)], env=env, check=True,
                       timeout=300)

    run("plain", tmp_path / "plain.npz")
    kill_after = random.Random().choice(range(EVERY, STEPS - EVERY, EVERY))
    proc = subprocess.Popen([sys.executable, str(worker), "slow", str(ckpt), str(tmp_path / "x.npz")],
                            env=env)
    deadline = time.monotonic() + 240
    while not (_steps(ckpt) and _steps(ckpt)[-1] >= kill_after):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "x.npz").exists()
    assert _steps(ckpt)[-1] < STEPS
    run("resume", tmp_path / "resumed.npz")
    plain, resumed = np.load(tmp_path / "plain.npz"), np.load(tmp_path / "resumed.npz")
    assert sorted(plain.files) == sorted(resumed.files)
    for name in plain.files:
        np.testing.assert_array_equal(plain[name], resumed[name], err_msg=name)
