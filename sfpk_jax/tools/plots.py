"""Figures the experiments write: accuracy vs sparsity, the SFPK trace, accuracy per epoch.

Every function saves one PNG and returns its (closed) matplotlib Figure, so a
caller or a test can read the titles, labels and lines back. Each figure
carries a title (say, the model, the dataset and the sparsity) so that it
reads without the README.
"""

from __future__ import annotations

import io
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; experiments run headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from sfpk_jax.storage import files  # noqa: E402

# Accuracy within this much of the dense model's is shaded as the dense band.
DENSE_BAND = 0.01
TRACE_ENERGY_LABEL = "loss at the binarised mask\n(polarized energy E(m))"


def _save(fig: Figure, path: str) -> Figure:
    """Writes ``fig`` atomically (PNG unless ``path`` says otherwise), closes and returns it."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    files.write_bytes(path, buffer.getvalue())
    return fig


def accuracy_vs_sparsity(records: Sequence[Mapping], path: str, dense_acc: float | None = None,
                         *, title: str | None = None) -> Figure:
    """One line per pruner: test accuracy right after pruning and after retraining.

    Args:
      records: dicts with ``pruner``, ``sparsity``, ``acc_pruned`` and
        ``acc_retrained``; with ``acc_pruned_std`` / ``acc_retrained_std``
        (means over seeds) the spread is drawn as error bars; an ``n_m``
        (say ``"2:4"``) is written under its sparsity's tick.
      path: where to save the PNG.
      dense_acc: the dense model's accuracy, drawn as a shaded band from it to
        :data:`DENSE_BAND` below, behind the points (a line there would hide
        the points of mild sparsities, which sit right at it).
      title: the figure's title (model, dataset, retraining).

    Returns:
      The Figure.
    """
    fig, ax = plt.subplots(figsize=(9, 4.2))
    if dense_acc is not None:
        ax.axhspan(dense_acc - DENSE_BAND, dense_acc, color="0.85", zorder=0,
                   label=f"dense model: {dense_acc:.3f} (band: up to {100 * DENSE_BAND:g} "
                         "point below)")
    for i, pruner in enumerate(sorted({r["pruner"] for r in records})):
        rows = sorted((r for r in records if r["pruner"] == pruner), key=lambda r: r["sparsity"])
        x = [100 * r["sparsity"] for r in rows]
        for key, style, what in (("acc_retrained", "o-", "retrained"),
                                 ("acc_pruned", "s--", "right after pruning")):
            spread = [r[f"{key}_std"] for r in rows] if f"{key}_std" in rows[0] else None
            ax.errorbar(x, [r[key] for r in rows], yerr=spread, fmt=style, color=f"C{i}",
                        alpha=1.0 if key == "acc_retrained" else 0.6, capsize=3, zorder=3,
                        label=f"{pruner}, {what}")
    patterns = {100 * r["sparsity"]: r.get("n_m") for r in records}
    sparsities = sorted(patterns)
    ax.set_xticks(sparsities, [f"{s:g}%" + (f"\n({patterns[s]})" if patterns[s] else "")
                               for s in sparsities])
    ax.set_xlabel("sparsity (share of prunable weights removed)")
    ax.set_ylabel("test accuracy (top-1)")
    ax.set_title(title or "accuracy vs sparsity", fontsize=10)
    # Beside the axes: inside, it would cover points wherever they fall.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _band(ax, steps, values: np.ndarray, color: str, label: str) -> None:
    """The particles' mean as a line and their min-max range as a band."""
    ax.fill_between(steps, values.min(axis=1), values.max(axis=1), color=color, alpha=0.25, lw=0)
    ax.plot(steps, values.mean(axis=1), color=color, lw=1.5, label=label)


