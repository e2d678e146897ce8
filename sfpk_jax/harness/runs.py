"""What every experiment shares: flags, data, pruning, retraining, outputs.

The scripts in ``experiments/`` only choose defaults and the order of these
steps. Every output goes under ``--out``: ``config.json``, ``metrics.csv``,
``results.json``, plots and orbax checkpoints under ``checkpoints/``.

Fault tolerance (see ``docs/long_runs.md``): every flag is checked before any
work or write; every training epoch, every pruning result and the SFPK
simulation (every ``--checkpoint-every`` steps) are checkpointed under
``checkpoints/``; ``--resume`` continues an interrupted run from there and
ends with the outputs an uninterrupted run would have written, bit for bit
(timings aside). Nothing in ``--out`` is deleted without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io as _io
import json
import math
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from sfpk_jax.core.channels import MASK_DIMS
from sfpk_jax.core.masks import MaskLayout, apply_masks, density, path_to_str
from sfpk_jax.data import (
    DATASETS,
    DataBundle,
    DatasetNotFoundError,
    Loader,
    load,
    particle_loader,
)
from sfpk_jax.data.pipeline import read_batch
from sfpk_jax.models import build, registered
from sfpk_jax.parallel import sharding
from sfpk_jax.parallel.sharding import default_mesh
from sfpk_jax.pruners import PRUNERS, prune
from sfpk_jax.sfpk.checkpointing import CheckpointPolicy, ResumeError
from sfpk_jax.sfpk.config import (
    COMPUTE_DTYPES,
    PARTICLE_MODES,
    POLARIZERS,
    REPULSION_MODES,
    SCHEDULES,
    SCOPES,
    SPARSITY_FNS,
    VOTE_MODES,
    SFPKConfig,
)
from sfpk_jax.sfpk.state import SFPKResult
from sfpk_jax.storage import checkpoints
from sfpk_jax.storage import files as io
from sfpk_jax.tools import plots as plotting
from sfpk_jax.train import (
    evaluate_batches,
    lr_schedule,
    make_loss_fn,
    recompute_batch_stats,
    train_epoch,
)

SMOKE = {"train_examples": 256, "test_examples": 128, "steps": 3, "particles": 2,
         "prune_batch_size": 16, "batch_size": 32, "epochs": 2, "rounds": 2, "round_epochs": 1}

# Flags that may differ between a run and its --resume: they change where
# things are and what is shown, not what is computed.
RESUME_IGNORES = ("out", "overwrite", "resume", "no_progress", "checkpoint_every", "data_dir")
# Flags a --resume may change on purpose: the learning rate, to get past a
# diverged (NaN) epoch; the particle mode, when the run moves to another
# machine (it changes float rounding only). A change is announced and recorded
# in config.json under RESUME_LOG; the run is then no longer bit-equal to an
# uninterrupted one.
RESUME_MAY_CHANGE = ("lr", "pretrain_lr", "particle_mode", "particle_chunk", "mesh_batch",
                     "data_parallel")
RESUME_LOG = "resume_changes"
# What --overwrite removes before starting again (results.json first: it marks
# a finished run). Plots are simply rewritten.
RUN_FILES = ("results.json", "summary.json", "table.md", "metrics.csv", "config.json")

# SFPKConfig fields whose flag has another name.
_CONFIG_FLAGS = {"momentum": "--vote-momentum"}


def fail(message: str) -> None:
    """Stops the run with one line on stderr and exit code 2 (no traceback)."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


def one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Makes ``parser``'s own errors (unknown flag, bad type, ...) one line and exit 2."""
    parser.error = lambda message: fail(f"{message} (see {parser.prog} --help)")


