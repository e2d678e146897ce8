"""Channel (structured) masks: one mask entry covers a whole channel of a kernel.

A channel mask keeps the kernel's rank with size 1 on every axis it spans, so
it broadcasts over the kernel. Where the channels are depends on the
framework: Flax kernels are (..., in, out), so an output channel mask is
(1, ..., 1, out); Equinox (and PyTorch) weights are (out, in, ...), so it is
(out, 1, ..., 1) there (:func:`channel_axes`).
The SFPK quantities then live on mask entries, each standing for the kernel
entries it covers: its node size, its summed |theta| and its summed theta^2.
For unstructured masks every one of these reduces to the entry itself.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import jax
import jax.numpy as jnp

# A channel mask removes whole output or whole input channels.
MaskDim = Literal["out", "in"]
MASK_DIMS: tuple[str, ...] = get_args(MaskDim)


def is_channel(mask_dim) -> bool:
    """Whether ``mask_dim`` asks for channel masks (``"out"`` or ``"in"``).

    The other values are None (unstructured) and ``"N:M"`` (N:M masks, see
    :mod:`sfpk_jax.core.n_m`), both masks of the kernels' full shape.
    """
    return isinstance(mask_dim, str) and mask_dim in MASK_DIMS

# (output axis, input axis) of a weight, by the name frameworks give it.
_AXES_BY_NAME = {"kernel": (-1, -2), "weight": (0, 1)}


def channel_axes(name: str, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The (output, input) channel axes of a weight named ``name``, or None if unknown.

    ``kernel`` is Flax's layout (..., in, out); ``weight`` is Equinox's and
    PyTorch's (out, in, ...). Leaves of rank < 2 have no channel axes.
    """
    if len(shape) < 2 or name not in _AXES_BY_NAME:
        return None
    out_axis, in_axis = _AXES_BY_NAME[name]
    return out_axis % len(shape), in_axis % len(shape)


def mask_shape(shape: tuple[int, ...], mask_dim: str | None,
               axes: tuple[int, int] | None) -> tuple[int, ...]:
    """The mask shape of a parameter of ``shape``.

    Args:
      shape: the parameter's shape.
      mask_dim: None (unstructured), ``"out"`` or ``"in"`` channels, or
        ``"N:M"`` (full-shaped, as unstructured).
      axes: the leaf's (output, input) channel axes, or None for a leaf that
        stays unstructured (a bias: one entry per channel already).

    Returns:
      The broadcastable mask shape.
    """
    if not is_channel(mask_dim) or axes is None:
        return tuple(shape)
    axis = axes[0] if mask_dim == "out" else axes[1]
    return tuple(d if i == axis else 1 for i, d in enumerate(shape))


def covered_sum(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums ``x`` (parameter-shaped) over the axes a mask of ``shape`` broadcasts across."""
    axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def abs_weight(theta: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """sum |theta| over the entries each mask entry covers (|theta| when unstructured)."""
    return covered_sum(jnp.abs(theta), shape)


def sq_weight(theta: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """sum theta^2 over the entries each mask entry covers."""
    return covered_sum(jnp.square(theta), shape)


def node_size(param_shape: tuple[int, ...], shape: tuple[int, ...]) -> int:
    """How many parameter entries one mask entry covers."""
    size = 1
    for a, b in zip(param_shape, shape):
        size *= a // b
    return size


def mask_sparsity(sparsity: float, structured: bool) -> float:
    """The fraction of mask entries to remove for a target weight sparsity.

    Channel masks follow the reference: every layer keeps sqrt(density) of
    its channels, since removing a layer's output channels also removes the
    next layer's input channels.
    """
    return 1.0 - math.sqrt(1.0 - sparsity) if structured else sparsity


def simulation_density(density: float, masked: int, total: int) -> float:
    """The density a channel-mask simulation aims at, renormalised over the whole model.

    The reference (``Methods/structural_pruners.py``, ``SFPK.mask``) keeps the
    weights outside the masked leaves (normalisation, shortcuts, ...) in its
    budget: with f the kept fraction of the channels, M the weights the masked
    leaves hold and P all of the model's parameters, it simulates toward
    (M - (1 - f) P) / M, and then keeps f of every layer's channels.

    Args:
      density: f, the kept fraction of the final mask.
      masked: M.
      total: P, at least M.

    Returns:
      The simulation's target density.

    Raises:
      ValueError: P < M, or no density is left for the masked leaves
        (the unmasked parameters alone exceed the kept budget f P).
    """
    if total < masked:
        raise ValueError(f"the model's parameter count {total} is below the {masked} weights of "
                         "its masked leaves: count every parameter of the model")
    target = (masked - (1.0 - density) * total) / masked
    if target <= 0.0:
        raise ValueError(
            f"keeping {density:.4f} of the channels leaves the masked leaves no density: their "
            f"{masked} weights must absorb the whole cut of {(1.0 - density) * total:.0f} of "
            f"the model's {total} parameters; choose a lower sparsity")
    return target


def is_structured(mask_shapes, shapes) -> bool:
    """Whether any mask entry covers more than one parameter entry."""
    return tuple(mask_shapes) != tuple(shapes)
