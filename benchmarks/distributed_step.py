"""The other way to spread particles over cores: ``jax.distributed`` over gloo, ``shard`` mode.

    python -m benchmarks.distributed_step --processes 2 --batch-size 128 --repeats 3

Starts ``--processes`` copies of itself, each pinned to one core, single-threaded
(``--xla_cpu_multi_thread_eigen=false``), with one CPU device, joined by
``jax.distributed`` with gloo collectives; every copy runs
``benchmarks.sfpk_step`` in ``shard`` mode (each device evaluates its share of
the particles), and process 0's report is printed. This is how several
processes share a simulation in this package (``particle_mode="shard"``),
and it needs the whole program started as that many processes:
``jax.distributed.initialize`` must run before any computation, so a library
call cannot start it (``particle_mode="processes"`` starts its own workers).
The last line printed is process 0's JSON report.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _member(args) -> None:
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[args.process_id % len(cores)]})
    import jax  # after the pinning and XLA_FLAGS (set by the launcher)

    from benchmarks import sfpk_step

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.processes,
                               process_id=args.process_id)
    report = sfpk_step.run(batch_size=args.batch_size, particles=args.particles,
                           repeats=args.repeats, particle_mode="shard",
                           conv_chunk=args.conv_chunk)
    report["processes"] = args.processes
    if args.process_id == 0:
        print(json.dumps(report))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--particles", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--conv-chunk", type=int, default=0,
                        help="examples per convolution chunk (models.chunked_conv; 0: none)")
    parser.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.process_id is not None:
        _member(args)
        return
    env = {**os.environ, "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false",
           "JAX_PLATFORMS": "cpu"}
    port = _free_port()
    common = [sys.executable, "-m", "benchmarks.distributed_step", "--processes",
              str(args.processes), "--batch-size", str(args.batch_size), "--particles",
              str(args.particles), "--repeats", str(args.repeats), "--conv-chunk",
              str(args.conv_chunk), "--port", str(port)]
    procs = [subprocess.Popen([*common, "--process-id", str(i)], env=env,
                              stdout=subprocess.PIPE if i == 0 else subprocess.DEVNULL, text=True)
             for i in range(args.processes)]
    out = procs[0].communicate()[0]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a process failed (exit codes {codes})")
    report = json.loads(out.strip().splitlines()[-1])
    print(f"jax.distributed, {args.processes} processes, batch {args.batch_size}: step "
          f"{report['step_s_median']:.3f} s, bare {report['bare_s_median']:.3f} s")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
