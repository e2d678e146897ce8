from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sfpk_jax.core.masks import ones_like_masks
from sfpk_jax.data import load_digits
from sfpk_jax.models import build
from sfpk_jax.train import (
    evaluate,
    evaluate_batches,
    lr_schedule,
    make_loss_fn,
    sgd_cosine,
    train,
    train_epoch,
)


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


def test_small_cnn_learns_digits(digits):
    apply_fn, variables = build("small_cnn")
    steps = len(digits.x_train) // 64
    opt = sgd_cosine(0.05, 2, steps, momentum=0.9)
    trained, history = train(
        apply_fn, variables, digits.x_train, digits.y_train, epochs=2, batch_size=64, optimizer=opt, progress=False
    )
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["loss"] < history[0]["loss"]
    assert history[0]["loss"] < 2.3  # below chance-level cross-entropy already
    assert evaluate(apply_fn, trained, digits.x_test, digits.y_test) > 0.6
    # Running statistics were updated by training.
    assert not np.allclose(trained["batch_stats"]["BatchNorm_0"]["mean"], variables["batch_stats"]["BatchNorm_0"]["mean"])


def test_masked_entries_stay_zero_with_momentum_and_decay(digits):
    apply_fn, variables = build("mlp")
    masks = ones_like_masks(variables["params"])
    rng = np.random.default_rng(0)
    masks = jax.tree.map(lambda m: jnp.asarray(rng.random(m.shape) < 0.3, jnp.float32), masks)
    opt = sgd_cosine(0.1, 2, 10, momentum=0.9, weight_decay=1e-3)
    trained, _ = train(
        apply_fn, variables, digits.x_train[:320], digits.y_train[:320],
        epochs=2, batch_size=32, optimizer=opt, masks=masks, progress=False,
    )
    for name in ("Dense_0", "Dense_1"):
        for leaf in ("kernel", "bias"):
            p, m = np.asarray(trained["params"][name][leaf]), np.asarray(masks[name][leaf])
            assert np.all(p[m == 0] == 0.0)
            kept_before = np.asarray(variables["params"][name][leaf])[m == 1]
            assert not np.allclose(p[m == 1], kept_before)


def test_non_finite_loss_raises(digits):
    apply_fn, variables = build("mlp")
    x = digits.x_train[:64].copy()
    x[40] = np.nan  # poisons whichever batch draws it
    with pytest.raises(FloatingPointError, match=r"epoch 1, step \d+: try a smaller learning rate"):
        train(apply_fn, variables, x, digits.y_train[:64], epochs=1, batch_size=16,
              optimizer=optax.sgd(0.1), progress=False)


def test_make_loss_fn_uses_batch_statistics_and_keeps_running_ones(digits):
    apply_fn, variables = build("small_cnn")
    batch = {"image": digits.x_train[:32], "label": digits.y_train[:32]}
    loss_fn = make_loss_fn(apply_fn, variables)
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables["params"], batch)
    logits, _ = apply_fn(variables, batch["image"], True)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    # Eval mode would use the running statistics and give a different loss.
    eval_logits, _ = apply_fn(variables, batch["image"], False)
    assert not np.allclose(logits, eval_logits)
    assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])


def test_evaluate_handles_partial_last_batch(digits):
    apply_fn, variables = build("mlp")
    x, y = digits.x_test[:103], digits.y_test[:103]
    logits, _ = apply_fn(variables, x, False)
    expected = float(np.mean(np.argmax(logits, axis=-1) == y))
    assert evaluate(apply_fn, variables, x, y, batch_size=25) == pytest.approx(expected)
    assert evaluate(apply_fn, variables, x, y) == pytest.approx(expected)


def test_evaluate_across_processes_sums_every_process_count(digits):
    """In one process the gathered counts are this process's: the same accuracy."""
    apply_fn, variables = build("mlp")
    batches = [{"image": digits.x_test[i:i + 40], "label": digits.y_test[i:i + 40]}
               for i in range(0, 103, 40)]
    alone = evaluate_batches(apply_fn, variables, batches)
    assert evaluate_batches(apply_fn, variables, batches, across_processes=True) == alone
    assert alone == pytest.approx(evaluate(apply_fn, variables, digits.x_test[:120],
                                           digits.y_test[:120]))


