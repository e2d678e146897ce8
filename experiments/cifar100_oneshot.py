"""One-shot pruning on CIFAR (paper Table 3): prune a trained model once, then retrain.

    python -m experiments.cifar100_oneshot --data-dir ~/data --dense-checkpoint runs/dense/checkpoints/dense --out runs/oneshot

Defaults are the paper's: ResNet-20 on CIFAR-100, SFPK with K=100 steps,
n=10 particles, mini-batch 512, lambda=0.2, r=1.1; retraining for 100 epochs
at batch 64 with SGD (momentum 0.875, lr 0.01, no weight decay) on a cosine
schedule after 5 warm-up epochs from 1e-4. ``final_acc`` is the top-1 of
the last epoch (the model saved as ``checkpoints/final``), ``mean_last5_acc``
the mean over the last 5 epochs (what the paper reports). ``--smoke`` runs
it all in about a minute on a CPU. A killed run continues with the same flags
plus ``--resume`` (see docs/long_runs.md).
"""

from __future__ import annotations

import argparse
import time

from experiments import harness
from sfpk_jax import sparsity_report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.cifar100_oneshot", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    harness.add_common_flags(parser)
    harness.add_recipe_flags(parser, lr=0.01, momentum=0.875, weight_decay=0.0, warmup_epochs=5)
    return harness.finish_args(parser, argv, [harness.recipe_checks], needs_dense=True)


@harness.guarded
def main(argv=None) -> int:
    args = parse_args(argv)
    run = harness.setup(args)
    bundle, out, metrics, apply_fn = run.bundle, run.out, run.metrics, run.apply_fn
    dense = harness.dense_model(args, run)
    _, test = harness.loaders(args, bundle, args.seed)
    dense_acc = harness.remember(args, "dense_acc",
                                 lambda: harness.eval_accuracy(apply_fn, dense, test.epoch(0)),
                                 dense)

    pruned = harness.prune_model(args, bundle, apply_fn, dense, args.sparsity)
    masked = harness.recompute_bn(args, bundle, apply_fn, dense, pruned.masks)
    acc_pruned = harness.remember(args, "acc_pruned",
                                  lambda: harness.eval_accuracy(apply_fn, masked, test.epoch(0)),
                                  masked)
    harness.save_checkpoint(args, out / "checkpoints" / "pruned",
                            {"variables": masked, "masks": pruned.masks})

    t0 = time.perf_counter()
    final, accs = harness.fit(apply_fn, masked, args, bundle, epochs=args.epochs,
                              masks=pruned.masks, metrics=metrics, phase="retrain")
    retrain_s = time.perf_counter() - t0
    harness.save_checkpoint(args, out / "checkpoints" / "final",
                            {"variables": final, "masks": pruned.masks})
    trace = getattr(pruned.result, "trace", None)
    results = {
        **harness.summarize(accs),
        "dense_acc": dense_acc,
        "acc_pruned": acc_pruned,
        "pruner": args.pruner,
        "sparsity": args.sparsity,
        **harness.mask_results(pruned.masks, dense["params"]),
        "prune_seconds": pruned.seconds,
        "retrain_seconds": retrain_s,
    }
    print(sparsity_report(pruned.masks, final["params"], n_m=harness.n_m_of(args)).table())
    label = f"{100 * args.sparsity:g}% sparsity"
    title = harness.run_title(args, f"{args.pruner} at {label}, retrained "
                                    f"{harness.count(args.epochs, 'epoch')}")
    harness.write_outputs(out, results, metrics, pruned.masks, {label: trace} if trace else None,
                          title=title, pruned_before=["retrain"],
                          targets=harness.trace_targets(args, {label: args.sparsity}))
    print(f"{args.pruner} at {args.sparsity:.0%} sparsity: top-1 after the last epoch "
          f"{results['final_acc']:.4f} (mean of the last 5 {results['mean_last5_acc']:.4f}, best "
          f"{results['best_acc']:.4f}, dense {dense_acc:.4f}, right after pruning "
          f"{acc_pruned:.4f}); results in {out}")
    return 0


if __name__ == "__main__":
    harness.run(main)
