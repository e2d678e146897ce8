"""A user's own pruner: registered once, it runs through prune(...) and the experiments' --pruner.

The registry sits behind functions: register_pruner, names, spec and unregister_pruner.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sfpk_jax
from experiments import cifar100_oneshot
from sfpk_jax import pruners
from sfpk_jax.core.masks import MaskLayout
from sfpk_jax.pruners import score_pruner

pytestmark = pytest.mark.slow


def _largest_gradient_scores(layout, params, batches, key, *, loss_fn):
    """|dL/dtheta| on the first particle slice of the first batch: higher is kept."""
    batch = jax.tree.map(lambda x: x[0], next(iter(batches)))
    grads = jax.grad(loss_fn)(params, batch)
    return [jnp.abs(g) for g in layout.gather(grads)]


@pytest.fixture
def registered():
    """Registers the pruner ``grad_magnitude`` for one test, then removes it."""
    sfpk_jax.register_pruner("grad_magnitude", score_pruner(_largest_gradient_scores),
                             needs_data=True)
    yield "grad_magnitude"
    pruners.unregister_pruner("grad_magnitude")
    assert "grad_magnitude" not in pruners.names()


def test_a_registered_pruner_runs_through_prune(registered, mlp):
    batches = mlp.particle_batches(1, size=16)
    result = sfpk_jax.prune(registered, mlp.loss_fn, mlp.params, batches, 0.75)
    layout = MaskLayout.from_params(mlp.params)
    assert sfpk_jax.sparsity_of(result.masks) == int(0.75 * layout.total) / layout.total
    assert pruners.spec(registered).needs_data and registered in pruners.names()


def test_registering_is_checked(registered):
    with pytest.raises(ValueError, match="already registered"):
        sfpk_jax.register_pruner(registered, lambda *a, **k: None)
    with pytest.raises(TypeError, match="needs_gpu"):
        sfpk_jax.register_pruner("other", lambda *a, **k: None, needs_gpu=True)
    with pytest.raises(ValueError, match="unknown pruner 'nope'"):
        sfpk_jax.prune("nope", None, {}, None, 0.5)
    with pytest.raises(ValueError, match="unknown pruner 'nope'"):
        pruners.unregister_pruner("nope")


def test_a_registered_pruner_runs_from_the_command_line(registered, tmp_path):
    out = tmp_path / "run"
    argv = ["--smoke", "--dataset", "digits", "--model", "small_cnn", "--pretrain-epochs", "1",
            "--epochs", "1", "--pruner", registered, "--sparsity", "0.8", "--no-progress",
            "--out", str(out)]
    assert cifar100_oneshot.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["pruner"] == registered
    assert np.isclose(results["achieved_sparsity"], 0.8, atol=2e-3)


# What a pruner returns is checked (issue 24) ---------------------------------------------------


def _halves(loss_fn, params, batches, sparsity, **_):
    return sfpk_jax.PruneResult(jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), params))


def _nothing(loss_fn, params, batches, sparsity, **_):
    return sfpk_jax.PruneResult(jax.tree.map(jnp.ones_like, params))


def _a_tree(loss_fn, params, batches, sparsity, **_):
    return jax.tree.map(jnp.ones_like, params)  # the masks, but not in a result


def _transposed(loss_fn, params, batches, sparsity, **_):
    return sfpk_jax.PruneResult(jax.tree.map(lambda p: jnp.ones_like(p).T, params))


def _nan(loss_fn, params, batches, sparsity, **_):
    masks = jax.tree.map(jnp.ones_like, params)
    return sfpk_jax.PruneResult(jax.tree.map(lambda m: m.at[(0,) * m.ndim].set(jnp.nan), masks))


def _raises(loss_fn, params, batches, sparsity, **_):
    raise RuntimeError("my pruner's own bug")


@pytest.fixture
def user_pruner(request):
    """Registers the pruner function ``request.param`` under its name for one test."""
    fn = request.param
    sfpk_jax.register_pruner(fn.__name__, fn)
    yield fn.__name__
    pruners.unregister_pruner(fn.__name__)


@pytest.mark.parametrize("user_pruner, problem", [
    (_halves, "the mask of Dense_0/bias holds 0.5"),
    (_a_tree, "a dict, not a result with .masks"),
    (_transposed, "the mask of Dense_0/kernel has shape (16, 8)"),
    (_nan, "holds nan"),
], indirect=["user_pruner"])
def test_prune_checks_what_a_pruner_returns(user_pruner, problem, mlp):
    with pytest.raises(pruners.PrunerOutputError, match=re.escape(problem)) as caught:
        sfpk_jax.prune(user_pruner, mlp.loss_fn, mlp.params, None, 0.5)
    assert caught.value.pruner == user_pruner
    assert str(caught.value).startswith(f"pruner {user_pruner!r} returned")


def _oneshot(out, pruner) -> list[str]:
    return ["--smoke", "--dataset", "digits", "--model", "small_cnn", "--pretrain-epochs", "1",
            "--epochs", "1", "--pruner", pruner, "--sparsity", "0.8", "--no-progress",
            "--out", str(out)]


@pytest.mark.parametrize("user_pruner, expected", [
    (_halves, "returned masks that are not usable: the mask of BatchNorm_0/bias holds 0.5"),
    (_nothing, "remove 0 of the 23834 entries of all prunable leaves, fewer than "
               "--sparsity=0.8 asks (19067; the masks' sparsity is 0.0000)"),
], indirect=["user_pruner"])
def test_a_bad_pruner_on_the_command_line_is_one_line_and_saves_nothing(user_pruner, expected,
                                                                         tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        cifar100_oneshot.main(_oneshot(out, user_pruner))
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: pruner {user_pruner!r}") and expected in err
    assert not (out / "results.json").exists() and not (out / "checkpoints" / "pruned").exists()


@pytest.mark.parametrize("user_pruner", [_raises], indirect=True)
def test_a_pruner_that_raises_gives_one_line_then_its_traceback(user_pruner, tmp_path, capsys):
    from experiments.harness.pruning import TRACEBACK_MARKER

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        cifar100_oneshot.main(_oneshot(out, user_pruner))
    first, marker, *rest = capsys.readouterr().err.splitlines()
    assert stop.value.code == 1
    assert first == (f"error: pruner {user_pruner!r} raised RuntimeError: my pruner's own bug; "
                     "nothing was saved")
    assert marker == TRACEBACK_MARKER
    trace = "\n".join(rest)
    assert trace.startswith("Traceback") and "in _raises" in trace
    assert not (out / "results.json").exists()
