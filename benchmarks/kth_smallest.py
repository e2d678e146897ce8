"""k-th smallest of |m * theta|: bisection over bit patterns vs a full sort.

    python -m benchmarks.kth_smallest --sizes 23834,276756,1093060 --repeats 20

Both run jitted on the same random vector, side by side; the median of
``--repeats`` calls is reported with their ratio. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from sfpk_jax.core.topk import kth_smallest


def _median_seconds(fn, x, k, repeats):
    jax.block_until_ready(fn(x, k))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(x, k))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="23834,276756,1093060")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    by_sort = jax.jit(lambda x, k: jnp.sort(x)[k - 1])
    by_bisection = jax.jit(kth_smallest)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        x = jnp.asarray(np.abs(np.random.default_rng(0).normal(size=size)).astype(np.float32))
        k = jnp.int32(int(0.9 * size))
        assert float(by_sort(x, k)) == float(by_bisection(x, k))
        sort_s = _median_seconds(by_sort, x, k, args.repeats)
        bis_s = _median_seconds(by_bisection, x, k, args.repeats)
        rows.append({"size": size, "sort_ms": 1e3 * sort_s, "bisection_ms": 1e3 * bis_s,
                     "speedup": sort_s / bis_s})
        print(f"D={size:>9,}  sort {1e3 * sort_s:8.2f} ms  bisection {1e3 * bis_s:8.2f} ms  "
              f"speed-up {sort_s / bis_s:5.1f}x")
    print(json.dumps({"backend": jax.default_backend(), "rows": rows}))


if __name__ == "__main__":
    main()
