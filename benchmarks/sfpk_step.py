"""Times one full SFPK step against the bare forward+backward passes it needs.

    python -m benchmarks.sfpk_step --model resnet20 --batch-size 512 --particles 10 --repeats 5
    python -m benchmarks.sfpk_step --model resnet20 --batch-size 128 --particles 10 --repeats 5

With no ``--particle-mode`` or ``--conv-chunk`` the step runs as the
library's default (``auto``) chooses for a default simulation of this model
and batch (:mod:`sfpk_jax.sfpk.auto`); the report names what it chose.

The step is ``make_stepper(...).step`` (all n particles: polarized energies and
gradients, repulsion, direction, move, vote) on ResNet-20 / CIFAR-100 shapes
with random data. The bare cost is n jitted ``value_and_grad`` calls of the
plain training-mode loss with respect to the parameters, on the same batches,
its convolutions chunked as the step's, dispatched the same way (``loop``: one jitted call per particle; ``vmap`` /
``map:K``: one vmapped / ``lax.map``-ped program; ``processes``: the worker
processes, one per core or ``--workers``, whose start is not timed). The
overhead is their ratio.

Both are compiled first (the compile times are reported), then timed
alternately, ``--repeats`` times each, and the medians are reported. The peak
memory is that of one call above the memory held before it: the process's
resident set on CPU (its high-water mark is reset before every timed call),
the device's ``peak_bytes_in_use`` elsewhere (a whole-process peak there).

One batch size per process, so that the peaks of one do not hide the other's;
run the command once per ``--batch-size``. The last line printed is one JSON
object with ``step_s_median``, ``bare_s_median``, ``overhead``, ``peak_mb``,
``backend`` and the settings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp

import sfpk_jax
from benchmarks.common import PeakRSS, build_problem, device_peak_mb
from sfpk_jax.core.masks import MaskLayout
from sfpk_jax.parallel.conv_chunks import chunk_convolutions
from sfpk_jax.parallel.sharding import default_mesh
from sfpk_jax.parallel.worker_pool import WorkerPool
from sfpk_jax.sfpk import auto, initial_state, make_stepper, modes
from sfpk_jax.sfpk.particle_workers import process_stepper


def make_bare(loss_fn, particles: int, mode: str, chunk: int, pool: WorkerPool | None = None):
    """``bare(params, batch)``: n forward+backward passes, dispatched as ``mode`` does.

    ``processes`` runs them in ``pool``'s workers (exported, loaded on the first call).
    """
    grad_fn = jax.value_and_grad(loss_fn)
    if mode == "processes":
        loaded = []

        def in_workers(params, batch):
            items = [(jax.tree.map(lambda x, i=i: x[i], batch),) for i in range(particles)]
            if not loaded:
                pool.load(jax.export.export(jax.jit(grad_fn))(params, *items[0]).serialize(),
                          (params,))
                loaded.append(True)
            return pool.map(items)

        return in_workers
    if mode == "loop":

        @jax.jit
        def one(params, batch, i):
            take = lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False)
            return grad_fn(params, jax.tree.map(take, batch))

        return lambda params, batch: tuple(one(params, batch, jnp.int32(i)) for i in range(particles))
    def plain(params, _, batch):  # the energy contract, without masks
        loss, grads = grad_fn(params, batch)
        return loss, jax.tree.leaves(grads)

    if mode == "shard":
        batched = jax.jit(modes.sharded_energies(plain, default_mesh(particles)))
    else:
        batched = jax.jit(modes.all_particles(plain, mode, chunk))
    dummy = [jnp.zeros((particles,))]
    return lambda params, batch: batched(params, dummy, batch)


def parse_mode(spec: str) -> tuple[str, int]:
    mode, _, chunk = spec.partition(":")
    return mode, int(chunk or 1)


class _Timer:
    """Seconds and peak memory of blocking calls."""

    def __init__(self):
        self.times, self.peaks = [], []

    def __call__(self, fn, *args):
        with PeakRSS() as peak:
            start = time.perf_counter()
            out = jax.block_until_ready(fn(*args))
            self.times.append(time.perf_counter() - start)
        self.peaks.append(peak.mb)
        return out


def run(model="resnet20", input_shape=(32, 32, 3), num_classes=100, batch_size=512,
        particles=10, repeats=5, particle_mode="auto", seed=0, workers=None, pin=True,
        conv_chunk="auto") -> dict:
    """Times the step and the bare passes; returns the report (see the module doc)."""
    loss_fn, params, batch = build_problem(
        model, tuple(input_shape), num_classes, particles, batch_size, seed
    )
    mode, chunk = parse_mode(particle_mode)
    config = sfpk_jax.SFPKConfig(particles=particles)
    one = jax.tree.map(lambda x: x[0], batch)
    # The run auto sizes is a default simulation (config.steps) of this model and batch.
    choice = auto.choose(
        sfpk_jax.Execution(particle_mode=mode, particle_chunk=chunk, conv_chunk=conv_chunk,
                           **({"workers": workers} if mode == "processes" else {})),
        config, work=lambda: auto.estimate_work(loss_fn, params, one, config))
    execution = choice.execution
    mode, chunk = execution.particle_mode, execution.particle_chunk
    workers = execution.workers if mode == "processes" else None
    layout = MaskLayout.from_params(params)
    # The bare passes run the convolutions as the step does.
    bare_loss = chunk_convolutions(loss_fn, execution.conv_chunk)
    with contextlib.ExitStack() as stack:
        pool = None
        if mode == "processes":
            # One pool each: a pool holds one function at a time.
            pool = stack.enter_context(WorkerPool(workers, pin=pin))
            stepper = process_stepper(loss_fn, layout, config, 0.05, pool, execution)
            bare = make_bare(bare_loss, particles, mode, chunk,
                             stack.enter_context(WorkerPool(workers, pin=pin)))
        else:
            stepper = make_stepper(loss_fn, layout, config, 0.05, execution)
            bare = make_bare(bare_loss, particles, mode, chunk)
        report = _time(stepper, bare, params, batch, initial_state(layout, config), repeats)
        report["workers"] = pool.size if pool else None
    report.update({
        "model": model, "input_shape": list(input_shape), "num_classes": num_classes,
        "batch_size": batch_size, "particles": particles, "repeats": repeats,
        "requested": {"particle_mode": particle_mode, "conv_chunk": conv_chunk},
        "particle_mode": mode, "execution": auto.summary(execution), "auto_reason": choice.reason,
        "pinned": pin if pool else None, "conv_chunk": execution.conv_chunk,
        "prunable": int(sum(layout.mask_sizes)),
        "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
        "machine": platform.processor() or platform.machine(),
        "jax": jax.__version__,
    })
    if report["backend"] != "cpu":
        peak = device_peak_mb(jax.devices()[0])
        if peak is not None:
            report.update(peak_mb=peak, bare_peak_mb=None, peak_kind="device peak_bytes_in_use")
    return report


def _time(stepper, bare, params, batch, state, repeats: int) -> dict:
    """Compiles, then times the step and the bare passes alternately."""
    start = time.perf_counter()
    state, _ = jax.block_until_ready(stepper.step(params, state, batch))
    step_compile = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(bare(params, batch))
    bare_compile = time.perf_counter() - start

    step_timer, bare_timer = _Timer(), _Timer()
    for _ in range(repeats):  # alternate, so that both see the same machine load
        state, _ = step_timer(stepper.step, params, state, batch)
        bare_timer(bare, params, batch)

    step_s, bare_s = statistics.median(step_timer.times), statistics.median(bare_timer.times)
    return {
        "step_s_median": step_s, "bare_s_median": bare_s, "overhead": step_s / bare_s,
        "step_s": step_timer.times, "bare_s": bare_timer.times,
        "step_compile_s": step_compile, "bare_compile_s": bare_compile,
        "peak_mb": max(step_timer.peaks), "bare_peak_mb": max(bare_timer.peaks),
        "peak_kind": "rss",
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--input-shape", default="32,32,3", help="H,W,C of one image")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=512, help="images per particle")
    parser.add_argument("--particles", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--particle-mode", default="auto",
                        help="auto (the library's default), loop, vmap, map:K, shard or processes")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes mode: worker processes (default: one per core)")
    parser.add_argument("--no-pin", action="store_true",
                        help="processes mode: leave the workers unpinned")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conv-chunk", type=lambda t: t if t == "auto" else int(t),
                        default="auto", help="examples per convolution chunk (0: whole batches; "
                                             "auto: the library's default)")
    args = parser.parse_args(argv)
    report = run(
        model=args.model, input_shape=tuple(int(s) for s in args.input_shape.split(",")),
        num_classes=args.num_classes, batch_size=args.batch_size, particles=args.particles,
        repeats=args.repeats, particle_mode=args.particle_mode, seed=args.seed,
        workers=args.workers, pin=not args.no_pin, conv_chunk=args.conv_chunk,
    )
    print(f"{report['model']} n={report['particles']} batch {report['batch_size']} "
          f"({report['execution']}, {report['backend']}): "
          f"step {report['step_s_median']:.3f} s, bare {report['bare_s_median']:.3f} s, "
          f"overhead x{report['overhead']:.2f}, peak {report['peak_mb']:.0f} MB")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
