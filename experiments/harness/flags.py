"""The experiments' flags (those of ``SFPKConfig`` and ``Execution`` made from their fields) and one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from experiments.harness import compile_cache
from sfpk_jax import pruners
from sfpk_jax.core import n_m
from sfpk_jax.data import DATASETS
from sfpk_jax.parallel.sharding import default_mesh
from sfpk_jax.sfpk import Execution, SFPKConfig, fields
from sfpk_jax.train.losses import layers_of

_FIELDS = {cls: {f.name: f for f in dataclasses.fields(cls)} for cls in (SFPKConfig, Execution)}
# Fields whose flag has another name than the field's (the attribute of the
# parsed arguments, that is): Execution.workers is --particle-workers, beside
# --data-workers.
_DESTS = {(Execution, "workers"): "particle_workers"}
# The attributes of the flags that say how a run executes rather than what it
# computes (filled by add_execution_flags): --resume may change them.
EXECUTION_DESTS: set[str] = set()
NO_PROGRESS_HELP = ("no progress bars: one plain line per epoch and per 10 SFPK steps instead "
                    "(also the case when stdout is not a terminal)")


def fail(message: str, code: int = 2) -> typing.NoReturn:
    """Stops the run with one line on stderr (no traceback).

    Args:
      message: the line (whitespace, newlines included, collapses to spaces).
      code: the exit code: 2 (the default) for a refusal of the flags, the
        data or the state of ``--out``; 1 for a failure along the way.
    """
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(code)


def one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Makes ``parser``'s own errors (unknown flag, bad type, ...) one line and exit 2."""
    parser.error = lambda message: fail(f"{message} (see {parser.prog} --help)")


def path_arg(text: str) -> str:
    """A path flag's value: ``~`` and environment variables expanded (``--data-dir=~/data``),
    then made absolute.

    Resolved once, here, against the directory the command runs in: the run
    and the libraries it calls (orbax reads a relative checkpoint folder as
    empty) then see one absolute path, and config.json records it. An empty
    value stays empty, for the checks to refuse.
    """
    expanded = os.path.expandvars(os.path.expanduser(text))
    return os.path.abspath(expanded) if expanded.strip() else expanded


def flag_name(dest: str) -> str:
    """The flag of a parsed argument's attribute, e.g. ``--prune-batch-size``."""
    return "--" + dest.replace("_", "-")


def _dest(cls: type, field: str) -> str:
    """The parsed arguments' attribute that holds ``cls``'s field ``field``."""
    return _DESTS.get((cls, field), field)


def field_flag(cls: type, field: str) -> str:
    """The flag that sets ``cls``'s field ``field`` (``cls``: SFPKConfig or Execution)."""
    return flag_name(_dest(cls, field))


def _by_field(cls: type, values: dict) -> dict:
    """The entries of ``values`` (keyed by attribute) that hold ``cls``'s fields, by field name."""
    return {name: values[_dest(cls, name)] for name in _FIELDS[cls] if _dest(cls, name) in values}


def add_field_flags(group, cls: type, *names: str, **defaults) -> None:
    """One flag per named field of ``cls`` (SFPKConfig or Execution), with its type, default, help.

    The values are checked by the dataclass itself (see :func:`sfpk_config`),
    so a flag with fixed choices lists them in its help but leaves the
    refusal to the dataclass.

    Args:
      group: the parser or argument group that takes the flags.
      cls: the dataclass.
      *names: the field names, in the order the flags are listed.
      **defaults: defaults that differ from the field's, by field name.

    Raises:
      TypeError: a field is a switch (bool): ``type=bool`` would read
        ``"False"`` as True, so such a field needs a flag of its own.
    """
    hints = typing.get_type_hints(cls)
    for name in names:
        field = _FIELDS[cls][name]
        kind = hints[name]
        if typing.get_origin(kind) is not typing.Literal:  # X | None: the X
            kind = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        if typing.get_origin(kind) is typing.Literal:  # a choice of values: their type
            kind = type(typing.get_args(kind)[0])
        if kind is bool:
            raise TypeError(f"{cls.__name__}.{name} is a switch: give it a store_true flag instead")
        text = field.metadata["help"]
        choices = [str(c) for c in fields.choices(cls).get(name, ()) if c is not None]
        if choices:
            text += f", one of {', '.join(choices)}"
        group.add_argument(field_flag(cls, name), dest=_dest(cls, name), type=kind,
                           default=defaults.get(name, field.default),
                           help=text.replace("%", "%%"))


def add_config_flags(group, *names: str, **defaults) -> None:
    """One flag per named :class:`SFPKConfig` field (see :func:`add_field_flags`)."""
    add_field_flags(group, SFPKConfig, *names, **defaults)


