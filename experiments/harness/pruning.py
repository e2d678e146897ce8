"""Pruning in the experiments: ``--pruner`` given what its registry entry needs, checkpointed."""

from __future__ import annotations

import sys
import time
import traceback
import typing
from typing import Any, NamedTuple

import jax
import numpy as np

from experiments.harness.edge import disk_full
from experiments.harness.flags import execution, fail, prunable, sfpk_config
from experiments.harness.outdir import DAMAGED, checkpoint_dir, slug
from experiments.harness.progress import LOG
from sfpk_jax import (
    CheckpointPolicy,
    PruneResult,
    ResumeError,
    SFPKResult,
    WorkerError,
    prune,
    sparsity_of,
)
from sfpk_jax.core import channels, n_m, topk
from sfpk_jax.core.masks import MaskLayout
from sfpk_jax.data import particle_loader
from sfpk_jax.pruners import PrunerOutputError, spec
from sfpk_jax.sfpk.state import TRACE_FIELDS
from sfpk_jax.storage import checkpoint_files
from sfpk_jax.train import make_loss_fn

# What to do about a diverged simulation with the experiments' flags: its
# checkpoints record the configuration and the weights, so --resume cannot
# take another --radius, --steps or dense model.
DIVERGED_FIX = ("With the experiments: --resume keeps the simulation's flags, so start the run "
                "again with --overwrite and a smaller --radius (closer to 1) or more --steps; "
                "to keep a dense model this run trained, use a new --out with --dense-checkpoint "
                "pointing at this run's checkpoints/dense instead")


class Pruned(NamedTuple):
    """One pruning call: the masks, the pruner's whole result and its wall time."""

    masks: Any
    result: Any
    seconds: float


def prune_model(args, bundle, apply_fn, variables, sparsity: float, *, init=None,
                seed_offset: int = 0, name: str | None = None) -> Pruned:
    """Runs ``--pruner`` on the dense (or fine-tuned) model.

    The result (masks; for a particle simulation such as SFPK also scores,
    particles and trace) is checkpointed under ``OUT/checkpoints/prune-<name>``
    and restored on ``--resume``; an SFPK simulation itself is checkpointed
    every ``--checkpoint-every`` steps under ``OUT/checkpoints/sfpk-<name>``
    and resumed from there.

    Args:
      args: the parsed flags.
      bundle: the dataset.
      apply_fn: the model's apply function.
      variables: the model's variables (``params`` are pruned).
      sparsity: the fraction of prunable weights to remove.
      init: an earlier simulation result to continue from (gradual pruning).
      seed_offset: added to ``--seed`` for the pruning batches.
      name: the checkpoint folders' name (default: pruner, sparsity, seed and
        ``seed_offset``); unique within a run.

    Returns:
      The masks, the result and the seconds pruning took (those of the first
      run when restored).
    """
    method = args.pruner
    simulation = spec(method).simulation
    name = slug(name or f"{method}-{sparsity:g}-seed{args.seed}-{seed_offset}")
    fingerprint = {
        "pruner": method, "sparsity": sparsity, "seed": args.seed, "seed_offset": seed_offset,
        "variables_sha256": checkpoint_files.tree_digest(variables),
        "init_sha256": None if init is None else checkpoint_files.tree_digest(
            (init.particles, init.scores)),
        # What a simulation's result holds: a checkpoint of other fields is not this code's.
        "trace_fields": list(TRACE_FIELDS) if simulation else None,
    }
    with checkpoint_files.Series(checkpoint_dir(args) / f"prune-{name}") as series:
        if args.resume:
            try:
                if series.latest() is not None:
                    state, record = series.restore(series.latest())
                    diffs = checkpoint_files.differences(record.get("fingerprint", {}), fingerprint)
                    if diffs:
                        fail(f"--resume: the pruning checkpoint {series.directory} is not from "
                             f"this run: {'; '.join(diffs)}. Resume with the run's flags and "
                             "inputs, or pass --overwrite to start again")
                    if simulation:
                        result = SFPKResult(state["masks"], state["scores"], state["particles"],
                                            dict(state["trace"]))
                    else:
                        result = PruneResult(state["masks"])
                    return Pruned(result.masks, result, float(record["seconds"]))
            except checkpoint_files.CheckpointError as err:
                fail(f"--resume: {err}; {DAMAGED}")
        pruned = _prune(args, bundle, apply_fn, variables, sparsity, init, seed_offset, name)
        tree = {"masks": pruned.masks}
        if simulation:
            tree.update(scores=pruned.result.scores, particles=pruned.result.particles,
                        trace=dict(pruned.result.trace))
        series.save(0, tree, {"fingerprint": fingerprint, "seconds": pruned.seconds})
    return pruned


