"""Device placement for particles and batches: meshes, sharding, replication.

One 2-D :class:`jax.sharding.Mesh` with axes ``"particles"`` and ``"batch"``
serves both kinds of parallelism: SFPK's particles split over devices (the
``shard`` particle mode, :mod:`sfpk_jax.sfpk.modes`) and data-parallel
retraining (:func:`shard_batch`, :func:`replicate`). Both are numerically the
single-device computation up to the order of floating-point sums, batch norm
included. How to run on several hosts, and to rehearse that on one machine:
``docs/many_devices.md``.
"""


from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sfpk_jax.core.masks import path_to_str

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
      The mesh, with both axes of type ``Auto``: :func:`sfpk_jax.sfpk.modes.sharded_energies`
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


def default_mesh(particles: int, batch_axis: int = 1) -> jax.sharding.Mesh:
    """The mesh of ``shard`` mode: as many devices as evenly share the particles.

    Args:
      particles: the number of particles n.
      batch_axis: devices that split each particle's mini-batch (devices of
        one process, so that its all-reduces stay within a host).

    Returns:
      A :func:`sfpk_jax.parallel.sharding.particle_mesh` whose particle axis is the
      largest divisor of n that fits the devices, e.g. 5 of 8 devices for 10
      particles. With several processes every process contributes the same
      number of its own devices, ordered by process.

    Raises:
      ValueError: ``batch_axis`` exceeds one process's devices, or (with
        several processes) n is not a multiple of the process count.
    """
    processes, local = jax.process_count(), jax.local_device_count()
    if not 1 <= batch_axis <= local:
        raise ValueError(f"batch_axis={batch_axis} must lie in [1, {local}] (the devices of "
                         "one process)")
    per_process = max(
        (k for k in range(1, local // batch_axis + 1) if particles % (k * processes) == 0), default=0)
    if not per_process:
        raise ValueError(f"{particles} particles do not split evenly over the {processes} "
                         f"processes: use a multiple of {processes} particles")
    devices = [d for p in range(processes)
               for d in [d for d in jax.devices() if d.process_index == p][: per_process * batch_axis]]
    return particle_mesh(devices, batch_axis=batch_axis)


def axis_size(mesh: Mesh, name: str) -> int:
    return int(dict(mesh.shape).get(name, 1))


def check_mesh(mesh: Mesh) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if PARTICLES not in mesh.axis_names:
        raise ValueError(
            f"the mesh has axes {mesh.axis_names}, but it needs a {PARTICLES!r} axis; "
            "build it with sfpk_jax.parallel.sharding.particle_mesh()"
        )
    unknown = set(mesh.axis_names) - {PARTICLES, BATCH}
    if unknown:
        raise ValueError(
            f"the mesh has axes {sorted(unknown)} besides {PARTICLES!r} and {BATCH!r}; "
            "build it with sfpk_jax.parallel.sharding.particle_mesh()"
        )
    explicit = [n for n, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Auto]
    if explicit:
        raise ValueError(
            f"mesh axes {explicit} are not of type Auto (jax.make_mesh defaults to "
            "Explicit); build the mesh with sfpk_jax.parallel.sharding.particle_mesh() or pass "
            "axis_types=(AxisType.Auto, AxisType.Auto)"
        )


def named_leaves(tree: PyTree, what: str):
    """(path, leaf) pairs of ``tree``, for error messages."""
    return [(path_to_str(p) or what, leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


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
    check_mesh(mesh)
    devices = _host_local_devices(mesh)
    for name, leaf in named_leaves(batch, "batch"):
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
    check_mesh(mesh)
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
    check_mesh(mesh)
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
