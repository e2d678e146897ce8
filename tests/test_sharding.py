"""Multi-device SFPK energies and data-parallel retraining (sfpk_jax.parallel.sharding).

The multi-device checks need 8 (simulated CPU) devices, which XLA only
creates when ``--xla_force_host_platform_device_count=8`` is set before jax
starts; conftest has started jax already, so they run once, in a subprocess
that executes this file as a script (``_worker``) on the variables of
conftest's tiny models and saves its results. The tests here compare those
results with the same computations on one device, in this process.

Tolerances (float32): energies and their gradients agree to rtol 1e-5 /
atol 1e-6, retrained variables to atol 1e-5 and the loss to rtol 1e-5, SFPK
scores to 1e-5 and the masks exactly. Splitting over devices only reorders
floating-point sums (observed differences are below 3e-7).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from sfpk_jax import Execution, sfpk_prune
from sfpk_jax.core.masks import MaskLayout
from sfpk_jax.models import make_apply_fn
from sfpk_jax.parallel import sharding
from sfpk_jax.parallel.sharding import default_mesh
from sfpk_jax.sfpk import energy as energy_lib
from sfpk_jax.sfpk import modes
from sfpk_jax.sfpk.config import SFPKConfig
from sfpk_jax.train import sgd_cosine, train_epoch

pytestmark = pytest.mark.slow

DEVICES = 8
N = 8  # particles
E2E = dict(steps=6, particles=N)
ENERGY_TOL = dict(rtol=1e-5, atol=1e-6)
ROOT = str(Path(__file__).resolve().parents[1])


# Inputs, built the same way in this process and in the worker.

def _particle_inputs(model, n: int = N):
    """One-particle energy, random particles in [0.2, 1] and a per-particle batch."""
    layout = MaskLayout.from_params(model.params, None, None)
    energy_fn = energy_lib.make_energy_fn(model.loss_fn, layout, SFPKConfig(particles=n))
    rng = np.random.default_rng(7)
    particles = [jnp.asarray(rng.uniform(0.2, 1.0, (n,) + s), jnp.float32) for s in layout.mask_shapes]
    batch = next(model.particle_batches(n, size=8, seed=11))
    return energy_fn, particles, batch


def _train(cnn, mesh, rows: slice = slice(None)):
    """One masked epoch of the tiny CNN (train-mode batch norm): 3 batches of 32.

    ``rows``: the examples of each batch this process feeds (its part of the
    global batch, with several processes).
    """
    rng = np.random.default_rng(5)
    batches = [
        {"image": rng.standard_normal((32,) + cnn.input_shape).astype(np.float32)[rows],
         "label": rng.integers(0, 4, 32).astype(np.int32)[rows]}
        for _ in range(3)
    ]
    masks = jax.tree.map(lambda p: jnp.asarray(rng.random(p.shape) < 0.5, jnp.float32), cnn.params)
    optimizer = sgd_cosine(0.05, 1, len(batches), momentum=0.9, weight_decay=1e-3)
    variables, _, loss = train_epoch(
        make_apply_fn(cnn.module), cnn.variables, optimizer.init(cnn.params), batches,
        optimizer=optimizer, masks=masks, mesh=mesh,
    )
    return variables, loss


def _flat(prefix: str, tree) -> dict:
    return {f"{prefix}/{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


def _error(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return ""


# The 8-device side, run as a script.

def _tiny_models(inputs: str) -> dict:
    """conftest's tiny MLP and CNN, with the variables the parent saved to ``inputs``.

    The constructors only run under ``jax.eval_shape``: eager Flax init
    compiles every op on its own, which would be the slowest part here.
    """
    from conftest import FEATURES, IMAGE, TinyCNN, TinyMLP, TinyModel

    saved = np.load(inputs)
    models = {}
    for name, module, shape in (("mlp", TinyMLP(), (FEATURES,)), ("cnn", TinyCNN(), IMAGE)):
        box = {}

        def make(name=name, module=module, shape=shape):
            box["model"] = TinyModel(name, module, shape)
            return box["model"].variables

        treedef = jax.tree.structure(jax.eval_shape(make))
        leaves = [jnp.asarray(saved[f"{name}/{i}"]) for i in range(treedef.num_leaves)]
        variables = jax.tree.unflatten(treedef, leaves)
        model = box["model"]
        model.params = variables["params"]
        model.extra = {k: v for k, v in variables.items() if k != "params"}
        model.variables = variables
        models[name] = model
    return models


def _worker(inputs: str, out: str) -> None:
    """Saves every 8-device result to ``out``.npz (arrays) and ``out``.json."""
    assert jax.device_count() == DEVICES, jax.devices()
    models = _tiny_models(inputs)
    arrays, info = {}, {"devices": jax.device_count()}
    meshes = {"8x1": sharding.particle_mesh(), "4x2": sharding.particle_mesh(batch_axis=2)}
    for name, label in (("mlp", "8x1"), ("cnn", "8x1"), ("cnn", "4x2")):
        model = models[name]
        energy_fn, particles, batch = _particle_inputs(model)
        fn = jax.jit(modes.sharded_energies(energy_fn, meshes[label]))
        energy, grads = fn(model.params, particles, batch)
        info[f"spec/{name}/{label}"] = str(grads[0].sharding.spec)
        arrays[f"{name}/{label}/energy"] = np.asarray(energy)
        arrays.update(_flat(f"{name}/{label}/grads", grads))

    mlp = models["mlp"]
    energy_fn, particles, batch = _particle_inputs(mlp, n=6)
    info["error/particles"] = _error(
        lambda: modes.sharded_energies(energy_fn, meshes["8x1"])(mlp.params, particles, batch)
    )
    info["error/batch"] = _error(lambda: sharding.shard_batch({"image": np.zeros((12, 3))}, meshes["8x1"]))

    variables, loss = _train(models["cnn"], meshes["8x1"])
    info["train/loss"] = loss
    info["train/spec"] = str(jax.tree.leaves(variables)[0].sharding.spec)
    arrays.update(_flat("train", variables))

    cnn = models["cnn"]
    result = sfpk_prune(cnn.loss_fn, cnn.params, cnn.particle_batches(N, seed=3), 0.8,
                        config=SFPKConfig(**E2E), execution=Execution(particle_mode="shard"))
    arrays.update(_flat("e2e/masks", result.masks))
    arrays.update(_flat("e2e/scores", result.scores))
    info["default_mesh/10"] = dict(default_mesh(10).shape)
    info["default_mesh/6x2"] = dict(default_mesh(6, batch_axis=2).shape)

    # The experiments' device flags, end to end at smoke size.
    from experiments import cifar100_oneshot
    run = Path(out).parent / "oneshot"
    info["oneshot/exit"] = cifar100_oneshot.main([
        "--out", str(run), "--smoke", "--dataset", "digits", "--model", "small_cnn",
        "--pretrain-epochs", "1", "--epochs", "1", "--particles", "4", "--particle-mode", "shard",
        "--mesh-batch", "2", "--data-parallel", "--no-progress"])
    info["oneshot/sparsity"] = json.loads((run / "results.json").read_text())["achieved_sparsity"]
    np.savez(out + ".npz", **arrays)
    Path(out + ".json").write_text(json.dumps(info))


def worker_files(tmp: Path, mlp, cnn, devices: int) -> tuple[str, str, dict]:
    """``(inputs, out, env)`` of a worker subprocess with ``devices`` CPU devices.

    ``inputs`` holds the tiny models' variables (see :func:`_tiny_models`),
    ``out`` is the prefix of the worker's result files.
    """
    inputs, out = str(tmp / "inputs.npz"), str(tmp / "out")
    np.savez(inputs, **_flat("mlp", mlp.variables), **_flat("cnn", cnn.variables))
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
    }
    return inputs, out, env


@pytest.fixture(scope="module")
def eight(tmp_path_factory, mlp, cnn):
    """Runs ``_worker`` once with 8 simulated CPU devices; returns (arrays, info)."""
    inputs, out, env = worker_files(tmp_path_factory.mktemp("sharding"), mlp, cnn, DEVICES)
    # -W error: the same warnings policy as the suite.
    proc = subprocess.run(
        [sys.executable, "-W", "error", __file__, inputs, out], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(out + ".npz")), json.loads(Path(out + ".json").read_text())


# The one-device side, and the comparisons.

def _assert_energies(arrays, prefix, reference):
    energy, grads = reference
    np.testing.assert_allclose(arrays[f"{prefix}/energy"], energy, **ENERGY_TOL)
    for i, g in enumerate(grads):
        np.testing.assert_allclose(arrays[f"{prefix}/grads/{i}"], g, **ENERGY_TOL, err_msg=f"grad {i}")


@functools.cache
def _one_device(model, mode: str):
    """Every particle's energy on one device, in ``vmap`` or ``loop`` mode."""
    energy_fn, particles, batch = _particle_inputs(model)
    if mode == "vmap":
        return jax.jit(modes.all_particles(energy_fn, "vmap", 1))(model.params, particles, batch)
    one = jax.jit(energy_fn)
    outs = [one(model.params, [m[i] for m in particles], jax.tree.map(lambda x: x[i], batch)) for i in range(N)]
    return np.stack([e for e, _ in outs]), [np.stack(leaf) for leaf in zip(*(g for _, g in outs))]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_eight_devices_match_vmap_and_loop(eight, name, request):
    arrays, info = eight
    assert info["devices"] == DEVICES
    model = request.getfixturevalue(name)
    _assert_energies(arrays, f"{name}/8x1", _one_device(model, "vmap"))
    _assert_energies(arrays, f"{name}/8x1", _one_device(model, "loop"))
    # The results stay spread over the devices, one particle each.
    assert info[f"spec/{name}/8x1"] == "P('particles',)"


