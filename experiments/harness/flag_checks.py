"""Every flag checked before any work or write: ``finish_args`` and the checks it runs."""

from __future__ import annotations

import argparse
import math
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import jax

from experiments.harness import compile_cache, n_m_flags
from experiments.harness.distributed import launch, main_first
from experiments.harness.flags import (
    execution,
    fail,
    field_flag,
    flag_name,
    one_line_errors,
    prunable,
    sfpk_config,
)
from experiments.harness.outdir import check_out_state, inputs_kept
from sfpk_jax import ConfigError, Execution, SFPKConfig, pruners
from sfpk_jax.core import channels
from sfpk_jax.core.masks import MaskLayout
from sfpk_jax.data import DATASETS
from sfpk_jax.models import build, registered
from sfpk_jax.models.registry import default_input_shape
from sfpk_jax.runtime.cores import max_workers
from sfpk_jax.sfpk import auto

# What --smoke sets the common size flags to when they are not given; scripts
# add their own.
SMOKE = {"steps": 3, "particles": 2, "prune_batch_size": 16, "batch_size": 32, "epochs": 2,
         "pretrain_epochs": 1}
# --seed and --steps must fit what jax and numpy take (a seed offset by the
# phases' offsets stays an int64; steps count in int32 inside jit).
SEED_LIMIT = 2**32
STEPS_LIMIT = 2**31 - 1
# The smallest change of density that float32 particles can express.
FLOAT32_STEP = 2.0**-23
# What --smoke runs on unless --dataset / --data-dir (--model) say otherwise.
SMOKE_DATASET, SMOKE_MODEL = "digits", "small_cnn"


class Check(NamedTuple):
    """One flag's check: ``ok`` is False when ``value`` is not ``allowed``."""

    flag: str
    value: Any
    ok: bool
    allowed: str


def finite(x) -> bool:
    """``x`` is a finite int or float."""
    return isinstance(x, (int, float)) and math.isfinite(x)


def positive_ints(args: argparse.Namespace, *names: str) -> list[Check]:
    """``--name`` is an integer >= 1, for each attribute name."""
    return [Check(flag_name(name), getattr(args, name), _int(getattr(args, name)) and
                  getattr(args, name) >= 1, "an integer >= 1") for name in names]


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def csv_items(text: str, kind) -> list | None:
    """The items of a comma-separated flag, each parsed by ``kind`` (e.g. ``float``).

    Returns:
      The items, or None when one does not parse or one comes twice.
    """
    try:
        values = [kind(t.strip()) for t in str(text).split(",")]
    except ValueError:
        return None
    return values if len(set(values)) == len(values) else None


def list_check(flag: str, text: str, kind, what: str, valid: Callable[[Any], bool]) -> Check:
    """A comma-separated flag whose items parse by ``kind``, come once and are each ``valid``.

    Args:
      flag: the flag, e.g. ``--seeds``.
      text: its value.
      kind: the type of each item, e.g. ``int``.
      what: the items, as the error says, e.g. ``"integers >= 0"``.
      valid: whether one parsed item is allowed.

    Returns:
      The check.
    """
    values = csv_items(text, kind)
    return Check(flag, text, values is not None and all(valid(v) for v in values),
                 f"comma-separated {what}, each once")


def sparsities_check(text: str) -> Check:
    """``--sparsities``: comma-separated fractions in (0, 1), each once."""
    return list_check("--sparsities", text, float, "fractions in (0, 1)",
                      lambda v: finite(v) and 0 < v < 1)


def out_problem(path: str) -> str | None:
    """Why ``--out`` cannot be used, or None; creates nothing (an unnamed probe file at most)."""
    if not str(path).strip():
        return "a folder name (it is empty, which would mean the current directory)"
    out = Path(path)
    if out.resolve() == Path.cwd().resolve() and any(out.iterdir()) and not (
            out / "config.json").exists():
        return ("a folder other than the current directory, which holds other files (an empty "
                "current directory, or one that holds a run, is fine)")
    return folder_problem(out)


def folder_problem(path: Path) -> str | None:
    """Why ``path`` cannot be (or become) a writable folder, or None; creates nothing but an
    unnamed probe file, removed at once."""
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


