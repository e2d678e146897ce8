"""The training loop: optax steps with fixed pruning masks, epochs, and evaluation."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from sfpk_jax.core.mask_checks import named_masks
from sfpk_jax.core.masks import apply_masks
from sfpk_jax.data.arrays import batch_iterator
from sfpk_jax.parallel import sharding as sharding_lib
from sfpk_jax.runtime import progress as progress_lib
from sfpk_jax.train.losses import cross_entropy
from sfpk_jax.train.masked import keep_masked

if TYPE_CHECKING:  # the model registry loads only when a model is built
    from sfpk_jax.models import ApplyFn

PyTree = Any

_LOG = logging.getLogger("sfpk_jax.train")


# Bit i of a training step's fault code: which part of the state was NaN or Inf.
FAULTS = ("loss", "model variables", "optimizer state")


def _not_finite(tree: PyTree) -> jax.Array:
    """True when any floating-point leaf of ``tree`` holds a NaN or Inf."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.any(jnp.stack([~jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(False)


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _count_correct(apply_fn: ApplyFn, variables: dict, images: jax.Array, labels: jax.Array,
                   valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits, _ = apply_fn(variables, images, False)
    bad = ~jnp.all(jnp.isfinite(logits), axis=-1) & valid
    return jnp.sum((jnp.argmax(logits, axis=-1) == labels) & valid), jnp.sum(bad)


def _pad_to(a: np.ndarray, size: int) -> np.ndarray:
    pad = [(0, size - len(a))] + [(0, 0)] * (a.ndim - 1)
    return np.pad(a, pad)


def evaluate_batches(apply_fn: ApplyFn, variables: dict, batches: Iterable[dict], *,
                     across_processes: bool = False) -> float:
    """Top-1 accuracy in eval mode over ``{"image", "label"}`` batches.

    Batches smaller than the first are padded to its size, so every pass has
    the same shape (one compilation).

    Args:
      apply_fn: ``apply_fn(variables, x, train) -> (logits, updated_variables)``.
      variables: model variables.
      batches: an iterable of batches, e.g. a non-shuffled loader epoch.
      across_processes: each JAX process passes its own share of the
        examples and the counts are summed over all processes (a collective:
        every process must call it).

    Returns:
      The fraction of correctly classified examples.

    Raises:
      FloatingPointError: the outputs are NaN or Inf on some example.
    """
    counts, size = np.zeros(3, np.int64), None  # correct, not finite, seen
    for batch in batches:
        images, labels = np.asarray(batch["image"]), np.asarray(batch["label"])
        size = size or len(images)
        valid = np.arange(size) < len(images)
        right, wrong = _count_correct(apply_fn, variables, _pad_to(images, size),
                                      _pad_to(labels, size), valid)
        counts += (int(right), int(wrong), len(images))
    if across_processes:
        counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, 3).sum(axis=0)
    correct, bad, seen = (int(c) for c in counts)
    if seen == 0:
        raise ValueError("evaluate_batches got no examples")
    if bad:
        raise FloatingPointError(
            f"the model's outputs are NaN or Inf on {bad} of {seen} evaluation examples: its "
            "weights or batch-norm statistics are not finite")
    return correct / seen


