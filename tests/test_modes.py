"""The compiled particle modes compile once: the loss traced once, nothing compiled after the first step."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sfpk_jax
from sfpk_jax import Execution, SFPKConfig
from sfpk_jax.core.masks import MaskLayout

pytestmark = pytest.mark.strict_promotion


def _rng(seed):
    return np.random.default_rng(seed)


BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


# A program found in the persistent compilation cache (which the suite turns
# on) is loaded instead of compiled: it counts as a compilation here.
CACHE_HIT = "/jax/compilation_cache/cache_hits"


class CompileCounter:
    """Counts XLA compilations (or loads from the persistent cache) while installed."""

    def __init__(self):
        self.count = 0

    def __call__(self, event, duration, **kwargs):
        del duration, kwargs
        if event == BACKEND_COMPILE:
            self.count += 1

    def _hit(self, event, **kwargs):
        del kwargs
        if event == CACHE_HIT:
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        jax.monitoring.register_event_listener(self._hit)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)
        jax.monitoring.unregister_event_listener(self._hit)


@pytest.mark.parametrize("mode, chunk", [("vmap", 1), ("map", 2), ("loop", 1)])
def test_stepper_traces_the_loss_once_and_compiles_only_the_first_step(mlp, mode, chunk):
    n, steps = 4, 5
    config = SFPKConfig(steps=steps, particles=n)
    execution = Execution(particle_mode=mode, particle_chunk=chunk)
    layout = MaskLayout.from_params(mlp.params)
    calls = []

    # chex keys its trace counter on where the function is defined, which is
    # the same for every parametrization of this test: start from zero.
    chex.clear_trace_counter()

    @chex.assert_max_traces(n=1)
    def loss_fn(params, batch):
        calls.append(isinstance(jax.tree.leaves(params)[0], jax.core.Tracer))
        return mlp.loss_fn(params, batch)

    stepper = sfpk_jax.sfpk.make_stepper(loss_fn, layout, config, 0.3, execution)
    state = sfpk_jax.sfpk.initial_state(layout, config)
    batches = mlp.batches_list(n, steps, seed=3)
    compiles = []
    for batch in batches:
        with CompileCounter() as counter:
            state, trace = stepper.step(mlp.params, state, batch)
            jax.block_until_ready((state, trace))
        compiles.append(counter.count)
        chex.assert_tree_all_finite((state.particles, state.scores))
        chex.assert_shape(list(trace), (n,))
    # The loss is only ever called while tracing, and traced exactly once for
    # the n particles x steps evaluations (vmap, map: one fused program; loop:
    # one jitted per-particle energy reused for every particle).
    assert calls == [True]
    # The counter sees the first step's compilations, and nothing compiles later.
    assert compiles[0] >= 1
    assert compiles[1:] == [0] * (steps - 1)
    assert int(state.step) == steps


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_prune_calls_with_new_batch_norm_state_and_target_compile_once(cnn, mode):
    """Gradual pruning's rounds: the same loss function, new batch-norm state,
    a new target density and the previous particles; only the first call compiles."""
    n, steps = 2, 3
    config = SFPKConfig(steps=steps, particles=n, early_stop=False)
    execution = Execution(particle_mode=mode)
    traced = []

    def fn(params, batch, state):
        traced.append(1)
        logits, _ = cnn.module.apply({**state, "params": params}, batch["x"], True,
                                     mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    rng = _rng(7)
    result, compiles, losses = None, [], []
    for round_, sparsity in enumerate([0.5, 0.7, 0.8]):
        # The running statistics differ every round, as after recompute_bn.
        state = jax.tree.map(lambda x: x + jnp.float32(rng.uniform()), cnn.extra)
        loss = sfpk_jax.StatefulLoss(fn, state)
        with CompileCounter() as counter:
            result = sfpk_jax.sfpk_prune(loss, cnn.params, cnn.particle_batches(n, seed=round_),
                                         sparsity, config=config, execution=execution,
                                         init=result)
            jax.block_until_ready(result.masks)
        compiles.append(counter.count)
        losses.append(result.trace["E"])
    # The loss is traced by the first call only (loop: the per-particle energy;
    # vmap: the fused step), so no later call compiled a step again; the
    # second's few compilations copy the first result's particles (done once).
    assert len(traced) == 1
    assert compiles[0] > compiles[1]
    assert compiles[2] == 0
    assert all(np.all(np.isfinite(e)) and e.shape == (steps, n) for e in losses)


def test_stateful_loss_state_is_an_argument_not_a_constant(cnn):
    """Reusing the compiled step must not reuse the first call's state."""
    config = SFPKConfig(steps=1, particles=2)
    layout = MaskLayout.from_params(cnn.params)
    batch = next(cnn.particle_batches(2, seed=1))

    def fn(params, batch, state):
        return cnn.loss_fn(params, batch) * state["scale"]

    energies = []
    for scale in (1.0, 3.0):
        loss = sfpk_jax.StatefulLoss(fn, {"scale": jnp.float32(scale)})
        stepper = sfpk_jax.sfpk.make_stepper(loss, layout, config, 0.3, Execution("vmap"))
        energies.append(np.asarray(stepper.energies(cnn.params, sfpk_jax.sfpk.initial_state(
            layout, config).particles, batch)[0]))
    np.testing.assert_allclose(energies[1], 3.0 * energies[0], rtol=1e-6)
