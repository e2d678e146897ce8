"""Convolutions in batch chunks are the plain convolution, up to float rounding, on any model."""


import framework_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from sfpk_jax.models import build
from sfpk_jax.parallel.conv_chunks import chunk_convolutions
from sfpk_jax.train import make_loss_fn

DIMS = ("NHWC", "HWIO", "NHWC")


def _loss(x, w):
    return jnp.sum(jnp.tanh(lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DIMS)))


def _inputs(batch, dtype=jnp.float32):
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((batch, 9, 9, 3)), dtype),
            jnp.asarray(rng.standard_normal((3, 3, 3, 5)), dtype))


def _convolutions(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count("conv_general_dilated[")


@pytest.mark.parametrize("batch, chunk, convs", [(8, 2, 4), (8, 8, 1), (8, 16, 1), (6, 4, 1)])
def test_value_and_both_gradients_match_the_plain_conv(batch, chunk, convs):
    """Chunks change the summation order only (chunk >= batch, or one not dividing it: whole)."""
    x, w = _inputs(batch)
    chunked = chunk_convolutions(_loss, chunk, min_bytes=0)
    assert _convolutions(chunked, x, w) == convs
    (v1, (gx1, gw1)), (v2, (gx2, gw2)) = (jax.jit(jax.value_and_grad(f, (0, 1)))(x, w)
                                          for f in (_loss, chunked))
    np.testing.assert_allclose(v2, v1, rtol=1e-6)
    # float32 sums in another order (values up to ~5); exactness is the float64 test's
    np.testing.assert_allclose(gx2, gx1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw2, gw1, rtol=1e-5, atol=1e-5)


def test_exact_in_float64_and_the_backward_pass_is_chunked_too():
    with jax.enable_x64(True):
        x, w = _inputs(8, jnp.float64)
        gw1, gw2 = (jax.grad(f, argnums=1)(x, w) for f in (_loss, chunk_convolutions(_loss, 2, min_bytes=0)))
        np.testing.assert_allclose(gw2, gw1, rtol=1e-11, atol=1e-12)
    x, w = _inputs(8)
    grads = [jax.grad(f, argnums=(0, 1)) for f in (_loss, chunk_convolutions(_loss, 2, min_bytes=0))]
    # Forward, input gradient and kernel gradient: one convolution each, per chunk.
    assert (_convolutions(grads[0], x, w), _convolutions(grads[1], x, w)) == (3, 12)


def test_forward_over_reverse_works_as_grasp_needs():
    """Plain autodiff through static slices: jvp of a gradient (GraSP's Hessian product)."""
    x, w = _inputs(8)
    grads = [jax.grad(lambda w, f=f: f(x, w)) for f in (_loss, chunk_convolutions(_loss, 2, min_bytes=0))]
    hvps = [jax.jvp(g, (w,), (jnp.ones_like(w),))[1] for g in grads]
    np.testing.assert_allclose(hvps[1], hvps[0], rtol=1e-4, atol=1e-4)


def test_convolutions_inside_jit_are_chunked_and_inside_scan_left_whole():
    x, w = _inputs(8)
    inner = jax.jit(_loss)

    def scanned(x, w):
        return lax.scan(lambda c, xi: (c + _loss(xi, w), None), 0.0, x[None])[0]

    assert _convolutions(chunk_convolutions(inner, 2, min_bytes=0), x, w) == 4
    np.testing.assert_allclose(chunk_convolutions(inner, 2, min_bytes=0)(x, w), _loss(x, w), rtol=1e-6)
    np.testing.assert_allclose(chunk_convolutions(scanned, 2, min_bytes=0)(x, w), _loss(x, w), rtol=1e-6)


@pytest.mark.parametrize("chunk", [-1, 1.5, True, "32"])
def test_bad_chunk_is_refused(chunk):
    with pytest.raises(ValueError, match="chunk must be a non-negative int"):
        chunk_convolutions(_loss, chunk)


def test_the_same_function_and_chunk_are_equal_so_compiled_programs_are_reused():
    assert chunk_convolutions(_loss, 4) == chunk_convolutions(_loss, 4)
    assert hash(chunk_convolutions(_loss, 4)) == hash(chunk_convolutions(_loss, 4))
    assert chunk_convolutions(_loss, 4) != chunk_convolutions(_loss, 2, min_bytes=0)
    assert chunk_convolutions(_loss, 0) is _loss


def test_a_convolution_whose_input_fits_in_the_caches_stays_whole():
    x, w = _inputs(8)  # 8 x 9 x 9 x 3 floats: under a kilobyte
    assert _convolutions(chunk_convolutions(_loss, 2), x, w) == 1
    assert _convolutions(chunk_convolutions(_loss, 2, min_bytes=x.nbytes - 1), x, w) == 4


def test_a_function_with_nothing_to_chunk_is_the_same_program():
    # Its jit calls stay calls, so XLA compiles (and rounds) it as the user wrote it.
    x, w = _inputs(8)
    inside_jit = lambda x, w: jax.jit(_loss)(x, w)  # noqa: E731
    assert (str(jax.make_jaxpr(chunk_convolutions(inside_jit, 2))(x, w))
            == str(jax.make_jaxpr(inside_jit)(x, w)))


def _same_loss_and_gradients(loss_fn, params, batch, chunk):
    chunked = chunk_convolutions(loss_fn, chunk, min_bytes=0)
    assert _convolutions(chunked, params, batch) > _convolutions(loss_fn, params, batch)
    (v1, g1), (v2, g2) = (jax.jit(jax.value_and_grad(f))(params, batch) for f in (loss_fn, chunked))
    np.testing.assert_allclose(v2, v1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("framework", ["linen", "nnx", "equinox"])
def test_a_users_model_of_each_framework_is_chunked_without_rebuilding(framework):
    """Training-mode batch norm still sees the whole batch: the loss and gradients are the same."""
    model = framework_models.build(framework)
    rng = np.random.default_rng(1)
    batch = {"image": jnp.asarray(rng.standard_normal((16, 8, 8, 1)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32)}
    _same_loss_and_gradients(model.loss_fn, model.params, batch, 4)


@pytest.mark.parametrize("name, shape", [("resnet20", (32, 32, 3)), ("small_cnn", (8, 8, 1))])
def test_zoo_models_are_chunked_the_same_way(name, shape):
    apply_fn, variables = build(name, input_shape=(1, *shape))
    rng = np.random.default_rng(1)
    batch = {"image": jnp.asarray(rng.standard_normal((16, *shape)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32)}
    _same_loss_and_gradients(make_loss_fn(apply_fn, variables), variables["params"], batch, 4)