def test_label_smoothing_changes_the_objective(digits):
    apply_fn, variables = build("mlp")
    x, y = digits.x_train[:64], digits.y_train[:64]
    kwargs = dict(epochs=1, batch_size=64, optimizer=optax.sgd(0.0), progress=False)
    _, plain = train(apply_fn, variables, x, y, **kwargs)
    _, smooth = train(apply_fn, variables, x, y, label_smoothing=0.1, **kwargs)
    logits, _ = apply_fn(variables, x, False)
    targets = optax.smooth_labels(jax.nn.one_hot(y, 10), 0.1)
    np.testing.assert_allclose(smooth[0]["loss"], optax.softmax_cross_entropy(logits, targets).mean(), rtol=1e-5)
    assert smooth[0]["loss"] != pytest.approx(plain[0]["loss"])


def test_schedule_with_warmup():
    schedule = lr_schedule(0.01, epochs=10, steps_per_epoch=4, warmup_epochs=5, warmup_start=1e-4)
    assert float(schedule(0)) == pytest.approx(1e-4, rel=1e-5)
    assert float(schedule(10)) == pytest.approx(1e-4 + (0.01 - 1e-4) * 10 / 20, rel=1e-5)
    assert float(schedule(20)) == pytest.approx(0.01, rel=1e-5)
    assert float(schedule(30)) == pytest.approx(0.005, rel=1e-5)
    assert float(schedule(40)) == pytest.approx(0.0, abs=1e-9)


def test_schedule_without_warmup():
    schedule = lr_schedule(0.1, epochs=2, steps_per_epoch=5)
    assert float(schedule(0)) == pytest.approx(0.1)
    assert float(schedule(5)) == pytest.approx(0.05, rel=1e-5)
    assert float(schedule(10)) == pytest.approx(0.0, abs=1e-9)


def test_sgd_cosine_follows_the_schedule():
    opt = sgd_cosine(0.01, epochs=10, steps_per_epoch=4, momentum=0.0, warmup_epochs=5)
    params = {"w": jnp.zeros(2)}
    state = opt.init(params)
    grads = {"w": jnp.ones(2)}
    steps = []
    for _ in range(21):
        updates, state = opt.update(grads, state, params)
        steps.append(float(-updates["w"][0]))
    assert steps[0] == pytest.approx(1e-4, rel=1e-5)
    assert steps[20] == pytest.approx(0.01, rel=1e-5)


def test_sgd_cosine_weight_decay_and_momentum():
    opt = sgd_cosine(1.0, epochs=1, steps_per_epoch=1000, momentum=0.5, weight_decay=0.1)
    params = {"w": jnp.full(1, 2.0)}
    state = opt.init(params)
    zero = {"w": jnp.zeros(1)}
    first, state = opt.update(zero, state, params)
    # Decay turns the zero gradient into 0.1 * w = 0.2, at lr 1.
    assert float(first["w"][0]) == pytest.approx(-0.2)
    second, _ = opt.update(zero, state, params)
    # Momentum adds half of the previous step (the lr has barely decayed).
    assert float(second["w"][0]) == pytest.approx(-0.3, rel=1e-4)


def test_invalid_warmup():
    with pytest.raises(ValueError, match="warmup_epochs"):
        sgd_cosine(0.01, epochs=5, steps_per_epoch=10, warmup_epochs=5)


def test_overflowed_weights_stop_training_even_when_the_loss_is_finite():
    """A loss that is still finite over weights that have overflowed is caught in the step."""
    apply_fn, variables = build("small_cnn", num_classes=10, key=jax.random.key(0))
    data = load_digits()
    batch = {"image": data.x_train[:32], "label": data.y_train[:32]}
    # A learning rate of 1e30: the weights overflow before the loss turns NaN.
    tx = optax.sgd(1e30)
    with pytest.raises(FloatingPointError, match=r"non-finite .*model variables.* at epoch 3, step"):
        train_epoch(apply_fn, variables, tx.init(variables["params"]), [batch] * 20,
                    optimizer=tx, epoch=3)


def test_evaluation_refuses_non_finite_outputs():
    apply_fn, variables = build("small_cnn", num_classes=10, key=jax.random.key(0))
    data = load_digits()
    broken = {**variables, "params": jax.tree.map(lambda p: p * jnp.inf, variables["params"])}
    with pytest.raises(FloatingPointError, match="NaN or Inf on"):
        evaluate(apply_fn, broken, data.x_test, data.y_test)