def add_common_flags(parser: argparse.ArgumentParser, **defaults) -> None:
    """The flags every experiment takes; ``defaults`` sets each script's values."""
    one_line_errors(parser)
    d = {"data_dir": None, "dataset": "cifar100", "model": "resnet20", "pruner": "sfpk",
         "sparsity": 0.95, "steps": 100, "particles": 10, "prune_batch_size": 512,
         "batch_size": 64, "pretrain_epochs": 0, "epochs": 100, "seed": 0, **defaults}
    g = parser.add_argument_group("common")
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("--overwrite", action="store_true",
                   help="start again in an --out that holds a finished or interrupted run "
                        "(removes its results, metrics and checkpoints)")
    g.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its last checkpoints; the "
                        "flags must be the run's (only --lr may change, see docs/long_runs.md)")
    g.add_argument("--checkpoint-every", type=int, default=10,
                   help="SFPK steps between simulation checkpoints (training: every epoch)")
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
    s.add_argument("--particle-mode", default="loop",
                   help=f"how particles go through the model, one of {PARTICLE_MODES} (shard: "
                        "over the devices, see --mesh-batch)")
    s.add_argument("--particle-chunk", type=int, default=1,
                   help="particles per chunk in map mode (bounds memory)")
    s.add_argument("--compute-dtype", default="float32",
                   help=f"dtype of the forward/backward passes, one of {COMPUTE_DTYPES}")
    s.add_argument("--synflow-iterations", type=int, default=1,
                   help="SynFlow pruning rounds: 1 is the official code's single shot, the "
                        "SynFlow paper uses 100")
    m = parser.add_argument_group("devices")
    m.add_argument("--mesh-batch", type=int, default=1,
                   help="shard mode: devices that split each particle's mini-batch (the rest "
                        "split the particles)")
    m.add_argument("--data-parallel", action="store_true",
                   help="(re)train data-parallel: every batch split over all devices")


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


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def out_problem(path: str) -> str | None:
    """Why ``--out`` cannot be used, or None; creates nothing (an unnamed probe file at most)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        return "a directory (it is a file)"
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"a path under a directory ({probe} is a file)"
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        return f"a writable directory (cannot create files in {probe}: {err.strerror or err})"
    return None


def _csv_items(text: str, kind, what: str) -> tuple[list | None, str]:
    """Parses a comma-separated flag; ``(None, reason)`` when malformed."""
    items = [t.strip() for t in str(text).split(",")]
    try:
        values = [kind(t) for t in items]
    except ValueError:
        return None, f"comma-separated {what}"
    if not values or len(set(values)) != len(values):
        return None, f"comma-separated {what}, each once"
    return values, ""


def _validate(args: argparse.Namespace) -> list[tuple[str, Any, bool, str]]:
    """``(flag, value, ok, allowed)`` for every flag ``args`` has, in a stable order."""
    ints = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    checks = [
        ("--resume", args.resume, not (args.resume and args.overwrite),
         "not together with --overwrite (--resume continues a run, --overwrite starts it again)"),
        ("--dataset", args.dataset, args.dataset in DATASETS, f"one of {', '.join(DATASETS)}"),
        ("--model", args.model, args.model in registered(), f"one of {', '.join(registered())}"),
        ("--pruner", args.pruner, args.pruner in PRUNERS, f"one of {', '.join(PRUNERS)}"),
        ("--scope", args.scope, args.scope in SCOPES, f"one of {', '.join(SCOPES)}"),
        ("--sparsity", args.sparsity, _finite(args.sparsity) and 0.0 < args.sparsity < 1.0,
         "a fraction in (0, 1)"),
        ("--radius", args.radius, _finite(args.radius) and args.radius >= 1.0, ">= 1"),
        ("--repulsion", args.repulsion, _finite(args.repulsion) and args.repulsion >= 0.0, ">= 0"),
        ("--vote-ratio", args.vote_ratio, _finite(args.vote_ratio) and 0.0 < args.vote_ratio <= 1.0,
         "a fraction in (0, 1]"),
        ("--vote-momentum", args.vote_momentum,
         _finite(args.vote_momentum) and args.vote_momentum >= 0.0, ">= 0"),
    ]
    for flag in ("steps", "particles", "prune_batch_size", "batch_size", "epochs", "bn_batches",
                 "checkpoint_every", "rounds", "round_epochs", "accum_steps", "synflow_iterations",
                 "particle_chunk", "mesh_batch"):
        if hasattr(args, flag):
            value = getattr(args, flag)
            checks.append((f"--{flag.replace('_', '-')}", value, ints(value) and value >= 1,
                           "an integer >= 1"))
    checks += [
        ("--pretrain-epochs", args.pretrain_epochs, args.pretrain_epochs >= 0, "an integer >= 0"),
        ("--seed", args.seed, args.seed >= 0, "an integer >= 0"),
    ]
    if hasattr(args, "lr"):
        checks += [
            ("--lr", args.lr, _finite(args.lr) and args.lr > 0, "a finite number > 0"),
            ("--momentum", args.momentum, _finite(args.momentum) and 0 <= args.momentum < 1,
             "a number in [0, 1)"),
            ("--weight-decay", args.weight_decay,
             _finite(args.weight_decay) and args.weight_decay >= 0, "a finite number >= 0"),
            ("--warmup-epochs", args.warmup_epochs, args.warmup_epochs >= 0, "an integer >= 0"),
            ("--warmup-start", args.warmup_start,
             _finite(args.warmup_start) and args.warmup_start >= 0, "a finite number >= 0"),
            ("--label-smoothing", args.label_smoothing,
             _finite(args.label_smoothing) and 0 <= args.label_smoothing < 1, "a number in [0, 1)"),
        ]
    devices = jax.device_count()
    checks.append(("--mesh-batch", args.mesh_batch, args.mesh_batch <= devices,
                   f"at most the {devices} devices"))
    if args.mesh_batch > 1 and args.particle_mode != "shard":
        checks.append(("--mesh-batch", args.mesh_batch, False, "1 unless --particle-mode shard"))
    if args.data_parallel:
        micro = args.batch_size // getattr(args, "accum_steps", 1)
        checks.append(("--batch-size", args.batch_size, micro % devices == 0,
                       f"one whose (micro-)batches split evenly over the {devices} devices "
                       "(--data-parallel)"))
    if hasattr(args, "accum_steps") and args.accum_steps >= 1:
        checks.append(("--batch-size", args.batch_size, args.batch_size % args.accum_steps == 0,
                       f"a multiple of --accum-steps={args.accum_steps} (each optimizer step "
                       "accumulates that many equal micro-batches)"))
    # benchmarks.compare_pruners: lists, and the dense models it always trains.
    if hasattr(args, "pruners"):
        pruners, _ = _csv_items(args.pruners, str, "pruner names")
        checks.append(("--pruners", args.pruners,
                       pruners is not None and all(p in PRUNERS for p in pruners),
                       f"comma-separated names, each once, from {', '.join(PRUNERS)}"))
    if hasattr(args, "sparsities") and isinstance(args.sparsities, str):
        values, allowed = _csv_items(args.sparsities, float, "fractions in (0, 1)")
        checks.append(("--sparsities", args.sparsities,
                       values is not None and all(_finite(v) and 0 < v < 1 for v in values),
                       allowed or "comma-separated fractions in (0, 1), each once"))
    if hasattr(args, "seeds"):
        values, allowed = _csv_items(args.seeds, int, "integers >= 0")
        checks.append(("--seeds", args.seeds, values is not None and all(v >= 0 for v in values),
                       allowed or "comma-separated integers >= 0, each once"))
    if hasattr(args, "pretrain_lr"):
        checks += [
            ("--pretrain-lr", args.pretrain_lr, _finite(args.pretrain_lr) and args.pretrain_lr > 0,
             "a finite number > 0"),
            ("--pretrain-epochs", args.pretrain_epochs, args.pretrain_epochs >= 1,
             "an integer >= 1 (the dense models are trained here)"),
        ]
    # Files and folders the run reads or writes.
    if args.data_dir is not None:
        checks.append(("--data-dir", args.data_dir, Path(args.data_dir).is_dir(),
                       "an existing directory"))
    if args.dense_checkpoint is not None:
        checks.append(("--dense-checkpoint", args.dense_checkpoint,
                       Path(args.dense_checkpoint).is_dir(),
                       "an existing checkpoint folder (e.g. OUT/checkpoints/dense of "
                       "experiments.pretrain)"))
    weights = getattr(args, "pretrained_weights", None)
    if weights is not None:
        checks += [
            ("--pretrained-weights", weights, Path(weights).is_file(), "an existing file"),
            ("--pretrained-weights", weights, args.dense_checkpoint is None,
             "not together with --dense-checkpoint (pass one source of the dense model)"),
        ]
    problem = out_problem(args.out)
    checks.append(("--out", args.out, problem is None, problem or ""))
    return checks


def _check_dense_source(args: argparse.Namespace) -> None:
    weights = getattr(args, "pretrained_weights", None)
    if args.dense_checkpoint or weights or args.pretrain_epochs >= 1:
        return
    sources = "--dense-checkpoint PATH (from experiments.pretrain)"
    if hasattr(args, "pretrained_weights"):
        sources = "--pretrained-weights FILE, " + sources
    fail(f"--pretrain-epochs={args.pretrain_epochs!r} is not allowed without another dense model: "
         f"no dense model, so pass {sources} or --pretrain-epochs N to train one here")


def finish_args(parser: argparse.ArgumentParser, argv, *, needs_dense: bool = False
                ) -> argparse.Namespace:
    """Parses, applies ``--smoke`` and validates every flag before any work or write.

    A bad value stops with one line naming the flag, the value and what is
    allowed, and exit code 2. ``needs_dense``: the experiment prunes a dense
    model, so one of its sources must be given.
    """
    one_line_errors(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            if hasattr(args, name) and name not in ("train_examples", "test_examples"):
                setattr(args, name, min(getattr(args, name), value))
        if args.pretrain_epochs:
            args.pretrain_epochs = 1
    for flag, value, ok, allowed in _validate(args):
        if not ok:
            fail(f"{flag}={value!r} is not allowed: expected {allowed}")
    try:
        sfpk_config(args)
    except ValueError as err:
        message = str(err)
        for field, flag in _CONFIG_FLAGS.items():
            message = message.replace(f"SFPKConfig.{field}=", f"{flag}=")
        fail(re.sub(r"SFPKConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), message))
    if needs_dense:
        _check_dense_source(args)
    _check_prunable(args)
    _check_out_state(args)
    return args


def _check_prunable(args: argparse.Namespace) -> None:
    """The model has weights to prune (shapes only: nothing is computed)."""
    shapes = jax.eval_shape(lambda: build(args.model, num_classes=10)[1])
    try:
        MaskLayout.from_params(shapes["params"], None, args.mask_dim)
    except ValueError as err:
        fail(f"--model={args.model!r} is not allowed: expected a model with prunable weights "
             f"({err})")


def sfpk_config(args: argparse.Namespace) -> SFPKConfig:
    """The simulation's hyper-parameters from the flags."""
    return SFPKConfig(
        steps=args.steps, particles=args.particles, repulsion=args.repulsion, radius=args.radius,
        schedule=args.schedule, sparsity_fn=args.sparsity_fn, polarizer=args.polarizer,
        repulsion_mode=args.repulsion_mode, vote_mode=args.vote_mode, vote_ratio=args.vote_ratio,
        momentum=args.vote_momentum, scope=args.scope, mask_dim=args.mask_dim,
        particle_mode=args.particle_mode, particle_chunk=args.particle_chunk,
        compute_dtype=args.compute_dtype, progress=not args.no_progress,
    )


