"""A run's output folder: its lock, config.json, ``--resume``, ``--overwrite``, checkpoint_files."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from experiments.harness import environment, rundir
from experiments.harness.distributed import is_main
from experiments.harness.flags import EXECUTION_DESTS, fail, flag_name
from sfpk_jax.storage import checkpoint_files, files

# Flags that may differ between a run and its --resume: they change where
# things are and what is shown, not what is computed. The environment
# (versions, machine) is a record, not a flag: see harness/environment.py.
RESUME_IGNORES = ("out", "overwrite", "resume", "no_progress", "checkpoint_every", "data_dir",
                  "compile_cache", "no_compile_cache", environment.KEY, "data",
                  "coordinator_address", "process_id")
# The data's fingerprint in config.json (see harness/datafp.py): compared on
# --resume apart from the flags, so moved data (--data-dir) is fine, other data is not.
DATA_KEY = "data"
# Flags a --resume may change on purpose: the learning rate, to get past a
# diverged (NaN) epoch, and the execution flags (flags.EXECUTION_DESTS), when
# the run moves to another machine (they change float rounding only). A change
# is announced and recorded in config.json under RESUME_LOG; the run is then
# no longer bit-equal to an uninterrupted one.
RESUME_MAY_CHANGE_ALSO = ("lr", "pretrain_lr")
# Flags newer than some runs' config.json, with the value those runs had. The
# process count may not change on --resume: each process's share of the
# batches, and the data iterators' saved state, depend on it.
ADDED_FLAGS = {"num_processes": 1, "conv_chunk": 0}
RESUME_LOG = "resume_changes"
# What --overwrite removes before starting again, and nothing else: the files
# the experiments write (results.json first: it marks a finished run), then
# the checkpoint folders they write under checkpoints/ (and orbax's temporary
# folders of those). A user's own file in --out is never touched.
RUN_FILES = ("results.json", "summary.json", "table.md", "metrics.csv", "config.json",
             "accuracy.png", "sparsity_per_layer.png", "sfpk_trace.png", "accuracy_vs_sparsity.png")
RUN_CHECKPOINTS = re.compile(r"(dense|pruned|final|round\d+|(train|prune|sfpk)-[A-Za-z0-9._-]+"
                             r"|values\.json)(\.orbax-checkpoint-tmp\S*)?")
# How to get past a damaged checkpoint.
DAMAGED = ("pass --overwrite to start the run again (or, when the folder holds an earlier step, "
           "remove the damaged step's folder to resume from the one before)")


def _config_changes(out: Path, args: argparse.Namespace) -> list[tuple[str, Any, Any]]:
    """The flags that differ from config.json and may (the lr, the execution flags); others fail."""
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
        old, new = saved.get(key, ADDED_FLAGS.get(key, absent)), now.get(key, absent)
        if old != new:
            may = key in RESUME_MAY_CHANGE_ALSO or key in EXECUTION_DESTS
            (allowed if may else differ).append((key, old, new))
    if differ:
        listed = "; ".join(f"{flag_name(k)} was {old!r}, now {new!r}" for k, old, new in differ)
        fail(f"--resume: the flags differ from those of the interrupted run in {out} "
             f"(config.json): {listed}. Resume with the run's flags, or pass --overwrite to "
             "start again")
    return allowed


def _written(out: Path) -> list[Path]:
    """What --overwrite removes in ``out``: the run's own files and checkpoints, results first."""
    found = [out / name for name in RUN_FILES if (out / name).is_file()]
    folder = out / "checkpoints"
    if folder.is_dir() and not folder.is_symlink():
        found += sorted(p for p in folder.iterdir() if RUN_CHECKPOINTS.fullmatch(p.name))
    return found


def _inside(path: str, parent: Path) -> bool:
    """``path`` is ``parent`` or lies under it (links resolved)."""
    child, parent = Path(path).resolve(), parent.resolve()
    return child == parent or parent in child.parents


def inputs_kept(args: argparse.Namespace, reads: dict[str, str | None]) -> None:
    """Exits 2 when ``--overwrite`` would delete something this run reads.

    Args:
      args: the parsed flags.
      reads: flag -> the path it names (None: not given), e.g. ``--dense-checkpoint``.
    """
    if not args.overwrite:
        return
    doomed = _written(Path(args.out))
    for flag, path in reads.items():
        hit = next((p for p in doomed if path and _inside(path, p)), None)
        if hit is not None:
            fail(f"{flag}={path!r} is not allowed with --overwrite --out={args.out!r}: "
                 f"--overwrite deletes {hit}, which this run reads. Copy it out of --out first, "
                 "or choose another --out")


