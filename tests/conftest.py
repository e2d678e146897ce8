"""Shared fixtures for the core test suite: tiny Flax models and per-particle batches.

Numerics settings for the whole suite:

* ``jax_numpy_rank_promotion="raise"``: every broadcast between arrays of
  different rank must be explicit. (``"warn"`` is not an option: pytest turns
  warnings into errors.)
* JAX's persistent compilation cache is on, in ``.cache/jax`` of the
  checkout (``SFPK_JAX_COMPILE_CACHE`` overrides it, ``=off`` turns it off).
* XLA compiles with most optimizations off (``jax_disable_most_optimizations``,
  also for the subprocesses the suite starts). The suite compiles thousands of
  small programs and runs each briefly: on a fresh checkout (CI: an empty
  cache) compiling was more than half of its time, and unoptimized programs
  compile in about a third less time while computing the same functions.
  ``SFPK_JAX_SUITE_OPTIMIZE=1`` keeps XLA's optimizations.
* ``jax_numpy_dtype_promotion="strict"`` (no implicit dtype promotion) for
  the test modules marked ``strict_promotion`` (the math of the step); the
  model/training modules of the package rely on implicit promotion inside
  Flax (e.g. ``float32`` / ``int32``), so the rest of the suite keeps
  ``"standard"``.

Tests that start subprocesses, run experiments end to end or run long
simulations carry the ``slow`` marker: ``pytest -m "not slow"`` is the quick run.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, settings

from experiments.harness import compile_cache
from sfpk_jax.core.layers import Layers, trace_layers

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "standard")
if os.environ.get("SFPK_JAX_SUITE_OPTIMIZE") != "1":
    # In the environment too, for the experiments and workers started as subprocesses.
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    jax.config.update("jax_disable_most_optimizations", True)

# JAX's persistent compilation cache, in a folder of the checkout that git
# ignores (not the user's cache): a second run of the suite loads most programs
# instead of compiling them. Set in the environment, so that the experiments
# the suite starts as subprocesses use the same folder. SFPK_JAX_COMPILE_CACHE
# set beforehand (a folder, or "off") wins.
# One folder per xdist worker: JAX writes cache entries without a lock, so a
# worker could read another's half-written entry. _SUITE_CACHE marks the
# folder as the suite's own choice (the workers inherit the controller's
# environment), as opposed to one the user set.
_SUITE_CACHE = "SFPK_JAX_SUITE_CACHE"
if compile_cache.ENV not in os.environ or os.environ.get(_SUITE_CACHE) == "1":
    _worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    os.environ[compile_cache.ENV] = str(Path(__file__).resolve().parents[1] / ".cache" / "jax"
                                        / _worker)
    os.environ[_SUITE_CACHE] = "1"
if compile_cache.default_dir() is not None:
    compile_cache.enable(compile_cache.default_dir())

# Hypothesis imports libcst lazily to print a patch for a failing example; that
# import raises a DeprecationWarning (mypy_extensions.TypedDict) which, with
# filterwarnings=error, turns every failing property into a pytest INTERNALERROR
# that hides the failure. Importing it once here, warnings silenced, avoids that.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:
        pass

settings.register_profile(
    "core",
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile("core")

FEATURES, CLASSES, HIDDEN = 8, 4, 16
IMAGE = (6, 6, 1)


class TinyMLP(nn.Module):
    """Dense(16) - relu - Dense(4) on 8 features."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        del train
        x = nn.relu(nn.Dense(HIDDEN)(x))
        return nn.Dense(CLASSES)(x)