# --- the output folder -------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _config_changes(out: Path, args: argparse.Namespace) -> list[tuple[str, Any, Any]]:
    """The RESUME_MAY_CHANGE flags that differ from config.json; every other difference fails."""
    path = out / "config.json"
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        fail(f"--resume: cannot read {path} ({err}), so the run there cannot be checked: "
             "pass --overwrite to start again")
    now = json.loads(json.dumps(vars(args)))
    absent = "<absent>"
    differ, allowed = [], []
    for key in sorted((set(saved) | set(now)) - set(RESUME_IGNORES) - {RESUME_LOG}):
        old, new = saved.get(key, absent), now.get(key, absent)
        if old != new:
            (allowed if key in RESUME_MAY_CHANGE else differ).append((key, old, new))
    if differ:
        listed = "; ".join(f"{_flag(k)} was {old!r}, now {new!r}" for k, old, new in differ)
        fail(f"--resume: the flags differ from those of the interrupted run in {out} "
             f"(config.json): {listed}. Resume with the run's flags, or pass --overwrite to "
             "start again")
    return allowed


def _wipe(out: Path) -> None:
    """What --overwrite removes: results first (they mark a finished run), then the rest."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def _check_out_state(args: argparse.Namespace) -> tuple[bool, bool]:
    """``(finished, started)`` for ``--out``; exits 2 when the flags do not fit that state."""
    out = Path(args.out)
    if io.is_busy(out):
        fail(f"another process is running in {out} (it holds {out / io.LOCK_NAME}): wait for it "
             "to end, or stop it first")
    finished = (out / "results.json").exists()
    started = (out / "config.json").exists() or (out / "checkpoints").exists()
    if args.resume and not (finished or started):
        fail(f"--resume: nothing to resume in {out} (no config.json or checkpoints there); "
             "run without --resume to start")
    if not (args.resume or args.overwrite):
        if finished:
            fail(f"{out} already holds results (results.json); choose another --out or pass "
                 "--overwrite")
        if started:
            fail(f"{out} holds an interrupted run (config.json but no results.json): pass "
                 "--resume to continue it or --overwrite to start again")
    return finished, started


def start(args: argparse.Namespace) -> Path:
    """Prepares ``--out`` and writes config.json, or checks it on ``--resume``.

    * a new (or unrelated) folder: a fresh run;
    * a finished run (results.json): needs ``--overwrite``, which removes its
      results, metrics and checkpoints first; with ``--resume`` and the same
      flags there is nothing to do (exit 0);
    * an interrupted run (config.json or checkpoints, no results.json): needs
      ``--resume`` (same flags) or ``--overwrite``.

    Every refusal is one line on stderr and exit code 2.
    """
    out = Path(args.out)
    finished, started = _check_out_state(args)
    if out.is_dir():
        _lock(out)
    if args.resume:
        if not (out / "config.json").exists():
            fail(f"--resume: {out} holds checkpoints but no config.json, so they cannot be "
                 "checked against the flags: pass --overwrite to start again")
        changes = _config_changes(out, args)
        if finished:
            print(f"{out} already holds the finished results of this run (results.json): "
                  "nothing to resume", file=sys.stderr)
            raise SystemExit(0)
        if changes:
            saved = json.loads((out / "config.json").read_text())
            log = saved.get(RESUME_LOG, [])
            for key, old, new in changes:
                saved[key] = new
                log.append({"flag": _flag(key), "old": old, "new": new})
                print(f"warning: resuming with {_flag(key)}={new!r} (the run used {old!r}): what "
                      "is computed from here on is no longer bit-for-bit what an uninterrupted "
                      "run computes", file=sys.stderr)
            saved[RESUME_LOG] = log
            io.write_json(out / "config.json", saved)
        print(f"resuming the run in {out} from its checkpoints", file=sys.stderr)
        return out
    if args.overwrite and (finished or started):
        _wipe(out)
    try:
        out = io.prepare_out_dir(out, overwrite=args.overwrite)
    except (io.OutputExistsError, PermissionError) as err:
        fail(str(err))
    _lock(out)
    io.write_json(out / "config.json", vars(args))
    return out


def _lock(out: Path) -> None:
    try:
        io.lock_dir(out)
    except io.DirectoryBusyError as err:
        fail(str(err))
    except OSError as err:
        fail(f"cannot use {out}: {err}; choose another --out")


def checkpoint_dir(args: argparse.Namespace) -> Path:
    """``OUT/checkpoints``."""
    return Path(args.out).absolute() / "checkpoints"


def _slug(name: str) -> str:
    """A folder name for a phase or pruning call."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-") or "phase"


