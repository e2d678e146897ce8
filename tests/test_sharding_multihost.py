"""SFPK over several processes (jax.distributed), rehearsed on one CPU machine.

Two processes with two simulated CPU devices each, talking over gloo, run
this file as a script (``_worker``): an interrupted ``sfpk_prune`` in
``shard`` mode with checkpoints, then its resume on another mesh, and a
data-parallel epoch with each process feeding half of every batch. The tests
compare the results with one device in this process: masks exactly, scores,
energies and retrained weights to 1e-5 (splitting over devices and processes
only reorders floating-point sums).
"""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from test_sharding import ROOT, _error, _flat, _tiny_models, _train, worker_files

from sfpk_jax import CheckpointPolicy, Execution, SFPKConfig, sfpk_prune
from sfpk_jax.parallel import sharding
from sfpk_jax.parallel.sharding import default_mesh

pytestmark = pytest.mark.slow

PROCESSES, LOCAL_DEVICES, N, STEPS, SPARSITY = 2, 2, 4, 6, 0.8
BROKEN_AT = 3  # the first run's batches end here, after the checkpoint of step 2


def _batches(model, stop: int = STEPS):
    """``start -> batches`` of steps ``start`` to ``stop - 1``, the same in every process."""
    return lambda start: itertools.islice(model.particle_batches(N, seed=3), start, stop)


CONFIG = SFPKConfig(particles=N, steps=STEPS)


def _worker(process: str, port: str, inputs: str, out: str) -> None:
    """One process of the group; saves its results to ``out``.{process}.npz/.json."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=PROCESSES, process_id=int(process))

    cnn = _tiny_models(inputs)["cnn"]
    folder = Path(out).parent / "checkpoints"
    interrupted = _error(lambda: sfpk_prune(
        cnn.loss_fn, cnn.params, _batches(cnn, BROKEN_AT), SPARSITY, config=CONFIG, execution=Execution("shard"),
        checkpoint=CheckpointPolicy(folder, every=2)))
    # Resumed on a mesh whose batch axis splits each particle's examples (and
    # its batch norm statistics) over the two devices of a process.
    mesh = default_mesh(N, batch_axis=2)
    result = sfpk_prune(cnn.loss_fn, cnn.params, _batches(cnn), SPARSITY, config=CONFIG,
                        execution=Execution("shard", mesh=mesh),
                        checkpoint=CheckpointPolicy(folder, every=2, resume=True))
    # Data-parallel retraining: each process feeds its half of every batch.
    half = 32 // PROCESSES
    variables, loss = _train(cnn, sharding.particle_mesh(),
                             slice(jax.process_index() * half, (jax.process_index() + 1) * half))
    first = sharding.particle_mesh([d for d in jax.devices() if d.process_index == 0])
    info = {
        "processes": jax.process_count(),
        "train/loss": float(loss),
        "devices": jax.device_count(),
        "interrupted": interrupted,
        "mesh": dict(mesh.shape),
        "default_mesh/4": dict(default_mesh(N).shape),
        "default_mesh/6": dict(default_mesh(6).shape),
        "error/odd": _error(lambda: default_mesh(3)),
        "error/loop": _error(lambda: sfpk_prune(
            cnn.loss_fn, cnn.params, _batches(cnn), SPARSITY, config=CONFIG, execution=Execution("loop"))),
        "error/mesh": _error(lambda: sfpk_prune(
            cnn.loss_fn, cnn.params, _batches(cnn), SPARSITY, config=CONFIG,
            execution=Execution("shard", mesh=first))),
    }
    arrays = {**_flat("masks", result.masks), **_flat("scores", result.scores),
              **{f"trace/{k}": v for k, v in result.trace.items()},
              **_flat("train", sharding.to_host(variables))}
    np.savez(f"{out}.{process}.npz", **arrays)
    Path(f"{out}.{process}.json").write_text(json.dumps(info))
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def group(tmp_path_factory, mlp, cnn):
    """Runs ``_worker`` in two processes; returns process 0's (arrays, info).

    Every process must end with the same results: they are gathered onto all.
    """
    inputs, out, env = worker_files(tmp_path_factory.mktemp("multihost"), mlp, cnn, LOCAL_DEVICES)
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-W", "error", __file__, str(p), port, inputs, out],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for p in range(PROCESSES)
    ]
    try:
        logs = [proc.communicate(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, (_, err) in zip(procs, logs):
        assert proc.returncode == 0, err[-4000:]
    results = [(dict(np.load(f"{out}.{p}.npz")), json.loads(Path(f"{out}.{p}.json").read_text()))
               for p in range(PROCESSES)]
    for arrays, info in results[1:]:
        assert info == results[0][1]
        for name, value in arrays.items():
            np.testing.assert_array_equal(value, results[0][0][name], err_msg=name)
    return results[0]


def test_two_processes_prune_like_one_device(group, cnn):
    arrays, info = group
    assert info["processes"] == PROCESSES and info["devices"] == PROCESSES * LOCAL_DEVICES
    assert info["mesh"] == {"particles": 2, "batch": 2}
    assert "batches ran out at step 3" in info["interrupted"]
    one = sfpk_prune(cnn.loss_fn, cnn.params, _batches(cnn), SPARSITY, config=CONFIG, execution=Execution("loop"))
    for i, (mask, score) in enumerate(zip(jax.tree.leaves(one.masks), jax.tree.leaves(one.scores))):
        np.testing.assert_array_equal(arrays[f"masks/{i}"], mask, err_msg=f"mask {i}")
        np.testing.assert_allclose(arrays[f"scores/{i}"], score, rtol=1e-5, atol=1e-6)
    assert arrays["trace/E"].shape == (STEPS, N)
    np.testing.assert_allclose(arrays["trace/E"], one.trace["E"], rtol=1e-5)


def test_two_processes_retrain_like_one_device(group, cnn):
    arrays, info = group
    variables, loss = _train(cnn, None)
    np.testing.assert_allclose(info["train/loss"], loss, rtol=1e-5)
    for i, leaf in enumerate(jax.tree.leaves(variables)):
        np.testing.assert_allclose(arrays[f"train/{i}"], leaf, atol=1e-5, err_msg=f"leaf {i}")


def test_the_default_mesh_takes_devices_of_every_process(group):
    _, info = group
    assert info["default_mesh/4"] == {"particles": 4, "batch": 1}
    assert info["default_mesh/6"] == {"particles": 2, "batch": 1}  # 6 = 2 processes x 3: 1 each


def test_multi_process_errors_name_the_fix(group):
    _, info = group
    assert "3 particles do not split evenly over the 2 processes" in info["error/odd"]
    assert "use particle_mode='shard', not 'loop'" in info["error/loop"]
    assert "no device of process(es) [1]" in info["error/mesh"]


if __name__ == "__main__":
    _worker(*sys.argv[1:5])
