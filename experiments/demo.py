"""Offline end-to-end run: SFPK vs magnitude pruning on the bundled 8x8 digits.

    python -m experiments.demo --out runs/demo

Trains a small CNN dense, prunes it with SFPK and with global magnitude
pruning at 90%, 95% and 98% sparsity, recomputes batch-norm statistics,
retrains each pruned model briefly with its mask held fixed, and writes
``results.json``, ``accuracy_vs_sparsity.png`` and ``sfpk_trace.png`` to
``--out``. Needs no download (scikit-learn ships the digits) and runs in a
few minutes on a 2-core CPU; the same ``--seed`` gives the same numbers. It
keeps no checkpoints (a killed demo is simply run again); the experiments in
``experiments/`` resume with ``--resume``.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

import sfpk_jax
from sfpk_jax import harness
from sfpk_jax.data import batch_iterator, load_digits, particle_batches
from sfpk_jax.models import build
from sfpk_jax.storage import files
from sfpk_jax.tools import plots
from sfpk_jax.train import (
    evaluate,
    make_loss_fn,
    recompute_batch_stats,
    sgd_cosine,
    train,
)

PRUNERS = ("sfpk", "magnitude")


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments.demo", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    harness.one_line_errors(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sparsities", default="0.9,0.95,0.98", help="comma-separated fractions removed")
    p.add_argument("--pretrain-epochs", type=int, default=40)
    p.add_argument("--retrain-epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--lr", type=float, default=0.05, help="dense training learning rate")
    s = p.add_argument_group("SFPK (defaults: the paper's)")
    harness.add_config_flags(s, "steps", "particles")
    s.add_argument("--prune-batch-size", type=int, default=128, help="mini-batch per particle")
    harness.add_config_flags(s, "radius", "repulsion")
    p.add_argument("--bn-batches", type=int, default=2, help="batches to re-estimate BN statistics")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    train_size = len(load_digits(seed=args.seed).x_train) if args.seed >= 0 else 0
    harness.require([
        harness.sparsities_check(args.sparsities),
        *harness.positive_ints(args, "pretrain_epochs", "retrain_epochs", "batch_size",
                               "prune_batch_size", "bn_batches"),
        harness.Check("--seed", args.seed, args.seed >= 0, "an integer >= 0"),
        harness.Check("--batch-size", args.batch_size, args.batch_size <= train_size,
                      f"at most the {train_size} training digits"),
        harness.Check("--prune-batch-size", args.prune_batch_size,
                      args.prune_batch_size <= train_size,
                      f"at most the {train_size} training digits"),
        harness.Check("--lr", args.lr, harness.finite(args.lr) and args.lr > 0,
                      "a finite number > 0"),
        harness.out_check(args),
    ])
    harness.check_config(args)
    args.sparsities = harness.csv_items(args.sparsities, float)
    return args


def prune(pruner, args, loss_fn, params, data, sparsity, index):
    """Masks for one pruner and sparsity, and the SFPK trace (None for magnitude)."""
    if pruner == "magnitude":
        return sfpk_jax.magnitude_prune(params, sparsity), None
    batches = particle_batches(
        data.x_train, data.y_train, args.particles, args.prune_batch_size, seed=(args.seed, index)
    )
    result = sfpk_jax.sfpk_prune(loss_fn, params, batches, sparsity, harness.sfpk_config(args))
    return result.masks, result.trace


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return _run(args)
    except FloatingPointError as err:
        # Training or SFPK diverged. The demo keeps no checkpoints (it takes
        # minutes): nothing is written yet, so just start again.
        harness.fail(f"{err}; start again with a smaller --lr (now {args.lr:g}) or, for SFPK, a "
                     "smaller --radius")


def _run(args) -> int:
    try:
        out = files.prepare_out_dir(args.out, overwrite=args.overwrite)
    except (files.OutputExistsError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    progress = not args.no_progress
    data = load_digits(seed=args.seed)
    apply_fn, variables = build("small_cnn", num_classes=10, key=jax.random.key(args.seed))
    steps_per_epoch = len(data.x_train) // args.batch_size

    start = time.perf_counter()
    dense, _ = train(
        apply_fn, variables, data.x_train, data.y_train, epochs=args.pretrain_epochs,
        batch_size=args.batch_size, seed=args.seed, progress=progress, desc="dense",
        optimizer=sgd_cosine(args.lr, args.pretrain_epochs, steps_per_epoch, momentum=0.9,
                             weight_decay=5e-4),
    )
    dense_acc = evaluate(apply_fn, dense, data.x_test, data.y_test)
    print(f"dense model: test accuracy {dense_acc:.4f} ({time.perf_counter() - start:.1f}s)")
    loss_fn = make_loss_fn(apply_fn, dense)

    records, traces = [], {}
    for index, sparsity in enumerate(args.sparsities):
        for pruner in PRUNERS:
            t0 = time.perf_counter()
            masks, trace = prune(pruner, args, loss_fn, dense["params"], data, sparsity, index)
            prune_s = time.perf_counter() - t0
            if trace is not None:
                traces[f"{100 * sparsity:g}% sparsity"] = trace
            pruned = {**dense, "params": sfpk_jax.apply_masks(dense["params"], masks)}
            bn_batches = batch_iterator(data.x_train, data.y_train, args.batch_size,
                                        seed=(args.seed, index, 1))
            pruned = recompute_batch_stats(
                apply_fn, pruned, (b for _, b in zip(range(args.bn_batches), bn_batches))
            )
            acc_pruned = evaluate(apply_fn, pruned, data.x_test, data.y_test)
            retrained, _ = train(
                apply_fn, pruned, data.x_train, data.y_train, epochs=args.retrain_epochs,
                batch_size=args.batch_size, masks=masks, seed=args.seed, progress=progress,
                desc=f"retrain {pruner} {sparsity:g}",
                optimizer=sgd_cosine(0.01, args.retrain_epochs, steps_per_epoch, momentum=0.875),
            )
            records.append({
                "pruner": pruner,
                "sparsity": sparsity,
                "density": sfpk_jax.density(masks),
                "acc_pruned": acc_pruned,
                "acc_retrained": evaluate(apply_fn, retrained, data.x_test, data.y_test),
                "prune_seconds": round(prune_s, 3),
            })

    files.write_json(out / "config.json", vars(args))
    plots.accuracy_vs_sparsity(records, str(out / "accuracy_vs_sparsity.png"), dense_acc)
    plots.sfpk_trace(traces, str(out / "sfpk_trace.png"))
    files.write_json(out / "results.json", records)

    print(f"\n{'pruner':<10} {'sparsity':>8} {'density':>8} {'acc_pruned':>11} {'acc_retrained':>14}")
    for r in records:
        print(f"{r['pruner']:<10} {r['sparsity']:>8.2f} {r['density']:>8.4f} "
              f"{r['acc_pruned']:>11.4f} {r['acc_retrained']:>14.4f}")
    print(f"dense accuracy {dense_acc:.4f}; results in {out} "
          f"({time.perf_counter() - start:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