def save_checkpoint(args: argparse.Namespace, path, tree) -> None:
    """Saves an output checkpoint (dense, pruned, final, ...).

    On ``--resume`` one that already exists was written by this run before it
    was interrupted (the computation is deterministic), so it is kept.
    """
    path = Path(path)
    if args.resume and path.exists():
        return
    checkpoints.save(path, tree, overwrite=args.overwrite)


def remember(args: argparse.Namespace, name: str, compute, inputs) -> Any:
    """``compute()``, recorded in ``checkpoints/values.json``; on ``--resume`` read back.

    For values that are costly to recompute on a resume (a full test-set
    evaluation). ``inputs`` (a pytree) must be what the value depends on: the
    stored value is used only when their sha256 matches.
    """
    path = checkpoint_dir(args) / "values.json"
    digest = checkpoints.tree_digest(inputs)

    def read() -> dict:
        try:
            saved = json.loads(path.read_text())
            return saved if isinstance(saved, dict) else {}
        except (OSError, ValueError):
            return {}

    if args.resume:
        entry = read().get(name)
        if isinstance(entry, dict) and entry.get("inputs_sha256") == digest:
            return entry["value"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    io.write_json(path, {**read(), name: {"inputs_sha256": digest, "value": value}})
    return value


# --- data, model, training ---------------------------------------------------------------------


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
            fail(f"--{flag.replace('_', '-')}={getattr(args, flag)} is not allowed: expected at "
                 f"most the {len(bundle.train)} training examples of --dataset={args.dataset}")
    return bundle


def build_model(args: argparse.Namespace, bundle: DataBundle):
    """``(apply_fn, variables)`` for ``--model`` on the dataset's shapes."""
    apply_fn, variables = build(args.model, num_classes=bundle.num_classes,
                                key=jax.random.key(args.seed), input_shape=(1, *bundle.image_shape))
    try:
        MaskLayout.from_params(variables["params"], None, args.mask_dim)
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
    """Data, fresh model, then the output folder (config.json) and metrics file.

    The data and the model come first so that a missing dataset or an
    unusable model stops the run before anything is written.
    """
    bundle = open_data(args)
    apply_fn, variables = build_model(args, bundle)
    out = start(args)
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
    """Per-epoch rows, rewritten atomically to ``metrics.csv`` after every epoch.

    ``found`` holds the rows an interrupted run left in the file (read when
    the object is made), so a resumed run can tell a deleted checkpoint from
    a phase that never started.
    """

    def __init__(self, path: Path):
        self.path, self.rows = Path(path), []
        self.found = self._read()

    def _read(self) -> list[dict]:
        try:
            with self.path.open(newline="") as f:
                return list(csv.DictReader(f))
        except (OSError, csv.Error, UnicodeDecodeError):
            return []

    def add(self, **row) -> None:
        self.rows.append(row)
        self._write()

    def restore(self, rows: list[dict]) -> None:
        """Replaces the rows (those of a restored checkpoint) and rewrites the file."""
        self.rows = [dict(r) for r in rows]
        self._write()

    def _write(self) -> None:
        if not self.rows:
            return
        text = _io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(self.rows[0]))
        writer.writeheader()
        writer.writerows(self.rows)
        io.write_text(self.path, text.getvalue())


