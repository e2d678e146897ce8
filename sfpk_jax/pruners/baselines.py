"""Scores of the one-shot baselines: random, SNIP, GraSP and SynFlow.

Each ``*_scores`` function returns one score array per prunable leaf (a list
in :class:`~sfpk_jax.core.masks.MaskLayout` order) with the convention of the
official SFPK code (``Methods/pruners.py``): **higher scores are kept**, the
``floor(sparsity * D)`` lowest are removed (globally, or per layer in local
scope). :func:`sfpk_jax.core.topk.masks_from_scores` turns any such scores
into exact-count masks.

Data conventions (SNIP and GraSP): ``batches`` yields the same per-step
batches as SFPK, every leaf with a leading particle axis ``n``. Each slice
``batch[i]`` is treated as one mini-batch of the official data loader (its own
mean loss, its own batch-norm statistics), and the gradients are summed over
all ``n`` slices of the first ``num_batches`` batches, as the official code
sums them over the batches of its loader. Pass batches with ``n = 1`` to use
exactly ``num_batches`` mini-batches.

Weights that are already zero (pruned earlier) are never kept, as in SFPK and
magnitude pruning, even where that leaves fewer than the target count.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sfpk_jax.core.masks import MaskLayout, path_to_str
from sfpk_jax.core.topk import alive_weights, check_sparsity, masks_from_scores

PyTree = Any
LogitsFn = Callable[[PyTree, jax.Array], jax.Array]

GRASP_TEMPERATURE = 200.0  # official GraSP: logits / 200 before the loss
GRASP_EPS = 1e-10  # official GraSP: scores / (|sum| + 1e-10)


# ---------------------------------------------------------------------- data


def _take_batches(batches: Iterable[Any] | None, num_batches: int, method: str) -> list[Any]:
    if batches is None:
        raise ValueError(
            f"{method} needs data: pass `batches` (per-step batches with a leading "
            "particle axis, as for SFPK)"
        )
    if isinstance(num_batches, bool) or not isinstance(num_batches, (int, np.integer)) or num_batches < 1:
        raise ValueError(f"num_batches must be an integer >= 1, got {num_batches!r}")
    taken = list(itertools.islice(iter(batches), int(num_batches)))
    if len(taken) < num_batches:
        raise ValueError(f"{method}: batches ran out after {len(taken)} of num_batches={num_batches}")
    for t, batch in enumerate(taken):
        leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
        if not leaves:
            raise ValueError(f"{method}: batch {t} is empty")
        sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for _, leaf in leaves}
        if None in sizes or len(sizes) != 1:
            shapes = ", ".join(f"{path_to_str(p) or '<root>'}: {np.shape(x)}" for p, x in leaves)
            raise ValueError(
                f"{method}: batch {t} leaves ({shapes}) need one common leading particle "
                "axis n (slice i is one mini-batch)"
            )
    return taken


def _sum_over_slices(fn: Callable[[Any], list], batch: Any) -> list:
    """``sum_i fn(batch[i])`` over the leading (particle) axis, one slice at a time."""
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    first = fn(jax.tree.map(lambda x: x[0], batch))
    if n == 1:
        return first
    rest = jax.tree.map(lambda x: x[1:], batch)

    def body(total, one):
        return [a + b for a, b in zip(total, fn(one))], None

    total, _ = jax.lax.scan(body, first, rest)
    return total


def _normalized(scores: list, norm: jax.Array) -> list:
    return [s / norm.astype(s.dtype) for s in scores]


# --------------------------------------------------------------------- random


def random_scores(layout: MaskLayout, params: PyTree, key: jax.Array) -> list[jax.Array]:
    """i.i.d. N(0, 1) scores, leaf ``l`` drawn from ``fold_in(key, l)``.

    Follows the official ``Randn`` (``torch.randn_like`` scores, top kept);
    data and weight values are ignored (only their shapes are used).
    """
    if key is None:
        raise ValueError("random pruning needs a PRNG key: pass key=jax.random.key(seed)")
    dtypes = [jnp.result_type(t) for t in layout.gather(params)]
    return [
        jax.random.normal(jax.random.fold_in(key, l), shape, dtype)
        for l, (shape, dtype) in enumerate(zip(layout.shapes, dtypes))
    ]


# ----------------------------------------------------------------------- SNIP


def snip_scores(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    layout: MaskLayout,
    batches: Iterable[Any],
    num_batches: int = 1,
) -> list[jax.Array]:
    """SNIP (Lee, Ajanthan & Torr, ICLR 2019): ``|dL/dm|`` at ``m = 1``.

    Since the loss sees ``m * theta``, ``dL/dm = theta * dL/dtheta``. As in the
    official ``SNIP`` (after mi-lad/snip): the gradient is accumulated over
    the pruning mini-batches (here every particle slice of the first
    ``num_batches`` batches) *before* the absolute value, and the scores are
    divided by their sum (which does not change the ranking).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` (mean over the mini-batch).
      params: the trained parameters.
      layout: the prunable leaves.
      batches: per-step batches with a leading particle axis.
      num_batches: how many of them to use.

    Returns:
      Non-negative scores summing to 1 (unless all are 0), per prunable leaf.
    """
    taken = _take_batches(batches, num_batches, "snip")

    @jax.jit
    def batch_grad(theta, params, batch):
        def one(b):
            return jax.grad(lambda th: loss_fn(layout.replace(params, th), b))(theta)

        return _sum_over_slices(one, batch)

    theta = layout.gather(params)
    grad = None
    for batch in taken:
        g = batch_grad(theta, params, batch)
        grad = g if grad is None else [a + b for a, b in zip(grad, g)]
    scores = [jnp.abs(t * g) for t, g in zip(theta, grad)]
    norm = sum(jnp.sum(s) for s in scores)
    return _normalized(scores, jnp.where(norm > 0, norm, 1.0))


# ---------------------------------------------------------------------- GraSP


def _tempered_loss(logits_fn: LogitsFn, layout: MaskLayout, temperature: float,
                   input_key: Any, label_key: Any) -> Callable:
    def loss(theta, params, batch):
        logits = logits_fn(layout.replace(params, theta), batch[input_key]) / temperature
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[label_key]).mean()

    return loss


def grasp_scores(
    logits_fn: LogitsFn,
    params: PyTree,
    layout: MaskLayout,
    batches: Iterable[Any],
    num_batches: int = 1,
    *,
    temperature: float = GRASP_TEMPERATURE,
    input_key: Any = "image",
    label_key: Any = "label",
) -> list[jax.Array]:
    """GraSP (Wang, Zhang & Grosse, ICLR 2020), as the official ``GraSP`` class.

    With ``L_T`` the cross-entropy of ``logits / T`` (T = 200):

    1. ``g = sum_b grad L_T(batch b)`` over the prunable leaves, held constant;
    2. ``Hg = sum_b d/dtheta <grad L_T(batch b), g>`` (a Hessian-vector product
       over the prunable leaves, here forward-over-reverse ``jax.jvp``);
    3. score ``= theta * Hg / (|sum(theta * Hg)| + 1e-10)``.

    The paper's score is ``S(-theta) = -theta * Hg`` and removes its largest
    values; the official code keeps the largest ``theta * Hg`` instead, which
    is the same mask. These scores are the official ones: higher is kept.

    Args:
      logits_fn: ``logits_fn(params, x) -> logits`` of the model (train-mode
        batch norm, as the loss the official code differentiates).
      params: the trained parameters.
      layout: the prunable leaves.
      batches: per-step batches with a leading particle axis; the same
        ``num_batches`` batches serve both passes, as the official code
        iterates its loader twice.
      num_batches: how many batches to use.
      temperature: T.
      input_key, label_key: where inputs and integer labels sit in a batch
        (``batch[input_key]``; ints index tuple batches).

    Returns:
      Signed scores per prunable leaf.
    """
    taken = _take_batches(batches, num_batches, "grasp")
    loss = _tempered_loss(logits_fn, layout, temperature, input_key, label_key)
    grad_fn = jax.grad(loss)

    @jax.jit
    def first_pass(theta, params, batch):
        return _sum_over_slices(lambda b: grad_fn(theta, params, b), batch)

    @jax.jit
    def second_pass(theta, params, g, batch):
        def hvp(b):
            return jax.jvp(lambda th: grad_fn(th, params, b), (theta,), (g,))[1]

        return _sum_over_slices(hvp, batch)

    def accumulate(fn, *args):
        total = None
        for batch in taken:
            part = fn(*args, batch)
            total = part if total is None else [a + b for a, b in zip(total, part)]
        return total

    theta = layout.gather(params)
    g = accumulate(first_pass, theta, params)
    hg = accumulate(second_pass, theta, params, g)
    scores = [t * h for t, h in zip(theta, hg)]
    norm = jnp.abs(sum(jnp.sum(s) for s in scores)) + GRASP_EPS
    return _normalized(scores, norm)


# -------------------------------------------------------------------- SynFlow


def synflow_scores(
    logits_fn: LogitsFn,
    params: PyTree,
    layout: MaskLayout,
    input_shape: Sequence[int],
    masks: Sequence[jax.Array] | None = None,
) -> list[jax.Array]:
    """SynFlow (Tanaka et al., NeurIPS 2020): ``|theta * dR/dtheta|``.

    As the official ``SynFlow`` class: every parameter (prunable or not:
    biases, batch-norm scales and offsets) is replaced by its absolute value,
    ``R`` is the sum of the network's output on one all-ones input of the
    data's per-example shape (batch of 1), and the score is
    ``|theta * dR/dtheta|`` at the linearised parameters. The official code
    runs the network in *train* mode (``model.train()``: batch norm uses the
    statistics of that single input); pass a train-mode ``logits_fn`` to
    match it, or an eval-mode one to match the original SynFlow repository.
    Running statistics live outside ``params`` and are left as they are.

    Args:
      logits_fn: ``logits_fn(params, x) -> output``.
      params: the trained parameters.
      layout: the prunable leaves.
      input_shape: per-example input shape (no batch axis).
      masks: optional current 0/1 masks per prunable leaf (iterative SynFlow):
        the linearised prunable weights are ``|theta| * mask``.

    Returns:
      Non-negative scores per prunable leaf.
    """
    shape = (1,) + tuple(int(d) for d in input_shape)
    dtypes = {jnp.result_type(x) for x in jax.tree_util.tree_leaves(params)}
    dtype = jnp.result_type(*dtypes) if dtypes else jnp.float32
    linear = jax.tree.map(jnp.abs, params)
    theta = layout.gather(linear)
    if masks is not None:
        theta = [t * jnp.asarray(m, t.dtype) for t, m in zip(theta, masks)]

    @jax.jit
    def flow_grad(theta, linear):
        def r(th):
            return jnp.sum(logits_fn(layout.replace(linear, th), jnp.ones(shape, dtype)))

        return jax.grad(r)(theta)

    grad = flow_grad(theta, linear)
    return [jnp.abs(t * g) for t, g in zip(theta, grad)]


def synflow_masks(
    logits_fn: LogitsFn,
    params: PyTree,
    layout: MaskLayout,
    input_shape: Sequence[int],
    sparsity: float,
    scope: str = "global",
    key: jax.Array | None = None,
    iterations: int = 1,
) -> PyTree:
    """SynFlow masks, one shot (the official code) or iterative (the paper).

    With ``iterations = K > 1``, round ``k = 1..K`` prunes to density
    ``(1 - sparsity) ** (k / K)``, scoring with the masked linearised weights
    of the previous round (the SynFlow paper uses K = 100); every round keeps
    an exact count, and a weight once removed stays removed. N:M masks
    (``layout.n_m``) take one round only: a round's intermediate density is
    no N:M pattern.
    """
    sparsity = check_sparsity(sparsity)
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    if layout.n_m is not None and iterations > 1:
        raise ValueError(f"synflow with iterations={iterations} prunes through intermediate "
                         f"densities that mask_dim='{layout.n_m}' cannot hold: use iterations=1")
    alive = alive_weights(layout, params)
    masks = None
    for k in range(1, int(iterations) + 1):
        removed = sparsity if k == iterations else 1.0 - (1.0 - sparsity) ** (k / iterations)
        scores = synflow_scores(logits_fn, params, layout, input_shape, masks)
        keep = alive if masks is None else [a & (m != 0) for a, m in zip(alive, masks)]
        round_key = None if key is None else jax.random.fold_in(key, k)
        tree = masks_from_scores(layout, scores, removed, scope=scope, key=round_key, alive=keep)
        masks = layout.gather(tree)
    return tree