class TinyCNN(nn.Module):
    """Conv(4, 3x3, valid) - BatchNorm - relu - flatten - Dense(4) on 6x6x1 images."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(4, (3, 3), padding="VALID")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(CLASSES)(x)


class TinyModel:
    """A model, its variables and a pure training-mode ``loss_fn(params, batch)``."""

    def __init__(self, name: str, module: nn.Module, input_shape: tuple[int, ...], seed: int = 0):
        self.name = name
        self.module = module
        self.input_shape = input_shape
        variables = module.init(jax.random.PRNGKey(seed), jnp.zeros((2,) + input_shape), True)
        # Stand-in for trained weights: Flax initialises biases to 0 (and BN
        # scales to 1), which would make |m * theta| tie at 0; jitter every leaf.
        rng = np.random.default_rng(seed + 1)
        self.params = jax.tree.map(
            lambda p: jnp.asarray(p + 0.1 * rng.standard_normal(p.shape), jnp.float32),
            variables["params"],
        )
        self.extra = {k: v for k, v in variables.items() if k != "params"}
        self.variables = {**self.extra, "params": self.params}

    def logits(self, params, x):
        variables = {**self.extra, "params": params}
        if "batch_stats" in self.extra:
            # Training mode: batch statistics; the running ones are discarded.
            out, _ = self.module.apply(variables, x, True, mutable=["batch_stats"])
            return out
        return self.module.apply(variables, x, True)

    def loss_fn(self, params, batch):
        logits = self.logits(params, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    def batch(self, rng: np.random.Generator, size: int, dtype=np.float32) -> dict:
        """One mini-batch: inputs ~ N(0, 1), labels from a fixed random linear teacher."""
        x = rng.standard_normal((size,) + self.input_shape).astype(dtype)
        teacher = np.random.default_rng(1234).standard_normal((int(np.prod(self.input_shape)), CLASSES))
        y = np.argmax(x.reshape(size, -1) @ teacher, axis=-1).astype(np.int32)
        return {"x": x, "y": y}

    def particle_batches(self, n: int, size: int = 8, seed: int = 0, dtype=np.float32, shared: bool = False) -> Iterator[dict]:
        """Infinite per-step batches with leading axis n (particle i uses slice i).

        ``shared=True`` gives every particle the same mini-batch.
        """
        rng = np.random.default_rng(seed)
        while True:
            if shared:
                one = self.batch(rng, size, dtype)
                yield {k: np.stack([v] * n) for k, v in one.items()}
            else:
                parts = [self.batch(rng, size, dtype) for _ in range(n)]
                yield {k: np.stack([p[k] for p in parts]) for k in parts[0]}

    def batches_list(self, n: int, steps: int, **kw) -> list[dict]:
        it = self.particle_batches(n, **kw)
        return [next(it) for _ in range(steps)]

    @property
    def layers(self) -> Layers:
        """The model's layers, read off its loss (what channel masks need)."""
        return trace_layers(self.loss_fn, self.params, self.batch(np.random.default_rng(0), 2))


def flax_axes(path: str, leaf) -> bool | tuple[int, int]:
    """A ``prunable`` for hand-made trees of Flax-named leaves (no model to read layers off):
    kernels ``(..., in, out)`` take channel masks, biases are selected (and follow them)."""
    name = path.rpartition("/")[2]
    if name == "kernel" and np.ndim(leaf) >= 2:
        return np.ndim(leaf) - 1, np.ndim(leaf) - 2
    return name == "bias"


def _as_float64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64) if np.issubdtype(np.asarray(a).dtype, np.floating) else a, tree)


@pytest.fixture(scope="module", autouse=True)
def _strict_dtype_promotion(request):
    """Modules marked ``strict_promotion`` run with jax_numpy_dtype_promotion="strict"
    (module-wide, so module-scoped fixtures such as simulation runs are covered too)."""
    marks = getattr(request.module, "pytestmark", [])
    marks = marks if isinstance(marks, list) else [marks]
    if any(mark.name == "strict_promotion" for mark in marks):
        with jax.numpy_dtype_promotion("strict"):
            yield
    else:
        yield


@pytest.fixture(autouse=True)
def _restore_loggers():
    """The experiments' ``progress.configure`` sets up the library's and the runs' loggers
    for a whole process; put them back after each test, so that no log line of one test
    lands in another's output (a doctest's, say)."""
    loggers = [logging.getLogger(name) for name in ("sfpk_jax", "experiments")]
    saved = [(list(logger.handlers), logger.level, logger.propagate) for logger in loggers]
    yield
    for logger, (handlers, level, propagate) in zip(loggers, saved):
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.fixture(scope="session")
def mlp() -> TinyModel:
    return TinyModel("mlp", TinyMLP(), (FEATURES,))


@pytest.fixture(scope="session")
def cnn() -> TinyModel:
    return TinyModel("cnn", TinyCNN(), IMAGE)


@pytest.fixture(params=["mlp", "cnn"])
def model(request) -> TinyModel:
    return request.getfixturevalue(request.param)


@pytest.fixture
def as_float64():
    return _as_float64