_DAMAGED = ("pass --overwrite to start the run again (or, when the folder holds an earlier step, "
            "remove the damaged step's folder to resume from the one before)")


def fit(apply_fn, variables, args, bundle, *, epochs, masks=None, metrics: Metrics, phase: str,
        accumulate: int = 1, seed_offset: int = 0):
    """Trains ``epochs`` epochs (masks held fixed), evaluating after each.

    Every epoch is checkpointed (variables, optimizer state, accuracies and
    metrics rows so far; the last two epochs kept) under
    ``OUT/checkpoints/train-<phase>``. With ``--resume`` the latest epoch is
    restored and training continues at the next one (the data order of epoch
    e depends only on the seed and e), so the result is bit-for-bit that of
    an uninterrupted run; a finished phase is just restored.

    Returns:
      The trained variables and the list of per-epoch test accuracies.
    """
    train, test = loaders(args, bundle, args.seed + seed_offset, accumulate)
    tx = optimizer(args, epochs, len(train), accumulate)
    if masks is not None:
        variables = {**variables, "params": apply_masks(variables["params"], masks)}
    opt_state = tx.init(variables["params"])
    mesh = sharding.particle_mesh() if args.data_parallel else None
    fingerprint = {
        "phase": phase, "epochs": epochs, "steps_per_epoch": len(train),
        "accumulate": accumulate, "seed": args.seed + seed_offset,
        "masks_sha256": None if masks is None else checkpoints.tree_digest(masks),
        "start_sha256": checkpoints.tree_digest(variables),
    }
    accs, first = [], 1
    with checkpoints.Series(checkpoint_dir(args) / f"train-{_slug(phase)}") as series:
        try:
            latest = series.latest()
            if latest is not None and not args.resume:
                fail(f"{series.directory} already holds checkpoints: is the phase name "
                     f"{phase!r} used twice in one run?")
            if latest is not None:
                state, record = series.restore(latest, {"variables": variables,
                                                        "opt_state": opt_state})
                diffs = checkpoints.differences(record.get("fingerprint", {}), fingerprint)
                if diffs:
                    fail(f"--resume: checkpoint {series.directory / str(latest)} is not from this "
                         f"run's phase {phase!r}: {'; '.join(diffs)}. Resume with the run's "
                         "flags and inputs, or pass --overwrite to start again")
                variables, opt_state = state["variables"], state["opt_state"]
                accs, first = list(record["accs"]), latest + 1
                metrics.restore(record["rows"])
            elif args.resume and any(r.get("phase") == phase for r in metrics.found):
                fail(f"--resume: the checkpoints of phase {phase!r} are missing from "
                     f"{series.directory}, though metrics.csv records epochs of it: pass "
                     "--overwrite to start the run again")
        except checkpoints.CheckpointError as err:
            fail(f"--resume: {err}; {_DAMAGED}")
        bar = tqdm(range(first, epochs + 1), initial=first - 1, total=epochs, desc=phase,
                   disable=args.no_progress)
        for epoch in bar:
            try:
                variables, opt_state, loss = train_epoch(
                    apply_fn, variables, opt_state, train.epoch(epoch), optimizer=tx, masks=masks,
                    label_smoothing=args.label_smoothing, epoch=epoch,
                    progress=not args.no_progress, desc=phase, mesh=mesh,
                )
            except FloatingPointError as err:
                fail(_diverged(args, phase, epoch, err, series.directory))
            accs.append(evaluate_batches(apply_fn, variables, test.epoch(0)))
            row = {"phase": phase, "epoch": epoch, "train_loss": round(loss, 6),
                   "test_acc": accs[-1]}
            # The checkpoint first: a metrics row on disk always has one.
            series.save(epoch, {"variables": variables, "opt_state": opt_state},
                        {"fingerprint": fingerprint, "accs": accs, "rows": [*metrics.rows, row]})
            metrics.add(**row)
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accs[-1]:.4f}")
    return variables, accs


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
    save_checkpoint(args, out / "checkpoints" / "dense", variables)
    return variables