def _wipe(out: Path) -> None:
    """What --overwrite removes (:func:`_written`): results first, then the rest."""
    for path in _written(out):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    try:
        (out / "checkpoints").rmdir()
    except OSError:  # absent, or it holds something that is not the run's
        pass


def check_out_state(args: argparse.Namespace) -> tuple[bool, bool]:
    """``(finished, started)`` for ``--out``; exits 2 when the flags do not fit that state."""
    out = Path(args.out)
    if rundir.is_busy(out):
        fail(f"another process is running in {out} (it holds {out / rundir.LOCK_NAME}): wait for it "
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


def _same_data(out: Path, data: dict | None) -> None:
    """Exits 2 when config.json records other data than ``data`` (runs that record none pass)."""
    saved = json.loads((out / "config.json").read_text()).get(DATA_KEY)
    if data is None or not isinstance(saved, dict):
        return
    differ = [f"{key} was {saved.get(key)!r}, now {value!r}" for key, value in data.items()
              if saved.get(key) != value]
    if differ:
        fail(f"--resume: the data differ from those the interrupted run in {out} trained on "
             f"(config.json, {DATA_KEY!r}): {'; '.join(differ)}. Resume with the run's data, or "
             "pass --overwrite to start again")


def start(args: argparse.Namespace, data: dict | None = None) -> Path:
    """Prepares ``--out`` and writes config.json, or checks it on ``--resume``.

    * a new (or unrelated) folder: a fresh run;
    * a finished run (results.json): needs ``--overwrite``, which removes its
      results, metrics and checkpoints first; with ``--resume`` and the same
      flags there is nothing to do (exit 0);
    * an interrupted run (config.json or checkpoints, no results.json): needs
      ``--resume`` (same flags) or ``--overwrite``.

    Every refusal is one line on stderr and exit code 2.

    Args:
      args: the parsed flags.
      data: the data's fingerprint (sizes and digests, see
        :func:`experiments.harness.datafp.fingerprint`), recorded in config.json;
        a ``--resume`` on other data is refused, naming what differs.

    Returns:
      The output folder.
    """
    out = Path(args.out)
    finished, started = check_out_state(args)
    if out.is_dir():
        _lock(out)
    if args.resume:
        if not (out / "config.json").exists():
            fail(f"--resume: {out} holds checkpoints but no config.json, so they cannot be "
                 "checked against the flags: pass --overwrite to start again")
        changes = _config_changes(out, args)
        _same_data(out, data)
        if finished:
            print(f"{out} already holds the finished results of this run (results.json): "
                  "nothing to resume", file=sys.stderr)
            raise SystemExit(0)
        if changes:
            saved = json.loads((out / "config.json").read_text())
            log = saved.get(RESUME_LOG, [])
            for key, old, new in changes:
                saved[key] = new
                log.append({"flag": flag_name(key), "old": old, "new": new})
                print(f"warning: resuming with {flag_name(key)}={new!r} (the run used {old!r}): "
                      "what is computed from here on is no longer bit-for-bit what an "
                      "uninterrupted run computes", file=sys.stderr)
            saved[RESUME_LOG] = log
            files.write_json(out / "config.json", saved)
        print(f"resuming the run in {out} from its checkpoints", file=sys.stderr)
        return out
    if args.overwrite and (finished or started):
        _wipe(out)
    try:
        out = rundir.prepare_out_dir(out, overwrite=args.overwrite)
    except (rundir.OutputExistsError, PermissionError) as err:
        fail(str(err))
    _lock(out)
    files.write_json(out / "config.json", {**vars(args), environment.KEY: environment.environment(),
                                           **({} if data is None else {DATA_KEY: data})})
    return out


def _lock(out: Path) -> None:
    try:
        rundir.lock_dir(out)
    except rundir.DirectoryBusyError as err:
        fail(str(err))
    except OSError as err:
        fail(f"cannot use {out}: {err}; choose another --out")


def checkpoint_dir(args: argparse.Namespace) -> Path:
    """``OUT/checkpoints``."""
    return Path(args.out).absolute() / "checkpoints"


def slug(name: str) -> str:
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
    checkpoint_files.save(path, tree, overwrite=args.overwrite)


def remember(args: argparse.Namespace, name: str, compute, inputs) -> Any:
    """``compute()``, recorded in ``checkpoints/values.json``; on ``--resume`` read back.

    For values that are costly to recompute on a resume (a full test-set
    evaluation). ``inputs`` (a pytree) must be what the value depends on: the
    stored value is used only when their sha256 matches.
    """
    path = checkpoint_dir(args) / "values.json"
    digest = checkpoint_files.tree_digest(inputs)

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
    if not is_main():
        return value
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, {**read(), name: {"inputs_sha256": digest, "value": value}})
    return value
