"""Models by name, behind one calling convention.

Every registered model is built into ``(apply_fn, variables)``:

* ``variables["params"]`` holds the weights, plus ``variables["batch_stats"]``
  when the model has batch norm;
* ``apply_fn(variables, x, train) -> (logits, updated_variables)``: in train
  mode batch norm normalises with batch statistics and ``updated_variables``
  carries the new running statistics; in eval mode (and for models without
  batch norm) the variables come back unchanged.

Model families register a factory with :func:`register`; the factory takes
``num_classes`` and returns a ``flax.linen`` module whose ``__call__`` is
``(x, train: bool) -> logits``. The bundled families (:data:`ZOO`) register
themselves when :func:`build` or :func:`registered` first needs them, so that
importing the package does not build the zoo's modules.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ApplyFn = Callable[[dict, jax.Array, bool], tuple[jax.Array, dict]]
Factory = Callable[[int], nn.Module]

_REGISTRY: dict[str, tuple[Factory, tuple[int, ...]]] = {}
# The modules of the bundled model families; each registers its models when imported.
ZOO = ("cifar_resnet", "deit", "mobilenet", "resnet50", "small_cnn", "vgg")


def _load_zoo() -> None:
    for module in ZOO:
        importlib.import_module(f"sfpk_jax.models.{module}")


def register(name: str, *, input_shape: tuple[int, ...]) -> Callable[[Factory], Factory]:
    """Decorator that registers a model factory under ``name``.

    Args:
      name: registry key used by :func:`build`.
      input_shape: default NHWC (or other) shape of the dummy input used to
        initialise the model, batch axis included.

    Returns:
      The decorator; it returns the factory unchanged.
    """

    def decorator(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = (factory, tuple(input_shape))
        return factory

    return decorator


def default_input_shape(name: str) -> tuple[int, ...]:
    """The shape (batch axis included) a registered model is initialised with by default."""
    _load_zoo()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(registered())}")
    return _REGISTRY[name][1]


def registered() -> tuple[str, ...]:
    """Names of the registered models, sorted."""
    _load_zoo()
    return tuple(sorted(_REGISTRY))


def _apply(module: nn.Module, variables: dict, x: jax.Array, train: bool) -> tuple[jax.Array, dict]:
    if train and "batch_stats" in variables:
        logits, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
        return logits, {**variables, **updates}
    return module.apply(variables, x, train=train), variables


def make_apply_fn(module: nn.Module) -> ApplyFn:
    """Wraps a module whose ``__call__`` is ``(x, train)`` into the apply contract.

    Args:
      module: a ``flax.linen`` module.

    Returns:
      ``apply_fn(variables, x, train) -> (logits, updated_variables)``.
    """
    return functools.partial(_apply, module)


def build(
    name: str,
    num_classes: int = 10,
    key: jax.Array | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> tuple[ApplyFn, dict[str, Any]]:
    """Builds a registered model and initialises its variables.

    Args:
      name: a registered model name (see :func:`registered`).
      num_classes: number of output logits.
      key: PRNG key of the initialisation; ``jax.random.key(0)`` by default.
      input_shape: shape of the dummy initialisation input, batch axis
        included; the model's registered default when ``None``.

    Returns:
      ``(apply_fn, variables)`` following the module docstring's contract.
    """
    _load_zoo()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(registered())}")
    factory, default_shape = _REGISTRY[name]
    module = factory(num_classes)
    key = jax.random.key(0) if key is None else key
    shape = default_shape if input_shape is None else tuple(input_shape)
    variables = dict(module.init(key, jnp.zeros(shape, jnp.float32), train=False))
    return make_apply_fn(module), variables
