"""CIFAR ResNets in the lottery-ticket (open_lth) form of the SFPK experiments.

A 3x3 stem conv, three stages of basic blocks (widths ``w, 2w, 4w``; the
first block of stages 2 and 3 halves the resolution), global average pooling
and one dense classifier. Convolutions have no bias (batch norm follows each
of them); the shortcut is the identity when the shape is kept and a strided
1x1 conv + batch norm when it changes, so parameter-free shortcuts carry
nothing to prune. Module names mirror the official PyTorch modules
(``conv``, ``bn``, ``blocks.{i}.conv1``, ``blocks.{i}.shortcut.0``, ``fc``).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from sfpk_jax.models.common import CIFAR_INPUT, KAIMING_NORMAL, batch_norm
from sfpk_jax.models.registry import register


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers around a residual connection.

    Attributes:
      features: output channels.
      downsample: halve the resolution (stride 2) and project the shortcut
        with a 1x1 conv + BN.
    """

    features: int
    downsample: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = batch_norm(train)
        conv = functools.partial(nn.Conv, self.features, use_bias=False, kernel_init=KAIMING_NORMAL)
        stride = 2 if self.downsample else 1
        # Explicit torch-style padding: "SAME" pads a strided conv asymmetrically.
        out = conv((3, 3), strides=stride, padding=1, name="conv1")(x)
        out = nn.relu(norm(name="bn1")(out))
        out = norm(name="bn2")(conv((3, 3), padding=1, name="conv2")(out))
        if self.downsample:
            shortcut = conv((1, 1), strides=2, padding=0, name="shortcut_0")(x)
            shortcut = norm(name="shortcut_1")(shortcut)
        else:
            shortcut = x
        return nn.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6d+2) for 32x32 images.

    Attributes:
      depth: total number of conv + dense layers, ``6 * blocks + 2``.
      width: channels of the first stage (16 for ResNet-20, 32 for WRN-20).
      num_classes: number of output logits.
    """

    depth: int
    width: int
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if (self.depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {self.depth}")
        blocks_per_stage = (self.depth - 2) // 6
        x = nn.Conv(
            self.width, (3, 3), padding=1, use_bias=False, kernel_init=KAIMING_NORMAL, name="conv"
        )(x)
        x = batch_norm(train)(name="bn")(x)
        x = nn.relu(x)
        index = 0
        for stage, features in enumerate((self.width, 2 * self.width, 4 * self.width)):
            for block in range(blocks_per_stage):
                downsample = stage > 0 and block == 0
                x = BasicBlock(features, downsample, name=f"blocks_{index}")(x, train)
                index += 1
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=KAIMING_NORMAL, name="fc")(x)


@register("resnet20", input_shape=CIFAR_INPUT)
def resnet20(num_classes: int) -> nn.Module:
    """ResNet-20, widths 16/32/64."""
    return CifarResNet(depth=20, width=16, num_classes=num_classes)


@register("resnet32", input_shape=CIFAR_INPUT)
def resnet32(num_classes: int) -> nn.Module:
    """ResNet-32, widths 16/32/64."""
    return CifarResNet(depth=32, width=16, num_classes=num_classes)


@register("resnet56", input_shape=CIFAR_INPUT)
def resnet56(num_classes: int) -> nn.Module:
    """ResNet-56, widths 16/32/64."""
    return CifarResNet(depth=56, width=16, num_classes=num_classes)


@register("wrn20", input_shape=CIFAR_INPUT)
def wrn20(num_classes: int) -> nn.Module:
    """Wide ResNet-20 (the official ``wide_resnet20``), widths 32/64/128."""
    return CifarResNet(depth=20, width=32, num_classes=num_classes)
