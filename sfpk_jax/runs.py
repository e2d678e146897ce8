"""What every experiment shares: flags, data, pruning, retraining, outputs.

The scripts in ``experiments/`` only choose defaults and the order of these
steps. Every output goes under ``--out``: ``config.json``, ``metrics.csv``,
``results.json``, plots and orbax checkpoints under ``checkpoints/``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io as _io
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from sfpk_jax import checkpoints, io, plotting
from sfpk_jax.batchnorm import recompute_batch_stats
from sfpk_jax.config import (
    POLARIZERS, REPULSION_MODES, SCHEDULES, SCOPES, SFPKConfig, SPARSITY_FNS, VOTE_MODES,
)
from sfpk_jax.data import DATASETS, DataBundle, DatasetNotFoundError, Loader, load, particle_loader
from sfpk_jax.data.pipeline import read_batch
from sfpk_jax.masks import MaskLayout, apply_masks, density, path_to_str
from sfpk_jax.models import build, registered
from sfpk_jax.pruners import PRUNERS, prune
from sfpk_jax.structure import MASK_DIMS
from sfpk_jax.training import evaluate_batches, lr_schedule, make_loss_fn, train_epoch

SMOKE = {"train_examples": 256, "test_examples": 128, "steps": 3, "particles": 2,
         "prune_batch_size": 16, "batch_size": 32, "epochs": 2, "rounds": 2, "round_epochs": 1}


def add_common_flags(parser: argparse.ArgumentParser, **defaults) -> None:
    """The flags every experiment takes; ``defaults`` sets each script's values."""
    d = {"data_dir": None, "dataset": "cifar100", "model": "resnet20", "pruner": "sfpk",
         "sparsity": 0.95, "steps": 100, "particles": 10, "prune_batch_size": 512,
         "batch_size": 64, "pretrain_epochs": 0, "epochs": 100, "seed": 0, **defaults}
    g = parser.add_argument_group("common")
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("--overwrite", action="store_true", help="replace finished results in --out")
    g.add_argument("--data-dir", default=d["data_dir"],
                   help="folder with the dataset (tfds data_dir, or the CIFAR python folders)")
    g.add_argument("--dataset", default=d["dataset"], help=f"one of {', '.join(DATASETS)}")
    g.add_argument("--model", default=d["model"], help="a registered model name")
    g.add_argument("--pruner", default=d["pruner"], help=f"one of {', '.join(PRUNERS)}")
    g.add_argument("--sparsity", type=float, default=d["sparsity"],
                   help="fraction of prunable weights removed (0.95 keeps 5%%)")
    g.add_argument("--scope", default="global", help=f"top-k scope, one of {SCOPES}")
    g.add_argument("--mask-dim", default=None, choices=MASK_DIMS,
                   help="prune whole output or input channels (structured; needs --scope local)")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="training batch size")
    g.add_argument("--pretrain-epochs", type=int, default=d["pretrain_epochs"],
                   help="epochs of dense pretraining when no --dense-checkpoint is given")
    g.add_argument("--dense-checkpoint", default=None, help="orbax checkpoint of the dense model")
    g.add_argument("--epochs", type=int, default=d["epochs"], help="(re)training epochs")
    g.add_argument("--seed", type=int, default=d["seed"])
    g.add_argument("--bn-batches", type=int, default=2,
                   help="training batches that re-estimate batch-norm statistics after pruning")
    g.add_argument("--smoke", action="store_true",
                   help="tiny data and sizes: runs the whole pipeline in about a minute")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    s = parser.add_argument_group("SFPK (defaults: the paper's)")
    s.add_argument("--steps", type=int, default=d["steps"], help="simulation steps K")
    s.add_argument("--particles", type=int, default=d["particles"], help="particles n")
    s.add_argument("--prune-batch-size", type=int, default=d["prune_batch_size"],
                   help="mini-batch per particle and step")
    s.add_argument("--radius", type=float, default=d.get("radius", 1.1), help="localization radius r")
    s.add_argument("--repulsion", type=float, default=0.2, help="repulsion weight lambda")
    s.add_argument("--schedule", default="exp", help=f"one of {SCHEDULES}")
    s.add_argument("--sparsity-fn", default="l2", help=f"one of {SPARSITY_FNS}")
    s.add_argument("--polarizer", default="onehot", help=f"one of {POLARIZERS}")
    s.add_argument("--repulsion-mode", default="exp", help=f"one of {REPULSION_MODES}")
    s.add_argument("--vote-mode", default="soft", help=f"one of {VOTE_MODES}")
    s.add_argument("--vote-ratio", type=float, default=1.0, help="fraction of particles voting")
    s.add_argument("--vote-momentum", type=float, default=0.1, help="score momentum mu")
    s.add_argument("--particle-mode", default="loop", help="loop, vmap or map")


