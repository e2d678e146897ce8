"""Gradual (iterative) pruning on ImageNet: P rounds of SFPK and fine-tuning, then a final fine-tune.

    python -m experiments.imagenet_iterative --data-dir ~/tensorflow_datasets \
        --pretrained-weights resnet50.safetensors --out runs/imagenet

Round e (0-based) prunes to density f^((e+1)/P), starting from the previous
round's particles (the particle system is kept across rounds, the start
density being their mean G) with the fine-tuned weights, then fine-tunes
with the mask held fixed. Defaults follow the official example: ResNet-50,
K=150, n=10, r=5.5, mini-batch 256, 10 pruning rounds, 50 final epochs,
label smoothing 0.1; ``--accum-steps`` accumulates gradients to reach the
batch size on small accelerators. ``--smoke`` runs 2 rounds on the embedded
digits in about a minute on a CPU. Every round is checkpointed: a killed run
continues with the same flags plus ``--resume`` (see docs/long_runs.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from experiments import harness
from experiments.harness.flags import path_arg
from sfpk_jax import sparsity_report
from sfpk_jax.pruners import spec


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.imagenet_iterative", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    harness.add_common_flags(parser, dataset="imagenet", model="resnet50", sparsity=0.9, steps=150,
                             prune_batch_size=256, batch_size=256, epochs=50, radius=5.5)
    harness.add_recipe_flags(parser, lr=0.1, momentum=0.9, weight_decay=1e-4, warmup_epochs=0,
                             label_smoothing=0.1)
    g = parser.add_argument_group("gradual pruning")
    g.add_argument("--rounds", type=int, default=10, help="pruning rounds P")
    g.add_argument("--round-epochs", type=int, default=1, help="fine-tuning epochs between rounds")
    g.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--pretrained-weights", default=None, type=path_arg,
                   help="safetensors file in torchvision/timm naming for the dense model (read "
                        "and checked against --model before anything is written)")
    return harness.finish_args(parser, argv, [harness.recipe_checks, _checks],
                               smoke={"rounds": 2, "round_epochs": 1}, needs_dense=True,
                               dense_flag="pretrained_weights")


def _checks(args) -> list[harness.Check]:
    """The gradual-pruning flags."""
    checks = harness.positive_ints(args, "rounds", "round_epochs", "accum_steps")
    if args.accum_steps >= 1:
        checks += [
            harness.Check("--batch-size", args.batch_size, args.batch_size % args.accum_steps == 0,
                          f"a multiple of --accum-steps={args.accum_steps} (each optimizer step "
                          "accumulates that many equal micro-batches)"),
            harness.batch_split_check(args, args.accum_steps),
        ]
    weights = args.pretrained_weights
    if weights is not None:
        checks += [
            harness.Check("--pretrained-weights", weights, Path(weights).is_file(),
                          "an existing file"),
            harness.Check("--pretrained-weights", weights, args.dense_checkpoint is None,
                          "not together with --dense-checkpoint (pass one source of the dense "
                          "model)"),
        ]
    return checks


@harness.guarded
def main(argv=None) -> int:
    args = parse_args(argv)
    run = harness.setup(args)
    bundle, out, metrics, apply_fn = run.bundle, run.out, run.metrics, run.apply_fn
    variables = harness.dense_model(args, run)
    _, test = harness.loaders(args, bundle, args.seed)
    dense_acc = harness.remember(args, "dense_acc",
                                 lambda: harness.eval_accuracy(apply_fn, variables, test.epoch(0)),
                                 variables)

    # Every step below is checkpointed or remembered, so a --resume replays the
    # finished rounds from their checkpoints (cheaply) and continues where the
    # run stopped; the particles carried between rounds come back with the
    # pruning results.
    target = 1.0 - args.sparsity
    previous, rounds, prune_s, finetune_s = None, [], 0.0, 0.0
    traces, sparsities = {}, {}  # by round, for the trace plot
    for e in range(args.rounds):
        sparsity = 1.0 - target ** ((e + 1) / args.rounds)
        pruned = harness.prune_model(args, bundle, apply_fn, variables, sparsity,
                                     init=previous, seed_offset=e, name=f"round{e + 1}")
        prune_s += pruned.seconds
        if spec(args.pruner).simulation:
            previous = pruned.result
            label = f"round {e + 1} (to {100 * sparsity:.3g}%)"
            traces[label], sparsities[label] = pruned.result.trace, sparsity
        variables = harness.recompute_bn(args, bundle, apply_fn, variables, pruned.masks)
        acc_pruned = harness.remember(
            args, f"acc_pruned_round{e + 1}",
            lambda: harness.eval_accuracy(apply_fn, variables, test.epoch(0)), variables)
        epochs = args.epochs if e == args.rounds - 1 else args.round_epochs
        t0 = time.perf_counter()
        variables, accs = harness.fit(apply_fn, variables, args, bundle, epochs=epochs,
                                      masks=pruned.masks, metrics=metrics, phase=f"round{e + 1}",
                                      accumulate=args.accum_steps, seed_offset=100 * (e + 1))
        finetune_s += time.perf_counter() - t0
        rounds.append({"round": e + 1, "sparsity": sparsity, "acc_pruned": acc_pruned,
                       "acc_finetuned": accs[-1], "prune_seconds": pruned.seconds})
        harness.save_checkpoint(args, out / "checkpoints" / f"round{e + 1}",
                                {"variables": variables, "masks": pruned.masks})
    harness.save_checkpoint(args, out / "checkpoints" / "final",
                            {"variables": variables, "masks": pruned.masks})
    results = {
        **harness.summarize(accs),
        "dense_acc": dense_acc,
        "pruner": args.pruner,
        "sparsity": args.sparsity,
        **harness.mask_results(pruned.masks, variables["params"]),
        "rounds": rounds,
        "prune_seconds": prune_s,
        "retrain_seconds": finetune_s,
    }
    print(sparsity_report(pruned.masks, variables["params"], n_m=harness.n_m_of(args)).table())
    title = harness.run_title(args, f"{args.pruner}, {harness.count(args.rounds, 'round')} to "
                                    f"{100 * args.sparsity:g}% sparsity, then "
                                    f"{harness.count(args.epochs, 'epoch')}")
    harness.write_outputs(out, results, metrics, pruned.masks, traces, title=title,
                          pruned_before=[f"round{e + 1}" for e in range(args.rounds)],
                          targets=harness.trace_targets(args, sparsities))
    print(f"{args.pruner}, {args.rounds} rounds to {args.sparsity:.0%} sparsity: top-1 after the "
          f"last epoch {results['final_acc']:.4f} (mean of the last 5 "
          f"{results['mean_last5_acc']:.4f}, best {results['best_acc']:.4f}, dense "
          f"{dense_acc:.4f}); results in {out}")
    return 0


if __name__ == "__main__":
    harness.run(main)
