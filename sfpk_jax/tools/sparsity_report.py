"""Per-layer sparsity of a pruned model: what the masks remove, and what the weights hold.

:func:`sparsity_report` counts, for every masked parameter, the weights it
has, the weights its mask keeps (a channel mask counts every weight it
covers), the weights that are non-zero as the parameter is now, and the
pruned entries that are non-zero: *regrown*, the sign of training without
:func:`sfpk_jax.keep_masked` (or of masks that are not this model's). Asked
for an N:M pattern (``n_m="2:4"``), it also counts every kernel's groups that
keep more than N (:func:`sfpk_jax.is_n_m`). The report is data (a
NamedTuple, ``as_dict`` for JSON) and prints as a table that flags every
layer with regrown entries.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from sfpk_jax.core import n_m as n_m_lib
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
      n_m_broken: with ``n_m`` asked for, the kernel's groups that keep more
        than N (0: it conforms); None for a leaf that is no kernel, or when
        no pattern was asked for.
    """

    path: str
    shape: tuple[int, ...]
    mask_shape: tuple[int, ...]
    weights: int
    kept: int
    sparsity: float
    nonzero: int
    regrown: int
    n_m_broken: int | None = None


class SparsityReport(NamedTuple):
    """Every masked parameter's :class:`LayerSparsity`, and the totals over them.

    Attributes:
      layers: one row per masked parameter, in the params tree's order.
      weights: all entries of the masked parameters.
      kept: the entries the masks keep.
      sparsity: the fraction the masks remove, ``1 - kept / weights``.
      nonzero: the non-zero entries of the parameters as they are.
      regrown: pruned entries that are non-zero, over all layers.
      n_m: the N:M pattern checked (``"2:4"``), or None.
      n_m_broken: the groups that break it, over all kernels (None without ``n_m``).
    """

    layers: tuple[LayerSparsity, ...]
    weights: int
    kept: int
    sparsity: float
    nonzero: int
    regrown: int
    n_m: str | None = None
    n_m_broken: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able dict: the totals and ``layers`` as a list of dicts."""
        totals = {k: getattr(self, k) for k in ("weights", "kept", "sparsity", "nonzero", "regrown",
                                                "n_m", "n_m_broken")}
        return {**totals, "layers": [{**row._asdict(), "shape": list(row.shape),
                                      "mask_shape": list(row.mask_shape)} for row in self.layers]}

    def table(self) -> str:
        """The report as a plain-text table, one line per parameter and a total.

        A layer with pruned entries that are non-zero ends in ``regrown: N``.
        With ``n_m`` a column after the sparsity says ``ok`` for a kernel
        that conforms, else how many of its groups break the pattern
        (``3 groups break``).
        """
        check = () if self.n_m is None else (self.n_m,)
        header = ("parameter", "shape", "mask", "weights", "kept", "nonzero", "sparsity",
                  *check, "")
        rows = [(r.path, "x".join(map(str, r.shape)) or "()",
                 "x".join(map(str, r.mask_shape)) or "()", f"{r.weights:,}", f"{r.kept:,}",
                 f"{r.nonzero:,}", f"{r.sparsity:.4f}", *_conformity(check, r.n_m_broken),
                 _flag(r.regrown)) for r in self.layers]
        rows.append(("total", "", "", f"{self.weights:,}", f"{self.kept:,}", f"{self.nonzero:,}",
                     f"{self.sparsity:.4f}", *_conformity(check, self.n_m_broken),
                     _flag(self.regrown)))
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        numbers = range(3, 7)  # right-aligned; names, shapes and words to the left
        lines = []
        for n, row in enumerate([header, *rows]):
            lines.append("  ".join(c.rjust(w) if i in numbers else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(row, widths))).rstrip())
            if n in (0, len(rows) - 1):
                lines.append("  ".join("-" * w for w in widths[:-1]))  # the flag needs none
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _flag(regrown: int) -> str:
    return f"regrown: {regrown:,}" if regrown else ""


def _conformity(check: tuple, broken: int | None) -> tuple[str, ...]:
    """The N:M column's cell (none without a pattern): ok, how many groups break, or blank."""
    if not check or broken is None:
        return ("",) * len(check)
    if broken == 0:
        return ("ok",)
    return ("1 group breaks" if broken == 1 else f"{broken:,} groups break",)


def sparsity_report(masks: PyTree, params: PyTree, *, n_m: str | None = None) -> SparsityReport:
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
      n_m: optionally an N:M pattern such as ``"2:4"``: every masked kernel
        (a ``kernel`` or ``weight`` of rank >= 2, grouped along its input
        axis as :func:`sfpk_jax.is_n_m` does) gets the count of its groups
        that keep more than N (``n_m_broken``; 0: it conforms).

    Returns:
      A :class:`SparsityReport`.

    Raises:
      ValueError: the masks do not fit ``params``, or hold other values than
        0 and 1 (the leaf is named), or no leaf holds a mask, or a bad ``n_m``.
    """
    pattern = None if n_m is None else n_m_lib.parse(n_m)
    rows = []
    for name, (m, p) in named_masks(masks, params).items():
        shape, values = tuple(np.shape(p)), np.asarray(p)
        covered = np.broadcast_to(np.asarray(m) != 0, shape)
        weights, kept = int(np.prod(shape)), int(np.count_nonzero(covered))
        axis = None if pattern is None else n_m_lib.input_axis(name, shape)
        rows.append(LayerSparsity(name, shape, tuple(np.shape(m)), weights, kept,
                                  (weights - kept) / max(weights, 1),
                                  int(np.count_nonzero(values)),
                                  int(np.count_nonzero(values[~covered])),
                                  None if axis is None else n_m_lib.broken_groups(covered, axis,
                                                                                  pattern)))
    if not rows:
        raise ValueError("no leaf of the mask tree holds a mask")
    weights, kept = sum(r.weights for r in rows), sum(r.kept for r in rows)
    broken = None if pattern is None else sum(r.n_m_broken or 0 for r in rows)
    return SparsityReport(tuple(rows), weights, kept, (weights - kept) / weights,
                          sum(r.nonzero for r in rows), sum(r.regrown for r in rows),
                          None if pattern is None else str(pattern), broken)
