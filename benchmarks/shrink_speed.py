"""Masked vs physically shrunk model: eval-mode inference time after channel pruning.

    python -m benchmarks.shrink_speed --model vgg16_bn --sparsities 0.5,0.75,0.9

For each sparsity, layer-wise channel masks come from channel magnitude
(``sfpk_jax.prune("magnitude", ..., scope="local", mask_dim=...)``) on the
hidden layers only, so the classes stay; :func:`sfpk_jax.tools.shrink.shrink` then
drops the dead channels. Both models are jitted and timed in eval mode on the
default JAX device (warm-up, then the median of ``--repeats`` runs of each,
alternating so that both see the same load on a shared machine), and their
logits are compared. The weights are random but spread like trained
ones (batch-norm statistics and shifts away from their initial values), so
masked channels emit non-zero constants and the exactness check means
something. Prints a markdown table and, last, one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import sfpk_jax
from sfpk_jax.core.masks import path_to_str
from sfpk_jax.models import make_apply_fn, small_cnn, vgg
from sfpk_jax.tools.flops import layer_costs, summary
from sfpk_jax.tools.shrink import shrink

MODELS = ("vgg16_bn", "vgg19_bn", "mlp")
TINY_VGG_PLAN = (8, 8, vgg.POOL, 16, 16)


def build_module(name: str, tiny: bool, hidden: int, num_classes: int = 10):
    """The module and its per-example input shape (CIFAR for VGG, 8x8 digits for the MLP)."""
    if name == "mlp":
        return small_cnn.MLP(num_classes=num_classes, hidden=32 if tiny else hidden), (8, 8, 1)
    if tiny:
        return vgg.VGG(plan=TINY_VGG_PLAN, num_classes=num_classes), (8, 8, 3)
    factory = vgg.vgg16_bn if name == "vgg16_bn" else vgg.vgg19_bn
    return factory(num_classes), (32, 32, 3)


def trained_like_variables(module, input_shape, seed: int = 0) -> dict:
    """Random variables shaped by ``jax.eval_shape`` (no init to compile).

    Kernels are He-normal as at initialisation; biases, batch-norm scales,
    shifts and running statistics are spread as after training, so that a
    masked channel's constant ``relu(BN(bias))`` is often non-zero.
    """
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, *input_shape)), train=False))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = path_to_str(path), leaf.shape
        if name.endswith("kernel"):
            x = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        elif name.endswith("bn/scale"):
            x = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("var"):
            x = rng.uniform(0.5, 2.0, shape)
        else:  # conv/dense biases, batch-norm shifts and means
            x = 0.5 * rng.standard_normal(shape)
        return np.asarray(x, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, dict(shapes))


def hidden_kernels(module, mask_dim: str):
    """The kernels whose channel masks remove hidden channels (never input or class channels)."""
    if isinstance(module, small_cnn.MLP):
        paths = {"Dense_0/kernel"} if mask_dim == "out" else {"Dense_1/kernel"}
    else:
        convs = [f"layers_{i}/conv/kernel" for i, s in enumerate(module.plan) if s != vgg.POOL]
        paths = set(convs) if mask_dim == "out" else {*convs[1:], "fc/kernel"}
    # Flax kernels, (..., in, out): their channel axes, given (the benchmark knows its modules).
    return lambda path, leaf: (leaf.ndim - 1, leaf.ndim - 2) if path in paths else False


def eval_fn(module):
    """The jitted eval-mode forward pass ``fn(variables, x) -> logits``."""
    return jax.jit(lambda v, x: module.apply(v, x, train=False))


def timed_pair(first, second, x, repeats: int) -> tuple[list[float], list[jax.Array]]:
    """Median wall times (ms) of two ``(fn, variables)`` forward passes, and their logits.

    The runs alternate, so both models see the same load on a shared machine.
    """
    pairs = (first, second)
    logits = [jax.block_until_ready(fn(v, x)) for fn, v in pairs]  # compile
    times: list[list[float]] = [[], []]
    for _ in range(repeats + 1):  # the first round only warms caches
        for i, (fn, v) in enumerate(pairs):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(v, x))
            times[i].append(1000.0 * (time.perf_counter() - t0))
    return [statistics.median(t[1:]) for t in times], logits


def costs(module, variables, input_shape) -> dict:
    """Conv/dense parameters and multiply-adds per example (see :mod:`sfpk_jax.tools.flops`)."""
    return summary(layer_costs(make_apply_fn(module), variables, jnp.zeros((1, *input_shape))))


def run(args) -> dict:
    module, input_shape = build_module(args.model, args.tiny, args.hidden)
    variables = trained_like_variables(module, input_shape, args.seed)
    x = jnp.asarray(np.random.default_rng(args.seed + 1).standard_normal(
        (args.batch_size, *input_shape)), jnp.float32)
    dense = costs(module, variables, input_shape)
    full_fn = eval_fn(module)  # one compile: every masked model has the full shapes
    rows = []
    for sparsity in args.sparsities:
        masks = sfpk_jax.prune("magnitude", None, variables["params"], None, sparsity,
                               prunable=hidden_kernels(module, args.mask_dim), scope="local",
                               mask_dim=args.mask_dim).masks
        masked = {**variables, "params": sfpk_jax.apply_masks(variables["params"], masks)}
        small = shrink(module, variables, masks)
        kept = costs(small.module, small.variables, input_shape)
        (full_ms, small_ms), (full_logits, small_logits) = timed_pair(
            (full_fn, masked), (eval_fn(small.module), small.variables), x, args.repeats)
        diff = float(jnp.max(jnp.abs(small_logits - full_logits)))
        rows.append({
            "sparsity": sparsity, "params": dense["params"], "kept_params": kept["params"],
            "flops": dense["flops"], "kept_flops": kept["flops"], "full_ms": full_ms,
            "shrunk_ms": small_ms, "speedup": full_ms / small_ms, "max_abs_logit_diff": diff,
            "max_abs_logit": float(jnp.max(jnp.abs(full_logits))),
            "widths": [r.width for r in small.report],
        })
        print(f"sparsity {sparsity:g}: widths {rows[-1]['widths']}, full {full_ms:.2f} ms, "
              f"shrunk {small_ms:.2f} ms", flush=True)
    return {"model": args.model, "tiny": args.tiny, "mask_dim": args.mask_dim,
            "batch_size": args.batch_size, "input_shape": list(input_shape),
            "repeats": args.repeats, "device": str(jax.devices()[0]), "rows": rows}


def markdown(result: dict) -> str:
    lines = ["| sparsity | params kept | FLOPs kept | masked full ms | shrunk ms | speed-up | "
             "max abs logit diff |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['sparsity']:g} | {r['kept_params']:,} ({r['kept_params'] / r['params']:.3f}) | "
            f"{r['kept_flops']:,} ({r['kept_flops'] / r['flops']:.3f}) | {r['full_ms']:.2f} | "
            f"{r['shrunk_ms']:.2f} | {r['speedup']:.2f}x | {r['max_abs_logit_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.shrink_speed",
                                description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vgg16_bn", choices=MODELS)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7, help="timed runs (the median is reported)")
    p.add_argument("--sparsities", default="0.5,0.75,0.9",
                   help="target weight sparsities; each layer keeps sqrt(1 - s) of its channels")
    p.add_argument("--mask-dim", default="out", choices=("out", "in"))
    p.add_argument("--hidden", type=int, default=2048, help="MLP hidden width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true",
                   help="a small VGG plan on 8x8 inputs (or a 32-unit MLP): runs in seconds")
    args = p.parse_args(argv)
    try:
        args.sparsities = [float(s) for s in args.sparsities.split(",")]
    except ValueError as err:
        p.error(f"--sparsities: {err}")
    if not all(0.0 < s < 1.0 for s in args.sparsities):
        p.error(f"--sparsities={args.sparsities} must all lie in (0, 1)")
    for flag in ("batch_size", "repeats", "hidden"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(markdown(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
