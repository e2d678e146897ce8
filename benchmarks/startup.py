"""Start-up costs: the first SFPK step's compilation, and a worker pool's start, cold and warm.

    python -m benchmarks.startup

Every measurement runs in a fresh process, so that nothing is compiled yet:

* **first step**, for ``small_cnn`` on the digits' shapes (8x8x1, batch 64,
  4 particles, as the demo and the README's quickstart) and ``resnet20`` on
  CIFAR-100's (batch 128, 10 particles): ``sfpk_prune`` with one step, in
  its default execution, with no persistent compilation cache, called twice. The first call compiles; the second finds everything
  compiled, so the difference is the compile time.
* **worker start**, ``resnet20`` (``--worker-model``), batch 128: a pool of one worker per core
  started and given the one-particle forward+backward program (exported),
  until every worker has loaded it; once with an empty cache folder (cold:
  the workers compile) and once more with the same folder (warm: they load
  it from disk).

Prints a markdown table, then one JSON object with every report.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# model: (image shape, classes, batch, particles)
_PROBLEMS = {"small_cnn": ((8, 8, 1), 10, 64, 4), "resnet20": ((32, 32, 3), 100, 128, 10)}


def first_step(model: str) -> dict:
    """Seconds of two one-step ``sfpk_prune`` calls in this (fresh) process."""
    import jax

    import sfpk_jax
    from benchmarks.common import build_problem

    shape, classes, size, particles = _PROBLEMS[model]
    loss_fn, params, batch = build_problem(model, shape, classes, particles, size)
    calls = []
    for _ in range(2):
        start = time.perf_counter()
        result = sfpk_jax.sfpk_prune(loss_fn, params, [batch], 0.5,
                                     config=sfpk_jax.SFPKConfig(steps=1, particles=particles),
                                     execution=sfpk_jax.Execution(progress=False))
        jax.block_until_ready(result.masks)
        calls.append(time.perf_counter() - start)
    return {"measure": "first step", "model": model, "first_call_s": calls[0],
            "second_call_s": calls[1], "compile_s": calls[0] - calls[1],
            "execution": sfpk_jax.sfpk.auto.summary(result.execution)}


def worker_start(model: str, workers: int | None) -> dict:
    """Seconds to start a pool and load the one-particle program into every worker."""
    import jax

    from benchmarks.common import build_problem
    from sfpk_jax.parallel.conv_chunks import chunk_convolutions
    from sfpk_jax.parallel.worker_pool import WorkerPool
    from sfpk_jax.sfpk import auto

    shape, classes, size, particles = _PROBLEMS[model]
    loss_fn, params, batch = build_problem(model, shape, classes, particles, size)
    one = jax.tree.map(lambda x: x[0], batch)
    grad_fn = jax.jit(jax.value_and_grad(chunk_convolutions(loss_fn, auto.conv_chunk("cpu"))))
    exported = jax.export.export(grad_fn, platforms=["cpu"])(params, one).serialize()
    start = time.perf_counter()
    with WorkerPool(workers) as pool:
        pool.load(exported, (params,))
        loaded = time.perf_counter() - start
        size = pool.size
    return {"measure": "worker start", "model": model, "workers": size, "start_s": loaded}


def _in_fresh_process(args: list[str], env: dict) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.startup", *args], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmarks.startup {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["load"] = os.getloadavg()[0]
    return report


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small_cnn,resnet20",
                        help="models of the first-step measurement")
    parser.add_argument("--worker-model", default="resnet20", help="model of the worker start")
    parser.add_argument("--workers", type=int, default=None, help="default: one per core")
    parser.add_argument("--one", nargs=2, metavar=("MEASURE", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        measure, model = args.one
        report = first_step(model) if measure == "first" else worker_start(model, args.workers)
        print(json.dumps(report))
        return [report]
    reports = []
    no_cache = {**os.environ, "SFPK_JAX_COMPILE_CACHE": "off"}
    for model in args.models.split(","):
        reports.append(_in_fresh_process(["--one", "first", model], no_cache))
    workers = ["--workers", str(args.workers)] if args.workers else []
    with tempfile.TemporaryDirectory() as folder:
        cached = {**os.environ, "SFPK_JAX_COMPILE_CACHE": folder}
        for kind in ("cold", "warm"):
            reports.append({**_in_fresh_process(["--one", "workers", args.worker_model,
                                                 *workers], cached), "cache": kind})
    print("| measure | model | seconds | detail | load after |")
    print("|---|---|---:|---|---:|")
    for r in reports:
        if r["measure"] == "first step":
            print(f"| first step compile | {r['model']} | {r['compile_s']:.2f} | first call "
                  f"{r['first_call_s']:.2f} s, second {r['second_call_s']:.2f} s "
                  f"({r['execution']}) | {r['load']:.1f} |")
        else:
            print(f"| worker start, {r['cache']} cache | {r['model']} | {r['start_s']:.2f} | "
                  f"{r['workers']} workers, program loaded | {r['load']:.1f} |")
    print(json.dumps(reports))
    return reports


if __name__ == "__main__":
    main()
