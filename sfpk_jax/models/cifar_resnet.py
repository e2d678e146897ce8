"""CIFAR ResNets in the two forms the official code builds.

A 3x3 stem conv, three stages of basic blocks (widths ``w, 2w, 4w``; the
first block of stages 2 and 3 halves the resolution), global average pooling
and one classifier. Convolutions have no bias (batch norm follows each of
them); the shortcut is a strided 1x1 conv + batch norm where the shape
changes, and the identity elsewhere. The official ``Utils/load.py`` takes

* ``resnet20``, ``resnet56`` and ``wrn20`` from ``Models/lottery_resnet.py``
  (open_lth): its identity shortcut (``layers.Identity2d``) multiplies by a
  trained per-channel weight, initialised to 1 and never pruned (here the
  block's ``shortcut`` parameter), and the dense classifier has a bias;
* ``resnet32`` from ``Models/probmask_cifar_resnet.py``: widths 32/64/128,
  parameter-free identity shortcuts, and a bias-free 1x1 conv classifier on
  the pooled 1x1 map, i.e. a dense layer without bias.

Module names follow the lottery form (``conv``, ``bn``, ``blocks.{i}.conv1``,
``blocks.{i}.shortcut.0``, ``fc``).
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
      identity_scale: the identity shortcut multiplies by a per-channel
        weight (``shortcut``), as the lottery form's ``Identity2d`` does.
    """

    features: int
    downsample: bool = False
    identity_scale: bool = True

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
        elif self.identity_scale:
            scale = self.param("shortcut", nn.initializers.ones, (x.shape[-1],))
            shortcut = x * scale.reshape((1,) * (x.ndim - 1) + scale.shape)
        else:
            shortcut = x
        return nn.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6d+2) for 32x32 images.

    Attributes:
      depth: total number of conv + dense layers, ``6 * blocks + 2``.
      width: channels of the first stage (16 for ResNet-20, 32 for WRN-20).
      num_classes: number of output logits.
      identity_scale: identity shortcuts carry a per-channel weight (the
        lottery form) or nothing (the ProbMask form).
      classifier_bias: the classifier has a bias (the lottery form).
    """

    depth: int
    width: int
    num_classes: int = 10
    identity_scale: bool = True
    classifier_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if (self.depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {self.depth}")
        blocks_per_stage = (self.depth - 2) // 6
        x = nn.Conv(
            self.width, (3, 3), padding=1, use_bias=False, kernel_init=KAIMING_NORMAL, name="conv",
        )(x)
        x = batch_norm(train)(name="bn")(x)
        x = nn.relu(x)
        index = 0
        for stage, features in enumerate((self.width, 2 * self.width, 4 * self.width)):
            for block in range(blocks_per_stage):
                downsample = stage > 0 and block == 0
                x = BasicBlock(features, downsample, self.identity_scale,
                               name=f"blocks_{index}")(x, train)
                index += 1
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, use_bias=self.classifier_bias,
                        kernel_init=KAIMING_NORMAL, name="fc")(x)


@register("resnet20", input_shape=CIFAR_INPUT)
def resnet20(num_classes: int) -> nn.Module:
    """ResNet-20, widths 16/32/64 (lottery form)."""
    return CifarResNet(depth=20, width=16, num_classes=num_classes)


@register("resnet32", input_shape=CIFAR_INPUT)
def resnet32(num_classes: int) -> nn.Module:
    """ResNet-32, widths 32/64/128 (ProbMask form, ``Models/probmask_cifar_resnet.py``)."""
    return CifarResNet(depth=32, width=32, num_classes=num_classes, identity_scale=False,
                       classifier_bias=False)


@register("resnet56", input_shape=CIFAR_INPUT)
def resnet56(num_classes: int) -> nn.Module:
    """ResNet-56, widths 16/32/64 (lottery form)."""
    return CifarResNet(depth=56, width=16, num_classes=num_classes)


@register("wrn20", input_shape=CIFAR_INPUT)
def wrn20(num_classes: int) -> nn.Module:
    """Wide ResNet-20 (the official ``wide_resnet20``), widths 32/64/128 (lottery form)."""
    return CifarResNet(depth=20, width=32, num_classes=num_classes)
