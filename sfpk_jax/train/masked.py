"""Masked training as an optax transformation: pruned weights stay exactly 0.

``keep_masked(inner, masks)`` is used like any optax optimizer in the user's
own loop. It zeroes the gradient of pruned entries before ``inner`` sees it
(so momentum and Adam moments never build up there), then projects the
update so that ``params + update`` is exactly 0 at pruned entries, whatever
``inner`` did (weight decay, Adam's epsilon, ...).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sfpk_jax.core.mask_checks import check_values, named_masks, path_to_str

PyTree = Any


def _is_none(x) -> bool:
    return x is None


def keep_masked(inner: optax.GradientTransformation, masks: PyTree) -> optax.GradientTransformation:
    """``inner`` with pruned entries held at exactly 0.

    Example:

    >>> import jax, jax.numpy as jnp, numpy as np, optax, sfpk_jax
    >>> params = {"dense": {"kernel": jnp.array([[0.1, -2.0], [0.5, 3.0]])}}
    >>> masks = sfpk_jax.magnitude_prune(params, 0.5)  # keeps -2 and 3
    >>> tx = sfpk_jax.keep_masked(optax.sgd(0.1, momentum=0.9), masks)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> new = optax.apply_updates(params, updates)  # 0.1 and 0.5 were pruned: exactly 0 now
    >>> np.round(np.asarray(new["dense"]["kernel"], np.float64), 3).tolist()
    [[0.0, -2.1], [0.0, 2.9]]

    Args:
      inner: any optax transformation (SGD, Adam, a chain with weight decay,
        ``optax.MultiSteps`` inside or outside, ...).
      masks: a mask tree mirroring the params (0/1 arrays that broadcast over
        their parameters, ``None`` at leaves that are not pruned), as returned
        by :func:`sfpk_jax.sfpk_prune` or any pruner. Leaves are matched by
        path, so masks of an NNX ``State`` also fit the plain arrays that
        ``nnx.Optimizer`` passes.

    Returns:
      A transformation whose state is ``inner``'s. Its ``update`` needs
      ``params``; after ``optax.apply_updates`` every pruned entry is 0, from
      the first update on.

    Raises:
      ValueError: (here) a mask holds other values than 0 and 1; (at
        ``init``) the masks do not fit the params. The leaf is named.
    """
    check_values(masks)
    inner = optax.with_extra_args_support(inner)

    def init(params):
        named_masks(masks, params)
        return inner.init(params)

    def mask_each(fn, tree, *rest):
        # Checked when made: here, every update, only matched to the tree.
        by_path = {name: m for name, (m, _) in named_masks(masks, tree, values=False).items()}
        return jax.tree_util.tree_map_with_path(
            lambda path, x, *r: fn(by_path.get(path_to_str(path)), x, *r), tree, *rest)

    def update(updates, state, params=None, **extra):
        if params is None:
            raise ValueError("keep_masked needs params in update(updates, state, params): it "
                             "sets params + update to 0 at pruned entries")
        # No gradient at pruned entries, so momentum and Adam's moments stay 0 there.
        grads = mask_each(lambda m, g: g if m is None else g * jnp.asarray(m, g.dtype), updates)
        updates, state = inner.update(grads, state, params, **extra)
        # -p, not 0: params + update is then exactly 0, even if p was not.
        projected = mask_each(
            lambda m, u, p: u if m is None else jnp.where(jnp.asarray(m) != 0, u, -p).astype(u.dtype),
            updates, params)
        return projected, state

    return optax.GradientTransformationExtraArgs(init, update)