def _prune(args, bundle, apply_fn, variables, sparsity, init, seed_offset, name) -> Pruned:
    """Prunes once, giving the pruner what its :class:`sfpk_jax.pruners.PrunerSpec` asks for."""
    method = args.pruner
    needs = spec(method)
    particles = args.particles if needs.particles is None else needs.particles
    layers, mask_dim = _mask_kind(args, apply_fn, variables, bundle, sparsity)
    options: dict[str, Any] = {}
    if needs.simulation:
        options = {"config": sfpk_config(args).replace(mask_dim=mask_dim),
                   "execution": execution(args, particles),
                   "init": init,
                   "checkpoint": CheckpointPolicy(checkpoint_dir(args) / f"sfpk-{name}",
                                                  args.checkpoint_every, args.resume)}
    if needs.needs_logits:
        # Training mode, as the official code runs GraSP and SynFlow (batch statistics).
        options["logits_fn"] = lambda p, x: apply_fn({**variables, "params": p}, x, True)[0]
    if needs.needs_input_shape:
        options["input_shape"] = bundle.image_shape
    if "iterations" in needs.options:
        options["iterations"] = args.synflow_iterations
    batches, opened = None, []
    if needs.needs_data:

        def stream(start: int = 0):
            opened.append(particle_loader(bundle.train, particles, args.prune_batch_size,
                                          transform=bundle.train_transform,
                                          seed=args.seed + seed_offset, start=start,
                                          workers=args.data_workers))
            return opened[-1]

        # A simulation takes the batches as a function of the first step, so
        # that a resumed one reads from there without replaying the others.
        batches = stream if needs.simulation else stream()
    LOG.info("%s %s: pruning to %.4g%% sparsity", method, name, 100 * sparsity)
    t0 = time.perf_counter()
    try:
        result = prune(method, make_loss_fn(apply_fn, variables), variables["params"], batches,
                       sparsity, scope=args.scope, key=jax.random.key(args.seed),
                       mask_dim=mask_dim, prunable=layers, **options)
    except FloatingPointError as err:
        fail(f"pruning with {method} diverged: {err}. {DIVERGED_FIX}")
    except ResumeError as err:
        fail(f"{err.problem}. Resume the run with its own flags plus --resume, or start it again "
             "with --overwrite")
    except WorkerError as err:
        fail(f"{_worker_failure(err)}. The simulation's checkpoints in {err.directory} are kept: "
             "rerun the same command with --resume to continue from them", code=1)
    except PrunerOutputError as err:
        fail(f"{err}; nothing was saved", code=1)
    except Exception as err:  # noqa: BLE001 - the pruner's own failure (a registered one, say)
        if disk_full(err) is not None:
            raise  # a checkpoint's write: the edge's one line, with --resume
        _pruner_raised(method, err)
    finally:
        # Endless streams: their worker processes stop only when closed.
        for iterator in opened:
            iterator.close()
    jax.block_until_ready(jax.tree_util.tree_leaves(result.masks))
    seconds = time.perf_counter() - t0
    _check_reached(method, result.masks, variables["params"], sparsity, args.scope,
                   layers, mask_dim)
    LOG.info("%s %s: pruned in %.1f s", method, name, seconds)
    return Pruned(result.masks, result, seconds)


def _mask_kind(args, apply_fn, variables, bundle, sparsity: float):
    """``(prunable, mask_dim)`` of one pruning to ``sparsity``.

    A gradual run to an N:M pattern prunes its rounds on the way (lower
    sparsities, which no N:M pattern has) unstructured, over the kernels that
    the pattern groups; its last round makes the groups, keeping N of each
    group's surviving weights (a pruned weight never comes back).
    """
    layers = prunable(args, apply_fn, variables, bundle.image_shape)
    pattern = n_m.from_mask_dim(args.mask_dim)
    if pattern is None or n_m.has_sparsity(pattern, sparsity):
        return layers, args.mask_dim
    grouped = set(MaskLayout.from_params(variables["params"], layers, args.mask_dim).paths)
    return (lambda path, _: path in grouped), None


def _worker_failure(err: WorkerError) -> str:
    """What happened to the worker, in a few words (the library's message says it at length)."""
    if err.worker is None:
        return f"SFPK's worker processes failed ({str(err).split(';')[0]})"
    if err.code is None:
        last = str(err).strip().splitlines()[-1]
        return f"SFPK worker process {err.worker} (pid {err.pid}) failed: {last}"
    return f"SFPK worker process {err.worker} (pid {err.pid}) died (exit code {err.code})"


# Printed above a failing pruner's own traceback, so the one-line error stays first.
TRACEBACK_MARKER = "---- the pruner's traceback (for debugging it) ----"


def _pruner_raised(method: str, err: Exception) -> typing.NoReturn:
    """One line naming the pruner and its error, then its traceback below a marker; exit 1."""
    print(f"error: pruner {method!r} raised {type(err).__name__}: "
          f"{' '.join(str(err).split()) or '(no message)'}; nothing was saved", file=sys.stderr)
    print(TRACEBACK_MARKER, file=sys.stderr)
    traceback.print_exception(err, file=sys.stderr)
    raise SystemExit(1)


def _check_reached(method: str, masks, params, sparsity: float, scope: str, layers,
                   mask_dim) -> None:
    """Exit 1 when the masks remove fewer entries than ``sparsity`` asks, before anything is saved.

    Counted as the pruners count: mask entries (channels for channel masks),
    over all prunable leaves (global scope) or per leaf (local scope). A
    pruner may remove more (weights that were zero already are never kept),
    never fewer.
    """
    layout = MaskLayout.from_params(params, layers, mask_dim)
    wanted = topk.remove_counts(layout.mask_sizes,
                                channels.mask_sparsity(sparsity, channels.is_channel(mask_dim)),
                                scope)
    removed = [0 if m is None else int(np.sum(np.asarray(m) == 0)) for m in layout.gather(masks)]
    short = ([("all prunable leaves", sum(removed), wanted, sum(layout.mask_sizes))]
             if scope == "global" else
             [(p, r, w, n) for p, r, w, n in zip(layout.paths, removed, wanted, layout.mask_sizes)])
    for where, got, want, size in short:
        if got < want:
            unit = "channels" if channels.is_channel(mask_dim) else "entries"
            fail(f"pruner {method!r} returned masks that remove {got} of the {size} {unit} of "
                 f"{where}, fewer than --sparsity={sparsity:g} asks ({want}; the masks' sparsity "
                 f"is {sparsity_of(masks, params):.4f}); no result is saved", code=1)