def out_check(args: argparse.Namespace) -> Check:
    """``--out`` is (or can become) a writable directory."""
    problem = out_problem(args.out)
    return Check("--out", args.out, problem is None, problem or "")


def compile_cache_check(args: argparse.Namespace) -> Check:
    """The compilation cache's folder (the flag's, the environment's or the default) is usable."""
    directory = compile_cache.directory(args)
    problem = None if directory is None else folder_problem(directory)
    source = (f"--compile-cache={args.compile_cache!r}" if args.compile_cache else
              f"the compilation cache folder {str(directory)!r} (from ${compile_cache.ENV} or the "
              "default)")
    return Check("--compile-cache", args.compile_cache, problem is None,
                 f"{problem}, for {source}; name another folder, or pass --no-compile-cache"
                 if problem else "")


def common_checks(args: argparse.Namespace) -> list[Check]:
    """The flags of ``add_common_flags`` that :class:`SFPKConfig` does not check."""
    devices = jax.device_count()
    return [
        Check("--resume", args.resume, not (args.resume and args.overwrite),
              "not together with --overwrite (--resume continues a run, --overwrite starts it "
              "again)"),
        Check("--dataset", args.dataset, args.dataset in DATASETS, f"one of {', '.join(DATASETS)}"),
        Check("--model", args.model, args.model in registered(),
              f"one of {', '.join(registered())}"),
        Check("--pruner", args.pruner, args.pruner in pruners.names(),
              f"one of {', '.join(pruners.names())}"),
        Check("--sparsity", args.sparsity, finite(args.sparsity) and 0.0 < args.sparsity < 1.0,
              "a fraction in (0, 1)"),
        *positive_ints(args, "prune_batch_size", "batch_size", "epochs", "bn_batches",
                       "checkpoint_every", "checkpoint_steps", "synflow_iterations",
                       "mesh_batch"),
        Check("--data-workers", args.data_workers,
              _int(args.data_workers) and 0 <= args.data_workers <= max_workers(),
              f"an integer in [0, {max_workers()}] (4 worker processes per core at most)"),
        Check("--conv-chunk", args.conv_chunk,
              args.conv_chunk == "auto" or (_int(args.conv_chunk) and args.conv_chunk >= 0),
              "an integer >= 0 or auto"),
        Check("--pretrain-epochs", args.pretrain_epochs, args.pretrain_epochs >= 0,
              "an integer >= 0"),
        Check("--seed", args.seed, 0 <= args.seed < SEED_LIMIT,
              f"an integer in [0, {SEED_LIMIT - 1}]"),
        Check("--steps", args.steps, args.steps <= STEPS_LIMIT, f"an integer <= {STEPS_LIMIT}"),
        Check("--mesh-batch", args.mesh_batch, args.mesh_batch <= devices,
              f"at most the {devices} devices"),
        Check("--mesh-batch", args.mesh_batch,
              args.mesh_batch <= 1 or args.particle_mode == "shard",
              "1 unless --particle-mode shard"),
        batch_split_check(args, 1),
        # Files and folders the run reads.
        Check("--data-dir", args.data_dir, args.data_dir is None or Path(args.data_dir).is_dir(),
              f"an existing directory that holds --dataset={args.dataset} (CIFAR: the folder "
              "into which cifar-*-python.tar.gz was extracted, or a tfds data_dir; see the "
              "Data section of docs/experiments.md)"),
        Check("--dense-checkpoint", args.dense_checkpoint,
              args.dense_checkpoint is None or Path(args.dense_checkpoint).is_dir(),
              "an existing checkpoint folder (e.g. OUT/checkpoints/dense of experiments.pretrain)"),
    ]


