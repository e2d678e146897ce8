"""What every experiment shares: flags, checks, the output folder, training, pruning, results.

The application side of the project: command-line flags, output folders,
run locks, exit codes and progress lines live here, beside the experiments
that use them, and not in the ``sfpk_jax`` library, which a user imports into
their own program and which never names a flag. The scripts in
``experiments/`` only choose defaults and the order of these steps. Every output goes under ``--out``: ``config.json``, ``metrics.csv``,
``results.json``, plots and orbax checkpoints under ``checkpoints/``.

Fault tolerance (see ``docs/long_runs.md``): every flag is checked before any
work or write; every training epoch, every pruning result and the SFPK
simulation (every ``--checkpoint-every`` steps) are checkpointed under
``checkpoints/``; ``--resume`` continues an interrupted run from there and
ends with the outputs an uninterrupted run would have written, bit for bit
(timings aside). Nothing in ``--out`` is deleted without ``--overwrite``.

The modules, each importing only those listed before it: :mod:`.compile_cache`
(JAX's persistent compilation cache, ``--compile-cache``), :mod:`.rundir` (the
output folder's lock), :mod:`.flags` (the flags, those of SFPK made from the
fields of :class:`sfpk_jax.SFPKConfig` and :class:`sfpk_jax.Execution`),
:mod:`.distributed` (``jax.distributed`` from the launch flags; only process 0
writes), :mod:`.progress` (bars or plain log lines), :mod:`.edge` (quiet
loggers, a full disk in one line, clean exits), :mod:`.environment` (versions
and machine for config.json), :mod:`.outdir` (the output folder, ``--resume``,
``--overwrite``), :mod:`.flag_checks` (``finish_args``, ``--smoke``),
:mod:`.results` (metrics and outputs), :mod:`.dense` (the dense model from a
file, checked before any write), :mod:`.datafp` (the data's fingerprint),
:mod:`.training` (data, model, training loop), :mod:`.pruning`.
"""

from experiments.harness.edge import guarded, run
from experiments.harness.flag_checks import (
    Check,
    batch_split_check,
    check_config,
    csv_items,
    finish_args,
    finite,
    list_check,
    out_check,
    positive_ints,
    recipe_checks,
    require,
    sparsities_check,
)
from experiments.harness.flags import (
    add_common_flags,
    add_config_flags,
    add_execution_flags,
    add_recipe_flags,
    execution,
    fail,
    n_m_of,
    one_line_errors,
    sfpk_config,
)
from experiments.harness.outdir import RESUME_LOG, remember, save_checkpoint, start
from experiments.harness.pruning import prune_model
from experiments.harness.results import (
    Metrics,
    count,
    mask_results,
    run_title,
    summarize,
    trace_targets,
    write_outputs,
)
from experiments.harness.training import (
    build_model,
    dense_model,
    eval_accuracy,
    fit,
    loaders,
    open_data,
    recompute_bn,
    setup,
)

__all__ = [
    "Check", "Metrics", "RESUME_LOG", "add_common_flags", "add_config_flags",
    "add_execution_flags", "add_recipe_flags", "execution",
    "batch_split_check", "build_model", "check_config", "count", "csv_items", "dense_model",
    "eval_accuracy", "fail",
    "finish_args", "finite", "fit", "guarded", "list_check", "loaders", "mask_results",
    "n_m_of", "one_line_errors", "open_data", "out_check", "positive_ints", "prune_model", "recipe_checks", "recompute_bn",
    "remember", "require", "run", "run_title", "save_checkpoint", "setup", "sfpk_config",
    "sparsities_check", "start", "summarize", "trace_targets", "write_outputs",
]
