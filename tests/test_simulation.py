"""The SFPK simulation end to end, on tiny models."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfpk_jax import Execution, SFPKConfig, SFPKResult, sfpk_prune
from sfpk_jax.core import schedules
from sfpk_jax.core.masks import MaskLayout, path_to_str
from sfpk_jax.sfpk import SFPKState, make_stepper, sfpk_update, spode_prune

pytestmark = [pytest.mark.slow, pytest.mark.strict_promotion]

N = 3
STEPS = 6


def _config(**changes):
    return SFPKConfig(**{"steps": STEPS, "particles": N, **changes})


class CountingLoss:
    """Wraps a loss_fn and counts how often it is traced."""

    def __init__(self, fn):
        self.fn = fn
        self.traces = 0

    def __call__(self, params, batch):
        if isinstance(jax.tree.leaves(params)[0], jax.core.Tracer):
            self.traces += 1
        return self.fn(params, batch)


def _leaves(tree):
    return [x for x in jax.tree.leaves(tree, is_leaf=lambda x: x is None) if x is not None]


def _kept_counts(result, layout):
    return [int(np.sum(np.asarray(m))) for m in layout.gather(result.masks)]


# --------------------------------------------------------------------- base run


def _counting_batches(batches, loss):
    """Yields ``batches``, noting how often ``loss`` had been traced before each."""
    seen = []

    def gen():
        for b in batches:
            seen.append(loss.traces)
            yield b

    return gen(), seen


def _host_copy(result):
    """The result as numpy copies (independent of the device buffers)."""
    return jax.tree.map(np.array, result)


@pytest.fixture(scope="module")
def base(mlp):
    """One loop-mode run of the MLP with distinct per-particle batches."""
    batches = mlp.batches_list(N, STEPS, seed=0)
    loss = CountingLoss(mlp.loss_fn)
    counted, seen = _counting_batches(batches, loss)
    # loop named: auto would trace the loss once more, to estimate the run's work.
    result = sfpk_prune(loss, mlp.params, counted, 0.5, config=_config(),
                        execution=Execution(particle_mode="loop"))
    return dict(result=_host_copy(result), batches=batches, traces=seen + [loss.traces])


def test_result_structure_and_trace_shapes(mlp, base):
    result = base["result"]
    assert isinstance(result, SFPKResult)
    layout = MaskLayout.from_params(mlp.params)
    for tree in (result.masks, result.scores, result.particles):
        assert jax.tree.structure(tree, is_leaf=lambda x: x is None) == jax.tree.structure(
            layout.scatter([0] * len(layout.index)), is_leaf=lambda x: x is None
        )
    for m, s in zip(layout.gather(result.masks), layout.shapes):
        assert m.shape == s and m.dtype == jnp.float32
        assert set(np.unique(np.asarray(m))) <= {0.0, 1.0}
    for p, s in zip(layout.gather(result.particles), layout.shapes):
        assert p.shape == (N,) + s
    assert set(result.trace) == {"G", "E", "K", "dt"}
    for name, values in result.trace.items():
        assert isinstance(values, np.ndarray), name
        assert values.shape == (STEPS, N), name
        assert np.all(np.isfinite(values)), name
    density = result.trace["G"]
    np.testing.assert_allclose(density[0], 1.0, rtol=1e-6)
    assert np.all(np.diff(density, axis=0) < 0)  # G falls every step
    assert np.all(result.trace["dt"] > 0)


def test_final_mask_count_is_exact_global(mlp, base):
    layout = MaskLayout.from_params(mlp.params)
    total = layout.total
    assert sum(_kept_counts(base["result"], layout)) == total - math.floor(0.5 * total)


def test_distinct_batches_make_particles_diverge(base):
    particles = [np.asarray(p) for p in _leaves(base["result"].particles)]
    spread = max(float(np.max(np.abs(p - p[:1]))) for p in particles)
    assert spread > 1e-3


def test_identical_batches_without_repulsion_keep_particles_identical(mlp):
    shared = mlp.particle_batches(N, seed=0, shared=True)
    result = sfpk_prune(mlp.loss_fn, mlp.params, shared, 0.5, config=_config(repulsion=0.0), execution=Execution(particle_mode="vmap"))
    for p in _leaves(result.particles):
        p = np.asarray(p)
        assert np.array_equal(p, np.broadcast_to(p[:1], p.shape))
    # ... and they did move.
    assert np.all(result.trace["G"][-1] < 0.9)
    assert np.all(result.trace["E"] == result.trace["E"][:, :1])


def test_same_batches_give_bit_identical_results(mlp, base):
    again = sfpk_prune(mlp.loss_fn, mlp.params, iter(base["batches"]), 0.5, config=_config())
    first = base["result"]
    for a, b in zip(_leaves(first.particles) + _leaves(first.scores) + _leaves(first.masks),
                    _leaves(again.particles) + _leaves(again.scores) + _leaves(again.masks)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    for name in first.trace:
        assert np.array_equal(first.trace[name], again.trace[name]), name


def test_step_is_traced_once_for_the_whole_run(base):
    # loop mode: one trace of the per-particle energy, reused for n particles x K steps.
    assert base["traces"] == [0] + [1] * STEPS


@pytest.mark.parametrize("mode", ["vmap", "map"])
def test_fused_step_is_traced_once(mlp, mode):
    loss = CountingLoss(mlp.loss_fn)
    batches, seen = _counting_batches(mlp.batches_list(N, 8, seed=1), loss)
    sfpk_prune(loss, mlp.params, batches, 0.5, config=_config(steps=8), execution=Execution(particle_mode=mode, particle_chunk=2))
    # The first step compiles (map with a remainder chunk traces the energy
    # twice in that one compile); no later step traces again.
    assert seen[0] == 0 and seen[1] >= 1
    assert seen[1:] == [seen[1]] * 7 and loss.traces == seen[1]


def test_init_continues_from_an_earlier_result(mlp, base):
    first = base["result"]
    layout = MaskLayout.from_params(mlp.params)
    # Start density: the particles' mean G.
    particles = [np.asarray(p, np.float64) for p in layout.gather(first.particles)]
    g = np.sqrt(sum(np.sum(p.reshape(N, -1) ** 2, axis=1) for p in particles) / layout.total)
    start = float(np.mean(g))
    assert start < 0.9
    target = 1.0 - 0.8
    result = sfpk_prune(mlp.loss_fn, mlp.params, mlp.particle_batches(N, seed=5), 0.8,
                        config=_config(), init=_host_copy(first))
    np.testing.assert_allclose(result.trace["G"][0], g, rtol=1e-5)
    ratio = start / target
    dt0 = target * (ratio - ratio ** (1.0 - 1.0 / STEPS))
    np.testing.assert_allclose(result.trace["dt"][0], dt0, rtol=1e-4)
    assert sum(_kept_counts(result, layout)) == layout.total - math.floor(0.8 * layout.total)
    assert result.trace["G"][-1].mean() < start


def test_init_result_is_left_intact(mlp, base):
    # Gradual pruning keeps the previous round's result (to save it, to
    # compare); continuing from it must not consume its buffers.
    first = jax.tree.map(jnp.asarray, base["result"])
    sfpk_prune(mlp.loss_fn, mlp.params, mlp.particle_batches(N, seed=5), 0.8,
               config=_config(steps=2), execution=Execution(particle_mode="vmap"), init=first)
    for a, b in zip(_leaves(first.particles) + _leaves(first.scores),
                    _leaves(base["result"].particles) + _leaves(base["result"].scores)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_init_with_the_wrong_particle_count_raises(mlp, base):
    with pytest.raises(ValueError, match=r"init particles .* expected"):
        sfpk_prune(mlp.loss_fn, mlp.params, mlp.particle_batches(N + 1), 0.8,
                   config=_config(particles=N + 1), init=base["result"])


def test_init_already_at_the_target_raises(mlp, base):
    with pytest.raises(ValueError, match="already at or below the target"):
        sfpk_prune(mlp.loss_fn, mlp.params, mlp.particle_batches(N), 0.05, config=_config(), init=base["result"])


# ------------------------------------------------------------ other configs


@pytest.mark.parametrize("scope", ["global", "local"])
def test_final_mask_count_is_exact_on_the_cnn(cnn, scope):
    # Some weights are exactly zero (already pruned): never kept, count still exact.
    layout = MaskLayout.from_params(cnn.params)
    rng = np.random.default_rng(0)
    theta = [jnp.where(rng.random(t.shape) < 0.1, 0.0, t) for t in layout.gather(cnn.params)]
    params = layout.replace(cnn.params, theta)
    result = sfpk_prune(cnn.loss_fn, params, cnn.particle_batches(N, seed=2), 0.7,
                        config=_config(scope=scope, steps=5), execution=Execution(particle_mode="vmap"))
    kept = _kept_counts(result, layout)
    if scope == "global":
        assert sum(kept) == layout.total - math.floor(0.7 * layout.total)
    else:
        assert kept == [d - math.floor(0.7 * d) for d in layout.sizes]
    for m, t in zip(layout.gather(result.masks), theta):
        assert np.all(np.asarray(m)[np.asarray(t) == 0] == 0)
    assert result.trace["G"].shape == (5, N)


def test_spode_runs_with_one_particle(mlp):
    result = spode_prune(mlp.loss_fn, mlp.params, mlp.particle_batches(1, seed=3), 0.6,
                         config=SFPKConfig(steps=5))
    layout = MaskLayout.from_params(mlp.params)
    for name, values in result.trace.items():
        assert values.shape == (5, 1), name
    np.testing.assert_allclose(result.trace["K"], 1.0)  # a lone particle
    assert all(p.shape[0] == 1 for p in layout.gather(result.particles))
    assert sum(_kept_counts(result, layout)) == layout.total - math.floor(0.6 * layout.total)


def test_early_stop_when_mean_g_reaches_the_target(mlp, monkeypatch):
    # G is convex, so the schedule alone never overshoots; double the steps
    # to reach the target half way through the run.
    real = schedules.step_size
    monkeypatch.setattr(schedules, "step_size", lambda *a, **k: 2.0 * real(*a, **k))
    steps = 10
    result = sfpk_prune(mlp.loss_fn, mlp.params, mlp.particle_batches(N, seed=4), 0.5,
                        config=_config(steps=steps), execution=Execution(particle_mode="vmap"))
    mean_g = result.trace["G"].mean(axis=1)
    run = len(mean_g)
    assert 1 < run < steps
    assert mean_g[-1] <= 0.5 and np.all(mean_g[:-1] > 0.5)


# ---------------------------------------------- computation paths agree


def _random_particles(layout, n, seed, low=0.2, high=1.0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.uniform(low, high, (n,) + s), jnp.float32) for s in layout.shapes]


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_particle_modes_agree_on_one_step(request, model_name):
    model = request.getfixturevalue(model_name)
    layout = MaskLayout.from_params(model.params)
    particles = _random_particles(layout, 4, seed=0)
    batch = next(model.particle_batches(4, seed=6))
    outs = {}
    for mode in ("loop", "vmap", "map"):
        stepper = make_stepper(model.loss_fn, layout, _config(particles=4), 0.3,
                               Execution(particle_mode=mode, particle_chunk=3))
        outs[mode] = jax.device_get(stepper.energies(model.params, particles, batch))
    energy, grads = outs["loop"]
    assert energy.shape == (4,)
    assert len(set(np.round(energy, 4))) > 1  # the particles really differ
    for mode in ("vmap", "map"):
        e, g = outs[mode]
        np.testing.assert_allclose(e, energy, rtol=1e-5, atol=1e-6)
        for a, b in zip(g, grads):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_particle_modes_agree_over_a_float64_run(mlp, as_float64):
    with jax.enable_x64(True):
        params = as_float64(mlp.params)
        batches = mlp.batches_list(N, 8, seed=7, dtype=np.float64)
        results = {
            mode: sfpk_prune(mlp.loss_fn, params, iter(batches), 0.6,
                             config=_config(steps=8), execution=Execution(particle_mode=mode, particle_chunk=2))
            for mode in ("loop", "vmap", "map")
        }
    ref = results["loop"]
    for p in _leaves(ref.particles):
        assert p.dtype == jnp.float64
    for mode in ("vmap", "map"):
        other = results[mode]
        for a, b in zip(_leaves(ref.particles) + _leaves(ref.scores), _leaves(other.particles) + _leaves(other.scores)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)
        for a, b in zip(_leaves(ref.masks), _leaves(other.masks)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for name in ref.trace:
            np.testing.assert_allclose(ref.trace[name], other.trace[name], rtol=1e-5)


def test_update_jit_matches_no_jit():
    shapes = [(4, 3), (2, 2, 1, 3)]
    rng = np.random.default_rng(1)
    n = 3
    config = _config(particles=n)
    particles = [jnp.asarray(rng.uniform(0.2, 1.0, (n,) + s), jnp.float32) for s in shapes]
    theta = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    grads = [jnp.asarray(0.1 * rng.normal(size=(n,) + s), jnp.float32) for s in shapes]
    energy = jnp.asarray(rng.permutation(n), jnp.float32)
    scores = [jnp.asarray(rng.random(s), jnp.float32) for s in shapes]
    start = jnp.float32(1.0)

    def state():
        return SFPKState([jnp.array(p) for p in particles], [jnp.array(s) for s in scores], jnp.int32(2), start)

    update = functools.partial(sfpk_update, config=config, target=0.2)
    jitted = jax.device_get(jax.jit(update)(state(), energy, grads, theta))
    with jax.disable_jit():
        eager = jax.device_get(update(state(), energy, grads, theta))
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    new_state, trace = jitted
    assert int(new_state.step) == 3
    np.testing.assert_array_equal(trace.E, np.asarray(energy))
    for field in trace:
        assert np.shape(field) == (n,)


def test_update_moves_g_by_dt_and_records_g_before():
    # l1 G is linear while entries stay positive: G falls by exactly dt.
    shapes = [(5, 4), (6,)]
    rng = np.random.default_rng(2)
    n = 3
    config = _config(particles=n, sparsity_fn="l1", repulsion=0.5)
    particles = [jnp.asarray(rng.uniform(0.5, 1.0, (n,) + s), jnp.float32) for s in shapes]
    theta = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    grads = [jnp.asarray(0.01 * rng.normal(size=(n,) + s), jnp.float32) for s in shapes]
    total = sum(math.prod(s) for s in shapes)
    g_before = sum(np.asarray(p).reshape(n, -1).sum(1) for p in particles) / total
    state = SFPKState(particles, [jnp.zeros(s) for s in shapes], jnp.int32(0), jnp.float32(g_before.mean()))
    new, trace = jax.jit(functools.partial(sfpk_update, config=config, target=0.2))(
        state, jnp.zeros((n,)), grads, theta
    )
    g_after = sum(np.asarray(p).reshape(n, -1).sum(1) for p in new.particles) / total
    np.testing.assert_allclose(trace.G, g_before, rtol=1e-5)
    np.testing.assert_allclose(g_before - g_after, trace.dt, rtol=1e-3)
    ratio = g_before.mean() / 0.2
    np.testing.assert_allclose(trace.dt, 0.2 * (ratio - ratio ** (1 - 1 / STEPS)), rtol=1e-4)


# --------------------------------------------------------------- errors


@pytest.mark.parametrize("sparsity", [0, 1, 1.5, -0.1, 0.0, 1.0])
def test_sparsity_outside_the_open_interval_raises(mlp, sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        sfpk_prune(mlp.loss_fn, mlp.params, mlp.particle_batches(N), sparsity, config=_config())


@pytest.mark.parametrize("sparsity", ["a", None, True])
def test_sparsity_that_is_not_a_number_raises(mlp, sparsity):
    with pytest.raises(TypeError, match="sparsity"):
        sfpk_prune(mlp.loss_fn, mlp.params, mlp.particle_batches(N), sparsity, config=_config())


def test_batch_leading_axis_must_be_the_particle_count(mlp):
    batches = mlp.particle_batches(N + 1)
    with pytest.raises(ValueError, match=r"step 0: batch leaf x .*n=3"):
        sfpk_prune(mlp.loss_fn, mlp.params, batches, 0.5, config=_config())


def test_batches_running_out_name_the_step(mlp):
    batches = mlp.batches_list(N, 2, seed=8)
    with pytest.raises(ValueError, match="ran out at step 2 of 6"):
        sfpk_prune(mlp.loss_fn, mlp.params, iter(batches), 0.5, config=_config(), execution=Execution(particle_mode="vmap"))


def test_nan_in_params_names_the_leaf(mlp):
    params = jax.tree.map(lambda x: x, mlp.params)
    params["Dense_1"]["kernel"] = params["Dense_1"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="Dense_1/kernel"):
        sfpk_prune(mlp.loss_fn, params, mlp.particle_batches(N), 0.5, config=_config())


def test_config_must_be_an_sfpk_config(mlp):
    with pytest.raises(TypeError, match="SFPKConfig"):
        sfpk_prune(mlp.loss_fn, mlp.params, mlp.particle_batches(N), 0.5, config={"steps": 3})


def test_paths_in_layout_are_readable(mlp):
    layout = MaskLayout.from_params(mlp.params)
    assert layout.paths == ("Dense_0/bias", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel")
    flat = jax.tree_util.tree_flatten_with_path(mlp.params)[0]
    assert [path_to_str(p) for p, _ in flat] == list(layout.paths)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_bfloat16_passes_give_the_float32_masks_within_tolerance(model, request):
    m = request.getfixturevalue(model)
    # Our code is strict-clean in bf16 (the MLP); Flax's BatchNorm itself mixes
    # bf16 activations with its float32 statistics.
    promotion = "strict" if model == "mlp" else "standard"
    with jax.numpy_dtype_promotion(promotion):
        results = {
            dtype: sfpk_prune(m.loss_fn, m.params, m.particle_batches(4, size=32, seed=1), 0.8,
                              config=_config(steps=20, particles=4), execution=Execution(compute_dtype=dtype))
            for dtype in ("float32", "bfloat16")
        }
    full, half = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(r.masks)])
                  for r in results.values())
    assert full.sum() == half.sum()
    # Stated tolerance: at least 95% of the kept entries are the same.
    assert (full * half).sum() >= 0.95 * full.sum()
    for r in results.values():
        assert all(x.dtype == np.float32 for x in jax.tree.leaves(r.particles))
        assert r.trace["E"].dtype == np.float32