def batch_split_check(args: argparse.Namespace, accumulate: int) -> Check:
    """Data-parallel, each micro-batch (``accumulate`` a step) splits over the devices.

    With several processes each feeds its equal share of every batch to its
    own devices, so the batch splits over all the devices of all processes.
    """
    devices, processes = jax.device_count(), jax.process_count()
    where = (f"the {devices} devices of the {processes} processes (--num-processes)"
             if processes > 1 else f"the {devices} devices (--data-parallel)")
    return Check("--batch-size", args.batch_size,
                 not (args.data_parallel or processes > 1)
                 or (args.batch_size // accumulate) % devices == 0,
                 f"one whose (micro-)batches split evenly over {where}")


def process_checks(args: argparse.Namespace) -> list[Check]:
    """With several processes, SFPK's particles split evenly over them (``shard`` mode).

    For the experiments that prune (those that need a dense model).
    """
    processes = jax.process_count()
    if (processes == 1 or args.pruner not in pruners.names()
            or not pruners.spec(args.pruner).simulation):
        return []
    return [
        Check("--particle-mode", args.particle_mode, args.particle_mode == "shard",
              "shard with --num-processes > 1 (the particles split over every process's "
              "devices)"),
        Check("--particles", args.particles, args.particles % processes == 0,
              f"a multiple of the {processes} processes (--num-processes): each process's "
              "devices take an equal share"),
    ]


def recipe_checks(args: argparse.Namespace) -> list[Check]:
    """The flags of ``add_recipe_flags``."""
    return [
        Check("--lr", args.lr, finite(args.lr) and args.lr > 0, "a finite number > 0"),
        Check("--momentum", args.momentum, finite(args.momentum) and 0 <= args.momentum < 1,
              "a number in [0, 1)"),
        Check("--weight-decay", args.weight_decay,
              finite(args.weight_decay) and args.weight_decay >= 0, "a finite number >= 0"),
        Check("--warmup-epochs", args.warmup_epochs, args.warmup_epochs >= 0, "an integer >= 0"),
        Check("--warmup-start", args.warmup_start,
              finite(args.warmup_start) and args.warmup_start >= 0, "a finite number >= 0"),
        Check("--label-smoothing", args.label_smoothing,
              finite(args.label_smoothing) and 0 <= args.label_smoothing < 1,
              "a number in [0, 1)"),
    ]


def require(checks: Iterable[Check]) -> None:
    """Stops at the first failed check: one line naming the flag, the value and what is allowed."""
    for check in checks:
        if not check.ok:
            fail(f"{check.flag}={check.value!r} is not allowed: expected {check.allowed}")


def check_config(args: argparse.Namespace) -> None:
    """The SFPK flags make a valid :class:`SFPKConfig` and :class:`Execution`; if not, one line
    naming the flag."""
    try:
        sfpk_config(args)
        execution(args)
    except ConfigError as err:
        cls = {"SFPKConfig": SFPKConfig, "Execution": Execution}[err.owner]
        require([Check(field_flag(cls, err.field), err.value, False, err.expected)])


def finish_args(parser: argparse.ArgumentParser, argv,
                checks: Iterable[Callable[[argparse.Namespace], list[Check]]] = (), *,
                smoke: dict | None = None, needs_dense: bool = False,
                dense_flag: str | None = None) -> argparse.Namespace:
    """Parses, applies ``--smoke`` and validates every flag before any work or write.

    A bad value stops with one line naming the flag, the value and what is
    allowed, and exit code 2.

    Args:
      parser: a parser with ``add_common_flags``.
      argv: the command line (None: ``sys.argv``).
      checks: the script's further checks, each ``args -> list[Check]`` (e.g.
        ``recipe_checks`` for ``add_recipe_flags``, and those of its own flags).
      smoke: what ``--smoke`` shrinks the script's own flags to (at most).
      needs_dense: the experiment prunes a dense model, so one of its sources
        must be given.
      dense_flag: the attribute of a further flag of the script that names a
        dense model file (e.g. ``pretrained_weights``).

    Returns:
      The parsed arguments.
    """
    one_line_errors(parser)
    args = parser.parse_args(argv)
    # Before anything asks JAX for its devices (the checks below do).
    launch(args)
    given = given_flags(parser, argv)
    if args.smoke:
        apply_smoke(args, given, {**SMOKE, **(smoke or {})})
        if "dataset" not in given and "data_dir" not in given:
            args.dataset = SMOKE_DATASET
        if "model" not in given and not (dense_flag and getattr(args, dense_flag)):
            args.model = SMOKE_MODEL
        if needs_dense and "pretrain_epochs" not in given:
            # The dense model is trained here (1 epoch) unless a file gives it.
            other = args.dense_checkpoint or (dense_flag and getattr(args, dense_flag))
            args.pretrain_epochs = 0 if other else SMOKE["pretrain_epochs"]
    n_m_flags.resolve(args, given)
    require([*common_checks(args), *(process_checks(args) if needs_dense else []),
             *(c for more in checks for c in more(args)), out_check(args),
             compile_cache_check(args)])
    check_config(args)
    # Resolved here, so that config.json records the chunk used and a --resume
    # on another backend announces the change.
    if args.conv_chunk == "auto":
        args.conv_chunk = auto.conv_chunk()
    if needs_dense:
        _check_dense_source(args, dense_flag)
    _check_prunable(args)
    # Process 0 alone judges --out (the others would see its lock and files).
    main_first(lambda: (check_out_state(args), inputs_kept(args, {
        "--dense-checkpoint": args.dense_checkpoint, "--data-dir": args.data_dir,
        **({flag_name(dense_flag): getattr(args, dense_flag)} if dense_flag else {})})))
    return args


def given_flags(parser: argparse.ArgumentParser, argv) -> set[str]:
    """The attributes that the command line ``argv`` sets (rather than a default)."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in saved:
            action.default = default


def apply_smoke(args: argparse.Namespace, given: set[str], sizes: dict) -> None:
    """``--smoke``'s values for the flags not given; a flag that is given is kept as it is.

    Args:
      args: the parsed flags, changed in place (config.json then records
        what the run uses).
      given: the attributes set on the command line (:func:`given_flags`).
      sizes: attribute -> --smoke's value; a number only ever lowers the
        script's default (e.g. ``--epochs``), other values (lists) replace it.
    """
    for name, value in sizes.items():
        if name not in given:
            now = getattr(args, name)
            setattr(args, name, min(now, value) if isinstance(value, (int, float)) else value)


def _check_dense_source(args: argparse.Namespace, dense_flag: str | None) -> None:
    """One source of the dense model is given (or it is trained here)."""
    if args.dense_checkpoint or args.pretrain_epochs >= 1:
        return
    if dense_flag and getattr(args, dense_flag):
        return
    sources = "--dense-checkpoint PATH (from experiments.pretrain)"
    if dense_flag:
        sources = f"{flag_name(dense_flag)} FILE, {sources}"
    smoke = (" (--smoke trains one for 1 epoch when --pretrain-epochs is left out)"
             if args.smoke else "")
    fail(f"--pretrain-epochs={args.pretrain_epochs!r} is not allowed without another dense model: "
         f"no dense model, so pass {sources} or --pretrain-epochs N to train one here{smoke}")


def _check_prunable(args: argparse.Namespace) -> None:
    """The model has weights to prune, and ``--sparsity`` removes one and keeps one.

    Shapes only: nothing is computed. The count is that of the model with 10
    classes (the fewest of the datasets), so the bounds hold for all of them.
    """
    built = {}

    def init():  # the apply function comes out beside the shapes
        built["apply_fn"], variables = build(args.model, num_classes=10)
        return variables

    shapes = jax.eval_shape(init)
    try:
        layers = prunable(args, built["apply_fn"], shapes,
                          default_input_shape(args.model)[1:])
        layout = MaskLayout.from_params(shapes["params"], layers, args.mask_dim)
    except ValueError as err:
        if args.n_m is not None:
            fail(f"--n-m={args.n_m} does not fit --model={args.model}: {err}")
        fail(f"--model={args.model!r} is not allowed: expected a model with prunable weights "
             f"({err})")
    low = max(1.0 / layout.total, FLOAT32_STEP)
    high = 1.0 - low
    units = "prunable channels" if channels.is_channel(args.mask_dim) else "prunable weights"
    require([Check("--sparsity", args.sparsity, low <= args.sparsity <= high,
                   f"a fraction in [{low:.3g}, {high:.6g}]: it must remove at least one of the "
                   f"{layout.total:,} {units} of --model={args.model} and keep one")])
