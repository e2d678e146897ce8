"""What channel pruning buys: remaining parameters and FLOPs per layer and in total.

    python -m benchmarks.structured_report --models resnet20,vgg16_bn --sparsity 0.75 --out runs/struct

For each model, output-channel masks are computed from the weights by
layer-wise channel magnitude (summed |theta|; the same code path any pruner's
channel masks take) and every conv/dense layer's parameters and multiply-adds
are counted before and under the masks (:mod:`sfpk_jax.tools.flops`). Counts come
from the masks alone: a removed output channel also idles the next layer's
matching input channel, which this count does not credit (a physically
shrunk model would). Writes ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp

import sfpk_jax
from experiments.harness import rundir
from sfpk_jax.core.layers import trace_layers
from sfpk_jax.models import build
from sfpk_jax.storage import files
from sfpk_jax.tools.flops import layer_costs, summary

INPUTS = {"mobilenet_v1": (224, 224, 3), "resnet50": (224, 224, 3)}


def model_report(name: str, sparsity: float, mask_dim: str) -> dict:
    """Per-layer and total costs of one model, dense and channel-pruned."""
    shape = INPUTS.get(name, (32, 32, 3))
    num_classes = 1000 if name in INPUTS else 100
    apply_fn, variables = build(name, num_classes=num_classes, input_shape=(1, *shape))
    x = jnp.zeros((1, *shape))
    # The model's layers (each weight's channel axes; the classifier keeps its classes).
    layers = trace_layers(lambda p, b: apply_fn({**variables, "params": p}, b, False)[0].sum(),
                          variables["params"], x)
    masks = sfpk_jax.magnitude_prune(variables["params"], sparsity, scope="local",
                                     prunable=layers, mask_dim=mask_dim)
    rows = layer_costs(apply_fn, variables, x, masks)
    return {"model": name, "input_shape": shape, "sparsity": sparsity, "mask_dim": mask_dim,
            "layers": [r._asdict() for r in rows], "total": summary(rows)}


def markdown(reports) -> str:
    lines = ["| model | params | kept | FLOPs (MACs) | kept | params kept | FLOPs kept |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in reports:
        t = r["total"]
        lines.append(f"| {r['model']} | {t['params']:,} | {t['kept_params']:,} | {t['flops']:,} | "
                     f"{t['kept_flops']:,} | {t['params_kept_fraction']:.3f} | "
                     f"{t['flops_kept_fraction']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.structured_report",
                                description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="resnet20,wrn20,vgg16_bn,vgg19_bn")
    p.add_argument("--sparsity", type=float, default=0.75)
    p.add_argument("--mask-dim", default="out", choices=("out", "in"))
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if not 0.0 < args.sparsity < 1.0:
        p.error(f"--sparsity={args.sparsity} must lie in (0, 1)")
    try:
        out = rundir.prepare_out_dir(args.out, overwrite=args.overwrite, marker="report.json")
    except (rundir.OutputExistsError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    reports = [model_report(m, args.sparsity, args.mask_dim) for m in args.models.split(",")]
    table = markdown(reports)
    files.write_text(out / "report.md", table)
    files.write_json(out / "report.json", reports)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