def add_recipe_flags(parser: argparse.ArgumentParser, *, lr, momentum, weight_decay,
                     warmup_epochs, warmup_start=1e-4, label_smoothing=0.0) -> None:
    """Optimizer recipe flags (SGD, cosine schedule with linear warm-up)."""
    g = parser.add_argument_group("training recipe")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    g.add_argument("--momentum", type=float, default=momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=weight_decay)
    g.add_argument("--warmup-epochs", type=int, default=warmup_epochs)
    g.add_argument("--warmup-start", type=float, default=warmup_start, help="learning rate at step 0")
    g.add_argument("--label-smoothing", type=float, default=label_smoothing)


def finish_args(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parses, applies ``--smoke`` and validates; bad values exit with code 2."""
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            if hasattr(args, name) and name not in ("train_examples", "test_examples"):
                setattr(args, name, min(getattr(args, name), value))
        if args.pretrain_epochs:
            args.pretrain_epochs = 1
    checks = [
        ("--dataset", args.dataset, args.dataset in DATASETS, f"one of {', '.join(DATASETS)}"),
        ("--model", args.model, args.model in registered(), f"one of {', '.join(registered())}"),
        ("--pruner", args.pruner, args.pruner in PRUNERS, f"one of {', '.join(PRUNERS)}"),
        ("--scope", args.scope, args.scope in SCOPES, f"one of {', '.join(SCOPES)}"),
        ("--sparsity", args.sparsity, 0.0 < args.sparsity < 1.0, "a fraction in (0, 1)"),
        ("--radius", args.radius, args.radius >= 1.0, ">= 1"),
    ]
    for flag in ("steps", "particles", "prune_batch_size", "batch_size", "epochs", "bn_batches"):
        value = getattr(args, flag)
        checks.append((f"--{flag.replace('_', '-')}", value, value >= 1, "an integer >= 1"))
    checks.append(("--pretrain-epochs", args.pretrain_epochs, args.pretrain_epochs >= 0, ">= 0"))
    for flag, value, ok, allowed in checks:
        if not ok:
            parser.error(f"{flag}={value!r} is not allowed: expected {allowed}")
    try:
        sfpk_config(args)
    except ValueError as err:
        parser.error(str(err).replace("SFPKConfig.", "--").replace("_", "-"))
    return args


def sfpk_config(args: argparse.Namespace) -> SFPKConfig:
    """The simulation's hyper-parameters from the flags."""
    return SFPKConfig(
        steps=args.steps, particles=args.particles, repulsion=args.repulsion, radius=args.radius,
        schedule=args.schedule, sparsity_fn=args.sparsity_fn, polarizer=args.polarizer,
        repulsion_mode=args.repulsion_mode, vote_mode=args.vote_mode, vote_ratio=args.vote_ratio,
        momentum=args.vote_momentum, scope=args.scope, mask_dim=args.mask_dim,
        particle_mode=args.particle_mode,
        progress=not args.no_progress,
    )


def fail(message: str) -> None:
    """Stops the run with one line on stderr and exit code 2 (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def start(args: argparse.Namespace) -> Path:
    """Prepares ``--out`` (never over finished results) and writes config.json."""
    try:
        out = io.prepare_out_dir(args.out, overwrite=args.overwrite)
    except (io.OutputExistsError, PermissionError) as err:
        fail(str(err))
    io.write_json(out / "config.json", vars(args))
    return out


class _Subset:
    """The first ``size`` examples of a source (``--smoke``)."""

    def __init__(self, source, size: int):
        self.source, self.size = source, min(size, len(source))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        return self.source[index]

    def read_batch(self, indices):
        return read_batch(self.source, indices)


def open_data(args: argparse.Namespace) -> DataBundle:
    """The dataset, or exit 2 with what was looked for and how to provide it."""
    try:
        bundle = load(args.dataset, args.data_dir)
    except DatasetNotFoundError as err:
        fail(str(err))
    if args.smoke:
        bundle = bundle._replace(train=_Subset(bundle.train, SMOKE["train_examples"]),
                                 test=_Subset(bundle.test, SMOKE["test_examples"]))
    for flag in ("batch_size", "prune_batch_size"):
        if getattr(args, flag) > len(bundle.train):
            fail(f"--{flag.replace('_', '-')}={getattr(args, flag)} is larger than the "
                 f"{len(bundle.train)} training examples")
    return bundle


def build_model(args: argparse.Namespace, bundle: DataBundle):
    """``(apply_fn, variables)`` for ``--model`` on the dataset's shapes."""
    apply_fn, variables = build(args.model, num_classes=bundle.num_classes,
                                key=jax.random.key(args.seed), input_shape=(1, *bundle.image_shape))
    try:
        MaskLayout.from_params(variables["params"])
    except ValueError as err:
        fail(f"--model={args.model}: {err}")
    return apply_fn, variables


class Setup(NamedTuple):
    bundle: DataBundle
    out: Path
    metrics: "Metrics"
    apply_fn: Any
    variables: dict


def setup(args: argparse.Namespace) -> Setup:
    """Data, output folder (config.json written), metrics file and fresh model, in that order.

    The data comes first so a missing dataset stops the run before anything
    is written.
    """
    bundle = open_data(args)
    out = start(args)
    apply_fn, variables = build_model(args, bundle)
    return Setup(bundle, out, Metrics(out / "metrics.csv"), apply_fn, variables)


def loaders(args: argparse.Namespace, bundle: DataBundle, seed: int,
            accumulate: int = 1) -> tuple[Loader, Loader]:
    """Training (shuffled, augmented) and test (in order) loaders.

    With gradient accumulation the training loader yields micro-batches of
    ``batch_size / accumulate``, so each optimizer step still sees ``batch_size``.
    """
    train = Loader(bundle.train, args.batch_size // accumulate, transform=bundle.train_transform,
                   seed=seed)
    test = Loader(bundle.test, min(256, len(bundle.test)), transform=bundle.eval_transform,
                  seed=seed, shuffle=False, drop_last=False)
    return train, test


def optimizer(args: argparse.Namespace, epochs: int, steps_per_epoch: int, accumulate: int = 1):
    """SGD with momentum on a cosine schedule with linear warm-up (the flags' recipe)."""
    warmup = min(args.warmup_epochs, epochs - 1)
    schedule = lr_schedule(args.lr, epochs, max(1, steps_per_epoch // accumulate), warmup,
                           args.warmup_start)
    sgd = optax.sgd(schedule, momentum=args.momentum or None)
    tx = optax.chain(optax.add_decayed_weights(args.weight_decay), sgd) if args.weight_decay else sgd
    return optax.MultiSteps(tx, accumulate) if accumulate > 1 else tx


class Metrics:
    """Per-epoch rows, rewritten atomically to ``metrics.csv`` after every epoch."""

    def __init__(self, path: Path):
        self.path, self.rows = path, []

    def add(self, **row) -> None:
        self.rows.append(row)
        text = _io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(self.rows[0]))
        writer.writeheader()
        writer.writerows(self.rows)
        io.write_text(self.path, text.getvalue())


def fit(apply_fn, variables, args, bundle, *, epochs, masks=None, metrics: Metrics, phase: str,
        accumulate: int = 1, seed_offset: int = 0):
    """Trains ``epochs`` epochs (masks held fixed), evaluating after each.

    Returns:
      The trained variables and the list of per-epoch test accuracies.
    """
    train, test = loaders(args, bundle, args.seed + seed_offset, accumulate)
    tx = optimizer(args, epochs, len(train), accumulate)
    if masks is not None:
        variables = {**variables, "params": apply_masks(variables["params"], masks)}
    opt_state = tx.init(variables["params"])
    accs = []
    bar = tqdm(range(1, epochs + 1), desc=phase, disable=args.no_progress)
    for epoch in bar:
        variables, opt_state, loss = train_epoch(
            apply_fn, variables, opt_state, train.epoch(epoch), optimizer=tx, masks=masks,
            label_smoothing=args.label_smoothing, epoch=epoch, progress=not args.no_progress,
            desc=phase,
        )
        accs.append(evaluate_batches(apply_fn, variables, test.epoch(0)))
        metrics.add(phase=phase, epoch=epoch, train_loss=round(loss, 6), test_acc=accs[-1])
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accs[-1]:.4f}")
    return variables, accs


