"""CIFAR VGG with batch norm in the lottery-ticket (open_lth) form of the SFPK experiments.

Stacks of 3x3 conv-BN-relu separated by 2x2 max-pools, a final 2x2 average
pool (2x2 -> 1x1 on 32x32 inputs) and a single dense classifier on the 512
features. As in the official code the convs keep their bias even though batch
norm follows (conv biases are not prunable). Module names mirror the official
PyTorch modules (``layers.{i}.conv``, ``layers.{i}.bn``, ``fc``).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from sfpk_jax.models.common import CIFAR_INPUT, KAIMING_NORMAL, batch_norm
from sfpk_jax.models.registry import register

POOL = "M"
VGG16_PLAN = (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512)
VGG19_PLAN = (
    64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL,
    512, 512, 512, 512, POOL, 512, 512, 512, 512,
)  # fmt: skip


class ConvBN(nn.Module):
    """3x3 conv (with bias), batch norm, relu.

    Attributes:
      features: output channels.
    """

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Conv(self.features, (3, 3), padding=1, kernel_init=KAIMING_NORMAL, name="conv")(x)
        x = batch_norm(train)(name="bn")(x)
        return nn.relu(x)


class VGG(nn.Module):
    """VGG-BN following ``plan`` (channel counts, ``"M"`` for a max-pool).

    Attributes:
      plan: the layer plan.
      num_classes: number of output logits.
    """

    plan: tuple[int | str, ...]
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        # Names use the index in the plan, like the official nn.Sequential.
        for index, spec in enumerate(self.plan):
            if spec == POOL:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            else:
                x = ConvBN(spec, name=f"layers_{index}")(x, train)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes, kernel_init=KAIMING_NORMAL, name="fc")(x)


@register("vgg16_bn", input_shape=CIFAR_INPUT)
def vgg16_bn(num_classes: int) -> nn.Module:
    """VGG-16 with batch norm, CIFAR form."""
    return VGG(plan=VGG16_PLAN, num_classes=num_classes)


@register("vgg19_bn", input_shape=CIFAR_INPUT)
def vgg19_bn(num_classes: int) -> nn.Module:
    """VGG-19 with batch norm, CIFAR form."""
    return VGG(plan=VGG19_PLAN, num_classes=num_classes)