def sfpk_trace(traces: Mapping[str, Mapping[str, np.ndarray]], path: str, *,
               targets: Mapping[str, float] | None = None, title: str | None = None) -> Figure:
    """The particles' G and energy E over the SFPK steps: mean line, min-max band.

    Args:
      traces: label (e.g. the sparsity) -> an ``SFPKResult.trace`` dict, whose
        ``G`` and ``E`` are ``(steps, particles)`` arrays.
      path: where to save the PNG.
      targets: label -> the target density (1 - sparsity), which G falls to,
        drawn as a dashed line.
      title: the figure's title (model, dataset, particles).

    Returns:
      The Figure.
    """
    fig, (ax_g, ax_e) = plt.subplots(1, 2, figsize=(11, 5.2))
    targets = targets or {}
    for i, (label, trace) in enumerate(traces.items()):
        g, e = np.asarray(trace["G"]), np.asarray(trace["E"])
        steps = np.arange(1, g.shape[0] + 1)
        color = f"C{i}"
        _band(ax_g, steps, g, color, f"{label}: {g.shape[1]} particles")
        _band(ax_e, steps, e, color, label)
        if label in targets:
            ax_g.axhline(targets[label], color=color, ls="--", lw=1,
                         label=f"{label}: target {targets[label]:.3g}")
    ax_g.set_yscale("log")
    ax_g.set_ylabel("G(m): the particle's density (1 = dense; log scale)")
    ax_g.set_title("G of the particles (line: mean, band: min to max)", fontsize=9)
    ax_e.set_ylabel(TRACE_ENERGY_LABEL)
    ax_e.set_title("each particle's loss on its mini-batch (line: mean, band: min to max)",
                   fontsize=9)
    for ax in (ax_g, ax_e):
        ax.set_xlabel("SFPK step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        # Below the axes: inside, it covers the curves wherever they go (G can
        # rise above 1 when the steps are large).
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.suptitle(title or "SFPK particles", fontsize=10)
    return _save(fig, path)


def accuracy_over_epochs(rows: Sequence[Mapping], path: str, *,
                         pruned_before: Collection[str] = (), title: str | None = None) -> Figure:
    """Test accuracy per epoch, one line per phase (pretrain, retrain, round1, ...).

    Args:
      rows: ``metrics.csv`` rows with ``phase``, ``epoch`` and ``test_acc``.
      path: where to save the PNG.
      pruned_before: the phases that start from a freshly pruned model; a
        vertical line marks where each begins.
      title: the figure's title (model, dataset, pruner and sparsity).

    Returns:
      The Figure.
    """
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    offset, marked = 0, False
    for phase in dict.fromkeys(r["phase"] for r in rows):
        part = [r for r in rows if r["phase"] == phase]
        if phase in pruned_before:
            ax.axvline(offset + 0.5, color="0.3", ls=":", lw=1.2,
                       label=None if marked else "pruning")
            marked = True
        ax.plot([offset + int(r["epoch"]) for r in part], [float(r["test_acc"]) for r in part],
                "o-", ms=3, label=phase)
        offset += len(part)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (all phases in order)")
    ax.set_ylabel("test accuracy (top-1)")
    ax.set_title(title or "test accuracy per epoch", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside: covers nothing
    return _save(fig, path)


def layer_sparsity(sparsity: Mapping[str, float], path: str, *, overall: float | None = None,
                   title: str | None = None) -> Figure:
    """Bars of the removed share (sparsity) of every pruned layer.

    Args:
      sparsity: '/'-joined parameter path -> removed share.
      path: where to save the PNG.
      overall: the sparsity over all pruned layers, drawn as a dashed line.
      title: the figure's title (model, dataset, pruner and sparsity).

    Returns:
      The Figure.
    """
    names = list(sparsity)
    values = [sparsity[n] for n in names]
    fig, ax = plt.subplots(figsize=(max(6.5, 0.3 * len(names)), 4.5))
    ax.bar(range(len(names)), values, label="layer")
    # A tick on every bar's top, so that a layer at 0 (left dense) shows too.
    ax.scatter(range(len(names)), values, marker="_", s=120, color="k", zorder=3, clip_on=False,
               label="its value")
    ax.set_ylim(0, 1.05)
    if overall is not None:
        ax.axhline(overall, color="C3", ls="--", lw=1, label=f"all layers: {overall:.3g}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8 if len(names) <= 20 else 6)
    ax.set_ylabel("sparsity (removed share of the layer)")
    ax.set_title(title or "sparsity per layer", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
