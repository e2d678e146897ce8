"""Convolutions in batch chunks are the plain convolution, up to float rounding, in every use."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from sfpk_jax.models import build, chunked_conv
from sfpk_jax.train import make_loss_fn

DIMS = ("NHWC", "HWIO", "NHWC")


def _loss(conv, x, w):
    return jnp.sum(jnp.tanh(conv(x, w, (1, 1), "SAME", dimension_numbers=DIMS)))


def _inputs(batch, dtype=jnp.float32):
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((batch, 9, 9, 3)), dtype),
            jnp.asarray(rng.standard_normal((3, 3, 3, 5)), dtype))


@pytest.mark.parametrize("batch, chunk", [(8, 2), (8, 8), (8, 16), (6, 4)])
def test_value_and_both_gradients_match_the_plain_conv(batch, chunk):
    """Chunks change the summation order only (chunk >= batch, or one not dividing it: plain)."""
    x, w = _inputs(batch)
    plain = jax.jit(jax.value_and_grad(functools.partial(_loss, lax.conv_general_dilated), (0, 1)))
    chunked = jax.jit(jax.value_and_grad(functools.partial(_loss, chunked_conv(chunk)), (0, 1)))
    (v1, (gx1, gw1)), (v2, (gx2, gw2)) = plain(x, w), chunked(x, w)
    np.testing.assert_allclose(v2, v1, rtol=1e-6)
    np.testing.assert_allclose(gx2, gx1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gw2, gw1, rtol=1e-5, atol=1e-5)


def test_exact_in_float64_and_the_program_has_the_chunks():
    with jax.enable_x64(True):
        x, w = _inputs(8, jnp.float64)
        grad = jax.grad(_loss, argnums=2)
        gw1, gw2 = grad(lax.conv_general_dilated, x, w), grad(chunked_conv(2), x, w)
        np.testing.assert_allclose(gw2, gw1, rtol=1e-11, atol=1e-12)
    hlo = jax.jit(functools.partial(_loss, chunked_conv(2))).lower(*_inputs(8)).as_text()
    assert hlo.count("convolution(") == 4


def test_forward_over_reverse_works_as_grasp_needs():
    """Plain autodiff through static slices: jvp of a gradient (GraSP's Hessian product)."""
    x, w = _inputs(8)
    grads = [jax.grad(lambda w, conv=conv: _loss(conv, x, w)) for conv in
             (lax.conv_general_dilated, chunked_conv(2))]
    hvps = [jax.jvp(g, (w,), (jnp.ones_like(w),))[1] for g in grads]
    np.testing.assert_allclose(hvps[1], hvps[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [-1, 1.5, True])
def test_bad_chunk_is_refused(chunk):
    with pytest.raises(ValueError, match="chunk"):
        chunked_conv(chunk)
    with pytest.raises(ValueError, match="conv_chunk"):
        build("small_cnn", conv_chunk=chunk)


@pytest.mark.parametrize("name, shape", [("small_cnn", (8, 8, 1)), ("resnet20", (32, 32, 3)),
                                         ("mlp", (8, 8, 1))])
def test_zoo_model_with_chunks_is_the_same_model(name, shape):
    """Same variables, same training-mode loss and gradients (batch norm sees the whole batch)."""
    (apply_plain, variables), (apply_chunked, same) = (
        build(name, input_shape=(1, *shape), conv_chunk=chunk) for chunk in (0, 4))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), variables, same))
    rng = np.random.default_rng(1)
    batch = {"image": jnp.asarray(rng.standard_normal((16, *shape)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32)}
    results = [jax.jit(jax.value_and_grad(make_loss_fn(apply_fn, variables)))(
        variables["params"], batch) for apply_fn in (apply_plain, apply_chunked)]
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5)
