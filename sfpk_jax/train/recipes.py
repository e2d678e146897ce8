"""The optimizer recipe of the paper: SGD with momentum on a cosine schedule after a warm-up."""

from __future__ import annotations

import optax


def lr_schedule(
    lr: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: int = 0,
    warmup_start: float = 1e-4,
) -> optax.Schedule:
    """Cosine decay to zero over all steps, after an optional linear warm-up.

    Args:
      lr: peak learning rate.
      epochs: total epochs, warm-up included.
      steps_per_epoch: optimizer steps per epoch.
      warmup_epochs: epochs of linear warm-up from ``warmup_start`` to ``lr``,
        in [0, epochs).
      warmup_start: learning rate at step 0 when warming up.

    Returns:
      The schedule, step -> learning rate.
    """
    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(
            f"epochs and steps_per_epoch must be at least 1, got {epochs} and {steps_per_epoch}"
        )
    if not 0 <= warmup_epochs < epochs:
        raise ValueError(f"warmup_epochs must lie in [0, {epochs - 1}] (epochs - 1), got {warmup_epochs}")
    total = epochs * steps_per_epoch
    if warmup_epochs == 0:
        return optax.cosine_decay_schedule(lr, decay_steps=total)
    return optax.warmup_cosine_decay_schedule(
        init_value=warmup_start,
        peak_value=lr,
        warmup_steps=warmup_epochs * steps_per_epoch,
        decay_steps=total,
    )


def sgd_cosine(
    lr: float,
    epochs: int,
    steps_per_epoch: int,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    warmup_epochs: int = 0,
    warmup_start: float = 1e-4,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """SGD with momentum on the :func:`lr_schedule` cosine schedule.

    The paper retrains with lr 0.01, momentum 0.875 and 5 warm-up epochs from
    1e-4 followed by cosine decay.

    Args:
      lr: peak learning rate.
      epochs: total epochs, warm-up included.
      steps_per_epoch: optimizer steps per epoch.
      momentum: heavy-ball momentum (0 for plain SGD).
      weight_decay: L2 coefficient added to the gradient of every parameter
        (coupled, as in torch's SGD); off when 0.
      warmup_epochs: epochs of linear warm-up, in [0, epochs).
      warmup_start: learning rate at step 0 when warming up.
      nesterov: use Nesterov momentum.

    Returns:
      The optax transformation.
    """
    schedule = lr_schedule(lr, epochs, steps_per_epoch, warmup_epochs, warmup_start)
    sgd = optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov)
    if weight_decay > 0.0:
        return optax.chain(optax.add_decayed_weights(weight_decay), sgd)
    return sgd
