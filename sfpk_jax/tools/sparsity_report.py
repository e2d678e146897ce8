"""Per-layer sparsity of a mask tree: the numbers behind "how sparse is my model?".

:func:`sparsity_report` counts, for every masked parameter, the weights it
has and the weights its mask keeps (a channel mask counts every weight it
covers), and the totals. The report is data (a NamedTuple, ``as_dict`` for
JSON) and prints as a table.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from sfpk_jax.core.masks import path_to_str

PyTree = Any


class LayerSparsity(NamedTuple):
    """One masked parameter.

    Attributes:
      path: its '/'-joined path.
      shape: the parameter's shape.
      mask_shape: the mask's shape (smaller than ``shape`` for channel masks).
      weights: the parameter's entries.
      kept: the entries its mask keeps.
      sparsity: the fraction it removes, ``1 - kept / weights``.
    """

    path: str
    shape: tuple[int, ...]
    mask_shape: tuple[int, ...]
    weights: int
    kept: int
    sparsity: float


class SparsityReport(NamedTuple):
    """Every masked parameter's :class:`LayerSparsity`, and the totals over them.

    Attributes:
      layers: one row per masked parameter, in the params tree's order.
      weights: all entries of the masked parameters.
      kept: the entries kept.
      sparsity: the fraction removed, ``1 - kept / weights``.
    """

    layers: tuple[LayerSparsity, ...]
    weights: int
    kept: int
    sparsity: float

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able dict: the totals and ``layers`` as a list of dicts."""
        return {"weights": self.weights, "kept": self.kept, "sparsity": self.sparsity,
                "layers": [{**row._asdict(), "shape": list(row.shape),
                            "mask_shape": list(row.mask_shape)} for row in self.layers]}

    def table(self) -> str:
        """The report as a plain-text table, one line per parameter and a total."""
        header = ("parameter", "shape", "mask", "weights", "kept", "sparsity")
        rows = [(r.path, "x".join(map(str, r.shape)) or "()",
                 "x".join(map(str, r.mask_shape)) or "()", f"{r.weights:,}", f"{r.kept:,}",
                 f"{r.sparsity:.4f}") for r in self.layers]
        rows.append(("total", "", "", f"{self.weights:,}", f"{self.kept:,}", f"{self.sparsity:.4f}"))
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = []
        for n, row in enumerate([header, *rows]):
            lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(row, widths))).rstrip())
            if n in (0, len(rows) - 1):
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def sparsity_report(masks: PyTree, params: PyTree) -> SparsityReport:
    """The sparsity of every masked parameter of ``params``, and in total.

    Example:

    >>> import jax.numpy as jnp, sfpk_jax
    >>> params = {"dense": {"kernel": jnp.array([[0.1, -2.0], [0.5, 3.0]]),
    ...                     "bias": jnp.array([0.2, -0.1])}}
    >>> report = sfpk_jax.sparsity_report(sfpk_jax.magnitude_prune(params, 0.5), params)
    >>> print(report)
    parameter     shape  mask  weights  kept  sparsity
    ------------  -----  ----  -------  ----  --------
    dense/bias    2      2           2     0    1.0000
    dense/kernel  2x2    2x2         4     3    0.2500
    ------------  -----  ----  -------  ----  --------
    total                            6     3    0.5000
    >>> report.sparsity, report.as_dict()["layers"][1]["kept"]
    (0.5, 3)

    Args:
      masks: a mask tree mirroring ``params`` (``None`` at leaves that are not
        pruned), e.g. ``result.masks``.
      params: the parameters the masks belong to (their shapes give the
        weights a channel mask covers).

    Returns:
      A :class:`SparsityReport`.

    Raises:
      ValueError: the trees do not match, or a mask does not broadcast to its
        parameter (the leaf is named), or no leaf holds a mask.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    try:
        mask_leaves = treedef.flatten_up_to(masks)
    except (ValueError, TypeError) as err:
        raise ValueError(f"masks do not mirror params ({err}): pass the masks of these "
                         "params (None at leaves that are not pruned)") from None
    rows = []
    for (path, p), m in zip(flat, mask_leaves):
        if m is None:
            continue
        name, shape, m = path_to_str(path), tuple(np.shape(p)), np.asarray(m)
        try:
            covered = np.broadcast_to(m != 0, shape)
        except ValueError:
            raise ValueError(f"the mask of {name} has shape {m.shape}, which does not broadcast "
                             f"to the parameter's shape {shape}") from None
        weights, kept = int(np.prod(shape)), int(np.count_nonzero(covered))
        rows.append(LayerSparsity(name, shape, m.shape, weights, kept, (weights - kept) / max(weights, 1)))
    if not rows:
        raise ValueError("no leaf of the mask tree holds a mask")
    weights, kept = sum(r.weights for r in rows), sum(r.kept for r in rows)
    return SparsityReport(tuple(rows), weights, kept, (weights - kept) / weights)
