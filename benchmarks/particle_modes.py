"""Times one full SFPK step per particle mode (loop / vmap / map) side by side.

    python -m benchmarks.particle_modes --model small_cnn --input-shape 32,32,3 \
        --num-classes 100 --particles 10 --batch-size 128 --repeats 5

Every mode runs the same step on the same random data after one warm-up step
(the compile); the median of ``--repeats`` timed steps is reported, with the
ratio to the fastest mode. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax

import sfpk_jax
from benchmarks.common import build_problem
from sfpk_jax import initial_state, make_stepper


def time_mode(loss_fn, params, batch, mode: str, chunk: int, particles: int, repeats: int):
    """Median seconds of one full SFPK step (energies, update, vote) in ``mode``."""
    config = sfpk_jax.SFPKConfig(particles=particles, particle_mode=mode, particle_chunk=chunk)
    layout = sfpk_jax.MaskLayout.from_params(params)
    stepper = make_stepper(loss_fn, layout, config, target=0.05)
    state = initial_state(layout, config)
    state, trace = stepper.step(params, state, batch)  # compile
    jax.block_until_ready(trace)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, trace = stepper.step(params, state, batch)
        jax.block_until_ready((state, trace))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--input-shape", default="32,32,3", help="H,W,C of one image")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--particles", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", default="loop,vmap,map:1,map:5",
                        help="comma list; map:K is lax.map in chunks of K particles")
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.input_shape.split(","))
    loss_fn, params, batch = build_problem(
        args.model, shape, args.num_classes, args.particles, args.batch_size
    )
    results = {}
    for spec in args.modes.split(","):
        mode, _, chunk = spec.partition(":")
        results[spec] = time_mode(
            loss_fn, params, batch, mode, int(chunk or 1), args.particles, args.repeats
        )
    fastest = min(results.values())
    print(f"{'mode':<8} {'median s/step':>14} {'x fastest':>10}")
    for spec, sec in results.items():
        print(f"{spec:<8} {sec:>14.3f} {sec / fastest:>10.2f}")
    print(json.dumps({
        "model": args.model, "input_shape": shape, "particles": args.particles,
        "batch_size": args.batch_size, "repeats": args.repeats,
        "backend": jax.default_backend(), "machine": platform.processor() or platform.machine(),
        "step_s_median": results, "fastest": min(results, key=results.get),
    }))


if __name__ == "__main__":
    main()
