"""Settings the zoo's models share, so that they match their PyTorch originals."""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn

# torch's BatchNorm defaults (torch momentum 0.1 is Flax momentum 0.9).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# The official code initialises conv and dense weights with torch's
# kaiming_normal_ (fan-in, relu gain, untruncated) and their biases with 0.
KAIMING_NORMAL = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

CIFAR_INPUT = (1, 32, 32, 3)


def batch_norm(train: bool) -> Callable[..., nn.BatchNorm]:
    """The zoo's batch norm: batch statistics when ``train``, running ones otherwise."""
    return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM,
                             epsilon=BN_EPSILON)
