"""Data, model and the checkpointed training loop of the experiments."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import grain
import jax
import optax

from experiments.harness import compile_cache, datafp, progress
from experiments.harness import dense as dense_files
from experiments.harness.distributed import is_main, local, main_first
from experiments.harness.flags import fail, flag_name, prunable
from experiments.harness.outdir import (
    DAMAGED,
    checkpoint_dir,
    save_checkpoint,
    slug,
    start,
)
from experiments.harness.results import Metrics
from sfpk_jax.core.masks import MaskLayout, apply_masks
from sfpk_jax.data import DataBundle, DatasetNotFoundError, Loader, load, shard
from sfpk_jax.models import build
from sfpk_jax.parallel import sharding
from sfpk_jax.parallel.conv_chunks import chunk_convolutions
from sfpk_jax.storage import checkpoint_files as checkpoints
from sfpk_jax.train import (
    evaluate_batches,
    recompute_batch_stats,
    sgd_cosine,
    train_epoch,
    zoo_forward,
)

# Training and test examples that --smoke keeps.
SMOKE_EXAMPLES = (256, 128)


class _Subset:
    """The first ``size`` examples of a source (``--smoke``)."""

    def __init__(self, source, size: int):
        self.source, self.size = source, min(size, len(source))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        return self.source[index]

    @property
    def labels(self):
        """The kept examples' labels, when the source holds its labels in memory (else None)."""
        labels = getattr(self.source, "labels", None)
        return None if labels is None else labels[: self.size]


def open_data(args: argparse.Namespace, prunes: bool = True) -> DataBundle:
    """The dataset, or exit 2 with what was looked for and how to provide it.

    Args:
      args: the parsed flags.
      prunes: the run prunes, so ``--prune-batch-size`` must fit the data too.
    """
    try:
        bundle = load(args.dataset, args.data_dir)
    except DatasetNotFoundError as err:
        fail(str(err))
    if args.smoke:
        bundle = bundle._replace(train=_Subset(bundle.train, SMOKE_EXAMPLES[0]),
                                 test=_Subset(bundle.test, SMOKE_EXAMPLES[1]))
    for name in ("batch_size", "prune_batch_size")[: 2 if prunes else 1]:
        if getattr(args, name) > len(bundle.train):
            fail(f"{flag_name(name)}={getattr(args, name)} is not allowed: expected at most the "
                 f"{len(bundle.train)} training examples of --dataset={args.dataset}")
    return bundle


@dataclasses.dataclass(frozen=True)
class ChunkedApply:
    """A zoo ``apply_fn(variables, x, train)`` with its convolutions over chunks of ``chunk``.

    Frozen, so that jitted steps keyed by the apply function are reused.
    """

    apply_fn: Callable
    chunk: int

    def __call__(self, variables, x, train):
        return chunk_convolutions(lambda v, x: self.apply_fn(v, x, train), self.chunk)(variables, x)


def build_model(args: argparse.Namespace, bundle: DataBundle):
    """``(apply_fn, variables)`` for ``--model`` on the dataset's shapes.

    The apply function runs its convolutions in chunks of ``--conv-chunk``
    examples, in training and evaluation as in pruning.
    """
    apply_fn, variables = build(args.model, num_classes=bundle.num_classes,
                                key=jax.random.key(args.seed), input_shape=(1, *bundle.image_shape))
    if args.conv_chunk:
        apply_fn = ChunkedApply(apply_fn, args.conv_chunk)
    try:
        MaskLayout.from_params(variables["params"], prunable(args, apply_fn, variables,
                                                             bundle.image_shape), args.mask_dim)
    except ValueError as err:
        fail(f"--model={args.model}: {err}")
    return apply_fn, variables



class Setup(NamedTuple):
    """What :func:`setup` prepares: data, output folder, metrics file, the model.

    ``variables`` are the fresh model's; ``dense`` the trained dense model
    that ``--dense-checkpoint`` or ``--pretrained-weights`` gives (None: there
    is none, :func:`dense_model` trains it).
    """

    bundle: DataBundle
    out: Path
    metrics: Metrics
    apply_fn: Any
    variables: dict
    dense: dict | None