def test_particles_by_batch_mesh_matches(eight, cnn):
    # The cnn has train-mode batch norm: each particle's mini-batch is split
    # over 2 devices but must still be normalised with its whole statistics.
    arrays, info = eight
    _assert_energies(arrays, "cnn/4x2", _one_device(cnn, "loop"))
    assert info["spec/cnn/4x2"] == "P('particles',)"


def test_indivisible_particles_and_batches_raise(eight):
    _, info = eight
    message = info["error/particles"]
    assert "6 particles" in message and "8 devices" in message and "multiple of 8" in message
    assert "(12, 3)" in info["error/batch"] and "multiple of 8" in info["error/batch"]


def test_data_parallel_train_epoch_matches_one_device(eight, cnn):
    arrays, info = eight
    variables, loss = _train(cnn, None)
    assert info["train/spec"] == "P()"  # the variables come back replicated
    np.testing.assert_allclose(info["train/loss"], loss, rtol=1e-5)
    for i, leaf in enumerate(jax.tree.leaves(variables)):
        np.testing.assert_allclose(arrays[f"train/{i}"], leaf, atol=1e-5, err_msg=f"leaf {i}")


def test_shard_mode_prunes_like_the_loop(eight, cnn):
    arrays, info = eight
    # 10 particles share 5 of the 8 devices evenly.
    assert info["default_mesh/10"] == {"particles": 5, "batch": 1}
    assert info["default_mesh/6x2"] == {"particles": 3, "batch": 2}
    result = sfpk_prune(cnn.loss_fn, cnn.params, cnn.particle_batches(N, seed=3), 0.8,
                        config=SFPKConfig(**E2E), execution=Execution(particle_mode="loop"))
    for i, mask in enumerate(jax.tree.leaves(result.masks)):
        np.testing.assert_array_equal(arrays[f"e2e/masks/{i}"], mask, err_msg=f"mask {i}")
    for i, score in enumerate(jax.tree.leaves(result.scores)):
        np.testing.assert_allclose(arrays[f"e2e/scores/{i}"], score, rtol=1e-5, atol=1e-5, err_msg=f"score {i}")