def add_execution_flags(parser: argparse.ArgumentParser, *, mesh_batch: bool = True) -> None:
    """The flags of how a run executes: particle mode, workers, precision, devices.

    They change how the work runs, not what it computes, so ``--resume`` may
    change them (announced); their attributes are collected in
    :data:`EXECUTION_DESTS`.

    Args:
      parser: the script's parser.
      mesh_batch: add ``--mesh-batch``, ``--conv-chunk`` and ``--data-parallel``
        too (the experiments with a training harness).
    """
    g = parser.add_argument_group("execution (may change on --resume)")
    before = {a.dest for a in parser._actions}
    add_field_flags(g, Execution, "particle_mode", "workers", "particle_chunk", "compute_dtype")
    if mesh_batch:
        g.add_argument("--mesh-batch", type=int, default=1,
                       help="--particle-mode shard: devices that split each particle's mini-batch "
                            "(the rest split the particles)")
        g.add_argument("--conv-chunk", type=_chunk, default="auto",
                       help="run the model's convolutions (training, evaluation and pruning) "
                            "over chunks of this many examples: the same model up to float "
                            "rounding, faster on a CPU at batches of 128 and more "
                            "(benchmarks/RESULTS.md); 0: whole batches; auto (the default): 32 "
                            "on a CPU, 0 on accelerators")
        g.add_argument("--data-parallel", action="store_true",
                       help="(re)train data-parallel: every batch split over all devices (always "
                            "so with --num-processes > 1)")
    EXECUTION_DESTS.update({a.dest for a in parser._actions} - before)


def _chunk(text: str) -> int | str:
    """``--conv-chunk``'s value: ``auto`` or an int (checked with the other flags)."""
    return text if text == "auto" else int(text)


def sfpk_config(args: argparse.Namespace) -> SFPKConfig:
    """What the simulation computes: the fields ``args`` has flags for, the others default.

    Raises:
      sfpk_jax.ConfigError: a flag holds a value the config does not allow
        (its ``field`` names the field, :func:`field_flag` the flag).
    """
    return SFPKConfig(**_by_field(SFPKConfig, vars(args)))


def execution(args: argparse.Namespace, particles: int | None = None) -> Execution:
    """How the simulation runs: the execution flags, progress as :func:`bars` says.

    Args:
      args: the parsed flags.
      particles: the simulation's particle count, for the mesh of
        ``--particle-mode shard --mesh-batch B`` (default ``--particles``).

    Raises:
      sfpk_jax.ConfigError: a flag holds a value the execution does not allow.
    """
    values = _by_field(Execution, vars(args))
    if "conv_chunk" in values:
        # The model of build_model runs its convolutions in chunks of --conv-chunk already.
        values["conv_chunk"] = 0
    if values.get("particle_mode") == "shard" and getattr(args, "mesh_batch", 1) > 1:
        values["mesh"] = default_mesh(particles or args.particles, args.mesh_batch)
    return Execution(**{**values, "progress": bars(args)})


def add_n_m_flag(group, help_more: str = "") -> None:
    """``--n-m N:M``: N:M masks (resolved by ``n_m_flags.resolve``)."""
    group.add_argument("--n-m", default=None, metavar="N:M",
                       help="keep N of every M consecutive weights along each kernel's input axis "
                            "(2:4 is what NVIDIA's sparse tensor cores run): sets --mask-dim N:M "
                            f"and --sparsity 1 - N/M{help_more}")


def n_m_of(args: argparse.Namespace) -> str | None:
    """The run's N:M pattern (``"2:4"``), or None when its masks are not N:M."""
    pattern = n_m.from_mask_dim(getattr(args, "mask_dim", None))
    return None if pattern is None else str(pattern)


def prunable(args: argparse.Namespace, apply_fn, variables: dict, image_shape):
    """The runs' prunable leaves: the default rule, or with ``--mask-dim`` the model's layers
    (read off its loss on shapes alone: channel axes, the classes kept)."""
    if args.mask_dim is None:
        return None
    return layers_of(apply_fn, variables, image_shape)


def bars(args: argparse.Namespace) -> bool:
    """Progress bars, or plain lines: bars only on a terminal and without ``--no-progress``.

    Only process 0 of several shows bars (read from the flags: this runs
    before ``jax.distributed`` starts).

    A captured log (stdout redirected, a batch job) gets one plain line per
    epoch and per 10 SFPK steps instead of a bar's carriage-return updates.
    """
    return (not args.no_progress and sys.stdout.isatty() and sys.stderr.isatty()
            and getattr(args, "process_id", 0) == 0)


