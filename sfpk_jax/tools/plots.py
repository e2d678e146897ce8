"""Figures every experiment writes: accuracy vs sparsity and the SFPK trace."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; experiments run headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sfpk_jax.storage import files  # noqa: E402


def _save(fig, path: str) -> None:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    files.write_bytes(path, buffer.getvalue())


def accuracy_vs_sparsity(records: Sequence[Mapping], path: str, dense_acc: float | None = None) -> None:
    """One line per pruner: test accuracy right after pruning and after retraining.

    Args:
      records: dicts with ``pruner``, ``sparsity``, ``acc_pruned``, ``acc_retrained``.
      path: where to save the PNG.
      dense_acc: accuracy of the dense model, drawn as a reference line.
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, pruner in enumerate(sorted({r["pruner"] for r in records})):
        rows = sorted((r for r in records if r["pruner"] == pruner), key=lambda r: r["sparsity"])
        x = [100 * r["sparsity"] for r in rows]
        color = f"C{i}"
        ax.plot(x, [r["acc_retrained"] for r in rows], "o-", color=color, label=f"{pruner}, retrained")
        ax.plot(x, [r["acc_pruned"] for r in rows], "s--", color=color, alpha=0.6,
                label=f"{pruner}, right after pruning")
    if dense_acc is not None:
        ax.axhline(dense_acc, color="gray", lw=1, ls=":", label="dense")
    ax.set_xlabel("sparsity (% of prunable weights removed)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def sfpk_trace(traces: Mapping[str, Mapping[str, np.ndarray]], path: str) -> None:
    """Every particle's density G and energy E over the SFPK steps.

    Args:
      traces: label (e.g. the sparsity) -> an ``SFPKResult.trace`` dict.
      path: where to save the PNG.
    """
    fig, (ax_g, ax_e) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (label, trace) in enumerate(traces.items()):
        g, e = np.asarray(trace["density"]), np.asarray(trace["energy"])
        steps = np.arange(1, g.shape[0] + 1)
        for p in range(g.shape[1]):
            kwargs = {"label": label} if p == 0 else {}
            ax_g.plot(steps, g[:, p], color=f"C{i}", lw=0.8, alpha=0.7, **kwargs)
            ax_e.plot(steps, e[:, p], color=f"C{i}", lw=0.8, alpha=0.7, **kwargs)
    ax_g.set_yscale("log")
    ax_g.set_xlabel("SFPK step")
    ax_g.set_ylabel("density G(m) of each particle")
    ax_e.set_xlabel("SFPK step")
    ax_e.set_ylabel("polarized energy E(m) of each particle")
    for ax in (ax_g, ax_e):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def accuracy_over_epochs(rows: Sequence[Mapping], path: str) -> None:
    """Test accuracy per epoch, one line per phase (pretrain, retrain, ...).

    Args:
      rows: ``metrics.csv`` rows with ``phase``, ``epoch`` and ``test_acc``.
      path: where to save the PNG.
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    offset = 0
    for phase in dict.fromkeys(r["phase"] for r in rows):
        part = [r for r in rows if r["phase"] == phase]
        ax.plot([offset + r["epoch"] for r in part], [r["test_acc"] for r in part], "o-", ms=3,
                label=phase)
        offset += len(part)
    ax.set_xlabel("epoch (all phases in order)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def layer_density(density: Mapping[str, float], path: str) -> None:
    """Bars of the kept fraction of every pruned layer.

    Args:
      density: '/'-joined parameter path -> kept fraction.
      path: where to save the PNG.
    """
    names = list(density)
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names)), 4))
    ax.bar(range(len(names)), [density[n] for n in names])
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_ylabel("kept fraction")
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)
