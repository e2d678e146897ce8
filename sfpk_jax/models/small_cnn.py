"""Small models for the 8x8 digits and for fast tests."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from sfpk_jax.models.common import batch_norm
from sfpk_jax.models.registry import register


class SmallCNN(nn.Module):
    """Three 3x3 conv-BN-relu blocks, one 2x2 average pool, global pool, dense.

    Attributes:
      num_classes: number of output logits.
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = batch_norm(train)
        # The convs feed batch norm, whose shift makes a conv bias redundant.
        conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding="SAME", use_bias=False)
        x = nn.relu(norm()(conv(16)(x)))
        x = nn.relu(norm()(conv(32)(x)))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(norm()(conv(64)(x)))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


class MLP(nn.Module):
    """Flatten, Dense(hidden), relu, Dense(num_classes); no batch norm.

    Attributes:
      num_classes: number of output logits.
      hidden: width of the hidden layer.
    """

    num_classes: int = 10
    hidden: int = 64

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train  # no layer behaves differently in training
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


@register("small_cnn", input_shape=(1, 8, 8, 1))
def small_cnn(num_classes: int) -> nn.Module:
    """The digits CNN (see :class:`SmallCNN`)."""
    return SmallCNN(num_classes=num_classes)


@register("mlp", input_shape=(1, 8, 8, 1))
def mlp(num_classes: int) -> nn.Module:
    """The tiny test MLP (see :class:`MLP`)."""
    return MLP(num_classes=num_classes)