# --- pruning -----------------------------------------------------------------------------------


class Pruned(NamedTuple):
    masks: Any
    result: Any
    seconds: float


class _Masks(NamedTuple):
    """A restored one-shot pruner's result (its ``.masks``)."""

    masks: Any


def prune_model(args, bundle, apply_fn, variables, sparsity: float, *, init=None,
                seed_offset: int = 0, name: str | None = None) -> Pruned:
    """Runs ``--pruner`` on the dense (or fine-tuned) model.

    The result (masks; for SFPK also scores, particles and trace) is
    checkpointed under ``OUT/checkpoints/prune-<name>`` and restored on
    ``--resume``; an SFPK simulation itself is checkpointed every
    ``--checkpoint-every`` steps under ``OUT/checkpoints/sfpk-<name>`` and
    resumed from there. ``name`` (default: pruner, sparsity, seed and
    ``seed_offset``) must be unique within a run.
    """
    method = args.pruner
    name = _slug(name or f"{method}-{sparsity:g}-seed{args.seed}-{seed_offset}")
    sfpk_like = method in ("sfpk", "spode")
    fingerprint = {
        "pruner": method, "sparsity": sparsity, "seed": args.seed, "seed_offset": seed_offset,
        "variables_sha256": checkpoints.tree_digest(variables),
        "init_sha256": None if init is None else checkpoints.tree_digest(
            (init.particles, init.scores)),
    }
    with checkpoints.Series(checkpoint_dir(args) / f"prune-{name}") as series:
        if args.resume:
            try:
                if series.latest() is not None:
                    state, record = series.restore(series.latest())
                    diffs = checkpoints.differences(record.get("fingerprint", {}), fingerprint)
                    if diffs:
                        fail(f"--resume: the pruning checkpoint {series.directory} is not from "
                             f"this run: {'; '.join(diffs)}. Resume with the run's flags and "
                             "inputs, or pass --overwrite to start again")
                    if sfpk_like:
                        result = SFPKResult(state["masks"], state["scores"], state["particles"],
                                            state["trace"])
                    else:
                        result = _Masks(state["masks"])
                    return Pruned(result.masks, result, float(record["seconds"]))
            except checkpoints.CheckpointError as err:
                fail(f"--resume: {err}; {_DAMAGED}")
        pruned = _prune(args, bundle, apply_fn, variables, sparsity, init, seed_offset, name)
        tree = {"masks": pruned.masks}
        if sfpk_like:
            tree.update(scores=pruned.result.scores, particles=pruned.result.particles,
                        trace=dict(pruned.result.trace))
        series.save(0, tree, {"fingerprint": fingerprint, "seconds": pruned.seconds})
    return pruned