# Checks on this process's first device only.

def test_one_device_mesh_is_the_loop(mlp):
    mesh = sharding.particle_mesh(jax.devices()[:1])
    assert dict(mesh.shape) == {"particles": 1, "batch": 1}
    energy_fn, particles, batch = _particle_inputs(mlp)
    # The first 2 particles: the program unrolls one energy per particle.
    first = lambda x: x[:2]
    energy, grads = jax.jit(modes.sharded_energies(energy_fn, mesh))(
        mlp.params, [first(m) for m in particles], jax.tree.map(first, batch)
    )
    arrays = {"x/energy": energy, **{f"x/grads/{i}": g for i, g in enumerate(grads)}}
    reference = _one_device(mlp, "loop")
    _assert_energies(arrays, "x", (first(reference[0]), [first(g) for g in reference[1]]))


def test_mesh_errors(mlp):
    with pytest.raises(ValueError, match="batch_axis=3 does not divide the 1 devices"):
        sharding.particle_mesh(jax.devices()[:1], batch_axis=3)
    explicit = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("particles", "batch"),
                    axis_types=(AxisType.Explicit, AxisType.Explicit))
    energy_fn, _, _ = _particle_inputs(mlp, n=1)
    with pytest.raises(ValueError, match="not of type Auto"):
        modes.sharded_energies(energy_fn, explicit)
    other = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    with pytest.raises(ValueError, match="needs a 'particles' axis"):
        sharding.shard_batch({"x": np.zeros(4)}, other)