def dense_model(args, bundle, apply_fn, variables, out: Path, metrics: Metrics):
    """The trained dense model: from ``--dense-checkpoint`` or pretrained here."""
    if args.dense_checkpoint:
        try:
            restored = checkpoints.restore(args.dense_checkpoint, variables)
        except (FileNotFoundError, ValueError) as err:
            fail(f"--dense-checkpoint: {err}")
        return restored
    if args.pretrain_epochs < 1:
        fail("no dense model: pass --dense-checkpoint PATH (from experiments.pretrain) "
             "or --pretrain-epochs N to train one here")
    variables, _ = fit(apply_fn, variables, args, bundle, epochs=args.pretrain_epochs,
                       metrics=metrics, phase="pretrain", seed_offset=1000)
    checkpoints.save(out / "checkpoints" / "dense", variables, overwrite=args.overwrite)
    return variables


class Pruned(NamedTuple):
    masks: Any
    result: Any
    seconds: float


def prune_model(args, bundle, apply_fn, variables, sparsity: float, *, init=None,
                seed_offset: int = 0) -> Pruned:
    """Runs ``--pruner`` on the dense (or fine-tuned) model."""
    loss_fn = make_loss_fn(apply_fn, variables)
    method = args.pruner
    options: dict[str, Any] = {}
    if method in ("sfpk", "spode"):
        options = {"config": sfpk_config(args), "init": init}
    if method in ("grasp", "synflow"):
        # Training mode, as the official code runs both (batch statistics).
        options["logits_fn"] = lambda p, x: apply_fn({**variables, "params": p}, x, True)[0]
    if method == "synflow":
        options["input_shape"] = bundle.image_shape
    batches = None
    if method in ("sfpk", "spode", "snip", "grasp"):
        particles = args.particles if method == "sfpk" else 1
        batches = particle_loader(bundle.train, particles, args.prune_batch_size,
                                  transform=bundle.train_transform, seed=args.seed + seed_offset)
    t0 = time.perf_counter()
    result = prune(method, loss_fn, variables["params"], batches, sparsity,
                   scope=args.scope, key=jax.random.key(args.seed), mask_dim=args.mask_dim,
                   **options)
    jax.block_until_ready(jax.tree_util.tree_leaves(result.masks))
    return Pruned(result.masks, result, time.perf_counter() - t0)


