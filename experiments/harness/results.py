"""What a run writes about its results: metrics.csv, mask summaries, plots and results.json."""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path
from typing import Any

import jax
import numpy as np

from experiments.harness.distributed import is_main
from sfpk_jax.core import channels
from sfpk_jax.storage import files
from sfpk_jax.tools import plots
from sfpk_jax.tools.sparsity_report import sparsity_report


class Metrics:
    """Per-epoch rows, rewritten atomically to ``metrics.csv`` after every epoch (by process 0).

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
        """Appends one row (an epoch's) and rewrites the file."""
        self.rows.append(row)
        self._write()

    def restore(self, rows: list[dict]) -> None:
        """Replaces the rows (those of a restored checkpoint) and rewrites the file."""
        self.rows = [dict(r) for r in rows]
        self._write()

    def _write(self) -> None:
        if not self.rows or not is_main():
            return
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(self.rows[0]))
        writer.writeheader()
        writer.writerows(self.rows)
        files.write_text(self.path, text.getvalue())


def mask_digest(masks) -> str:
    """sha256 of the 0/1 masks in canonical (sorted-path) order."""
    flat = jax.tree_util.tree_flatten_with_path(masks)[0]
    h = hashlib.sha256()
    for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf) != 0).tobytes())
    return h.hexdigest()


def mask_results(masks, params) -> dict[str, Any]:
    """``achieved_sparsity`` (removed weights overall), ``sparsity_per_layer`` and ``mask_digest``."""
    report = sparsity_report(masks, params)
    return {"achieved_sparsity": report.sparsity,
            "sparsity_per_layer": {row.path: row.sparsity for row in report.layers},
            "mask_digest": mask_digest(masks)}


def summarize(accs: list[float]) -> dict[str, float]:
    """The test accuracies of a phase's epochs, summarised.

    Returns:
      ``final_acc``: the last epoch's, i.e. that of the model saved as
      ``checkpoints/final``; ``mean_last5_acc``: the mean over the last 5
      epochs (all, when fewer), what the paper reports; ``best_acc``: the
      highest of any epoch (chosen on the test set, so optimistic).
    """
    return {"final_acc": float(accs[-1]), "mean_last5_acc": float(np.mean(accs[-5:])),
            "best_acc": float(np.max(accs))}


def count(n: int, noun: str) -> str:
    """``"1 epoch"``, ``"2 epochs"``: for titles and messages."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def run_title(args, what: str) -> str:
    """A figure title: the model, the dataset (``--smoke`` said) and ``what`` was run."""
    smoke = " (--smoke)" if getattr(args, "smoke", False) else ""
    return f"{args.model} on {args.dataset}{smoke}: {what}"


def trace_targets(args, sparsities: dict[str, float]) -> dict[str, float]:
    """Trace label -> the target density that the trace plot draws.

    Only for weight masks: channel masks are simulated at another density
    than the weights' (the kept channels per layer), so no line is drawn.
    """
    if channels.is_channel(getattr(args, "mask_dim", None)):
        return {}
    return {label: 1.0 - sparsity for label, sparsity in sparsities.items()}


def write_outputs(out: Path, results: dict, metrics: Metrics, masks=None, traces=None, *,
                  title: str, pruned_before=(), targets=None) -> None:
    """Plots, then results.json last (its presence marks a finished run); process 0 only.

    Args:
      out: the run's folder.
      results: what results.json holds (``sparsity_per_layer`` and
        ``achieved_sparsity`` when ``masks`` is given).
      metrics: the per-epoch rows, for ``accuracy.png``.
      masks: the final masks, when the run pruned (``sparsity_per_layer.png``).
      traces: label -> SFPK trace, for ``sfpk_trace.png``.
      title: the figures' title (:func:`run_title`).
      pruned_before: the training phases that start right after pruning.
      targets: label of a trace -> its target density.
    """
    if not is_main():
        return
    plots.accuracy_over_epochs(metrics.rows, str(out / "accuracy.png"),
                               pruned_before=pruned_before, title=title)
    if masks is not None:
        plots.layer_sparsity(results["sparsity_per_layer"], str(out / "sparsity_per_layer.png"),
                             overall=results["achieved_sparsity"], title=title)
    if traces:
        plots.sfpk_trace(traces, str(out / "sfpk_trace.png"), targets=targets, title=title)
    files.write_json(out / "results.json", results)
