"""Running SFPK and retraining on several devices (and several hosts).

Two kinds of parallelism share one 2-D :class:`jax.sharding.Mesh` with axes
``"particles"`` and ``"batch"`` (see :func:`particle_mesh`):

* **Particles over devices** (:func:`sharded_energies`): the n mask particles
  are split over the ``"particles"`` axis, and every device computes E and
  grad E for its n/d particles one after another, each with plain (not
  grouped) convolutions. When the ``"batch"`` axis is longer than 1, each
  particle's mini-batch is further split over it.
* **Data-parallel retraining** (:func:`shard_batch`, :func:`replicate`,
  ``sfpk_jax.training.train_epoch(..., mesh=mesh)``): every batch is split
  over all the mesh's devices, variables and optimizer state are replicated,
  and ``jax.jit`` partitions the step from those input shardings.

Both are numerically the single-device computation (up to the order of
floating-point sums), batch norm in training mode included: batch statistics
are taken over the whole (global) batch, not per device.

Single host, several accelerators: nothing to do beyond building the mesh,
``particle_mesh()`` uses ``jax.devices()``. To try it on a CPU-only machine,
set ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is
imported.

Several hosts (one process per host, every process runs the same program):

1. Call ``jax.distributed.initialize()`` once per process, before any other
   jax call. On Cloud TPU and under SLURM/Open MPI the coordinator and process
   ids are detected; elsewhere pass them:
   ``jax.distributed.initialize(coordinator_address="host0:1234",
   num_processes=P, process_id=i)``.
2. Build the mesh over the global device list, the same on every process:
   ``mesh = particle_mesh()`` (it uses ``jax.devices()``, which after step 1
   holds every host's devices, ordered by process). Keep the ``"batch"`` axis
   no longer than one host's device count (``jax.local_device_count()``) so
   that its frequent all-reduces stay within a host.
3. Run the same calls on every process.

   * SFPK: ``sfpk_prune(..., SFPKConfig(particle_mode="shard"))`` with the
     same arguments everywhere. Every process's ``batches`` yields the whole
     particle batch ``(n, B, ...)``, the same values on every host (e.g.
     :func:`sfpk_jax.data.particle_loader` with one seed); each device
     receives only its own slice (:func:`shard_particle_batch`). The default
     mesh takes the same number of devices from every process. Checkpoints go
     to a folder that every process sees (a shared file system). The result
     (masks, scores, particles) is gathered onto every process.
   * retraining: each process's loader yields ``global_batch / P`` examples
     per step (e.g. seed it per process or shard the file list by
     ``jax.process_index()``); ``train_epoch(..., mesh=mesh)`` (or
     :func:`shard_batch`) assembles the global batch from the local parts.
     Parameters and other replicated inputs must be identical on every
     process; pass them through :func:`replicate`.

4. Read results back with :func:`to_host`: an array sharded over several
   processes is not wholly addressable from one of them, and ``to_host``
   all-gathers it (every process must call it).

To rehearse this on one CPU machine, start P processes with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` each and, before
``jax.distributed.initialize(coordinator_address="127.0.0.1:12355",
num_processes=P, process_id=i)``, call
``jax.config.update("jax_cpu_collectives_implementation", "gloo")`` (CPU
devices of different processes need it to communicate);
``tests/test_multihost.py`` does so with two processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sfpk_jax.energy import EnergyFn, stack_outputs
from sfpk_jax.masks import path_to_str

PARTICLES = "particles"
BATCH = "batch"

PyTree = Any


def particle_mesh(devices: Sequence[jax.Device] | None = None, *, batch_axis: int = 1) -> Mesh:
    """A ``(particles, batch)`` mesh over ``devices``.

    Args:
      devices: the devices to use, in order; ``jax.devices()`` (every device
        of every process) when None.
      batch_axis: length of the ``"batch"`` axis, which splits each
        particle's mini-batch; the ``"particles"`` axis gets the rest,
        ``len(devices) // batch_axis``. Consecutive devices share a particle,
        so on several hosts a ``batch_axis`` up to the local device count
        keeps that axis within a host.

    Returns:
      The mesh, with both axes of type ``Auto``: :func:`sharded_energies`
      closes over the ``"batch"`` axis inside ``shard_map`` and lets the
      compiler partition it, which ``Explicit`` axes (``jax.make_mesh``'s
      default) reject.

    Raises:
      ValueError: if ``batch_axis`` does not divide the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("particle_mesh got no devices")
    if isinstance(batch_axis, bool) or not isinstance(batch_axis, int) or batch_axis < 1:
        raise ValueError(f"batch_axis must be an integer >= 1, got {batch_axis!r}")
    if len(devices) % batch_axis:
        raise ValueError(
            f"batch_axis={batch_axis} does not divide the {len(devices)} devices; "
            f"choose a divisor of {len(devices)}"
        )
    grid = np.asarray(devices, dtype=object).reshape(len(devices) // batch_axis, batch_axis)
    return Mesh(grid, (PARTICLES, BATCH), axis_types=(AxisType.Auto, AxisType.Auto))


def _axis_size(mesh: Mesh, name: str) -> int:
    return int(dict(mesh.shape).get(name, 1))


def _check_mesh(mesh: Mesh) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if PARTICLES not in mesh.axis_names:
        raise ValueError(
            f"the mesh has axes {mesh.axis_names}, but it needs a {PARTICLES!r} axis; "
            "build it with sfpk_jax.sharding.particle_mesh()"
        )
    unknown = set(mesh.axis_names) - {PARTICLES, BATCH}
    if unknown:
        raise ValueError(
            f"the mesh has axes {sorted(unknown)} besides {PARTICLES!r} and {BATCH!r}; "
            "build it with sfpk_jax.sharding.particle_mesh()"
        )
    explicit = [n for n, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Auto]
    if explicit:
        raise ValueError(
            f"mesh axes {explicit} are not of type Auto (jax.make_mesh defaults to "
            "Explicit); build the mesh with sfpk_jax.sharding.particle_mesh() or pass "
            "axis_types=(AxisType.Auto, AxisType.Auto)"
        )


def _leading(tree: PyTree, what: str):
    """(path, leaf) pairs of ``tree``, for error messages."""
    return [(path_to_str(p) or what, leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def sharded_energies(energy_fn: EnergyFn, mesh: Mesh):
    """E and grad E of every particle, the particles split over the mesh.

    Same contract as ``sfpk_jax.energy.all_particles``: the returned function
    maps ``(params, particles, batch)`` (every particle leaf and batch leaf
    with leading axis n; particle i uses slice i of the batch) to
    ``(energy (n,), grads)``, each grad leaf of shape ``(n, ...)``.

    Inside ``shard_map`` over the ``"particles"`` axis each device gets n/d
    particles and evaluates them one ``energy_fn`` call at a time (a Python
    loop, unrolled into one program): one particle at a time keeps the
    model's convolutions plain, whereas vmapping per-particle masks through
    them makes slow grouped convolutions. Params are replicated; the outputs
    come back as global arrays sharded over ``"particles"``.

    When the mesh's ``"batch"`` axis is longer than 1, each particle's
    mini-batch (axis 1 of every batch leaf of rank >= 2) is split over it.
    That axis is left to the compiler (``shard_map`` is manual over
    ``"particles"`` only), so a loss with train-mode batch norm still
    normalises with the whole mini-batch's statistics (the compiler inserts
    the all-reduces): averaging per-shard gradients with ``lax.pmean`` would
    instead give per-shard batch statistics, a different function.

    The returned function is not jitted (like ``all_particles``); call it
    inside ``jax.jit``. Its program is unrolled n/d times, so compile time
    grows with the particles per device.

    Args:
      energy_fn: the one-particle energy, from ``sfpk_jax.energy.make_energy_fn``.
      mesh: a mesh from :func:`particle_mesh` (axes ``"particles"`` and
        optionally ``"batch"``, both of type Auto).

    Returns:
      ``(params, particles, batch) -> (energy, grads)``.

    Raises:
      ValueError: (when called) if n is not a multiple of the
        ``"particles"`` axis length, or a batch leaf's per-particle batch is
        not a multiple of the ``"batch"`` axis length.
    """
    _check_mesh(mesh)
    n_dev = _axis_size(mesh, PARTICLES)
    n_batch = _axis_size(mesh, BATCH)

    def local(params, particles, batch):
        per_device = particles[0].shape[0]
        outputs = [
            energy_fn(params, [m[i] for m in particles], jax.tree.map(lambda x: x[i], batch))
            for i in range(per_device)
        ]
        return stack_outputs(outputs)

    mapped = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(PARTICLES), P(PARTICLES)),
        out_specs=P(PARTICLES),
        # Manual over the particles only: the batch axis stays with the
        # compiler, which keeps cross-example reductions (batch norm) exact.
        axis_names=frozenset({PARTICLES}),
        # The polarizers' quantile search is a fori_loop whose carry starts as
        # a constant and becomes particle-varying, which the varying-axes type
        # check rejects; the outputs are per-particle anyway, nothing is
        # differentiated through the shard_map, so the check adds nothing here.
        check_vma=False,
    )
    batch_sharding = NamedSharding(mesh, P(PARTICLES, BATCH))

    def energies(params, particles, batch):
        particles = list(particles)
        if not particles:
            raise ValueError("sharded_energies got no particle leaves")
        n = particles[0].shape[0]
        for name, leaf in _leading(particles, "particles"):
            if leaf.ndim == 0 or leaf.shape[0] != n:
                raise ValueError(
                    f"particle leaf {name} has shape {leaf.shape}; every particle leaf "
                    f"needs the same leading axis n={n}"
                )
        if n % n_dev:
            raise ValueError(
                f"{n} particles do not split evenly over the {n_dev} devices of the mesh's "
                f"{PARTICLES!r} axis: use a number of particles that is a multiple of "
                f"{n_dev}, or build the mesh over fewer devices "
                "(particle_mesh(devices=jax.devices()[:k]) with k dividing n)"
            )
        for name, leaf in _leading(batch, "batch"):
            if np.ndim(leaf) == 0 or np.shape(leaf)[0] != n:
                raise ValueError(
                    f"batch leaf {name} has shape {np.shape(leaf)}, but its leading axis "
                    f"must be the particle count n={n}"
                )
            if n_batch > 1 and np.ndim(leaf) >= 2 and np.shape(leaf)[1] % n_batch:
                raise ValueError(
                    f"batch leaf {name} has {np.shape(leaf)[1]} examples per particle, which "
                    f"do not split evenly over the mesh's {BATCH!r} axis of {n_batch} "
                    f"devices; use a per-particle batch size that is a multiple of {n_batch}"
                )
        if n_batch > 1:
            # Tells the compiler to split each particle's examples over "batch".
            batch = jax.tree.map(
                lambda x: jax.lax.with_sharding_constraint(x, batch_sharding) if x.ndim >= 2 else x,
                batch,
            )
        return mapped(params, particles, batch)

    return energies


def _host_local_devices(mesh: Mesh) -> int:
    me = jax.process_index()
    return sum(d.process_index == me for d in mesh.devices.flat)


def _place(leaf, sharding: NamedSharding, *, whole: bool):
    """A global array with ``sharding`` from a host or jax array.

    ``whole``: every process holds the whole value, and each device receives
    only its own slice of it, straight from the host; otherwise the leaf is
    this process's part of the global array (its share of the examples).
    """
    if isinstance(leaf, jax.Array):
        if leaf.sharding == sharding:
            return leaf
        if jax.process_count() == 1 or not leaf.is_fully_addressable:
            return jax.device_put(leaf, sharding)
    host = np.asarray(leaf)
    if whole:
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.make_array_from_process_local_data(sharding, host)


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """Splits the leading (example) axis of every batch leaf over all the mesh's devices.

    For data-parallel training: ``jax.jit`` then runs each step on every
    device with its slice of the examples and all-reduces as needed.

    Args:
      batch: a pytree of arrays with a common leading example axis. With
        several processes, each passes its own part (its loader's examples);
        the global batch is the concatenation over processes.
      mesh: a mesh from :func:`particle_mesh`; both axes are used.

    Returns:
      The batch as global arrays sharded over ``("particles", "batch")``.

    Raises:
      ValueError: if a leaf's example count does not split evenly over the
        devices (of this process, with several processes).
    """
    _check_mesh(mesh)
    devices = _host_local_devices(mesh)
    for name, leaf in _leading(batch, "batch"):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] % devices:
            raise ValueError(
                f"batch leaf {name} has shape {np.shape(leaf)}: its leading axis must split "
                f"evenly over the mesh's {devices} devices"
                + (" of this process" if jax.process_count() > 1 else "")
                + f"; use a batch size that is a multiple of {devices} (and drop the last "
                "partial batch)"
            )
    sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    return jax.tree.map(lambda x: _place(x, sharding, whole=False), batch)