def recompute_bn(args, bundle, apply_fn, variables, masks):
    """The masked model with batch-norm statistics re-estimated (spec: after voting)."""
    masked = {**variables, "params": apply_masks(variables["params"], masks)}
    train, _ = loaders(args, bundle, args.seed + 7)
    batches = (b for _, b in zip(range(args.bn_batches), train.epoch(0)))
    return recompute_batch_stats(apply_fn, masked, batches)


def mask_digest(masks) -> str:
    """sha256 of the 0/1 masks in canonical (sorted-path) order."""
    flat = jax.tree_util.tree_flatten_with_path(masks)[0]
    h = hashlib.sha256()
    for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf) != 0).tobytes())
    return h.hexdigest()


def density_per_layer(masks) -> dict[str, float]:
    """Kept fraction of every pruned leaf, by '/'-joined path."""
    # None leaves (unpruned parameters) are empty subtrees, so they drop out here.
    return {path_to_str(path): float(np.mean(np.asarray(m) != 0))
            for path, m in jax.tree_util.tree_flatten_with_path(masks)[0]}


def mask_results(masks, params) -> dict[str, Any]:
    """``density`` (kept weights overall), ``density_per_layer`` and ``mask_digest``."""
    return {"density": density(masks, params), "density_per_layer": density_per_layer(masks),
            "mask_digest": mask_digest(masks)}


def summarize(accs: list[float], last: int = 5) -> dict[str, float]:
    """``final_acc`` (mean of the last ``last`` epochs, or all) and ``best_acc``."""
    return {"final_acc": float(np.mean(accs[-last:])), "best_acc": float(np.max(accs))}


def write_outputs(out: Path, results: dict, metrics: Metrics, masks=None, traces=None) -> None:
    """Plots, then results.json last (its presence marks a finished run)."""
    plotting.accuracy_over_epochs(metrics.rows, str(out / "accuracy.png"))
    if masks is not None:
        plotting.layer_density(results["density_per_layer"], str(out / "density_per_layer.png"))
    if traces:
        plotting.sfpk_trace(traces, str(out / "sfpk_trace.png"))
    io.write_json(out / "results.json", results)