def _prune(args, bundle, apply_fn, variables, sparsity, init, seed_offset, name) -> Pruned:
    loss_fn = make_loss_fn(apply_fn, variables)
    method = args.pruner
    options: dict[str, Any] = {}
    if method in ("sfpk", "spode"):
        options = {"config": sfpk_config(args), "init": init,
                   "checkpoint": CheckpointPolicy(checkpoint_dir(args) / f"sfpk-{name}",
                                                  args.checkpoint_every, args.resume)}
        if args.particle_mode == "shard" and args.mesh_batch > 1:
            options["mesh"] = default_mesh(args.particles, args.mesh_batch)
    if method in ("grasp", "synflow"):
        # Training mode, as the official code runs both (batch statistics).
        options["logits_fn"] = lambda p, x: apply_fn({**variables, "params": p}, x, True)[0]
    if method == "synflow":
        options.update(input_shape=bundle.image_shape, iterations=args.synflow_iterations)
    batches = None
    if method in ("sfpk", "spode", "snip", "grasp"):
        particles = args.particles if method == "sfpk" else 1

        def stream(start: int = 0):
            return particle_loader(bundle.train, particles, args.prune_batch_size,
                                   transform=bundle.train_transform,
                                   seed=args.seed + seed_offset, start=start)

        # SFPK takes the batches as a function of the first step, so that a
        # resumed simulation reads from there without replaying the others.
        batches = stream if "checkpoint" in options else stream()
    t0 = time.perf_counter()
    try:
        result = prune(method, loss_fn, variables["params"], batches, sparsity,
                       scope=args.scope, key=jax.random.key(args.seed), mask_dim=args.mask_dim,
                       **options)
    except FloatingPointError as err:
        fail(f"pruning with {method} diverged: {err}")
    except ResumeError as err:
        fail(str(err))
    jax.block_until_ready(jax.tree_util.tree_leaves(result.masks))
    return Pruned(result.masks, result, time.perf_counter() - t0)


def recompute_bn(args, bundle, apply_fn, variables, masks):
    """The masked model with batch-norm statistics re-estimated (spec: after voting)."""
    masked = {**variables, "params": apply_masks(variables["params"], masks)}
    train, _ = loaders(args, bundle, args.seed + 7)
    batches = (b for _, b in zip(range(args.bn_batches), train.epoch(0)))
    return recompute_batch_stats(apply_fn, masked, batches)


# --- results -----------------------------------------------------------------------------------


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