def _particle_spec(leaf) -> P:
    return P(PARTICLES, BATCH) if np.ndim(leaf) >= 2 else P(PARTICLES)


def shard_particle_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """Places a particle batch ``(n, B, ...)``: n over ``"particles"``, B over ``"batch"``.

    ``sfpk_prune`` in ``shard`` mode does this to every step's batch. With
    several processes every process passes the whole batch, the same values
    everywhere (e.g. :func:`sfpk_jax.data.particle_loader` with the same seed
    on every host), and each device receives only its own slice of it.

    Args:
      batch: leaves with leading axis n and, for leaves of rank >= 2, the
        per-particle examples on axis 1; host arrays or jax arrays.
      mesh: a mesh from :func:`particle_mesh`.

    Returns:
      The batch as global arrays.
    """
    _check_mesh(mesh)
    return jax.tree.map(lambda x: _place(x, NamedSharding(mesh, _particle_spec(x)), whole=True), batch)


def shard_particles(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places arrays with a leading particle axis n over ``"particles"`` (other axes whole).

    For the particle (mask) leaves and anything else per-particle, e.g. an
    SFPK state's particles. With several processes every process passes the
    whole tree, the same values everywhere.

    Args:
      tree: leaves with leading axis n.
      mesh: a mesh from :func:`particle_mesh`.

    Returns:
      The tree as global arrays.
    """
    _check_mesh(mesh)
    sharding = NamedSharding(mesh, P(PARTICLES))
    return jax.tree.map(lambda x: _place(x, sharding, whole=True), tree)


def to_host(tree: PyTree) -> PyTree:
    """numpy copies of every leaf, also of arrays spread over several processes.

    With several processes every process must call it (the arrays that are
    not wholly on this process's devices are all-gathered).
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Copies every leaf of ``tree`` onto every device of the mesh.

    Args:
      tree: arrays (``None`` leaves stay None); with several processes every
        process must pass the same values.
      mesh: any mesh.

    Returns:
      The tree as fully replicated global arrays.
    """
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: _place(x, sharding, whole=True), tree)
