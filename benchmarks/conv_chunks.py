"""Probe: the whole SFPK step with every convolution run in batch chunks, against the plain one.

    python -m benchmarks.conv_chunks --batch-size 512 --chunk 128 --repeats 3

A convolution's forward pass and input gradient are per example and its
kernel gradient is a sum over examples, so ``lax.map`` over chunks of the
batch (autodiff sums the kernel gradient over the chunks) is the same
function up to summation order, with each chunk's activations small enough
to stay in cache. This probe swaps Flax's ``lax.conv_general_dilated`` for the
chunked one while the chunked step is traced (a measurement, not a setting
of the library), checks that both steps' energies and gradients agree, then
times the two steps alternately (``loop`` mode, ResNet-20 / CIFAR-100
shapes, random data). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
import types

import flax.linen.linear as flax_linear
import jax
import numpy as np

import sfpk_jax
from benchmarks.common import build_problem
from sfpk_jax import initial_state, make_stepper

PLAIN_CONV = jax.lax.conv_general_dilated


def chunked_conv(chunk: int):
    """``lax.conv_general_dilated`` over chunks of ``chunk`` examples (batch axis first)."""

    def conv(lhs, rhs, *args, **kwargs):
        batch = lhs.shape[0]
        if chunk >= batch or batch % chunk:
            return PLAIN_CONV(lhs, rhs, *args, **kwargs)
        chunks = lhs.reshape((batch // chunk, chunk) + lhs.shape[1:])
        out = jax.lax.map(lambda x: PLAIN_CONV(x, rhs, *args, **kwargs), chunks)
        return out.reshape((batch,) + out.shape[2:])

    return conv


@contextlib.contextmanager
def flax_convs(conv):
    """Flax's ``nn.Conv`` calls ``conv`` instead of ``lax.conv_general_dilated`` meanwhile."""
    original = flax_linear.lax
    flax_linear.lax = types.SimpleNamespace(**{**vars(original), "conv_general_dilated": conv})
    try:
        yield
    finally:
        flax_linear.lax = original


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--particles", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    loss_fn, params, batch = build_problem("resnet20", (32, 32, 3), 100, args.particles,
                                           args.batch_size, 0)
    config = sfpk_jax.SFPKConfig(particles=args.particles)
    layout = sfpk_jax.MaskLayout.from_params(params)
    steppers = {"plain": make_stepper(loss_fn, layout, config, 0.05)}
    # Another function object: another cached stepper, traced while the convs are chunked.
    steppers["chunked"] = make_stepper(lambda p, b: loss_fn(p, b), layout, config, 0.05)
    state = initial_state(layout, config)
    energies = {"plain": steppers["plain"].energies(params, state.particles, batch)}
    with flax_convs(chunked_conv(args.chunk)):
        energies["chunked"] = steppers["chunked"].energies(params, state.particles, batch)
    gaps = [float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-30)) for a, b in
            zip(jax.tree.leaves(energies["plain"]), jax.tree.leaves(energies["chunked"]))]
    states = {name: initial_state(layout, config) for name in steppers}
    with flax_convs(chunked_conv(args.chunk)):
        states["chunked"], _ = jax.block_until_ready(
            steppers["chunked"].step(params, states["chunked"], batch))
    states["plain"], _ = jax.block_until_ready(steppers["plain"].step(params, states["plain"],
                                                                      batch))
    times = {name: [] for name in steppers}
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):  # alternate, so that both see the same machine load
        for name, stepper in steppers.items():
            start = time.perf_counter()
            states[name], _ = jax.block_until_ready(stepper.step(params, states[name], batch))
            times[name].append(time.perf_counter() - start)
    load.append(os.getloadavg()[0])
    report = {"batch_size": args.batch_size, "chunk": args.chunk, "particles": args.particles,
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