def setup(args: argparse.Namespace, prunes: bool = True) -> Setup:
    """Data, fresh model, the dense model's file, then the output folder and metrics file.

    Everything that is read comes first, so that a missing dataset, an
    unusable model or a dense checkpoint of another model stops the run
    before config.json (or anything else) is written.

    Args:
      args: the parsed flags.
      prunes: the run prunes (``experiments.pretrain`` does not, so its
        ``--prune-batch-size`` is not checked against the data).

    Returns:
      The :class:`Setup`.
    """
    if not is_main():
        # Process 0 shows the run; the others print errors only.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
    progress.configure(args)
    compile_cache.configure(args)
    bundle = open_data(args, prunes)
    apply_fn, variables = build_model(args, bundle)
    dense = dense_files.from_file(args, variables)
    data = datafp.fingerprint(bundle)
    out = main_first(lambda: start(args, data)) or Path(args.out)
    return Setup(bundle, out, Metrics(out / "metrics.csv"), apply_fn, variables, dense)


def loaders(args: argparse.Namespace, bundle: DataBundle, seed: int,
            accumulate: int = 1, whole: bool = False) -> tuple[Loader, Loader]:
    """Training (shuffled, augmented) and test (in order) loaders.

    With gradient accumulation the training loader yields micro-batches of
    ``batch_size / accumulate``, so each optimizer step still sees ``batch_size``.
    With several processes the training loader yields this process's share of
    every batch (for data-parallel training), unless ``whole``, and the test
    loader this process's share of the test set (examples ``i::count``), which
    :func:`eval_accuracy` sums over the processes.
    """
    train = Loader(bundle.train, args.batch_size // accumulate, transform=bundle.train_transform,
                   seed=seed, workers=args.data_workers,
                   sharded=jax.process_count() > 1 and not whole)
    test_set = bundle.test
    if jax.process_count() > 1:
        index, count = shard()
        test_set = grain.MapDataset.source(bundle.test)[index::count]
        if not len(test_set):
            fail(f"the test set has {len(bundle.test)} examples, fewer than the {count} "
                 "processes: every process evaluates its share of it; use fewer processes")
    test = Loader(test_set, min(256, len(test_set)), transform=bundle.eval_transform,
                  seed=seed, shuffle=False, drop_last=False, workers=args.data_workers)
    return train, test


def eval_accuracy(apply_fn, variables: dict, batches) -> float:
    """Accuracy over a :func:`loaders` test epoch, summed over every process's share.

    With several processes every process must call it (the counts are
    gathered); ``variables`` must be the same on all of them.
    """
    return evaluate_batches(apply_fn, variables, batches,
                            across_processes=jax.process_count() > 1)


