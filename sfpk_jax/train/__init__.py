"""(Re)training with optax under fixed masks: losses, the paper's recipe, the loop, batch norm."""

from sfpk_jax.train.batchnorm import recompute_batch_stats, zoo_forward
from sfpk_jax.train.loop import evaluate, evaluate_batches, train, train_epoch
from sfpk_jax.train.losses import cross_entropy, layers_of, make_loss_fn
from sfpk_jax.train.masked import keep_masked
from sfpk_jax.train.recipes import lr_schedule, sgd_cosine

__all__ = ["cross_entropy", "evaluate", "evaluate_batches", "keep_masked", "layers_of",
           "lr_schedule", "make_loss_fn", "recompute_batch_stats", "sgd_cosine", "train",
           "train_epoch", "zoo_forward"]
