"""Models written the way the frameworks' own examples write them, on 8x8 one-channel images.

* ``NNXCNN``: Flax's NNX MNIST tutorial CNN (two convolutions with average
  pooling, two linear layers), with a batch norm after the first convolution.
* ``EqxCNN``: Equinox's MNIST example (a list of layers: convolution, max
  pooling, flatten, three linear layers, log-softmax), with a batch norm.
* ``LinenResNet``: Flax Linen's ImageNet ResNet example in small (an initial
  convolution, residual blocks with batch norm and a projection shortcut, a
  dense classifier).

:func:`build` returns each as a :class:`Model`: the params to prune, a pure
training-mode ``loss_fn(params, batch)`` on ``{"image", "label"}`` batches
(NHWC), the batch-norm statistics and their ``forward`` for
:func:`sfpk_jax.recompute_batch_stats`, and an eval-mode ``logits(params,
stats, images)``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, NamedTuple

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import sfpk_jax

CLASSES = 10


class NNXCNN(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, kernel_size=(3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(16, rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
        self.avg_pool = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(32 * 2 * 2, 64, rngs=rngs)
        self.linear2 = nnx.Linear(64, CLASSES, rngs=rngs)

    def __call__(self, x):
        x = self.avg_pool(nnx.relu(self.bn1(self.conv1(x))))
        x = self.avg_pool(nnx.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        return self.linear2(nnx.relu(self.linear1(x)))


class EqxCNN(eqx.Module):
    layers: list

    def __init__(self, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.layers = [
            eqx.nn.Conv2d(1, 8, kernel_size=3, key=k1),
            eqx.nn.BatchNorm(8, axis_name="batch", mode="batch"),
            eqx.nn.MaxPool2d(kernel_size=2),
            jax.nn.relu,
            jnp.ravel,
            eqx.nn.Linear(8 * 5 * 5, 64, key=k2),
            jax.nn.sigmoid,
            eqx.nn.Linear(64, 32, key=k3),
            jax.nn.relu,
            eqx.nn.Linear(32, CLASSES, key=k4),
            jax.nn.log_softmax,
        ]

    def __call__(self, x, state):
        for layer in self.layers:
            if isinstance(layer, eqx.nn.BatchNorm):
                x, state = layer(x, state)
            else:
                x = layer(x)
        return x, state


class ResNetBlock(nn.Module):
    filters: int
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x, train: bool):
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        residual = x
        y = nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.filters, (3, 3), use_bias=False)(y)
        y = norm(scale_init=nn.initializers.zeros)(y)
        if residual.shape != y.shape:
            residual = nn.Conv(self.filters, (1, 1), self.strides, use_bias=False,
                               name="conv_proj")(residual)
            residual = norm(name="norm_proj")(residual)
        return nn.relu(residual + y)


class LinenResNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(8, (3, 3), use_bias=False, name="conv_init")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                 name="bn_init")(x))
        x = ResNetBlock(8)(x, train)
        x = ResNetBlock(16, (2, 2))(x, train)
        return nn.Dense(CLASSES)(jnp.mean(x, axis=(1, 2)))


class Model(NamedTuple):
    """A framework's model as the tests use it."""

    params: Any
    loss_fn: Callable
    stats: Any
    forward: Callable  # params -> (stats, batch) -> stats: one training-mode step
    logits: Callable  # (params, stats, images) -> eval-mode logits
    output: str  # the path of the classifier's weight
    first: str  # the path of the first convolution's weight
    first_bias: str | None  # its bias, if it has one
    preactivation: Callable  # (params, images) -> the first convolution's output, NHWC


def _xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def nnx_model(seed: int = 0) -> Model:
    model = NNXCNN(rngs=nnx.Rngs(seed))
    model.train()
    graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    merge = lambda p, s: nnx.merge(graphdef, p, s, rest, copy=True)

    def loss_fn(p, batch):
        return _xent(merge(p, stats)(batch["image"]), batch["label"])

    def forward(p):
        def step(s, batch):
            copy = merge(p, s)
            copy.train()
            copy(batch["image"])
            return nnx.state(copy, nnx.BatchStat)

        return step

    def logits(p, s, images):
        copy = merge(p, s)
        copy.eval()
        return copy(images)

    return Model(params, loss_fn, stats, forward, logits, "linear2/kernel", "conv1/kernel",
                 "conv1/bias", lambda p, x: merge(p, stats).conv1(x))


def equinox_model(seed: int = 0) -> Model:
    model, state = eqx.nn.make_with_state(EqxCNN)(jax.random.key(seed))
    split = sfpk_jax.split_equinox(model)

    def run(p, s, images, inference):
        net = eqx.nn.inference_mode(split.merge(p), inference)
        x = jnp.moveaxis(images, -1, 1)  # Equinox convolutions take (C, H, W)
        return jax.vmap(net, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, s)

    def loss_fn(p, batch):
        return _xent(run(p, state, batch["image"], False)[0], batch["label"])

    def first_conv(p, images):
        out = jax.vmap(split.merge(p).layers[0])(jnp.moveaxis(images, -1, 1))
        return jnp.moveaxis(out, 1, -1)

    return Model(split.params, loss_fn, state,
                 lambda p: lambda s, batch: run(p, s, batch["image"], False)[1],
                 lambda p, s, images: run(p, s, images, True)[0],
                 "layers/9/weight", "layers/0/weight", "layers/0/bias", first_conv)


def linen_model(seed: int = 0) -> Model:
    module = LinenResNet()
    variables = module.init(jax.random.key(seed), jnp.zeros((2, 8, 8, 1)), train=False)
    stats = variables["batch_stats"]

    def apply(p, s, images, train):
        out = module.apply({"params": p, "batch_stats": s}, images, train=train,
                           mutable=["batch_stats"] if train else False)
        return out if train else (out, s)

    def first_conv(p, images):
        return nn.Conv(8, (3, 3), use_bias=False).apply({"params": p["conv_init"]}, images)

    return Model(variables["params"],
                 lambda p, batch: _xent(apply(p, stats, batch["image"], True)[0], batch["label"]),
                 stats,
                 lambda p: lambda s, batch: apply(p, s, batch["image"], True)[1]["batch_stats"],
                 lambda p, s, images: apply(p, s, images, False)[0],
                 "Dense_0/kernel", "conv_init/kernel", None, first_conv)


BUILD = {"linen": linen_model, "nnx": nnx_model, "equinox": equinox_model}


def build(framework: str, seed: int = 0) -> Model:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return BUILD[framework](seed)
