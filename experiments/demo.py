"""Offline end-to-end run: SFPK vs magnitude pruning on the bundled 8x8 digits.

    python -m experiments.demo --out runs/demo

Trains a small CNN dense, prunes it with SFPK and with global magnitude
pruning at 90%, 95% and 98% sparsity, recomputes batch-norm statistics,
retrains each pruned model briefly with its mask held fixed, and writes
``results.json``, ``config.json``, ``accuracy_vs_sparsity.png`` and
``sfpk_trace.png`` to ``--out``. Needs no download (scikit-learn ships the
digits) and runs in a few minutes on a 2-core CPU (``--smoke``: seconds); the
same ``--seed`` gives the same numbers on the same machine and versions. It
keeps no checkpoints (a killed demo is simply run again); the experiments in
``experiments/`` resume with ``--resume``.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

import sfpk_jax
from experiments import harness
from experiments.harness import environment, flag_checks, flags, n_m_flags, progress, rundir
from sfpk_jax.data import batch_iterator, load_digits, particle_batches
from sfpk_jax.models import build
from sfpk_jax.storage import files
from sfpk_jax.tools import plots
from sfpk_jax.train import (
    evaluate,
    layers_of,
    make_loss_fn,
    recompute_batch_stats,
    sgd_cosine,
    train_epoch,
    zoo_forward,
)

PRUNERS = ("sfpk", "magnitude")
# What --smoke changes besides the common sizes (harness.flag_flag_checks.SMOKE).
SMOKE = {"sparsities": "0.9", "retrain_epochs": 1}


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments.demo", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    harness.one_line_errors(p)
    p.add_argument("--out", required=True, type=flags.path_arg,
                   help="output directory (~ and $VARIABLES are expanded)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the model's initialisation, the data split and order, and SFPK's "
                        "mini-batches")
    p.add_argument("--sparsities", default="0.9,0.95,0.98",
                   help="comma-separated fractions of the prunable weights removed")
    p.add_argument("--n-m", default=None, metavar="N:M,...",
                   help="comma-separated N:M patterns (e.g. 2:4,1:4) to prune to instead of "
                        "--sparsities: N kept of every M weights along each kernel's input axis, "
                        "for both pruners")
    p.add_argument("--pretrain-epochs", type=int, default=40, help="epochs of dense training")
    p.add_argument("--retrain-epochs", type=int, default=10,
                   help="epochs of retraining after each pruning, masks held fixed")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--lr", type=float, default=0.05, help="dense training learning rate")
    s = p.add_argument_group("SFPK (defaults: the paper's)")
    harness.add_config_flags(s, "steps", "particles")
    s.add_argument("--prune-batch-size", type=int, default=128, help="mini-batch per particle")
    harness.add_config_flags(s, "radius", "repulsion")
    p.add_argument("--bn-batches", type=int, default=2, help="batches to re-estimate BN statistics")
    p.add_argument("--smoke", action="store_true",
                   help="a quick check of the whole demo (under a minute): one sparsity (90%%), 1 "
                        "dense and 1 retraining epoch, 3 SFPK steps of 2 particles, for the flags "
                        "not given (flags given are kept as given)")
    p.add_argument("--no-progress", action="store_true", help=flags.NO_PROGRESS_HELP)
    args = p.parse_args(argv)
    given = flag_checks.given_flags(p, argv)
    if args.smoke:
        sizes = {k: v for k, v in flag_checks.SMOKE.items() if hasattr(args, k)}
        flag_checks.apply_smoke(args, given, {**sizes, **SMOKE})
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
    n_m_flags.patterns(args, given)
    return args


def _label(sparsity: float, pattern: str | None) -> str:
    return f"{100 * sparsity:g}% sparsity" + (f" ({pattern})" if pattern else "")


def prune(pruner, args, model, data, sparsity, index, pattern):
    """Masks for one pruner and sparsity (N:M ``pattern``, or None), and the SFPK trace
    (None for magnitude)."""
    apply_fn, dense = model
    if pruner == "magnitude":
        # N:M groups run along each kernel's input axis, which the model's layers give.
        layers = None if pattern is None else layers_of(apply_fn, dense, data.x_train.shape[1:])
        return sfpk_jax.magnitude_prune(dense["params"], sparsity, prunable=layers,
                                        mask_dim=pattern), None
    batches = particle_batches(
        data.x_train, data.y_train, args.particles, args.prune_batch_size, seed=(args.seed, index)
    )
    result = sfpk_jax.sfpk_prune(make_loss_fn(apply_fn, dense), dense["params"], batches, sparsity,
                                 config=harness.sfpk_config(args).replace(mask_dim=pattern),
                                 execution=harness.execution(args),
                                 desc=f"SFPK {pattern or f'{sparsity:g}'}")
    return result.masks, result.trace


def fit(args, apply_fn, variables, data, *, epochs, optimizer, desc, masks=None):
    """Trains on the digits as :func:`sfpk_jax.train.train` does, showing a bar or log lines.

    The batches of epoch e are shuffled by ``(--seed, e)``; with ``masks``
    the pruned weights are zeroed first and stay zero.
    """
    if masks is not None:
        variables = {**variables, "params": sfpk_jax.apply_masks(variables["params"], masks)}
    opt_state = optimizer.init(variables["params"])
    bar = progress.bar(args, desc=desc, total=epochs * (len(data.x_train) // args.batch_size),
                       unit="step")
    for epoch in range(1, epochs + 1):
        batches = batch_iterator(data.x_train, data.y_train, args.batch_size,
                                 seed=(args.seed, epoch))
        variables, opt_state, loss = train_epoch(
            apply_fn, variables, opt_state, progress.counted(batches, bar), optimizer=optimizer,
            masks=masks, epoch=epoch)
        bar.set_postfix(epoch=f"{epoch}/{epochs}", loss=f"{loss:.4f}")
        progress.LOG.info("%s: epoch %d/%d, train loss %.4f", desc, epoch, epochs, loss)
    bar.close()
    return variables


@harness.guarded
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
        out = rundir.prepare_out_dir(args.out, overwrite=args.overwrite)
    except (rundir.OutputExistsError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    progress.configure(args)
    data = load_digits(seed=args.seed)
    apply_fn, variables = build("small_cnn", num_classes=10, key=jax.random.key(args.seed))
    steps_per_epoch = len(data.x_train) // args.batch_size

    start = time.perf_counter()
    dense = fit(args, apply_fn, variables, data, epochs=args.pretrain_epochs, desc="dense",
                optimizer=sgd_cosine(args.lr, args.pretrain_epochs, steps_per_epoch, momentum=0.9,
                                     weight_decay=5e-4))
    dense_acc = evaluate(apply_fn, dense, data.x_test, data.y_test)
    print(f"dense model: test accuracy {dense_acc:.4f} ({time.perf_counter() - start:.1f}s)")

    records, traces = [], {}
    for index, (sparsity, pattern) in enumerate(zip(args.sparsities, args.patterns)):
        for pruner in PRUNERS:
            t0 = time.perf_counter()
            masks, trace = prune(pruner, args, (apply_fn, dense), data, sparsity, index, pattern)
            prune_s = time.perf_counter() - t0
            if trace is not None:
                traces[_label(sparsity, pattern)] = trace
            pruned = {**dense, "params": sfpk_jax.apply_masks(dense["params"], masks)}
            bn_batches = batch_iterator(data.x_train, data.y_train, args.batch_size,
                                        seed=(args.seed, index, 1))
            pruned["batch_stats"] = recompute_batch_stats(
                zoo_forward(apply_fn, pruned), pruned["batch_stats"],
                (b for _, b in zip(range(args.bn_batches), bn_batches)))
            acc_pruned = evaluate(apply_fn, pruned, data.x_test, data.y_test)
            retrained = fit(
                args, apply_fn, pruned, data, epochs=args.retrain_epochs, masks=masks,
                desc=f"retrain {pruner} {pattern or f'{sparsity:g}'}",
                optimizer=sgd_cosine(0.01, args.retrain_epochs, steps_per_epoch, momentum=0.875),
            )
            records.append({
                "pruner": pruner,
                "sparsity": sparsity,
                "n_m": pattern,
                "achieved_sparsity": sfpk_jax.sparsity_of(masks),
                "dense_acc": dense_acc,
                "acc_pruned": acc_pruned,
                "acc_retrained": evaluate(apply_fn, retrained, data.x_test, data.y_test),
                "prune_seconds": round(prune_s, 3),
            })

    files.write_json(out / "config.json",
                     {**vars(args), environment.KEY: environment.environment()})
    kind = f", N:M masks ({', '.join(args.patterns)})" if args.n_m else ""
    title = (f"small_cnn on the 8x8 digits{kind}: SFPK ({harness.count(args.particles, 'particle')}, "
             f"{harness.count(args.steps, 'step')}) vs magnitude,\nretrained "
             f"{harness.count(args.retrain_epochs, 'epoch')}, seed {args.seed}")
    plots.accuracy_vs_sparsity(records, str(out / "accuracy_vs_sparsity.png"), dense_acc,
                               title=title)
    plots.sfpk_trace(traces, str(out / "sfpk_trace.png"), title=title,
                     targets={_label(s, p): 1.0 - s for s, p in zip(args.sparsities, args.patterns)})
    files.write_json(out / "results.json", records)

    print(f"\n{'pruner':<10} {'sparsity':>8} {'N:M':>5} {'achieved':>8} {'acc_pruned':>11} "
          f"{'acc_retrained':>14}")
    for r in records:
        print(f"{r['pruner']:<10} {r['sparsity']:>8.2f} {r['n_m'] or '-':>5} "
              f"{r['achieved_sparsity']:>8.4f} {r['acc_pruned']:>11.4f} {r['acc_retrained']:>14.4f}")
    print(f"dense accuracy {dense_acc:.4f}; results in {out} "
          f"({time.perf_counter() - start:.0f}s in all)")
    return 0


if __name__ == "__main__":
    harness.run(main)
