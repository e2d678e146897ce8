"""CIFAR VGGs with batch norm, in the two forms the official code builds.

Stacks of 3x3 conv-BN-relu separated by 2x2 max-pools and one classifier on
the 512 features of the final 1x1 map. The official ``Utils/load.py`` takes
its two CIFAR VGG-BNs from different files:

* ``vgg16_bn``: the lottery-ticket (open_lth) form (``Models/lottery_vgg.py``):
  convs with a bias (not prunable) although batch norm follows, a final 2x2
  average pool (2x2 -> 1x1 on 32x32 inputs), a dense classifier with bias.
* ``vgg19_bn``: the ProbMask form (``Models/probmask_cifar_vgg_bn.py``): no
  conv has a bias, a fifth max-pool ends the plan (1x1 on 32x32 inputs), and
  the classifier is a bias-free 1x1 conv on that map, i.e. a dense layer
  without bias.

Module names follow the lottery form (``layers.{i}.conv``, ``layers.{i}.bn``,
``fc``; ``i`` the index in the plan) for both.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from sfpk_jax.models.common import CIFAR_INPUT, KAIMING_NORMAL, batch_norm
from sfpk_jax.models.registry import register

POOL = "M"
VGG16_PLAN = (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512)
# Configuration "E" of the ProbMask file: it ends in a max-pool.
VGG19_PLAN = (
    64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL,
    512, 512, 512, 512, POOL, 512, 512, 512, 512, POOL,
)  # fmt: skip


class ConvBN(nn.Module):
    """3x3 conv, batch norm, relu.

    Attributes:
      features: output channels.
      bias: whether the conv has a bias.
    """

    features: int
    bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Conv(self.features, (3, 3), padding=1, use_bias=self.bias,
                    kernel_init=KAIMING_NORMAL, name="conv")(x)
        x = batch_norm(train)(name="bn")(x)
        return nn.relu(x)


class VGG(nn.Module):
    """VGG-BN following ``plan`` (channel counts, ``"M"`` for a max-pool).

    Attributes:
      plan: the layer plan.
      num_classes: number of output logits.
      bias: convs and classifier have biases (the lottery form) or none (the
        ProbMask form).
      avg_pool: a 2x2 average pool before the classifier (the lottery form;
        the ProbMask plan ends in a max-pool instead).
    """

    plan: tuple[int | str, ...]
    num_classes: int = 10
    bias: bool = True
    avg_pool: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        # Names use the index in the plan, like the official nn.Sequential.
        for index, spec in enumerate(self.plan):
            if spec == POOL:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            else:
                x = ConvBN(spec, self.bias, name=f"layers_{index}")(x, train)
        if self.avg_pool:
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes, use_bias=self.bias, kernel_init=KAIMING_NORMAL,
                        name="fc")(x)


@register("vgg16_bn", input_shape=CIFAR_INPUT)
def vgg16_bn(num_classes: int) -> nn.Module:
    """VGG-16 with batch norm, CIFAR lottery form (``Models/lottery_vgg.py``)."""
    return VGG(plan=VGG16_PLAN, num_classes=num_classes)


@register("vgg19_bn", input_shape=CIFAR_INPUT)
def vgg19_bn(num_classes: int) -> nn.Module:
    """VGG-19 with batch norm, CIFAR ProbMask form (``Models/probmask_cifar_vgg_bn.py``)."""
    return VGG(plan=VGG19_PLAN, num_classes=num_classes, bias=False, avg_pool=False)
