"""Layer-wise and channel SFPK as the official code runs them.

The rules, each on a small hand-computable case:

* a layer-wise polarizer reads one density for every layer (the dynamics' G:
  sum_l G_l, or the global G) and leaves a layer alone while its k_l <= 1;
  each layer's own G_l (with k_l < 1) is the ``local_polarizer="layer"``
  option;
* the ``exp`` repulsion of channel masks divides by S_j + 1e-12;
* channel masks simulate toward (M - (1 - f) P) / M and keep f of the channels;
* the scopes split (``test_split_scopes.py``);
* the float32 Gauss-sigmoid polarizer survives the dense start.

These rules were checked against the official code on the same float64
weights and batches, six steps: an MLP and ResNet-20, channel masks out and in
with global and with local dynamics, and layer-wise unstructured. The final
masks were identical. Particles and scores agreed to 5e-6 (relative) or
better at every step; the trajectories amplify rounding about tenfold per step
on ResNet-20. Without the 1e-12 that the reference adds inside its global norms
(``Methods/spode.py``, ``calc_norm``) they agreed to 2e-8 on ResNet-20 and
1e-12 on the MLP. Where the official code settles a detail, the test names its
file and function.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sfpk_jax
from sfpk_jax import Execution, SFPKConfig
from sfpk_jax.core import channels, polarizers
from sfpk_jax.core import repulsion as repulsion_lib
from sfpk_jax.core.masks import MaskLayout
from sfpk_jax.sfpk.config import ConfigError
from sfpk_jax.sfpk.energy import make_energy_fn, polarizer_density

# --------------------------------------------------------------- configuration


def test_the_dynamics_default_to_global_for_channel_masks_only():
    # main.py: --structural keeps ode_scope="global" while the pruning scope
    # becomes local.
    assert SFPKConfig().dynamics == "global"
    assert SFPKConfig(scope="local").dynamics == "local"
    assert SFPKConfig(scope="local", mask_dim="out").dynamics == "global"
    assert SFPKConfig(scope="local", mask_dim="in", dynamics_scope="local").dynamics == "local"
    assert SFPKConfig(scope="local", dynamics_scope="global").dynamics == "global"
    assert SFPKConfig().local_polarizer == "sum"


@pytest.mark.parametrize("changes", [
    dict(dynamics_scope="local"),  # layer-wise dynamics with one global mask
    dict(dynamics_scope="layer", scope="local"),
    dict(local_polarizer="own", scope="local"),
])
def test_invalid_scope_settings_name_the_field(changes):
    field = next(iter(changes))
    with pytest.raises(ConfigError, match=rf"SFPKConfig\.{field}="):
        SFPKConfig(**changes)


@pytest.mark.parametrize("changes, at", [
    (dict(), "scope"),
    (dict(scope="local"), "sum"),
    (dict(scope="local", mask_dim="out"), "global"),
    (dict(scope="local", mask_dim="out", dynamics_scope="local"), "sum"),
    (dict(scope="local", local_polarizer="layer"), "scope"),
    (dict(scope="local", mask_dim="in", local_polarizer="layer"), "scope"),
])
def test_the_polarizer_reads_the_dynamics_density(changes, at):
    assert polarizer_density(SFPKConfig(**changes)) == at


# ------------------------------------------------ the layer-wise polarizer


def _point(mask, at, scope="local", name="onehot"):
    mask = [jnp.asarray(m, jnp.float32) for m in mask]
    theta = [jnp.ones_like(m) for m in mask]
    out = polarizers.polarize(name, mask, theta, kind="l1", scope=scope, eps=0.9, ratio=0.9, at=at)
    return [np.asarray(p) for p in out]


A = [0.1, 0.2, 0.3, 0.4]     # l1 density G_A = 0.25
B = [0.05, 0.1, 0.15, 0.2]   # G_B = 0.125


def test_layers_are_cut_at_the_sum_of_the_layer_densities():
    # b = 1[|m theta| >= tau], tau the k-th smallest: k - 1 entries drop.
    # sum_l G_l = 0.375: k = floor(0.625 * 4) = 2 in every layer of 4.
    a, b = _point([A, B], "sum")
    np.testing.assert_array_equal(a, [0, 1, 1, 1])
    np.testing.assert_array_equal(b, [0, 1, 1, 1])
    # Each at its own G_l: k = floor(0.75 * 4) = 3 and floor(0.875 * 4) = 3.
    a, b = _point([A, B], "scope")
    np.testing.assert_array_equal(a, [0, 0, 1, 1])
    np.testing.assert_array_equal(b, [0, 0, 1, 1])
    # At the global G = 1.5 / 8: k = floor(0.8125 * 4) = 3 per layer.
    a, b = _point([A, B], "global")
    np.testing.assert_array_equal(a, [0, 0, 1, 1])
    np.testing.assert_array_equal(b, [0, 0, 1, 1])


def test_one_entry_to_remove_leaves_a_layer_alone_at_one_density():
    # Methods/mask_processor.py, OneHotHard.forward (local): prune_num <= 1
    # returns the mask. sum_l G_l = 0.35 + 0.2: floor(0.45 * 4) = 1.
    mask = [[0.2, 0.3, 0.4, 0.5], [0.1, 0.15, 0.25, 0.3]]
    for got, m in zip(_point(mask, "sum"), mask):
        np.testing.assert_allclose(got, m, rtol=1e-6)
    # Each at its own G_l: k = floor(0.65 * 4) = 2 and floor(0.8 * 4) = 3.
    a, b = _point(mask, "scope")
    np.testing.assert_array_equal(a, [0, 1, 1, 1])
    np.testing.assert_array_equal(b, [0, 0, 1, 1])
    # At the global G = 4.7 / 8: floor(0.4125 * 4) = 1.
    mask = [[0.5, 0.6, 0.7, 0.8], [0.4, 0.5, 0.55, 0.65]]
    for got, m in zip(_point(mask, "global"), mask):
        np.testing.assert_allclose(got, m, rtol=1e-6)
    # G = 0.65 gives k = 1: the per-layer reading still binarises (tau is the
    # smallest entry, so b = 1), and the gradient is taken at 1, not at m.
    one = [[0.5, 0.6, 0.7, 0.8]]
    np.testing.assert_array_equal(_point(one, "scope")[0], [1, 1, 1, 1])
    np.testing.assert_allclose(_point(one, "sum")[0], one[0], rtol=1e-6)


def test_a_sum_above_one_never_binarises():
    # ResNet-20 has 22 masked leaves: sum_l G_l > 1 for the whole run.
    mask = [[0.3, 0.9, 0.5, 0.7]] * 3
    for name in ("onehot", "onehot_soft"):
        for got, m in zip(_point(mask, "sum", name=name), mask):
            np.testing.assert_allclose(got, m, rtol=1e-6)
    with pytest.raises(ValueError, match="'sum' only in local scope"):
        _point(mask, "sum", scope="global")


def test_local_energy_is_taken_at_the_continuous_mask_by_default(mlp):
    layout = MaskLayout.from_params(mlp.params)
    rng = np.random.default_rng(0)
    # Every G_l is about 0.6 (< 1), their sum above 1.
    mask = [jnp.asarray(rng.uniform(0.2, 1.0, s), jnp.float32) for s in layout.shapes]
    theta = layout.gather(mlp.params)
    batch = mlp.batch(np.random.default_rng(1), 16)

    def loss_at(point):
        return mlp.loss_fn(layout.replace(mlp.params, [t * p for t, p in zip(theta, point)]), batch)

    reference = jax.value_and_grad(loss_at)(mask)
    per_layer = jax.value_and_grad(loss_at)(polarizers.polarize(
        "onehot", mask, theta, kind="l2", scope="local", eps=0.9, ratio=0.9))
    for config, expected in ((SFPKConfig(scope="local"), reference),
                             (SFPKConfig(scope="local", local_polarizer="layer"), per_layer)):
        energy, grad = make_energy_fn(mlp.loss_fn, layout, config)(mlp.params, mask, batch)
        np.testing.assert_allclose(energy, expected[0], rtol=1e-6)
        for g, r in zip(grad, expected[1]):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)
    assert not np.isclose(reference[0], per_layer[0])


# --------------------------------------------------- the channel repulsion


def _channel_problem(seed=0, n=3):
    rng = np.random.default_rng(seed)
    theta = [jnp.asarray(rng.normal(size=(2, 2, 1, 3))), jnp.asarray(rng.normal(size=(3, 4))),
             jnp.asarray(rng.normal(size=(4,)))]
    shapes = [(1, 1, 1, 3), (1, 4), (4,)]
    particles = [jnp.asarray(rng.uniform(0.6, 1.0, (n, *s))) for s in shapes]
    return particles, theta


def test_channel_exp_repulsion_divides_by_the_other_strength():
    with jax.enable_x64(True):
        particles, theta = _channel_problem()
        n = particles[0].shape[0]
        # The expanded masks (Methods/sfpk.py, MaskSystem._calc_similarity_struct_exp).
        full = [np.broadcast_to(np.asarray(p), (n, *t.shape)) for p, t in zip(particles, theta)]
        w = [np.abs(np.asarray(t)) for t in theta]
        strength = sum(np.sum((f**2 * wl).reshape(n, -1), axis=1) for f, wl in zip(full, w))
        dist = sum(np.sum(((f[:, None] - f[None]) * wl) ** 2, axis=tuple(range(2, f.ndim + 1)))
                   for f, wl in zip(full, w))
        expected = np.mean(np.exp(-dist / (strength[None, :] + 1e-12)), axis=1)
        k, _ = repulsion_lib.repulsion(particles, theta, mode="exp", weighted=True, structured=True)
        np.testing.assert_allclose(k, expected, rtol=1e-12)
        # The unstructured normaliser sqrt(S_i S_j) gives another K.
        k_pair, _ = repulsion_lib.repulsion(particles, theta, mode="exp", weighted=True)
        assert not np.allclose(k_pair, expected, rtol=1e-6)


@pytest.mark.parametrize("weighted", [True, False])
def test_channel_repulsion_gradient_is_the_derivative_of_k(weighted):
    with jax.enable_x64(True):
        particles, theta = _channel_problem(seed=1, n=4)
        n = particles[0].shape[0]
        w = [channels.abs_weight(t, p.shape[1:]) if weighted else
             jnp.full(p.shape[1:], channels.node_size(t.shape, p.shape[1:]), jnp.float64)
             for p, t in zip(particles, theta)]
        w2 = [channels.sq_weight(t, p.shape[1:]) if weighted else wl
              for p, t, wl in zip(particles, theta, w)]

        def k_i(m_i, i):
            # K_i with every other particle and every strength held constant.
            fixed = [jax.lax.stop_gradient(p) for p in particles]
            strength = [sum(jnp.sum(jnp.square(p[j]) * wl) for p, wl in zip(fixed, w))
                        for j in range(n)]
            terms = [jnp.exp(-sum(jnp.sum(w2l * jnp.square(a - p[j]))
                                  for a, p, w2l in zip(m_i, fixed, w2)) / (strength[j] + 1e-12))
                     for j in range(n)]
            return sum(terms) / n

        _, grads = repulsion_lib.repulsion(particles, theta, mode="exp", weighted=weighted,
                                           structured=True)
        for i in range(n):
            expected = jax.grad(k_i)([p[i] for p in particles], i)
            for g, e in zip(grads, expected):
                np.testing.assert_allclose(g[i], e, rtol=1e-10, atol=1e-14)


def test_channel_cos_repulsion_keeps_the_pair_normaliser():
    particles, theta = _channel_problem(seed=2)
    for a, b in zip(repulsion_lib.repulsion(particles, theta, mode="cos", weighted=True),
                    repulsion_lib.repulsion(particles, theta, mode="cos", weighted=True,
                                            structured=True)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)


# ------------------------------------------------------ the channel target


def test_simulation_density_renormalises_over_all_parameters():
    # Methods/structural_pruners.py, SFPK.mask: (M - (1 - s) P) / M.
    assert channels.simulation_density(0.5, 296, 308) == pytest.approx((296 - 154) / 296)
    assert channels.simulation_density(0.5, 100, 100) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lower sparsity"):
        channels.simulation_density(0.1, 100, 200)
    with pytest.raises(ValueError, match="below the 100 weights"):
        channels.simulation_density(0.5, 100, 99)


def _sfpk_run(cnn, steps=3, **kwargs):
    config = SFPKConfig(steps=steps, particles=2, scope="local", mask_dim="out", early_stop=False)
    # Both kernels (the classifier too, by choice): the counts below are the reference's.
    return sfpk_jax.sfpk_prune(cnn.loss_fn, cnn.params, cnn.particle_batches(2, seed=3), 0.75,
                               config=config, execution=Execution("vmap"),
                               prunable=cnn.layers.restrict("kernel$"), **kwargs)


def test_channel_simulation_aims_at_the_renormalised_density(cnn):
    # TinyCNN: conv kernel 36 + conv bias 4 + batch norm 8 + dense 256 + 4; the
    # biases follow their kernels' channels, so M counts the kernels alone.
    layout = MaskLayout.from_params(cnn.params, cnn.layers.restrict("kernel$"), mask_dim="out")
    assert layout.total == 292
    assert sum(x.size for x in jax.tree.leaves(cnn.params)) == 308
    steps = 3
    for total, result in ((308, _sfpk_run(cnn, steps)),
                          (400, _sfpk_run(cnn, steps, total_params=400))):
        target = (292 - (1 - 0.5) * total) / 292
        # exp schedule, every layer from G_l = 1: dt_0 = f (1/f - (1/f)^(1 - 1/K)).
        dt0 = target * (1 / target - (1 / target) ** (1 - 1 / steps))
        np.testing.assert_allclose(result.trace["dt"][0], dt0, rtol=1e-5)
        # The final mask keeps f = sqrt(1 - 0.75) of every layer's channels.
        for m, size in zip(layout.gather(result.masks), layout.mask_sizes):
            assert int(np.sum(m)) == size - math.floor(0.5 * size)
    with pytest.raises(ValueError, match="lower sparsity"):
        _sfpk_run(cnn, total_params=1000)


def test_prune_passes_the_parameter_count(cnn):
    result = sfpk_jax.prune("sfpk", cnn.loss_fn, cnn.params, cnn.particle_batches(2, seed=3), 0.75,
                            scope="local", mask_dim="out", total_params=400,
                            prunable=cnn.layers.restrict("kernel$"),
                            config=SFPKConfig(steps=2, particles=2), execution=Execution(particle_mode="vmap"))
    reference = _sfpk_run(cnn, 2, total_params=400)
    np.testing.assert_allclose(result.trace["dt"], reference.trace["dt"], rtol=1e-6)


# ------------------------------------------------ float32 Gauss polarizer


def test_gauss_quantile_of_a_density_above_one_is_finite():
    # q = 1 - G + 1e-12 < 0 makes norm.ppf NaN; the reference's max(-1e12, .)
    # turns it into -1e12 (Methods/mask_processor.py, GaussSigmoid.forward),
    # which puts every entry at the top of the band.
    mask = [jnp.full((6,), 1.0 + 2**-20, jnp.float32), jnp.full((3,), 1.0 + 2**-20, jnp.float32)]
    theta = [jnp.linspace(0.1, 1.0, 6, dtype=jnp.float32), jnp.asarray([0.5, 1.0, 1.5], jnp.float32)]
    for scope, at in (("global", "scope"), ("local", "scope"), ("local", "sum")):
        point = jax.jit(lambda m, t, s=scope, a=at: polarizers.polarize(
            "gauss_sigmoid", m, t, kind="l2", scope=s, eps=0.9, ratio=0.9, at=a))(mask, theta)
        for p in point:
            np.testing.assert_array_equal(np.asarray(p), np.ones(p.shape, np.float32))


@pytest.mark.parametrize("scope", ["global", "local"])
def test_float32_gauss_run_from_the_dense_start_completes(cnn, scope):
    # In local scope the polarizer reads sum_l G_l > 1 from the start: every
    # step takes the NaN quantile path.
    config = SFPKConfig(steps=4, particles=2, scope=scope, polarizer="gauss_sigmoid")
    result = sfpk_jax.sfpk_prune(cnn.loss_fn, cnn.params, cnn.particle_batches(2, seed=1), 0.5,
                                 config=config, execution=Execution("vmap"))
    assert result.trace["E"].shape == (4, 2)
    assert all(np.all(np.isfinite(v)) for v in result.trace.values())
    assert jax.tree.leaves(result.particles)[0].dtype == jnp.float32
