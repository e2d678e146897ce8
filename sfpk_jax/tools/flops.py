"""Parameters and FLOPs per layer, dense and under masks.

Every ``nn.Conv`` / ``nn.Dense`` call is intercepted once on a sample input
to learn how many output positions it computes. A kernel entry is used once
per output position, so a layer's multiply-adds are (output positions) x
(kept kernel entries), whatever the grouping or channel structure of its mask.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from sfpk_jax.core.masks import path_to_str


class LayerCost(NamedTuple):
    """One conv or dense layer.

    Attributes:
      path: the module's path, '/'-joined (e.g. ``layer1_0/conv1``).
      params: kernel (and bias) entries.
      kept_params: entries a mask keeps (all without masks).
      flops: multiply-adds per example of the dense layer.
      kept_flops: multiply-adds per example with the masked kernel.
    """

    path: str
    params: int
    kept_params: int
    flops: int
    kept_flops: int


def output_positions(apply_fn, variables: dict, x: jax.Array) -> dict[str, int]:
    """Output positions per example (spatial size; 1 for dense) of every conv/dense layer."""
    positions: dict[str, int] = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, (nn.Conv, nn.Dense)) and context.method_name == "__call__":
            positions["/".join(context.module.path)] = int(np.prod(out.shape[1:-1]))
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: apply_fn(v, x, False), variables, x)
    return positions


def layer_costs(apply_fn, variables: dict, x: jax.Array, masks: Any = None) -> list[LayerCost]:
    """Per-layer parameters and FLOPs of a model, optionally under masks.

    Args:
      apply_fn: ``apply_fn(variables, x, train) -> (logits, updated_variables)``.
      variables: the model variables.
      x: a sample input with batch size 1 (only its shape is used).
      masks: a mask tree mirroring ``variables["params"]`` (None: dense).

    Returns:
      One :class:`LayerCost` per conv/dense layer, in call order.
    """
    positions = output_positions(apply_fn, variables, x)
    params = variables["params"]
    flat = {path_to_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    kept = {}
    if masks is not None:
        mask_flat = jax.tree_util.tree_flatten_with_path(masks)[0]
        kept = {path_to_str(p): np.broadcast_to(np.asarray(m) != 0, np.shape(flat[path_to_str(p)]))
                for p, m in mask_flat}
    rows = []
    for layer, n_pos in positions.items():
        kernel = flat[f"{layer}/kernel"]
        k_kept = int(np.count_nonzero(kept[f"{layer}/kernel"])) if f"{layer}/kernel" in kept else kernel.size
        bias = flat.get(f"{layer}/bias")
        b_size = 0 if bias is None else bias.size
        b_kept = int(np.count_nonzero(kept[f"{layer}/bias"])) if f"{layer}/bias" in kept else b_size
        rows.append(LayerCost(layer, kernel.size + b_size, k_kept + b_kept,
                              n_pos * kernel.size, n_pos * k_kept))
    return rows


def summary(rows: list[LayerCost]) -> dict[str, float]:
    """Totals and the kept fractions of parameters and FLOPs."""
    total = {f: sum(getattr(r, f) for r in rows) for f in ("params", "kept_params", "flops", "kept_flops")}
    return {**total, "params_kept_fraction": total["kept_params"] / total["params"],
            "flops_kept_fraction": total["kept_flops"] / total["flops"]}
