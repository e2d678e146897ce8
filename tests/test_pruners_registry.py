"""A user's own pruner: registered once, it runs through prune(...) and the experiments' --pruner.

The registry sits behind functions: register_pruner, names, spec and unregister_pruner.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sfpk_jax
from experiments import cifar100_oneshot
from sfpk_jax.core.masks import MaskLayout
from sfpk_jax import pruners
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
