"""Our SFPK step in several particle modes and the official code's, back to back in one window.

    python -m benchmarks.side_by_side --official-python /tmp/torchvenv/bin/python \
        --official-dir /tmp/sfpk_official --batch-sizes 128,512 --modes auto,loop,processes

For every batch size, runs ``benchmarks.official_step`` (with the official
code's ``--threads``) and ``benchmarks.sfpk_step`` once per ``--modes`` entry,
each in its own process, one after the other, and records the load average
(``os.getloadavg``) before and after each. Prints a markdown table with each
step's median and its ratio to the official code's at the same batch size,
then one JSON object with every report. Without ``--official-python`` only
our modes run. ``auto`` (the default ``--modes``) is the library's default
execution, no flags given; another mode names ``--particle-mode``, its
convolution chunks still the library's default; ``processes-unpinned`` is
``processes`` with ``--no-pin``, and a mode ending in ``+chunkK``
(``loop+chunk0``) runs every convolution over chunks of K examples
(``--conv-chunk K``; 0: whole batches).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def _last_json(command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measured(command: list[str]) -> dict:
    before = os.getloadavg()[0]
    report = _last_json(command)
    report["load_before_after"] = [before, os.getloadavg()[0]]
    return report


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-python", default=None,
                        help="a Python with PyTorch (without it, ours only)")
    parser.add_argument("--official-dir", default=None, help="checkout of mzf666/SFPK-main")
    parser.add_argument("--batch-sizes", default="128,512")
    parser.add_argument("--modes", default="auto",
                        help="comma list of auto (the library's default) or --particle-mode "
                             "values (processes-unpinned: with --no-pin; +chunkK: --conv-chunk K)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="the official code's torch threads")
    args = parser.parse_args(argv)
    rows = []
    for batch in args.batch_sizes.split(","):
        common = ["--batch-size", batch, "--repeats", str(args.repeats)]
        official = None
        if args.official_python:
            official = _measured([args.official_python, "-m", "benchmarks.official_step",
                                  "--official-dir", args.official_dir, "--threads",
                                  str(args.threads), *common])
            rows.append({"implementation": f"official, {args.threads} torch threads",
                         "batch": int(batch), "report": official})
        for mode in args.modes.split(","):
            # "processes-unpinned": processes mode with --no-pin; "+chunkK": --conv-chunk K.
            name, _, chunk = mode.partition("+chunk")
            flags = ["--particle-mode", name.removesuffix("-unpinned"),
                     "--conv-chunk", chunk or "auto"]
            flags += ["--no-pin"] * name.endswith("-unpinned")
            ours = _measured([sys.executable, "-m", "benchmarks.sfpk_step", *flags, *common])
            rows.append({"implementation": f"ours, {mode}", "batch": int(batch), "report": ours})
            if official:
                rows[-1]["ratio"] = ours["step_s_median"] / official["step_s_median"]
    print("| implementation | runs as | batch | step (s) | bare (s) | step / official "
          "| load before, after |")
    print("|---|---|---:|---:|---:|---:|---|")
    for row in rows:
        r = row["report"]
        ratio = f"{row['ratio']:.2f}" if "ratio" in row else ("1" if "impl" in r else "-")
        load = ", ".join(f"{x:.1f}" for x in r["load_before_after"])
        print(f"| {row['implementation']} | {r.get('execution', 'torch')} | {row['batch']} | "
              f"{r['step_s_median']:.2f} | "
              f"{r['bare_s_median']:.2f} | {ratio} | {load} |")
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
