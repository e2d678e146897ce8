"""The experiments' flags (the SFPK ones made from ``SFPKConfig``'s fields) and one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from sfpk_jax.data import DATASETS
from sfpk_jax.harness import compile_cache
from sfpk_jax.pruners import PRUNERS
from sfpk_jax.sfpk.config import SFPKConfig

_FIELDS = {f.name: f for f in dataclasses.fields(SFPKConfig)}
_TYPES = typing.get_type_hints(SFPKConfig)
# SFPKConfig fields whose flag has another name than the field's (the
# attribute of the parsed arguments, that is); SGD's --momentum is another flag.
_DESTS = {"momentum": "vote_momentum"}
NO_PROGRESS_HELP = ("no progress bars: one plain line per epoch and per 10 SFPK steps instead "
                    "(also the case when stdout is not a terminal)")


def fail(message: str) -> typing.NoReturn:
    """Stops the run with one line on stderr and exit code 2 (no traceback)."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


def one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Makes ``parser``'s own errors (unknown flag, bad type, ...) one line and exit 2."""
    parser.error = lambda message: fail(f"{message} (see {parser.prog} --help)")


def path_arg(text: str) -> str:
    """A path flag's value with ``~`` and environment variables expanded (``--data-dir=~/data``)."""
    return os.path.expandvars(os.path.expanduser(text))


def flag_name(dest: str) -> str:
    """The flag of a parsed argument's attribute, e.g. ``--prune-batch-size``."""
    return "--" + dest.replace("_", "-")


def _dest(field: str) -> str:
    """The parsed arguments' attribute that holds the :class:`SFPKConfig` field ``field``."""
    return _DESTS.get(field, field)


def config_flag(field: str) -> str:
    """The flag that sets the :class:`SFPKConfig` field ``field``."""
    return flag_name(_dest(field))


def _by_field(values: dict) -> dict:
    """The entries of ``values`` (keyed by attribute) that hold config fields, by field name."""
    return {name: values[_dest(name)] for name in _FIELDS if _dest(name) in values}


def add_config_flags(group, *fields: str, **defaults) -> None:
    """One flag per named :class:`SFPKConfig` field, with its type, default and help.

    The values are checked by :class:`SFPKConfig` itself (see
    :func:`sfpk_config`), so a flag with fixed choices lists them in its help
    but leaves the refusal to the config.

    Args:
      group: the parser or argument group that takes the flags.
      *fields: the field names, in the order the flags are listed.
      **defaults: defaults that differ from the field's, by field name.

    Raises:
      TypeError: a field is a switch (bool): ``type=bool`` would read
        ``"False"`` as True, so such a field needs a flag of its own.
    """
    for name in fields:
        field = _FIELDS[name]
        kind = next((t for t in typing.get_args(_TYPES[name]) if t is not type(None)),
                    _TYPES[name])
        if kind is bool:
            raise TypeError(f"SFPKConfig.{name} is a switch: give it a store_true flag instead")
        text = field.metadata["help"]
        choices = [str(c) for c in field.metadata.get("choices", ()) if c is not None]
        if choices:
            text += f", one of {', '.join(choices)}"
        group.add_argument(config_flag(name), dest=_dest(name), type=kind,
                           default=defaults.get(name, field.default),
                           help=text.replace("%", "%%"))


def sfpk_config(args: argparse.Namespace) -> SFPKConfig:
    """The simulation's hyper-parameters: the fields ``args`` has flags for, the others default.

    Raises:
      sfpk_jax.sfpk.config.ConfigError: a flag holds a value the config does
        not allow (its ``field`` names the field, :func:`config_flag` the flag).
    """
    return SFPKConfig(**{**_by_field(vars(args)), "progress": bars(args)})


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
    config = _by_field(d)
    g = parser.add_argument_group("common")
    g.add_argument("--out", required=True, type=path_arg,
                   help="output directory (~ and $VARIABLES are expanded, as in every path flag)")
    g.add_argument("--overwrite", action="store_true",
                   help="start again in an --out that holds a finished or interrupted run "
                        "(removes the files and checkpoints the experiments wrote there, "
                        "nothing else)")
    g.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its last checkpoints; the "
                        "flags must be the run's (--lr and the device settings may change, "
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
    g.add_argument("--pruner", default=d["pruner"], help=f"one of {', '.join(PRUNERS)}")
    g.add_argument("--sparsity", type=float, default=d["sparsity"],
                   help="fraction of prunable weights removed (0.95 keeps 5%%)")
    add_config_flags(g, "scope", "mask_dim", "dynamics_scope", "local_polarizer", **config)
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
    compile_cache.add_flags(g)
    s = parser.add_argument_group("SFPK (defaults: the paper's)")
    add_config_flags(s, "steps", "particles", **config)
    s.add_argument("--prune-batch-size", type=int, default=d["prune_batch_size"],
                   help="mini-batch per particle and step")
    add_config_flags(s, "radius", "repulsion", "schedule", "sparsity_fn", "polarizer",
                     "repulsion_mode", "vote_mode", "vote_ratio", "momentum", "particle_mode",
                     "particle_chunk", "particle_workers", "compute_dtype", **config)
    s.add_argument("--synflow-iterations", type=int, default=1,
                   help="SynFlow pruning rounds: 1 is the official code's single shot, the "
                        "SynFlow paper uses 100")
    m = parser.add_argument_group("devices")
    m.add_argument("--mesh-batch", type=int, default=1,
                   help="--particle-mode shard: devices that split each particle's mini-batch "
                        "(the rest split the particles)")
    m.add_argument("--conv-chunk", type=int, default=None,
                   help="run every convolution over chunks of this many examples: the same "
                        "model up to float rounding, and on CPU faster SFPK steps at batches of "
                        "128 and more (benchmarks/RESULTS.md); 0: whole batches. Default: "
                        "32 on CPU, 0 on accelerators")
    m.add_argument("--data-parallel", action="store_true",
                   help="(re)train data-parallel: every batch split over all devices (always so "
                        "with --num-processes > 1)")
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
