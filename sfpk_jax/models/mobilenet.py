"""MobileNet-V1 for ImageNet, as the STR checkpoint used by the SFPK experiments.

A strided 3x3 conv-BN-relu stem, 13 depthwise-separable blocks (3x3
depthwise conv-BN-relu, then 1x1 pointwise conv-BN-relu), global average
pooling and the classifier. No conv has a bias. The official classifier is a
bias-free 1x1 conv on the pooled 1x1 map, i.e. a dense layer without bias,
which is what is built here.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sfpk_jax.models.common import batch_norm
from sfpk_jax.models.registry import register

# (output channels, stride) of the depthwise-separable blocks.
BLOCKS = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)  # fmt: skip

# torch's default conv init (kaiming_uniform_ with a=sqrt(5)), which the
# official model keeps: uniform with variance 1 / (3 fan_in).
TORCH_CONV_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv-BN-relu, then 1x1 pointwise conv-BN-relu.

    Attributes:
      features: output channels of the pointwise conv.
      stride: stride of the depthwise conv.
    """

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = batch_norm(train)
        channels = x.shape[-1]
        x = nn.Conv(
            channels,
            (3, 3),
            strides=self.stride,
            padding=1,
            feature_group_count=channels,
            use_bias=False,
            kernel_init=TORCH_CONV_INIT,
            name="dw",
        )(x)
        x = nn.relu(norm(name="dw_bn")(x))
        x = nn.Conv(self.features, (1, 1), use_bias=False, kernel_init=TORCH_CONV_INIT, name="pw")(x)
        return nn.relu(norm(name="pw_bn")(x))


class MobileNetV1(nn.Module):
    """MobileNet-V1 (width 1.0).

    Attributes:
      num_classes: number of output logits.
    """

    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Conv(
            32, (3, 3), strides=2, padding=1, use_bias=False, kernel_init=TORCH_CONV_INIT,
            name="stem",
        )(x)
        x = batch_norm(train)(name="stem_bn")(x)
        x = nn.relu(x)
        for index, (features, stride) in enumerate(BLOCKS):
            x = DepthwiseSeparable(features, stride,
                                   name=f"blocks_{index}")(x, train)
        # The official AvgPool2d(7) is the global pool at 224x224; a global mean
        # also admits smaller inputs.
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, use_bias=False, kernel_init=TORCH_CONV_INIT, name="fc")(x)


@register("mobilenet_v1", input_shape=(1, 224, 224, 3))
def mobilenet_v1(num_classes: int) -> nn.Module:
    """MobileNet-V1 for 224x224 ImageNet images."""
    return MobileNetV1(num_classes=num_classes)
