"""ResNet-50 for ImageNet in torchvision's layout (v1.5).

A 7x7 stride-2 stem conv-BN-relu and a 3x3 stride-2 max-pool, four stages of
bottleneck blocks (1x1, 3x3, 1x1 convs, each followed by BN; the stride sits
on the 3x3 conv as in torchvision v1.5; a 1x1 conv + BN "downsample" projects
the shortcut of each stage's first block), global average pooling and a dense
classifier. Convs have no bias. Module names mirror torchvision's
(``layer1.0.conv1`` is ``layer1_0/conv1``, ``layer1.0.downsample.0`` is
``layer1_0/downsample_0``), which :func:`sfpk_jax.models.load_pretrained`
relies on.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from sfpk_jax.models.common import batch_norm
from sfpk_jax.models.registry import register

STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))  # (bottleneck width, blocks)
EXPANSION = 4

# torchvision initialises convs with kaiming_normal_(mode="fan_out", relu).
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch's default Linear weight init (kaiming_uniform_ with a=sqrt(5)).
LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand, each with BN, around a residual.

    Attributes:
      width: channels of the 1x1 reduce and 3x3 convs; the block outputs
        ``4 * width``.
      stride: stride of the 3x3 conv and of the downsample conv.
      downsample: project the shortcut with a 1x1 conv + BN.
    """

    width: int
    stride: int = 1
    downsample: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = batch_norm(train)
        conv = functools.partial(nn.Conv, use_bias=False, kernel_init=CONV_INIT)
        out = nn.relu(norm(name="bn1")(conv(self.width, (1, 1), name="conv1")(x)))
        # Explicit torch-style padding: "SAME" pads a strided conv asymmetrically.
        out = conv(self.width, (3, 3), strides=self.stride, padding=1, name="conv2")(out)
        out = nn.relu(norm(name="bn2")(out))
        out = norm(name="bn3")(conv(EXPANSION * self.width, (1, 1), name="conv3")(out))
        if self.downsample:
            shortcut = conv(EXPANSION * self.width, (1, 1), strides=self.stride, name="downsample_0")(x)
            shortcut = norm(name="downsample_1")(shortcut)
        else:
            shortcut = x
        return nn.relu(out + shortcut)


class ResNet50(nn.Module):
    """torchvision's ResNet-50.

    Attributes:
      num_classes: number of output logits.
    """

    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Conv(64, (7, 7), strides=2, padding=3, use_bias=False, kernel_init=CONV_INIT,
                    name="conv1")(x)
        x = batch_norm(train)(name="bn1")(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, (width, blocks) in enumerate(STAGES):
            for block in range(blocks):
                first = block == 0
                stride = 2 if first and stage > 0 else 1
                # Every stage's first block changes the channel count (64 -> 256
                # in stage 1), so it always projects the shortcut.
                x = Bottleneck(width, stride, downsample=first,
                               name=f"layer{stage + 1}_{block}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=LINEAR_INIT, name="fc")(x)


@register("resnet50", input_shape=(1, 224, 224, 3))
def resnet50(num_classes: int) -> nn.Module:
    """ResNet-50 for 224x224 ImageNet images."""
    return ResNet50(num_classes=num_classes)
