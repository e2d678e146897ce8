"""Trains a dense model and saves it as an orbax checkpoint for the pruning experiments.

    python -m experiments.pretrain --data-dir ~/data --dataset cifar100 --model resnet20 --out runs/dense

CIFAR recipe (the common one for CIFAR ResNets/VGG): 160 epochs at batch 128,
SGD with momentum 0.9, lr 0.1 on a cosine schedule, weight decay 5e-4,
pad-4 random crop + flip augmentation. The checkpoint is written to
``OUT/checkpoints/dense``; pass it to the others with ``--dense-checkpoint``.
``--smoke`` trains small_cnn on the embedded digits for 2 epochs (about half a
minute on a CPU). Every epoch is checkpointed: a killed run continues with
the same flags plus ``--resume`` (see docs/long_runs.md).
"""

from __future__ import annotations

import argparse
import time

from experiments import harness


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.pretrain", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    harness.add_common_flags(parser, epochs=160, batch_size=128)
    harness.add_recipe_flags(parser, lr=0.1, momentum=0.9, weight_decay=5e-4, warmup_epochs=0)
    return harness.finish_args(parser, argv, [harness.recipe_checks])


@harness.guarded
def main(argv=None) -> int:
    args = parse_args(argv)
    run = harness.setup(args, prunes=False)
    out = run.out
    t0 = time.perf_counter()
    variables, accs = harness.fit(run.apply_fn, run.variables, args, run.bundle,
                                  epochs=args.epochs, metrics=run.metrics, phase="pretrain")
    train_s = time.perf_counter() - t0
    harness.save_checkpoint(args, out / "checkpoints" / "dense", variables)
    # The checkpoint is the last epoch's model, so dense_acc is final_acc.
    results = {**harness.summarize(accs), "dense_acc": accs[-1], "achieved_sparsity": 0.0,
               "train_seconds": train_s, "checkpoint": str(out / "checkpoints" / "dense")}
    harness.write_outputs(out, results, run.metrics,
                          title=harness.run_title(args, "dense training, "
                                                 f"{harness.count(args.epochs, 'epoch')}"))
    print(f"dense {args.model} on {args.dataset}: top-1 after the last epoch "
          f"{results['final_acc']:.4f} (mean of the last 5 {results['mean_last5_acc']:.4f}, best "
          f"{results['best_acc']:.4f}); checkpoint {results['checkpoint']}")
    return 0


if __name__ == "__main__":
    harness.run(main)
