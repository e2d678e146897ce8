"""Convolutions over chunks of the batch, on any model: the same function, faster on a CPU.

A convolution's output and its input gradient are computed example by
example, and its kernel gradient is a sum over the examples, so running it on
chunks of the batch and concatenating changes only the order of that sum.
What it changes is memory traffic: at batch 512 one layer's activations of a
CIFAR ResNet (about 33 MB) no longer fit in the CPU's caches, while a chunk
of 32 does. Measured on the 2-core dev CPU (``benchmarks/RESULTS.md``), a
whole SFPK step of ResNet-20 at batch 512 runs about twice as fast with
chunks of 32. Batch norm, which needs the statistics of the whole batch, is
untouched: only the convolutions are chunked.

:func:`chunk_convolutions` rewrites a function, not a model: it traces the
function to a jaxpr and evaluates it again with every
``conv_general_dilated`` whose batch is larger than the chunk (and a multiple
of it) split into static slices, so Flax Linen, Flax NNX and Equinox models
(whose vmapped convolutions trace to one batched convolution) all get it
without being rebuilt. The slices are unrolled into the program, so plain
autodiff of the rewritten function gives the chunked backward pass in every
mode (reverse, forward, higher order); ``lax.map`` over the chunks would put
the backward convolutions in a loop, where XLA:CPU gives them poor layouts.

Only a convolution whose input is larger than ``min_bytes`` (by default
:data:`MIN_BYTES`, 4 MiB) is chunked: a smaller one already fits in the
caches, and its chunks would only lengthen compilation. A function with no
convolution to chunk runs as it is, bit for bit.

Convolutions inside ``jit`` calls are rewritten too; those inside control
flow (``scan``, ``cond``, ``while``) or custom derivative rules are left
whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

# Inputs up to this size stay whole: they fit in a CPU's caches already.
MIN_BYTES = 4 * 2**20
# The primitives of calls whose inner jaxpr is inlined (and rewritten).
_CALLS = ("pjit", "jit", "closed_call", "core_call")


@dataclasses.dataclass(frozen=True)
class ChunkedConvolutions:
    """``fn`` with its convolutions run over chunks of ``chunk`` examples.

    Equal (and hashing alike) for the same fields, so that compiled programs
    keyed by the function are reused.

    Attributes:
      fn: the function rewritten.
      chunk: examples per chunk.
      min_bytes: convolutions whose input is not larger stay whole.
    """

    fn: Callable
    chunk: int
    min_bytes: int = MIN_BYTES

    def __call__(self, *args):
        closed, shape = jax.make_jaxpr(self.fn, return_shape=True)(*args)
        # With nothing to split, calls stay calls: the function's own program, rounding
        # as written (and the function is still traced once).
        out = _evaluate(closed.jaxpr, closed.consts, jax.tree.leaves(args), self,
                        inline=_splits_any(closed.jaxpr, self))
        return jax.tree.unflatten(jax.tree.structure(shape), out)


def chunk_convolutions(fn: Callable, chunk: int, *, min_bytes: int = MIN_BYTES) -> Callable:
    """``fn`` with every large convolution over a batch larger than ``chunk`` run chunk by chunk.

    Example:

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from sfpk_jax.parallel.conv_chunks import chunk_convolutions
    >>> model = nn.Conv(4, (3, 3))
    >>> x = jnp.ones((8, 5, 5, 1))
    >>> params = model.init(jax.random.key(0), x)
    >>> loss = lambda p, x: model.apply(p, x).sum()
    >>> chunked = chunk_convolutions(loss, 2, min_bytes=0)  # a toy: chunk even a small one
    >>> str(jax.make_jaxpr(chunked)(params, x)).count("conv_general_dilated")
    4
    >>> bool(jnp.allclose(chunked(params, x), loss(params, x)))
    True

    Args:
      fn: a function of arrays (pytrees of them), e.g. ``loss_fn(params,
        batch)``. Its convolutions take the batch on the input's batch
        dimension, as every framework writes them.
      chunk: examples per chunk; 0 returns ``fn`` itself. A convolution whose
        batch is at most ``chunk``, or not a multiple of it, stays whole.
      min_bytes: a convolution whose input holds at most this many bytes
        stays whole.

    Returns:
      The rewritten function: the same values up to float rounding, the same
      pytrees in and out.

    Raises:
      ValueError: ``chunk`` is not a non-negative int.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"chunk must be a non-negative int (0: no chunks), got {chunk!r}")
    return fn if chunk == 0 else ChunkedConvolutions(fn, chunk, min_bytes)


def _splits(lhs, how: ChunkedConvolutions, params: dict) -> bool:
    """Whether a convolution of input ``lhs`` (an array or its aval) is run in chunks."""
    batch, chunk = lhs.shape[params["dimension_numbers"].lhs_spec[0]], how.chunk
    small = lhs.size * lhs.dtype.itemsize <= how.min_bytes
    return not (small or batch <= chunk or batch % chunk or params["batch_group_count"] != 1)


def _splits_any(jaxpr, how: ChunkedConvolutions) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            if _splits(eqn.invars[0].aval, how, eqn.params):
                return True
        elif eqn.primitive.name in _CALLS and _inner(eqn) is not None:
            if _splits_any(_inner(eqn).jaxpr, how):
                return True
    return False


def _conv(lhs: jax.Array, rhs: jax.Array, how: ChunkedConvolutions, params: dict) -> jax.Array:
    if not _splits(lhs, how, params):
        return lax.conv_general_dilated_p.bind(lhs, rhs, **params)
    spec = params["dimension_numbers"]
    axis = spec.lhs_spec[0]
    parts = jnp.split(lhs, lhs.shape[axis] // how.chunk, axis=axis)
    return jnp.concatenate([lax.conv_general_dilated_p.bind(part, rhs, **params)
                            for part in parts], axis=spec.out_spec[0])


def _evaluate(jaxpr, consts, args, how: ChunkedConvolutions, inline: bool = True) -> list[Any]:
    env = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            outs = [_conv(*ins, how, eqn.params)]
        elif inline and name in _CALLS and _inner(eqn) is not None:
            inner = _inner(eqn)
            outs = _evaluate(inner.jaxpr, inner.consts, ins, how)
        else:
            out = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
            outs = out if eqn.primitive.multiple_results else [out]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _inner(eqn) -> jcore.ClosedJaxpr | None:
    for key in ("jaxpr", "call_jaxpr"):
        inner = eqn.params.get(key)
        if isinstance(inner, jcore.ClosedJaxpr):
            return inner
        if isinstance(inner, jcore.Jaxpr):
            return jcore.ClosedJaxpr(inner, ())
    return None
