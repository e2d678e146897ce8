"""Convolutions over chunks of the batch: the same function, faster on CPU at large batches.

A convolution's output and its input gradient are computed example by
example, and its kernel gradient is a sum over the examples, so running it on
chunks of the batch and concatenating changes only the order of that sum.
What it changes is memory traffic: at batch 512 one layer's activations of a
CIFAR ResNet (about 33 MB) no longer fit in the CPU's caches, while a chunk
of 32 does. Measured on the 2-core dev CPU (``benchmarks/RESULTS.md``), a
whole SFPK step of ResNet-20 at batch 512 runs about twice as fast with
chunks of 32 (1.6 times with chunks of 128). Batch norm, which needs the
statistics of the whole batch, is untouched: only the convolutions are
chunked.

The chunks are static slices (``jnp.split``) unrolled into the program, so
plain autodiff gives the chunked backward pass in every mode (reverse,
forward, higher order); ``lax.map`` over the chunks would put the backward
convolutions in a loop, where XLA:CPU gives them poor layouts (measured: far
slower than the plain convolution).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

ConvFn = Callable[..., jax.Array]


def chunked_conv(chunk: int) -> ConvFn:
    """``lax.conv_general_dilated``, run over chunks of ``chunk`` examples.

    For a Flax model: ``nn.Conv(..., conv_general_dilated=chunked_conv(128))``
    (the zoo's models take ``conv_chunk`` instead, see
    :func:`sfpk_jax.models.build`). Batches of at most ``chunk`` examples, and
    batches that ``chunk`` does not divide, take the plain convolution.

    Args:
      chunk: examples per chunk; 0 gives the plain convolution itself.

    Returns:
      A function with ``lax.conv_general_dilated``'s signature; the batch is
      the first axis of the input (Flax's ``NHWC`` layout).

    Raises:
      ValueError: ``chunk`` is negative.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"chunk must be a non-negative int (0: no chunks), got {chunk!r}")
    if chunk == 0:
        return lax.conv_general_dilated

    def conv(lhs: jax.Array, rhs: jax.Array, *args, **kwargs) -> jax.Array:
        batch = lhs.shape[0]
        if batch <= chunk or batch % chunk:
            return lax.conv_general_dilated(lhs, rhs, *args, **kwargs)
        return jnp.concatenate([lax.conv_general_dilated(part, rhs, *args, **kwargs)
                                for part in jnp.split(lhs, batch // chunk)])

    return conv