def optimizer(args: argparse.Namespace, epochs: int, steps_per_epoch: int, accumulate: int = 1):
    """The flags' recipe (:func:`sfpk_jax.train.sgd_cosine`), stepping every ``accumulate`` batches.

    Args:
      args: the parsed flags (``add_recipe_flags``).
      epochs: the phase's epochs; the warm-up is cut to fit them.
      steps_per_epoch: training (micro-)batches per epoch.
      accumulate: micro-batches whose gradients make one optimizer step.

    Returns:
      The optax transformation.
    """
    tx = sgd_cosine(args.lr, epochs, max(1, steps_per_epoch // accumulate),
                    momentum=args.momentum, weight_decay=args.weight_decay,
                    warmup_epochs=min(args.warmup_epochs, epochs - 1),
                    warmup_start=args.warmup_start)
    return optax.MultiSteps(tx, accumulate) if accumulate > 1 else tx


def fit(apply_fn, variables, args, bundle, *, epochs, masks=None, metrics: Metrics, phase: str,
        accumulate: int = 1, seed_offset: int = 0):
    """Trains ``epochs`` epochs (masks held fixed), evaluating after each.

    Every epoch is checkpointed (variables, optimizer state, accuracies and
    metrics rows so far; the last two epochs kept) under
    ``OUT/checkpoints/train-<phase>``, and every ``--checkpoint-steps`` steps
    within an epoch under ``train-<phase>-steps`` (numbered by global step),
    with the data iterator's grain state and the epoch's losses so far. With
    ``--resume`` the latest of them is restored and training continues at the
    next step (the data of epoch e depends only on the seed and e, and the
    iterator state says where in it), so the result is bit-for-bit that of an
    uninterrupted run; a finished phase is just restored.

    Returns:
      The trained variables and the list of per-epoch test accuracies.
    """
    train, test = loaders(args, bundle, args.seed + seed_offset, accumulate)
    tx = optimizer(args, epochs, len(train), accumulate)
    if masks is not None:
        variables = {**variables, "params": apply_masks(variables["params"], masks)}
    opt_state = tx.init(variables["params"])
    mesh = sharding.particle_mesh() if args.data_parallel or jax.process_count() > 1 else None
    fingerprint = {
        "phase": phase, "epochs": epochs, "steps_per_epoch": len(train),
        "accumulate": accumulate, "seed": args.seed + seed_offset,
        "masks_sha256": None if masks is None else checkpoints.tree_digest(masks),
        "start_sha256": checkpoints.tree_digest(variables),
    }
    accs, first, resumed, record = [], 1, None, {}
    with checkpoints.Series(checkpoint_dir(args) / f"train-{slug(phase)}") as series, \
            checkpoints.Series(checkpoint_dir(args) / f"train-{slug(phase)}-steps") as steps:
        try:
            latest = series.latest()
            if latest is not None and not args.resume:
                fail(f"{series.directory} already holds checkpoints: is the phase name "
                     f"{phase!r} used twice in one run?")
            if latest is not None:
                state, record = series.restore(latest, {"variables": variables,
                                                        "opt_state": opt_state})
                _same_run(series.directory / str(latest), record, fingerprint, phase)
                variables, opt_state = state["variables"], state["opt_state"]
                accs, first = list(record["accs"]), latest + 1
                metrics.restore(record["rows"])
            elif args.resume and any(r.get("phase") == phase for r in metrics.found):
                fail(f"--resume: the checkpoints of phase {phase!r} are missing from "
                     f"{series.directory}, though metrics.csv records epochs of it: pass "
                     "--overwrite to start the run again")
            mid = steps.latest()
            if args.resume and mid is not None and mid > (first - 1) * len(train):
                # Killed within epoch `first`: continue from its last saved step.
                state, resumed = steps.restore(mid, {"variables": variables, "opt_state": opt_state})
                _same_run(steps.directory / str(mid), resumed, fingerprint, phase)
                variables, opt_state = state["variables"], state["opt_state"]
                progress.LOG.info("%s: resuming epoch %d at step %d of %d", phase, first,
                                  resumed["position"], len(train))
        except checkpoints.CheckpointError as err:
            fail(f"--resume: {err}; {DAMAGED}")
        # One bar per phase over all its steps, left on screen when done.
        bar = progress.bar(args, desc=phase, total=epochs * len(train),
                           initial=(first - 1) * len(train), unit="step")
        # One iterator for the whole phase (worker processes start once); its
        # grain state, saved with every checkpoint, says where to continue.
        data_state = (resumed or record).get("data_state")
        if first <= epochs and first > 1 and data_state is None:
            fail(f"--resume: the checkpoints in {series.directory} hold no data iterator state "
                 "(written before the grain loaders): pass --overwrite to start the phase again")
        batches = train.epochs(1, epochs + 1, data_state) if first <= epochs else None
        evals = test.epochs(first, epochs + 1) if first <= epochs else None
        position, chunks = (0, []) if resumed is None else (resumed["position"], resumed["chunks"])
        bar.update(position)
        try:
            for epoch in range(first, epochs + 1):
                t0 = time.perf_counter()
                try:
                    # The epoch in chunks that end at multiples of --checkpoint-steps,
                    # whether or not it was resumed, so that the losses add up alike.
                    while position < len(train):
                        end = min(len(train), (position // args.checkpoint_steps + 1)
                                  * args.checkpoint_steps)
                        variables, opt_state, loss = train_epoch(
                            apply_fn, variables, opt_state,
                            progress.counted(itertools.islice(batches, end - position), bar),
                            optimizer=tx, masks=masks, label_smoothing=args.label_smoothing,
                            epoch=epoch, mesh=mesh,
                        )
                        chunks.append([loss, end - position])
                        position = end
                        if position < len(train):
                            steps.save((epoch - 1) * len(train) + position,
                                       local({"variables": variables, "opt_state": opt_state}),
                                       {"fingerprint": fingerprint, "position": position,
                                        "data_state": batches.get_state(), "chunks": chunks})
                except FloatingPointError as err:
                    fail(_diverged(args, phase, epoch, err, series.directory))
                loss = sum(mean * count for mean, count in chunks) / len(train)
                position, chunks = 0, []
                accs.append(eval_accuracy(apply_fn, local(variables),
                                          itertools.islice(evals, len(test))))
                row = {"phase": phase, "epoch": epoch, "train_loss": round(loss, 6),
                       "test_acc": accs[-1]}
                # The checkpoint first: a metrics row on disk always has one.
                series.save(epoch, local({"variables": variables, "opt_state": opt_state}),
                            {"fingerprint": fingerprint, "accs": accs, "rows": [*metrics.rows, row],
                             "data_state": batches.get_state()})
                metrics.add(**row)
                bar.set_postfix(epoch=f"{epoch}/{epochs}", loss=f"{loss:.3f}",
                                acc=f"{accs[-1]:.4f}")
                progress.LOG.info("%s: epoch %d/%d, train loss %.4f, test accuracy %.4f (%.1f s)",
                                  phase, epoch, epochs, loss, accs[-1], time.perf_counter() - t0)
        finally:
            for iterator in (batches, evals):
                if iterator is not None:
                    iterator.close()
        bar.close()
    # The same numpy arrays on every process, for what follows (pruning, saving).
    return local(variables), accs


def _same_run(where: Path, record: dict, fingerprint: dict, phase: str) -> None:
    """Exit 2 unless the checkpoint ``where`` was written by this run's ``phase``."""
    diffs = checkpoints.differences(record.get("fingerprint", {}), fingerprint)
    if diffs:
        fail(f"--resume: checkpoint {where} is not from this run's phase {phase!r}: "
             f"{'; '.join(diffs)}. Resume with the run's flags and inputs, or pass --overwrite "
             "to start again")


def _diverged(args, phase: str, epoch: int, err: Exception, directory: Path) -> str:
    """The one-line message for a NaN/Inf training loss."""
    if epoch > 1:
        saved = f"the end of epoch {epoch - 1}, checkpointed in {directory / str(epoch - 1)}"
    else:
        saved = "none in this phase yet (a resume restarts the phase from its beginning)"
    lr = ("--lr (or --pretrain-lr for the dense models)" if hasattr(args, "pretrain_lr")
          else f"--lr (now {args.lr:g})")
    return (f"training diverged in phase {phase!r}: {err}. Last good state: {saved}. To "
            f"continue from it, rerun with --resume and a smaller {lr}: --resume allows "
            "changing the learning rate. Or start again with --overwrite and a smaller --lr "
            "or more --warmup-epochs")


def dense_model(args, run: Setup) -> dict:
    """The trained dense model: the file's (read by :func:`setup`), or pretrained here."""
    if run.dense is not None:
        return run.dense
    if args.pretrain_epochs < 1:
        fail("no dense model: pass --dense-checkpoint PATH (from experiments.pretrain) "
             "or --pretrain-epochs N to train one here")
    variables, _ = fit(run.apply_fn, run.variables, args, run.bundle,
                       epochs=args.pretrain_epochs, metrics=run.metrics, phase="pretrain",
                       seed_offset=1000)
    save_checkpoint(args, run.out / "checkpoints" / "dense", variables)
    return variables


def recompute_bn(args, bundle, apply_fn, variables, masks):
    """The masked model with batch-norm statistics re-estimated (spec: after voting)."""
    masked = {**variables, "params": apply_masks(variables["params"], masks)}
    if "batch_stats" not in masked:
        return masked
    train, _ = loaders(args, bundle, args.seed + 7, whole=True)
    batches = train.epoch(0)
    try:
        stats = recompute_batch_stats(zoo_forward(apply_fn, masked), masked["batch_stats"],
                                      itertools.islice(batches, args.bn_batches))
        return {**masked, "batch_stats": stats}
    finally:
        batches.close()
