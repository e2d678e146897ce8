"""Physical channel shrinking: drop pruned channels so inference really gets cheaper.

:func:`shrink` rebuilds a VGG-BN or MLP model without the channels that
channel masks killed, carrying their constant outputs forward exactly (eval
mode). Residual networks are not supported: a skip connection ties the
channels of several layers together. How dead channels are found and why the
result is exact: ``docs/shrinking.md``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sfpk_jax.core import channels
from sfpk_jax.core.masks import path_to_str
from sfpk_jax.models import small_cnn, vgg
from sfpk_jax.models.common import BN_EPSILON

# Factories of the registered models that can be shrunk, by registry name.
_FACTORIES = {"vgg16_bn": vgg.vgg16_bn, "vgg19_bn": vgg.vgg19_bn, "mlp": small_cnn.mlp}
SUPPORTED = tuple(_FACTORIES)

_SUPPORTED_TEXT = (
    "shrink supports the plain feed-forward models: VGG-BN (vgg16_bn, vgg19_bn or any "
    "sfpk_jax.models.vgg.VGG) and the MLP (mlp or sfpk_jax.models.small_cnn.MLP)"
)


class LayerShrink(NamedTuple):
    """How one hidden layer shrank.

    Attributes:
      path: the layer's module path (``layers_3`` for VGG, ``Dense_0`` for the MLP).
      channels: its output channels before shrinking.
      kept: original channels kept.
      width: output channels of the shrunk layer: ``kept``, plus 1 when it
        carries a constant channel (see the module docstring) or would
        otherwise be empty.
      folded: dropped channels whose non-zero constant output was carried into
        the next layer.
      indices: the kept original channels, in order (a constant channel, if
        any, comes after them).
    """

    path: str
    channels: int
    kept: int
    width: int
    folded: int
    indices: tuple[int, ...]


class Shrunk(NamedTuple):
    """The result of :func:`shrink`.

    Attributes:
      module: the smaller Flax module (same class, smaller widths).
      variables: its variables (``params``, plus ``batch_stats`` for VGG);
        the masks are baked into the weights.
      report: one :class:`LayerShrink` per hidden layer, in order.
    """

    module: nn.Module
    variables: dict
    report: tuple[LayerShrink, ...]


def shrink(model: str | nn.Module | Any, variables: dict, masks: Any) -> Shrunk:
    """Rebuilds a channel-pruned model without its dead channels.

    Args:
      model: a registered name (``vgg16_bn``, ``vgg19_bn``, ``mlp``), a
        :class:`~sfpk_jax.models.vgg.VGG` or :class:`~sfpk_jax.models.small_cnn.MLP`
        module, or the ``apply_fn`` returned by :func:`sfpk_jax.models.build`.
      variables: the model's variables: ``{"params": ..., "batch_stats": ...}``
        (VGG needs its batch statistics; they define the constants that dead
        channels emit).
      masks: channel masks mirroring ``variables["params"]`` (``None`` at
        unpruned leaves), e.g. ``prune(..., scope="local", mask_dim="out").masks``;
        a result with a ``.masks`` attribute is accepted too.

    Returns:
      ``(module, variables, report)`` as a :class:`Shrunk`: in eval mode,
      ``module.apply(variables, x, train=False)`` equals the masked full
      model's logits up to float rounding.

    Raises:
      ValueError: the architecture cannot be shrunk, the variables do not fit
        the module, or the masks are not channel masks.
    """
    module = _resolve_module(model, variables)
    variables = _as_numpy(variables)
    params = variables["params"]
    masked, alive = _masked_params(params, getattr(masks, "masks", masks))
    if isinstance(module, vgg.VGG):
        return _shrink_vgg(module, masked, variables.get("batch_stats"), alive)
    return _shrink_mlp(module, masked, alive)


# --------------------------------------------------------------------------- inputs


def _num_classes(variables: Any, kernel_path: tuple[str, ...]) -> int:
    node = variables.get("params", {}) if hasattr(variables, "get") else {}
    for name in kernel_path:
        node = node.get(name, {}) if hasattr(node, "get") else {}
    if np.ndim(node) != 2:
        raise ValueError(
            f"variables have no params/{'/'.join(kernel_path)} (a dense kernel); pass the "
            "variables of the named model, e.g. the second result of sfpk_jax.models.build(name)"
        )
    return int(np.shape(node)[-1])


def _resolve_module(model: Any, variables: Any) -> nn.Module:
    """The module behind a name, a module or a ``build`` apply_fn."""
    if isinstance(model, functools.partial) and model.args and isinstance(model.args[0], nn.Module):
        model = model.args[0]  # registry.make_apply_fn binds the module first
    if isinstance(model, str):
        if model not in _FACTORIES:
            raise ValueError(
                f"cannot shrink model {model!r}: {_SUPPORTED_TEXT}. Models with skip "
                "connections tie channels across layers; evaluate them masked "
                "(sfpk_jax.apply_masks) instead"
            )
        kernel = ("fc", "kernel") if model.startswith("vgg") else ("Dense_1", "kernel")
        return _FACTORIES[model](_num_classes(variables, kernel))
    if isinstance(model, (vgg.VGG, small_cnn.MLP)):
        return model
    raise ValueError(
        f"cannot shrink a {type(model).__name__}: {_SUPPORTED_TEXT}. Pass one of those "
        "(a registry name, the module or build()'s apply_fn), or evaluate this model masked "
        "(sfpk_jax.apply_masks) instead"
    )


def _as_numpy(variables: Any) -> dict:
    if not hasattr(variables, "get") or "params" not in variables:
        raise ValueError(
            "variables must be the model's variable dict {'params': ..., 'batch_stats': ...}, "
            "not the params alone; pass e.g. the variables returned by sfpk_jax.models.build"
        )
    return jax.tree.map(np.asarray, {k: v for k, v in variables.items()})


def _masked_params(params: Any, masks: Any) -> tuple[dict, dict[str, np.ndarray]]:
    """Masked params as a flat ``{path: array}`` dict, and kernel masks broadcast to bools.

    Every kernel mask must be a channel mask (see :mod:`sfpk_jax.core.channels`):
    an unstructured mask leaves no whole channel to drop, so shrinking would
    silently buy nothing.
    """
    flat = {path_to_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    alive: dict[str, np.ndarray] = {}
    if masks is None:
        return flat, alive
    for p, mask in jax.tree_util.tree_flatten_with_path(masks)[0]:
        path = path_to_str(p)
        if path not in flat:
            raise ValueError(
                f"the masks hold {path!r}, which the params do not; masks must mirror "
                "variables['params'] (build them from the same params)"
            )
        param = flat[path]
        mask = np.asarray(mask)
        shape = tuple(param.shape)
        is_kernel = path.rpartition("/")[2] == "kernel" and param.ndim >= 2
        if is_kernel:
            out_mask, in_mask = (channels.mask_shape(shape, d, channels.channel_axes("kernel", shape))
                                 for d in channels.MASK_DIMS)
            if mask.shape not in (out_mask, in_mask):
                raise ValueError(
                    f"the mask of {path} has shape {mask.shape}, not a channel mask of the "
                    f"kernel {shape} (output channels: {out_mask}, input channels: {in_mask}); "
                    "shrinking needs channel masks: prune with mask_dim='out' or 'in' and "
                    "scope='local'")
        try:
            keep = np.broadcast_to(mask != 0, shape)
        except ValueError:
            raise ValueError(
                f"the mask of {path} has shape {mask.shape}, which does not broadcast to the "
                f"parameter's {shape}; masks must mirror variables['params']"
            ) from None
        flat[path] = np.where(keep, param, np.zeros((), param.dtype))
        if is_kernel:
            alive[path] = keep
    return flat, alive


def _require(flat: dict, path: str, shape: tuple[int, ...] | None, what: str) -> np.ndarray:
    if path not in flat:
        raise ValueError(f"{what}: variables have no {path}; pass the variables of this module")
    if shape is not None and tuple(flat[path].shape) != shape:
        raise ValueError(
            f"{what}: {path} has shape {tuple(flat[path].shape)}, the module expects {shape}; "
            "pass the variables of this module (same plan / widths)"
        )
    return flat[path]


def _cast(x: np.ndarray, like: np.ndarray) -> jax.Array:
    return jnp.asarray(np.asarray(x, dtype=like.dtype))


def _nest(flat: dict[str, jax.Array]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        *parents, name = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = leaf
    return tree


def _column_alive(alive: dict, path: str, channels: int) -> np.ndarray:
    """Output channels of a kernel that any mask entry keeps (all when unmasked)."""
    if path not in alive:
        return np.ones(channels, bool)
    keep = alive[path]
    return keep.reshape(-1, keep.shape[-1]).any(axis=0)


def _row_used(alive: dict, path: str, shape: tuple[int, ...], channels: int) -> np.ndarray:
    """Channels of the previous layer that the kernel at ``path`` reads (all when unmasked).

    ``shape`` is the kernel's; a dense kernel after a flatten has ``positions x
    channels`` input rows (channel fastest, as NHWC flattens).
    """
    if path not in alive:
        return np.ones(channels, bool)
    keep = alive[path]
    if keep.ndim == 2:  # dense: (positions * channels, out)
        return keep.reshape(-1, channels, shape[-1]).any(axis=(0, 2))
    return np.moveaxis(keep, -2, 0).reshape(channels, -1).any(axis=1)


# --------------------------------------------------------------------------- VGG


def _shrink_vgg(module: vgg.VGG, flat: dict, stats: Any, alive: dict) -> Shrunk:
    if stats is None:
        raise ValueError(
            "VGG variables need 'batch_stats': a dead channel emits relu(BN(conv bias)), "
            "which depends on the running statistics; pass the full variable dict"
        )
    stats = {path_to_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(stats)[0]}
    layers = [i for i, spec in enumerate(module.plan) if spec != vgg.POOL]
    if not layers:
        raise ValueError("the VGG plan has no conv layer, so there is no channel to drop")
    name = [f"layers_{i}" for i in layers]
    width = [int(module.plan[i]) for i in layers]
    fc_kernel = _require(flat, "fc/kernel", None, "VGG classifier")
    # The ProbMask form (vgg19_bn) has neither conv nor classifier biases.
    fc_bias = (_require(flat, "fc/bias", (module.num_classes,), "VGG classifier")
               if module.bias else None)
    if fc_kernel.shape[1] != module.num_classes or fc_kernel.shape[0] % width[-1]:
        raise ValueError(
            f"fc/kernel has shape {fc_kernel.shape}, which does not follow a last conv of "
            f"{width[-1]} channels and {module.num_classes} classes; pass this module's variables"
        )
    positions = fc_kernel.shape[0] // width[-1]

    # Per layer: its masked tensors (validated against the plan).
    kernels, conv_b, scales, betas, means, vars_ = [], [], [], [], [], []
    c_in = None
    for n, c in zip(name, width):
        k = _require(flat, f"{n}/conv/kernel", None, f"VGG layer {n}")
        if k.ndim != 4 or k.shape[-1] != c or (c_in is not None and k.shape[2] != c_in):
            raise ValueError(
                f"{n}/conv/kernel has shape {k.shape}; the plan {module.plan} expects "
                f"{c} output channels{'' if c_in is None else f' and {c_in} input channels'}; "
                "pass the variables of this module (same plan)"
            )
        kernels.append(k)
        conv_b.append(_require(flat, f"{n}/conv/bias", (c,), f"VGG layer {n}") if module.bias
                      else np.zeros(c, k.dtype))
        scales.append(_require(flat, f"{n}/bn/scale", (c,), f"VGG layer {n}"))
        betas.append(_require(flat, f"{n}/bn/bias", (c,), f"VGG layer {n}"))
        means.append(_require(stats, f"{n}/bn/mean", (c,), f"VGG layer {n} batch_stats"))
        vars_.append(_require(stats, f"{n}/bn/var", (c,), f"VGG layer {n} batch_stats"))
        c_in = c

    # Which channels survive, and the constant each masked-out channel emits.
    keep, const, folded = [], [], []
    for li, (n, c) in enumerate(zip(name, width)):
        produced = _column_alive(alive, f"{n}/conv/kernel", c)
        next_path = f"{name[li + 1]}/conv/kernel" if li + 1 < len(name) else "fc/kernel"
        next_shape = kernels[li + 1].shape if li + 1 < len(name) else fc_kernel.shape
        used = _row_used(alive, next_path, next_shape, c)
        # Eval-mode batch norm, written as Flax computes it (conv bias 0 when absent).
        z = conv_b[li].astype(np.float64) - means[li]
        k = np.maximum(z * (scales[li] / np.sqrt(vars_[li].astype(np.float64) + BN_EPSILON))
                       + betas[li], 0.0)
        keep.append(produced & used)
        const.append(np.where(produced, 0.0, k))  # only zero-kernel channels are constant
        folded.append(~produced & used & (k != 0))

    # A constant channel carries folded constants into a following conv, and into
    # a classifier without bias. A layer left with no channel keeps one too, so
    # the module stays valid; the next layer then reads it through the fold
    # (zero weights when nothing folds).
    carries = [li + 1 < len(name) or fc_bias is None for li in range(len(name))]
    carrier = [bool((carries[li] and folded[li].any()) or not keep[li].any())
               for li in range(len(name))]

    new_flat: dict[str, jax.Array] = {}
    new_stats: dict[str, jax.Array] = {}
    rows = np.arange(kernels[0].shape[2])  # the image channels are never dropped
    for li, n in enumerate(name):
        cols = np.flatnonzero(keep[li])
        k = kernels[li][:, :, rows, :][..., cols].astype(np.float64)
        if li > 0 and carrier[li - 1]:
            # The previous layer's constant channel reads through sum_c k_c W[:, :, c, :].
            fold = np.einsum("c,hwco->hwo", const[li - 1] * folded[li - 1], kernels[li])[..., cols]
            k = np.concatenate([k, fold[:, :, None, :]], axis=2)
        extra = 1 if carrier[li] else 0
        k = np.pad(k, ((0, 0), (0, 0), (0, 0), (0, extra)))  # constant channel: zero kernel
        pad = (lambda v, fill: np.concatenate([v[cols], np.full(extra, fill, v.dtype)]))
        new_flat[f"{n}/conv/kernel"] = _cast(k, kernels[li])
        if module.bias:
            new_flat[f"{n}/conv/bias"] = _cast(pad(conv_b[li], 0.0), conv_b[li])
        # Scale 0 and bias 1: BN outputs exactly 1 whatever its input, relu keeps it.
        new_flat[f"{n}/bn/scale"] = _cast(pad(scales[li], 0.0), scales[li])
        new_flat[f"{n}/bn/bias"] = _cast(pad(betas[li], 1.0), betas[li])
        new_stats[f"{n}/bn/mean"] = _cast(pad(means[li], 0.0), means[li])
        new_stats[f"{n}/bn/var"] = _cast(pad(vars_[li], 1.0), vars_[li])
        rows = cols  # the next layer reads the kept channels (its fold row covers the rest)

    # Classifier: the final pool (average or max) keeps a constant channel
    # constant, so every flattened position p adds k_c * W[p, c, :]: fold it
    # into the bias, or, without one, into the carrier channel's row.
    w = fc_kernel.reshape(positions, width[-1], -1)
    cols = np.flatnonzero(keep[-1])
    fold = np.einsum("c,pco->po", const[-1] * folded[-1], w.astype(np.float64))
    rows = [w[:, cols, :]] + ([fold[:, None, :] if fc_bias is None else
                               np.zeros_like(w[:, :1, :])] if carrier[-1] else [])
    w = np.concatenate(rows, axis=1)
    new_flat["fc/kernel"] = _cast(w.reshape(-1, w.shape[-1]), fc_kernel)
    if fc_bias is not None:
        new_flat["fc/bias"] = _cast(fc_bias + fold.sum(axis=0), fc_bias)

    plan = list(module.plan)
    report = []
    for li, (i, n) in enumerate(zip(layers, name)):
        kept = np.flatnonzero(keep[li])
        plan[i] = len(kept) + (1 if carrier[li] else 0)
        report.append(LayerShrink(n, width[li], len(kept), plan[i], int(folded[li].sum()),
                                  tuple(int(c) for c in kept)))
    new_module = module.clone(parent=None, plan=tuple(plan))
    variables = {"params": _nest(new_flat), "batch_stats": _nest(new_stats)}
    return Shrunk(new_module, variables, tuple(report))


# --------------------------------------------------------------------------- MLP


def _shrink_mlp(module: small_cnn.MLP, flat: dict, alive: dict) -> Shrunk:
    hidden = module.hidden
    w0 = _require(flat, "Dense_0/kernel", None, "MLP hidden layer")
    if w0.ndim != 2 or w0.shape[1] != hidden:
        raise ValueError(
            f"Dense_0/kernel has shape {w0.shape}, the module's hidden width is {hidden}; "
            "pass the variables of this module"
        )
    b0 = _require(flat, "Dense_0/bias", (hidden,), "MLP hidden layer")
    w1 = _require(flat, "Dense_1/kernel", (hidden, module.num_classes), "MLP output layer")
    b1 = _require(flat, "Dense_1/bias", (module.num_classes,), "MLP output layer")

    produced = _column_alive(alive, "Dense_0/kernel", hidden)
    used = _row_used(alive, "Dense_1/kernel", w1.shape, hidden)
    # A unit with a zero kernel column emits relu(bias) for every input.
    k = np.maximum(b0.astype(np.float64), 0.0)
    folded = ~produced & used & (k != 0)
    keep = produced & used
    cols = np.flatnonzero(keep)
    extra = 0 if cols.size else 1  # an all-zero unit keeps the module valid
    bias = b1 + (k * folded) @ w1.astype(np.float64)
    new = {
        "Dense_0/kernel": _cast(np.pad(w0[:, cols], ((0, 0), (0, extra))), w0),
        "Dense_0/bias": _cast(np.pad(b0[cols], (0, extra)), b0),
        "Dense_1/kernel": _cast(np.pad(w1[cols], ((0, extra), (0, 0))), w1),
        "Dense_1/bias": _cast(bias, b1),
    }
    report = (LayerShrink("Dense_0", hidden, int(cols.size), int(cols.size) + extra,
                          int(folded.sum()), tuple(int(c) for c in cols)),)
    new_module = module.clone(parent=None, hidden=int(cols.size) + extra)
    return Shrunk(new_module, {"params": _nest(new)}, report)
