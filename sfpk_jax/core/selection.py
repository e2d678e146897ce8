"""Which leaves are pruned, along which channel axes, and which biases follow their kernels.

Unstructured masks (``mask_dim=None``) select by name by default: the
weights of every convolution and dense layer (Flax ``kernel``, Equinox
``weight``, of rank >= 2; never an embedding table) and the bias of every
dense layer. Channel masks (``mask_dim="out"`` or ``"in"``) and N:M masks
(``mask_dim="2:4"``, groups along each kernel's input axis) must know each
weight's channel axes and which layers produce the model's outputs and read
its inputs; those come from the model's :class:`~sfpk_jax.core.layers.Layers`
(read off the loss's jaxpr), and then:

* the layers that produce the outputs keep their outputs (the classes) under
  ``"out"``, and the layers that read the inputs keep their inputs (the
  image's channels) under ``"in"`` and under N:M (an image's 1 or 3
  channels are no multiple of M), unless the user restricts the layers
  (``layers.restrict(...)``);
* only convolution and dense kernels with one input and one output axis take
  channel or N:M masks; any other kernel (``DenseGeneral``, attention, the
  stacked kernels of layers run by a ``scan``) is refused, naming it;
* an embedding table is never selected, even one tied to the classifier
  (``Embed.attend``), unless the user restricts the layers to it;
* under ``"out"`` a layer's bias follows its kernel's channel mask (it is
  *tied*), so a removed channel is removed whole;
* under N:M only kernels are pruned: a leaf without an input axis (a bias, a
  norm's scale), even one a ``prunable`` regex selects, stays dense (None).

A ``prunable`` regex or callable overrides the selection; a callable may
return ``(out_axis, in_axis)`` to name a weight's channel axes itself.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Union

import jax
import numpy as np

from sfpk_jax.core import channels
from sfpk_jax.core.layers import Layers
from sfpk_jax.core.mask_checks import check_params, path_to_str

# A callable may return (out_axis, in_axis) instead of True: the leaf is
# prunable, and its channel masks take those axes.
Prunable = Union[None, str, Callable[[str, Any], Union[bool, tuple[int, int]]], Layers]

# Names the frameworks give their weights: Flax (Linen and NNX) ``kernel``,
# Equinox ``weight`` (Equinox also names norm scales ``weight``: rank 1).
_WEIGHT_NAMES = ("kernel", "weight")
# (output axis, input axis) of a rank-2 weight, by name: Flax Dense (in, out),
# Equinox Linear (out, in). Higher ranks are ambiguous by name (a Flax Conv
# kernel and a DenseGeneral kernel look alike): their axes come from the layers.
_DENSE_AXES = {"kernel": (1, 0), "weight": (0, 1)}


class Selection(NamedTuple):
    """The prunable leaves of a params tree.

    Attributes:
      index: their positions among the flattened leaves.
      axes: per prunable leaf, its ``(out_axis, in_axis)`` when it takes
        channel masks, else None.
      tied: ``(position of a bias among the flattened leaves, position of its
        kernel in index, the bias's shape)``: biases whose masks follow their
        kernel's.
    """

    index: tuple[int, ...]
    axes: tuple[tuple[int, int] | None, ...]
    tied: tuple[tuple[int, int, tuple[int, ...]], ...]


def _owner(params: Any, keypath) -> Any:
    """The object holding the leaf at ``keypath`` (an Equinox layer, say), or None."""
    obj = params
    for key in tuple(keypath)[:-1]:
        if isinstance(key, jax.tree_util.GetAttrKey):
            obj = getattr(obj, key.name, None)
        elif isinstance(key, jax.tree_util.DictKey):
            obj = obj[key.key] if hasattr(obj, "__getitem__") else None
        elif isinstance(key, jax.tree_util.SequenceKey):
            obj = obj[key.idx] if hasattr(obj, "__getitem__") else None
        else:
            return None
    return obj


def _is_embedding(path: str, owner: Any) -> bool:
    """An embedding table: Flax (Linen ``Embed``, NNX ``Embed``) names it ``embedding``; an
    Equinox ``Embedding`` names it ``weight``, like a layer, so its owner tells.

    A table tied to the classifier (``Embed.attend``) is also a dense layer's
    kernel in the loss; it is still not pruned by default.
    """
    if path.rpartition("/")[2] == "embedding":
        return True
    eqx = sys.modules.get("equinox")
    return eqx is not None and isinstance(owner, eqx.nn.Embedding)


def _by_name(paths: Sequence[str], leaves: Sequence[Any], owners: Sequence[Any]) -> list[bool]:
    """The unstructured default: conv/dense weights and dense biases, by name."""
    weight_rank = {}
    for p, leaf, owner in zip(paths, leaves, owners):
        parent, _, name = p.rpartition("/")
        if name in _WEIGHT_NAMES and not _is_embedding(p, owner):
            weight_rank[parent] = np.ndim(leaf)
    selected = []
    for p, leaf, owner in zip(paths, leaves, owners):
        parent, _, name = p.rpartition("/")
        if name in _WEIGHT_NAMES:
            selected.append(np.ndim(leaf) >= 2 and not _is_embedding(p, owner))
        else:
            selected.append(name == "bias" and weight_rank.get(parent) == 2)
    return selected


def _by_layers(paths, leaves, owners, layers: Layers, mask_dim) -> list:
    """Per leaf: False, True or axes, from the model's layers (see the module doc)."""
    dense = {p.rpartition("/")[0] for p, use in layers.uses.items() if use.op == "dense"}
    default = layers.where is None
    kept = ((layers.outputs if mask_dim == "out" else () if mask_dim is None else layers.inputs)
            if default else ())
    out = []
    for p, leaf, owner in zip(paths, leaves, owners):
        use = layers.uses.get(p)
        if not layers.selects(p, leaf) or p in kept or (default and _is_embedding(p, owner)):
            out.append(False)
        elif use is None:
            # A dense layer's bias is prunable on its own only in unstructured masks.
            parent, _, name = p.rpartition("/")
            out.append(mask_dim is None and name == "bias" and parent in dense)
        elif mask_dim is None:
            out.append(True)
        elif not use.known:
            raise ValueError(
                f"{p} (shape {tuple(np.shape(leaf))}) is the kernel of a {use.op} layer whose "
                "channel axes are not one output and one input axis (a DenseGeneral, attention "
                "or einsum kernel, or layers stacked under a scan): "
                f"mask_dim={mask_dim!r} applies only to Conv and Dense/Linear kernels. "
                "Give its axes with prunable=a callable returning (out_axis, in_axis) for it, "
                "or leave it out with prunable=layers.restrict(<regex without it>)")
        else:
            out.append((use.out_axis, use.in_axis))
    return out


def _decisions(params, prunable: Prunable, mask_dim) -> tuple[list, list, list]:
    check_params(params)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [path_to_str(p) for p, _ in flat]
    leaves = [leaf for _, leaf in flat]
    owners = [_owner(params, p) for p, _ in flat]
    if isinstance(prunable, Layers):
        return paths, leaves, _by_layers(paths, leaves, owners, prunable, mask_dim)
    if prunable is None:
        if mask_dim is not None:
            raise ValueError(
                f"mask_dim={mask_dim!r} needs the model's layers, to find each weight's channel "
                "axes and the layers to keep: sfpk_prune and prune read them off loss_fn and "
                "the first batch; here pass prunable=sfpk_jax.core.layers.trace_layers(loss_fn, "
                "params, batch)")
        return paths, leaves, _by_name(paths, leaves, owners)
    if isinstance(prunable, str):
        pattern = re.compile(prunable)
        return paths, leaves, [bool(pattern.search(p)) for p in paths]
    if callable(prunable):
        out = []
        for p, leaf in zip(paths, leaves):
            d = prunable(p, leaf)
            out.append(tuple(d) if isinstance(d, (tuple, list)) else bool(d))
        return paths, leaves, out
    raise TypeError(
        "prunable must be None, a regex string, a callable (path, leaf) -> bool or "
        f"(out_axis, in_axis), or the model's Layers, got {type(prunable).__name__}")


def _axes(path: str, shape: tuple[int, ...], decision, mask_dim) -> tuple[int, int] | None:
    """The channel axes of a selected leaf, checked; None when it stays unstructured."""
    if isinstance(decision, tuple):
        in_range = len(decision) == 2 and all(
            isinstance(a, int) and -len(shape) <= a < len(shape) for a in decision)
        if not in_range or decision[0] % len(shape) == decision[1] % len(shape):
            raise ValueError(
                f"prunable gave channel axes {decision} for {path} (shape {shape}): "
                "expected two different axes (out_axis, in_axis) of the leaf")
        return tuple(a % len(shape) for a in decision)
    if mask_dim is None or len(shape) < 2:
        return None
    name = path.rpartition("/")[2]
    if len(shape) == 2 and name in _DENSE_AXES:
        return _DENSE_AXES[name]
    raise ValueError(
        f"mask_dim={mask_dim!r} cannot be applied to {path} (shape {shape}): its channel axes "
        "are not known from its name (a convolution's and a DenseGeneral's kernels look alike). "
        "Pass prunable=sfpk_jax.core.layers.trace_layers(loss_fn, params, batch).restrict(...) "
        "to read them off the model, or a callable returning (out_axis, in_axis) for it")


def select(params: Any, prunable: Prunable = None, mask_dim: str | None = None) -> Selection:
    """The prunable leaves of ``params``, their channel axes and the tied biases.

    Args:
      params: the parameter pytree.
      prunable: None (the default rules, see the module doc), a regex
        matched (``re.search``) against '/'-joined paths, a callable
        ``(path, leaf) -> bool | (out_axis, in_axis)``, or the model's
        :class:`~sfpk_jax.core.layers.Layers`.
      mask_dim: None, ``"out"``, ``"in"`` or ``"N:M"``.

    Returns:
      The :class:`Selection`.

    Raises:
      ValueError: channel masks without the layers (under the default rule),
        or a selected weight whose channel axes are not known (named).
    """
    paths, leaves, decisions = _decisions(params, prunable, mask_dim)
    index = tuple(i for i, d in enumerate(decisions) if d is not False)
    axes = tuple(_axes(paths[i], tuple(np.shape(leaves[i])), decisions[i], mask_dim)
                 for i in index)
    if mask_dim is not None and not channels.is_channel(mask_dim):
        # N:M groups run along an input axis: a leaf without one stays dense.
        kernels = [k for k, a in enumerate(axes) if a is not None]
        index, axes = tuple(index[k] for k in kernels), tuple(axes[k] for k in kernels)
    tied = []
    if mask_dim == "out":
        position = {paths[i]: k for k, i in enumerate(index)}
        for i, (p, leaf) in enumerate(zip(paths, leaves)):
            parent, _, name = p.rpartition("/")
            kernel = next((position[f"{parent}/{w}"] for w in _WEIGHT_NAMES
                           if f"{parent}/{w}" in position), None)
            if name != "bias" or kernel is None or axes[kernel] is None:
                continue
            # One entry per output channel: (C,), or Equinox's conv bias (C, 1, 1).
            channels_out = np.shape(leaves[index[kernel]])[axes[kernel][0]]
            shape = np.shape(leaf)
            if int(np.prod(shape)) == channels_out and sum(d != 1 for d in shape) <= 1:
                tied.append((i, kernel, tuple(shape)))
    tied_leaves = {i for i, _, _ in tied}
    keep = [k for k, i in enumerate(index) if i not in tied_leaves]
    # A tied bias is no prunable leaf of its own: drop it and renumber the kernels.
    renumber = {old: new for new, old in enumerate(keep)}
    return Selection(tuple(index[k] for k in keep), tuple(axes[k] for k in keep),
                     tuple((i, renumber[k], shape) for i, k, shape in tied))

