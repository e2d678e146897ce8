"""Every pruner at several sparsities and seeds, right after pruning and after a short retraining.

    python -m benchmarks.compare_pruners --out runs/compare

Defaults run on the embedded digits (small_cnn; offline, CPU). The same script
runs the paper's comparison on a GPU box, e.g.
``--dataset cifar100 --model resnet20 --data-dir ~/data --pretrain-epochs 160
--retrain-epochs 100 --prune-batch-size 512``. Writes ``results.json`` (one
record per pruner, sparsity and seed), ``summary.json`` and ``table.md``
(mean +- std over seeds) and ``accuracy_vs_sparsity.png``. ``--smoke`` runs
every pruner at 90% sparsity with one seed on 256 digits.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from experiments import harness
from sfpk_jax import pruners
from sfpk_jax.storage import files
from sfpk_jax.tools import plots
from sfpk_jax.train import evaluate_batches


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare_pruners", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    harness.add_common_flags(parser, dataset="digits", model="small_cnn", prune_batch_size=128,
                             pretrain_epochs=40, epochs=5)
    harness.add_recipe_flags(parser, lr=0.01, momentum=0.875, weight_decay=0.0, warmup_epochs=0)
    g = parser.add_argument_group("comparison")
    g.add_argument("--pruners", default=",".join(pruners.names()), help="comma-separated pruner names")
    g.add_argument("--sparsities", default="0.9,0.95,0.98,0.99",
                   help="comma-separated fractions of the prunable weights removed")
    g.add_argument("--seeds", default="0,1,2",
                   help="comma-separated seeds: one dense model and one run of each pruner per "
                        "seed")
    g.add_argument("--pretrain-lr", type=float, default=0.05, help="dense training learning rate")
    args = harness.finish_args(parser, argv, [harness.recipe_checks, _checks],
                               smoke={"seeds": "0", "sparsities": "0.9"})
    args.pruners = harness.csv_items(args.pruners, str)
    args.sparsities = harness.csv_items(args.sparsities, float)
    args.seeds = harness.csv_items(args.seeds, int)
    return args


def _checks(args) -> list[harness.Check]:
    """The comparison's lists (names known, values in range, each once), and its dense models."""
    return [
        harness.list_check("--pruners", args.pruners, str, f"names from {', '.join(pruners.names())}",
                           lambda name: name in pruners.names()),
        harness.sparsities_check(args.sparsities),
        harness.list_check("--seeds", args.seeds, int, "integers >= 0", lambda seed: seed >= 0),
        harness.Check("--pretrain-lr", args.pretrain_lr,
                      harness.finite(args.pretrain_lr) and args.pretrain_lr > 0,
                      "a finite number > 0"),
        harness.Check("--pretrain-epochs", args.pretrain_epochs, args.pretrain_epochs >= 1,
                      "an integer >= 1 (the dense models are trained here)"),
        harness.Check("--dense-checkpoint", args.dense_checkpoint, args.dense_checkpoint is None,
                      "none: the comparison trains one dense model per seed itself"),
    ]


def dense_model(args, bundle, metrics):
    """The dense model of ``args.seed``, trained with ``--pretrain-lr`` (SGD 0.9, wd 5e-4)."""
    apply_fn, variables = harness.build_model(args, bundle)
    recipe = argparse.Namespace(**{**vars(args), "lr": args.pretrain_lr, "momentum": 0.9,
                                   "weight_decay": 5e-4})
    variables, _ = harness.fit(apply_fn, variables, recipe, bundle, epochs=args.pretrain_epochs,
                               metrics=metrics, phase=f"dense seed {args.seed}", seed_offset=1000)
    return apply_fn, variables


def aggregate(records):
    """Mean and std over seeds of each pruner and sparsity."""
    rows = []
    for pruner in dict.fromkeys(r["pruner"] for r in records):
        for sparsity in dict.fromkeys(r["sparsity"] for r in records):
            group = [r for r in records if r["pruner"] == pruner and r["sparsity"] == sparsity]
            row = {"pruner": pruner, "sparsity": sparsity, "seeds": len(group)}
            for key in ("acc_pruned", "acc_retrained", "prune_seconds"):
                values = [r[key] for r in group]
                row[key], row[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
            rows.append(row)
    return rows


def markdown(rows, dense_accs, synflow_iterations: int = 1) -> str:
    """The table of :func:`aggregate`'s rows, under the dense accuracy."""
    lines = [f"Dense accuracy: {np.mean(dense_accs):.4f} ± {np.std(dense_accs):.4f}", "",
             "| pruner | sparsity | acc. after pruning | acc. after retraining | prune s |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        name = r["pruner"]
        if name == "synflow" and synflow_iterations > 1:
            name = f"synflow ({synflow_iterations} rounds)"
        lines.append(f"| {name} | {100 * r['sparsity']:g}% | {r['acc_pruned']:.4f} ± "
                     f"{r['acc_pruned_std']:.4f} | {r['acc_retrained']:.4f} ± "
                     f"{r['acc_retrained_std']:.4f} | {r['prune_seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    run = harness.setup(args)
    bundle, out, metrics = run.bundle, run.out, run.metrics
    records, dense_accs = [], []
    start = time.perf_counter()
    for seed in args.seeds:
        args.seed = seed
        apply_fn, dense = dense_model(args, bundle, metrics)
        _, test = harness.loaders(args, bundle, seed)
        dense_acc = evaluate_batches(apply_fn, dense, test.epoch(0))
        dense_accs.append(dense_acc)
        for sparsity in args.sparsities:
            for pruner in args.pruners:
                args.pruner = pruner
                pruned = harness.prune_model(args, bundle, apply_fn, dense, sparsity)
                masked = harness.recompute_bn(args, bundle, apply_fn, dense, pruned.masks)
                acc_pruned = evaluate_batches(apply_fn, masked, test.epoch(0))
                _, accs = harness.fit(apply_fn, masked, args, bundle, epochs=args.epochs,
                                      masks=pruned.masks, metrics=metrics,
                                      phase=f"{pruner} {sparsity:g} seed {seed}")
                records.append({"pruner": pruner, "sparsity": sparsity, "seed": seed,
                                "dense_acc": dense_acc, "acc_pruned": acc_pruned,
                                "acc_retrained": accs[-1],
                                "prune_seconds": pruned.seconds,
                                **harness.mask_results(pruned.masks, dense["params"])})
                print(f"seed {seed} {pruner:<9} {sparsity:5.2%}: pruned {acc_pruned:.4f}, "
                      f"retrained {accs[-1]:.4f}", flush=True)
    rows = aggregate(records)
    table = markdown(rows, dense_accs, args.synflow_iterations)
    title = harness.run_title(args, f"pruners compared, retrained "
                                    f"{harness.count(args.epochs, 'epoch')}, "
                                    f"{harness.count(len(args.seeds), 'seed')} (bars: std)")
    plots.accuracy_vs_sparsity(rows, str(out / "accuracy_vs_sparsity.png"),
                               float(np.mean(dense_accs)), title=title)
    files.write_text(out / "table.md", table)
    files.write_json(out / "summary.json", {"dense_acc": dense_accs, "rows": rows,
                                         "seconds": time.perf_counter() - start})
    files.write_json(out / "results.json", records)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