def test_replicate_and_shard_batch_place_leaves():
    mesh = sharding.particle_mesh(jax.devices()[:1])
    tree = sharding.replicate({"a": np.arange(3.0), "b": None}, mesh)
    assert tree["b"] is None and tree["a"].sharding.spec == jax.sharding.PartitionSpec()
    batch = sharding.shard_batch({"x": np.ones((4, 2), np.float32)}, mesh)
    np.testing.assert_array_equal(batch["x"], np.ones((4, 2)))
    assert sharding.shard_batch(batch, mesh)["x"] is batch["x"]  # already placed: no copy
    particles = sharding.shard_particles([np.ones((3, 5), np.float32)], mesh)
    assert particles[0].sharding.spec == jax.sharding.PartitionSpec("particles")
    placed = sharding.shard_particle_batch({"x": np.ones((3, 4, 2)), "w": np.ones(3)}, mesh)
    assert placed["x"].sharding.spec == jax.sharding.PartitionSpec("particles", "batch")
    assert placed["w"].sharding.spec == jax.sharding.PartitionSpec("particles")


if __name__ == "__main__":
    _worker(*sys.argv[1:3])


def test_a_mesh_needs_shard_mode_and_a_fitting_particle_count(mlp):
    mesh = sharding.particle_mesh(jax.devices()[:1])
    with pytest.raises(ValueError, match="None unless particle_mode='shard'"):
        Execution(particle_mode="loop", mesh=mesh)
    result = sfpk_prune(mlp.loss_fn, mlp.params, mlp.particle_batches(N, seed=3), 0.8,
                        config=SFPKConfig(**E2E), execution=Execution("shard", mesh=mesh))
    loop = sfpk_prune(mlp.loss_fn, mlp.params, mlp.particle_batches(N, seed=3), 0.8,
                      config=SFPKConfig(**E2E), execution=Execution(particle_mode="loop"))
    for a, b in zip(jax.tree.leaves(result.masks), jax.tree.leaves(loop.masks)):
        np.testing.assert_array_equal(a, b)


def test_experiments_run_sharded_and_data_parallel(eight):
    _, info = eight
    assert info["oneshot/exit"] == 0
    assert info["oneshot/sparsity"] == pytest.approx(0.95, abs=2e-3)
