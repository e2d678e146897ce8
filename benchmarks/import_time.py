"""What ``import sfpk_jax`` costs on top of jax, flax and optax, now and at an older commit.

    python -m benchmarks.import_time --repeats 15 --old-commit 6aea205

Each repeat runs fresh interpreters, alternately for each checkout, with
``python -X importtime -c "import jax, flax, optax; import sfpk_jax"``: the
cumulative time that ``-X importtime`` reports for the top-level ``sfpk_jax``
line is what the package adds (jax, flax and optax are already imported when
it starts). Also reported: the interpreter's whole import of jax, flax and
optax (the baseline), the wall time of the process, and how many modules the
package adds. The old commit is checked out into a temporary git worktree.
Run it twice and keep the second (warm file cache); the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ("import jax, flax, optax, sys; n = len(sys.modules); import sfpk_jax; "
        "print(len(sys.modules) - n)")
_LINE = re.compile(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)")


def measure(checkout: Path) -> dict[str, float]:
    """One fresh interpreter in ``checkout``: seconds added by sfpk_jax, baseline, wall, modules."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", CODE], cwd=checkout, env=env,
                          capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    cumulative = {}
    for match in _LINE.finditer(done.stderr):
        if not match.group(2):  # top-level imports only
            cumulative[match.group(3)] = int(match.group(1)) / 1e6
    base = sum(cumulative.get(name, 0.0) for name in ("jax", "flax", "optax"))
    return {"added_s": cumulative["sfpk_jax"], "base_s": base, "wall_s": wall,
            "modules": int(done.stdout.strip())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--old-commit", default=None,
                        help="also measure this commit (checked out into a temporary worktree)")
    args = parser.parse_args(argv)
    checkouts = {"now": ROOT}
    with tempfile.TemporaryDirectory() as tmp:
        if args.old_commit:
            old = Path(tmp) / "old"
            subprocess.run(["git", "worktree", "add", "--detach", str(old), args.old_commit],
                           cwd=ROOT, check=True, capture_output=True)
            checkouts[args.old_commit] = old
        try:
            runs = {name: [] for name in checkouts}
            for _ in range(args.repeats):
                for name, path in checkouts.items():  # alternately: both see the same load
                    runs[name].append(measure(path))
        finally:
            if args.old_commit:
                subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT,
                               check=False, capture_output=True)
    report = {"repeats": args.repeats, "load_average": os.getloadavg(), "python": sys.version,
              "checkouts": {}}
    for name, rows in runs.items():
        medians = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        report["checkouts"][name] = medians
        print(f"{name:>10}: sfpk_jax adds {medians['added_s']:.3f} s over jax+flax+optax "
              f"({medians['base_s']:.3f} s), {medians['modules']:.0f} modules; process "
              f"{medians['wall_s']:.2f} s (medians of {args.repeats})")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