def add_common_flags(parser: argparse.ArgumentParser, **defaults) -> None:
    """The flags every experiment takes (see ``common_checks``).

    Args:
      parser: the script's parser.
      **defaults: the script's defaults, by attribute name (``steps``,
        ``prune_batch_size``, ``vote_momentum``, ...).
    """
    one_line_errors(parser)
    d = {"data_dir": None, "dataset": "cifar100", "model": "resnet20", "pruner": "sfpk",
         "sparsity": 0.95, "prune_batch_size": 512, "batch_size": 64, "pretrain_epochs": 0,
         "epochs": 100, "seed": 0, **defaults}
    config = _by_field(SFPKConfig, d)
    g = parser.add_argument_group("common")
    g.add_argument("--out", required=True, type=path_arg,
                   help="output directory (~ and $VARIABLES are expanded, as in every path flag)")
    g.add_argument("--overwrite", action="store_true",
                   help="start again in an --out that holds a finished or interrupted run "
                        "(removes the files and checkpoints the experiments wrote there, "
                        "nothing else)")
    g.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its last checkpoints; the "
                        "flags must be the run's (--lr and the execution flags may change, "
                        "see docs/long_runs.md)")
    g.add_argument("--checkpoint-every", type=int, default=10,
                   help="SFPK steps between simulation checkpoints (training: every epoch)")
    g.add_argument("--checkpoint-steps", type=int, default=500,
                   help="training steps between checkpoints within an epoch (with the data "
                        "iterator's state, so --resume continues mid-epoch)")
    g.add_argument("--data-workers", type=int, default=0,
                   help="processes that read, decode and augment the data (grain mp_prefetch; "
                        "0: the main process, with reader threads)")
    g.add_argument("--data-dir", default=d["data_dir"], type=path_arg,
                   help="folder with the dataset (tfds data_dir, or the CIFAR python folders)")
    g.add_argument("--dataset", default=d["dataset"], help=f"one of {', '.join(DATASETS)}")
    g.add_argument("--model", default=d["model"], help="a registered model name")
    g.add_argument("--pruner", default=d["pruner"], help=f"one of {', '.join(pruners.names())}")
    g.add_argument("--sparsity", type=float, default=d["sparsity"],
                   help="fraction of prunable weights removed (0.95 keeps 5%%)")
    add_config_flags(g, "scope", "mask_dim", "dynamics_scope", "local_polarizer", **config)
    add_n_m_flag(g)
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="training batch size")
    g.add_argument("--pretrain-epochs", type=int, default=d["pretrain_epochs"],
                   help="epochs of dense pretraining when no --dense-checkpoint is given")
    g.add_argument("--dense-checkpoint", default=None, type=path_arg,
                   help="orbax checkpoint folder of the dense model (OUT/checkpoints/dense of "
                        "experiments.pretrain); checked against --model before anything is written")
    g.add_argument("--epochs", type=int, default=d["epochs"], help="(re)training epochs")
    g.add_argument("--seed", type=int, default=d["seed"],
                   help="seed of the model's initialisation, the data order and the pruners")
    g.add_argument("--bn-batches", type=int, default=2,
                   help="training batches that re-estimate batch-norm statistics after pruning")
    g.add_argument("--smoke", action="store_true",
                   help="a quick check of the whole pipeline (about a minute on a CPU): the "
                        "embedded digits unless --dataset or --data-dir is given, small_cnn "
                        "unless --model is, the first 256/128 examples, and tiny sizes for the "
                        "size flags not given (flags given are kept as given)")
    g.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    compile_cache.add_flags(g, path_arg)
    s = parser.add_argument_group("SFPK (defaults: the paper's)")
    add_config_flags(s, "steps", "particles", **config)
    s.add_argument("--prune-batch-size", type=int, default=d["prune_batch_size"],
                   help="mini-batch per particle and step")
    add_config_flags(s, "radius", "repulsion", "schedule", "sparsity_fn", "polarizer",
                     "repulsion_mode", "vote_mode", "vote_ratio", "vote_momentum", **config)
    s.add_argument("--synflow-iterations", type=int, default=1,
                   help="SynFlow pruning rounds: 1 is the official code's single shot, the "
                        "SynFlow paper uses 100")
    add_execution_flags(parser)
    h = parser.add_argument_group("processes (one per host, see docs/many_devices.md)")
    h.add_argument("--coordinator-address", default=None,
                   help="HOST:PORT of process 0, where the processes meet (with --num-processes "
                        "> 1); the same on every host")
    h.add_argument("--num-processes", type=int, default=1,
                   help="processes of the run, one per host, each with all its local devices")
    h.add_argument("--process-id", type=int, default=0,
                   help="this process's index in [0, --num-processes); process 0 writes the "
                        "outputs")


def add_recipe_flags(parser: argparse.ArgumentParser, *, lr, momentum, weight_decay,
                     warmup_epochs, warmup_start=1e-4, label_smoothing=0.0) -> None:
    """Optimizer recipe flags (SGD, cosine schedule with linear warm-up); see ``recipe_checks``."""
    g = parser.add_argument_group("training recipe")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    g.add_argument("--momentum", type=float, default=momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=weight_decay,
                   help="L2 weight decay, added to the gradient (as torch.optim.SGD does)")
    g.add_argument("--warmup-epochs", type=int, default=warmup_epochs,
                   help="epochs of linear warm-up from --warmup-start to --lr before the cosine "
                        "decay (cut to the phase's epochs - 1)")
    g.add_argument("--warmup-start", type=float, default=warmup_start,
                   help="learning rate at step 0")
    g.add_argument("--label-smoothing", type=float, default=label_smoothing,
                   help="label smoothing of the training cross-entropy, in [0, 1)")