def evaluate(apply_fn: ApplyFn, variables: dict, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
    """Top-1 accuracy in eval mode (running batch-norm statistics).

    Args:
      apply_fn: ``apply_fn(variables, x, train) -> (logits, updated_variables)``.
      variables: model variables.
      x: images.
      y: integer labels aligned with ``x``.
      batch_size: examples per forward pass.

    Returns:
      The fraction of correctly classified examples.
    """
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"x and y must be non-empty and of equal length, got {len(x)} and {len(y)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    batch_size = min(batch_size, len(x))
    return evaluate_batches(
        apply_fn, variables,
        ({"image": x[i : i + batch_size], "label": y[i : i + batch_size]}
         for i in range(0, len(x), batch_size)),
    )


@functools.partial(jax.jit, static_argnames=("apply_fn", "optimizer", "label_smoothing"))
def _train_step(
    apply_fn: ApplyFn,
    optimizer: optax.GradientTransformation,
    label_smoothing: float,
    variables: dict,
    opt_state: optax.OptState,
    batch: dict,
    masks: PyTree | None,
) -> tuple[dict, optax.OptState, jax.Array, jax.Array]:
    def loss_fn(params):
        logits, updated = apply_fn({**variables, "params": params}, batch["image"], True)
        return cross_entropy(logits, batch["label"], label_smoothing), updated

    (loss, updated), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    tx = optimizer if masks is None else keep_masked(optimizer, masks)
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    params = optax.apply_updates(variables["params"], updates)
    variables = {**updated, "params": params}
    # Checked here, in the step, so that a finite loss over weights that have
    # already overflowed is caught too; no host round-trip until the epoch ends.
    faults = sum(bad.astype(jnp.int32) << bit for bit, bad in enumerate(
        [~jnp.isfinite(loss), _not_finite(variables), _not_finite(opt_state)]))
    return variables, opt_state, loss, faults


def _raise_if_not_finite(losses: np.ndarray, faults: np.ndarray, epoch: int) -> None:
    bad = np.flatnonzero(faults)
    if bad.size:
        step, code = int(bad[0]), int(faults[bad[0]])
        what = ", ".join(name for bit, name in enumerate(FAULTS) if code >> bit & 1)
        raise FloatingPointError(
            f"non-finite {what} (loss {losses[step]:.4g}) at epoch {epoch}, step {step + 1}: "
            "try a smaller learning rate"
        )


def train_epoch(
    apply_fn: ApplyFn,
    variables: dict,
    opt_state: optax.OptState,
    batches: Iterable[dict],
    *,
    optimizer: optax.GradientTransformation,
    masks: PyTree | None = None,
    label_smoothing: float = 0.0,
    epoch: int = 1,
    progress: bool = False,
    desc: str = "epoch",
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[dict, optax.OptState, float]:
    """One pass over ``batches``; pruned weights stay exactly zero.

    Args:
      apply_fn: ``apply_fn(variables, x, train) -> (logits, updated_variables)``.
      variables: model variables (``params`` and maybe ``batch_stats``).
      opt_state: the optimizer's state.
      batches: ``{"image", "label"}`` dicts, e.g. a :class:`sfpk_jax.data.Loader` epoch.
      optimizer: the optax transformation that made ``opt_state``.
      masks: optional mask tree; training goes through :func:`keep_masked`, so
        pruned entries get no gradient and stay exactly 0.
      label_smoothing: label smoothing of the cross-entropy, in [0, 1).
      epoch: epoch number, for the error message and the bar.
      progress: show a tqdm bar over the steps (on a terminal or in a notebook).
      desc: label of the bar.
      mesh: optional device mesh (``sfpk_jax.parallel.sharding.particle_mesh()``) for
        data-parallel training: each batch is split over all its devices and
        ``variables``, ``opt_state`` and ``masks`` are replicated, so the jitted
        step runs on every device; batch norm still sees the whole batch. Batch
        sizes must be multiples of the device count. With several processes,
        each passes its own part of every batch (see ``sfpk_jax.parallel.sharding``).
        None: the step runs where its inputs are (one device), as before.

    Returns:
      ``(variables, opt_state, mean loss)``; with a mesh, as arrays replicated
      over it.

    Raises:
      FloatingPointError: when a step's loss, the model's variables or the
        optimizer state became NaN or infinite (the message names which).
      ValueError: with a mesh, when a batch does not split evenly over it.
    """
    if masks is not None:
        named_masks(masks, variables["params"])
    if mesh is not None:
        # jit partitions the step from its inputs' shardings (SPMD): replicated
        # state and a batch split over the devices make it data-parallel, and
        # the outputs come back replicated, so later steps need no re-placing.
        variables, opt_state = sharding_lib.replicate((variables, opt_state), mesh)
        masks = None if masks is None else sharding_lib.replicate(masks, mesh)
    losses, faults = [], []
    # Losses stay on device until the epoch ends, so steps are not synchronised.
    with progress_lib.bar(progress, iterable=batches, desc=f"{desc} {epoch}", leave=False) as bar:
        for batch in bar:
            if mesh is not None:
                batch = sharding_lib.shard_batch(batch, mesh)
            variables, opt_state, loss, fault = _train_step(
                apply_fn, optimizer, label_smoothing, variables, opt_state, batch, masks
            )
            losses.append(loss)
            faults.append(fault)
    if not losses:
        raise ValueError(f"epoch {epoch} had no batches: the data is smaller than one batch")
    epoch_losses = np.asarray(jnp.stack(losses))
    _raise_if_not_finite(epoch_losses, np.asarray(jnp.stack(faults)), epoch)
    return variables, opt_state, float(epoch_losses.mean())


def train(
    apply_fn: ApplyFn,
    variables: dict,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    optimizer: optax.GradientTransformation,
    masks: PyTree | None = None,
    seed: int = 0,
    label_smoothing: float = 0.0,
    progress: bool = True,
    desc: str = "train",
) -> tuple[dict, list[dict[str, float]]]:
    """Trains on in-memory arrays with mini-batch cross-entropy.

    Args:
      apply_fn: ``apply_fn(variables, x, train) -> (logits, updated_variables)``.
      variables: initial model variables (``params`` and maybe ``batch_stats``).
      x: training images.
      y: integer training labels.
      epochs: passes over the data (the last partial batch is dropped).
      batch_size: examples per step, in [1, len(x)].
      optimizer: any optax transformation, e.g. from :func:`sgd_cosine`.
      masks: optional mask tree mirroring ``params`` (``None`` at unpruned
        leaves); parameters and gradients are masked at every step.
      seed: seed of the per-epoch shuffles.
      label_smoothing: label smoothing of the cross-entropy, in [0, 1).
      progress: show a tqdm bar over epochs on a terminal or in a notebook;
        elsewhere (a log file) log one line per epoch (logger ``sfpk_jax.train``).
      desc: label of the progress bar.

    Returns:
      ``(variables, history)``: the trained variables and one
      ``{"epoch", "loss"}`` dict per epoch (mean training loss, epochs from 1).

    Raises:
      FloatingPointError: when a step's loss is NaN or infinite.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if masks is not None:
        variables = {**variables, "params": apply_masks(variables["params"], masks)}
    opt_state = optimizer.init(variables["params"])
    history = []
    drawn = progress_lib.shown(progress)
    with progress_lib.bar(progress, total=epochs, desc=desc) as bar:
        for epoch in range(1, epochs + 1):
            batches = batch_iterator(x, y, batch_size, seed=(seed, epoch))
            variables, opt_state, loss = train_epoch(
                apply_fn, variables, opt_state, batches, optimizer=optimizer, masks=masks,
                label_smoothing=label_smoothing, epoch=epoch,
            )
            history.append({"epoch": epoch, "loss": loss})
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)
            if progress and not drawn:
                _LOG.info("%s: epoch %d/%d, mean loss %.4f", desc, epoch, epochs, loss)
    return variables, history


