"""The whole SFPK step with the model's convolutions in batch chunks, against the plain one.

    python -m benchmarks.conv_chunks --batch-size 512 --chunk 128 --repeats 3

Builds ``--model`` (default ResNet-20 on CIFAR-100 shapes, random data) twice, with whole-batch
convolutions and with ``conv_chunk=--chunk``
(:func:`sfpk_jax.models.chunked_conv`), checks that both steps' energies
and gradients agree, then times the two ``loop``-mode steps alternately, so
that both see the same machine load. The last line printed is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

import sfpk_jax
from benchmarks.common import build_problem
from sfpk_jax import initial_state, make_stepper


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--input-shape", default="32,32,3", help="H,W,C of one image")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--particles", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.input_shape.split(","))
    problems = {name: build_problem(args.model, shape, args.num_classes, args.particles,
                                    args.batch_size, 0, chunk)
                for name, chunk in (("plain", 0), ("chunked", args.chunk))}
    params, batch = problems["plain"][1:]
    config = sfpk_jax.SFPKConfig(particles=args.particles)
    layout = sfpk_jax.MaskLayout.from_params(params)
    steppers = {name: make_stepper(problem[0], layout, config, 0.05)
                for name, problem in problems.items()}
    state = initial_state(layout, config)
    energies = {name: stepper.energies(params, state.particles, batch)
                for name, stepper in steppers.items()}
    gaps = [float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-30)) for a, b in
            zip(jax.tree.leaves(energies["plain"]), jax.tree.leaves(energies["chunked"]))]
    states = {name: initial_state(layout, config) for name in steppers}
    for name, stepper in steppers.items():  # compile
        states[name], _ = jax.block_until_ready(stepper.step(params, states[name], batch))
    times = {name: [] for name in steppers}
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):  # alternate, so that both see the same machine load
        for name, stepper in steppers.items():
            start = time.perf_counter()
            states[name], _ = jax.block_until_ready(stepper.step(params, states[name], batch))
            times[name].append(time.perf_counter() - start)
    load.append(os.getloadavg()[0])
    report = {"model": args.model, "batch_size": args.batch_size, "chunk": args.chunk,
              "particles": args.particles,
              "plain_s_median": statistics.median(times["plain"]),
              "chunked_s_median": statistics.median(times["chunked"]),
              "times": times, "max_relative_gap": max(gaps), "load_before_after": load}
    report["speedup"] = report["plain_s_median"] / report["chunked_s_median"]
    print(f"batch {args.batch_size}, chunks of {args.chunk}: plain "
          f"{report['plain_s_median']:.2f} s, chunked {report['chunked_s_median']:.2f} s "
          f"(x{report['speedup']:.2f}); energies and gradients agree to "
          f"{report['max_relative_gap']:.1e} relative")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
