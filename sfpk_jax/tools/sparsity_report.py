"""Per-layer sparsity of a pruned model: what the masks remove, and what the weights hold.

:func:`sparsity_report` counts, for every masked parameter, the weights it
has, the weights its mask keeps (a channel mask counts every weight it
covers), the weights that are non-zero as the parameter is now, and the
pruned entries that are non-zero: *regrown*, the sign of training without
:func:`sfpk_jax.keep_masked` (or of masks that are not this model's). The
report is data (a NamedTuple, ``as_dict`` for JSON) and prints as a table
that flags every layer with regrown entries.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from sfpk_jax.core.mask_checks import named_masks

PyTree = Any


class LayerSparsity(NamedTuple):
    """One masked parameter.

    Attributes:
      path: its '/'-joined path.
      shape: the parameter's shape.
      mask_shape: the mask's shape (smaller than ``shape`` for channel masks).
      weights: the parameter's entries.
      kept: the entries its mask keeps.
      sparsity: the fraction the mask removes, ``1 - kept / weights``.
      nonzero: the parameter's non-zero entries, as it is now.
      regrown: pruned entries (mask 0) that are non-zero now: 0 for a model
        trained under its masks.
    """

    path: str
    shape: tuple[int, ...]
    mask_shape: tuple[int, ...]
    weights: int
    kept: int
    sparsity: float
    nonzero: int
    regrown: int


class SparsityReport(NamedTuple):
    """Every masked parameter's :class:`LayerSparsity`, and the totals over them.

    Attributes:
      layers: one row per masked parameter, in the params tree's order.
      weights: all entries of the masked parameters.
      kept: the entries the masks keep.
      sparsity: the fraction the masks remove, ``1 - kept / weights``.
      nonzero: the non-zero entries of the parameters as they are.
      regrown: pruned entries that are non-zero, over all layers.
    """

    layers: tuple[LayerSparsity, ...]
    weights: int
    kept: int
    sparsity: float
    nonzero: int
    regrown: int

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able dict: the totals and ``layers`` as a list of dicts."""
        totals = {k: getattr(self, k) for k in ("weights", "kept", "sparsity", "nonzero", "regrown")}
        return {**totals, "layers": [{**row._asdict(), "shape": list(row.shape),
                                      "mask_shape": list(row.mask_shape)} for row in self.layers]}

    def table(self) -> str:
        """The report as a plain-text table, one line per parameter and a total.

        A layer with pruned entries that are non-zero ends in ``regrown: N``.
        """
        header = ("parameter", "shape", "mask", "weights", "kept", "nonzero", "sparsity", "")
        rows = [(r.path, "x".join(map(str, r.shape)) or "()",
                 "x".join(map(str, r.mask_shape)) or "()", f"{r.weights:,}", f"{r.kept:,}",
                 f"{r.nonzero:,}", f"{r.sparsity:.4f}", _flag(r.regrown)) for r in self.layers]
        rows.append(("total", "", "", f"{self.weights:,}", f"{self.kept:,}", f"{self.nonzero:,}",
                     f"{self.sparsity:.4f}", _flag(self.regrown)))
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = []
        for n, row in enumerate([header, *rows]):
            lines.append("  ".join(c.ljust(w) if i < 3 or i == 7 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(row, widths))).rstrip())
            if n in (0, len(rows) - 1):
                lines.append("  ".join("-" * w for w in widths[:-1]))  # the flag needs none
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _flag(regrown: int) -> str:
    return f"regrown: {regrown:,}" if regrown else ""


def sparsity_report(masks: PyTree, params: PyTree) -> SparsityReport:
    """The sparsity of every masked parameter of ``params``, and the weights as they are.

    Example:

    >>> import jax.numpy as jnp, sfpk_jax
    >>> params = {"dense": {"kernel": jnp.array([[0.1, -2.0], [0.5, 3.0]]),
    ...                     "bias": jnp.array([0.2, -0.1])}}
    >>> masks = sfpk_jax.magnitude_prune(params, 0.5)
    >>> print(sfpk_jax.sparsity_report(masks, params))  # the weights were not masked yet
    parameter     shape  mask  weights  kept  nonzero  sparsity
    ------------  -----  ----  -------  ----  -------  --------
    dense/bias    2      2           2     0        2    1.0000  regrown: 2
    dense/kernel  2x2    2x2         4     3        4    0.2500  regrown: 1
    ------------  -----  ----  -------  ----  -------  --------
    total                            6     3        6    0.5000  regrown: 3
    >>> report = sfpk_jax.sparsity_report(masks, sfpk_jax.apply_masks(params, masks))
    >>> report.sparsity, report.nonzero, report.regrown
    (0.5, 3, 0)

    Args:
      masks: a mask tree mirroring ``params`` (``None`` at leaves that are not
        pruned), e.g. ``result.masks``.
      params: the parameters the masks belong to, as they are now (their
        shapes give the weights a channel mask covers; their values the
        non-zero and regrown counts).

    Returns:
      A :class:`SparsityReport`.

    Raises:
      ValueError: the masks do not fit ``params``, or hold other values than
        0 and 1 (the leaf is named), or no leaf holds a mask.
    """
    rows = []
    for name, (m, p) in named_masks(masks, params).items():
        shape, values = tuple(np.shape(p)), np.asarray(p)
        covered = np.broadcast_to(np.asarray(m) != 0, shape)
        weights, kept = int(np.prod(shape)), int(np.count_nonzero(covered))
        rows.append(LayerSparsity(name, shape, tuple(np.shape(m)), weights, kept,
                                  (weights - kept) / max(weights, 1),
                                  int(np.count_nonzero(values)),
                                  int(np.count_nonzero(values[~covered]))))
    if not rows:
        raise ValueError("no leaf of the mask tree holds a mask")
    weights, kept = sum(r.weights for r in rows), sum(r.kept for r in rows)
    return SparsityReport(tuple(rows), weights, kept, (weights - kept) / weights,
                          sum(r.nonzero for r in rows), sum(r.regrown for r in rows))
