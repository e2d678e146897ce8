"""Forward+backward of one model under other convolution lowerings, side by side.

    python -m benchmarks.conv_speed --model resnet20 --batch-size 128 --repeats 7
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python -m benchmarks.conv_speed ...

One jitted ``value_and_grad`` of the training-mode loss (the bare cost of one
particle) per variant, timed alternately after a compile; medians of wall
time and of process CPU time (all threads) are reported. CPU time is the
steadier number on a shared machine. Variants, swapped into every Flax
``nn.Conv`` through ``flax.linen.intercept_methods``:

* ``lax``: Flax's default ``lax.conv_general_dilated``, NHWC / HWIO;
* ``nchw``: the same convolution run in NCHW / OIHW, transposing around it;
* ``im2col``: the k*k shifted views concatenated, then one matmul;
* ``taps``: one matmul per kernel tap, summed (no k*k-wide patch matrix);
* ``bf16``: ``lax`` with parameters, batch-norm state and images cast to
  bfloat16 inside the loss (the loss itself in float32).

These are experiments (issue 5), not part of the package: none of them beat
``lax`` on the full step (see RESULTS.md). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sfpk_jax import models
from sfpk_jax.train import cross_entropy, make_loss_fn


def _geometry(lhs, rhs, window_strides, padding):
    kh, kw = rhs.shape[:2]
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), window_strides, padding)
    (pt, pb), (pl, pr) = padding
    x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    sh, sw = window_strides
    ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    views = {(i, j): x[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, :]
             for i in range(kh) for j in range(kw)}
    return views, (x.shape[0], ho, wo)


def _check(lhs_dilation, rhs_dilation, feature_group_count):
    if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
        raise NotImplementedError("dilated convolutions")
    if feature_group_count != 1:
        raise NotImplementedError("grouped convolutions")


def im2col_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, precision=None):
    """NHWC x HWIO convolution as one (N*H*W, k*k*C) x (k*k*C, O) matmul."""
    _check(lhs_dilation, rhs_dilation, feature_group_count)
    views, (n, ho, wo) = _geometry(lhs, rhs, window_strides, padding)
    patches = jnp.concatenate(list(views.values()), axis=-1)
    kernel = rhs.reshape(-1, rhs.shape[-1])
    return jnp.dot(patches.reshape(-1, kernel.shape[0]), kernel, precision=precision).reshape(
        n, ho, wo, -1)


def taps_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
              dimension_numbers=None, feature_group_count=1, precision=None):
    """NHWC x HWIO convolution as a sum of one matmul per kernel tap."""
    _check(lhs_dilation, rhs_dilation, feature_group_count)
    views, (n, ho, wo) = _geometry(lhs, rhs, window_strides, padding)
    out = sum(jnp.dot(v.reshape(-1, v.shape[-1]), rhs[i, j], precision=precision)
              for (i, j), v in views.items())
    return out.reshape(n, ho, wo, -1)


def nchw_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
              dimension_numbers=None, feature_group_count=1, precision=None):
    """The NHWC x HWIO convolution computed in NCHW x OIHW."""
    y = lax.conv_general_dilated(
        jnp.transpose(lhs, (0, 3, 1, 2)), jnp.transpose(rhs, (3, 2, 0, 1)), window_strides,
        padding, lhs_dilation, rhs_dilation, ("NCHW", "OIHW", "NCHW"), feature_group_count,
        precision=precision)
    return jnp.transpose(y, (0, 2, 3, 1))


CONVS = {"im2col": im2col_conv, "taps": taps_conv, "nchw": nchw_conv}


def with_conv(loss_fn, conv):
    """``loss_fn`` with every ``nn.Conv`` of the model computing through ``conv``."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if not (isinstance(module, nn.Conv) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        object.__setattr__(module, "conv_general_dilated", conv)  # frozen dataclass
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(module, "conv_general_dilated", None)

    def wrapped(params, batch):
        with nn.intercept_methods(interceptor):
            return loss_fn(params, batch)

    return wrapped


def bf16_loss(apply_fn, variables):
    """The training-mode loss computed in bfloat16 (cross-entropy in float32)."""

    def loss_fn(params, batch):
        cast = lambda tree: jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)
        logits, _ = apply_fn({**cast(variables), "params": cast(params)},
                             batch["image"].astype(jnp.bfloat16), True)
        return cross_entropy(logits.astype(jnp.float32), batch["label"])

    return loss_fn


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--input-shape", default="32,32,3")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--variants", default="lax,nchw,im2col,taps,bf16")
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.input_shape.split(","))
    apply_fn, variables = models.build(args.model, num_classes=args.num_classes,
                                       input_shape=(1,) + shape)
    base = make_loss_fn(apply_fn, variables)
    losses = {"lax": base, "bf16": bf16_loss(apply_fn, variables)}
    losses.update({name: with_conv(base, conv) for name, conv in CONVS.items()})
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(args.batch_size,) + shape), jnp.float32),
             "label": jnp.asarray(rng.integers(0, args.num_classes, args.batch_size), jnp.int32)}
    params = variables["params"]
    names = args.variants.split(",")
    fns = {name: jax.jit(jax.value_and_grad(losses[name])) for name in names}
    for fn in fns.values():
        jax.block_until_ready(fn(params, batch))
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(params, batch))
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    rows = {name: {"wall_s_median": statistics.median(wall[name]),
                   "cpu_s_median": statistics.median(cpu[name])} for name in names}
    for name, row in rows.items():
        print(f"{name:<8} wall {row['wall_s_median']:.3f} s  cpu {row['cpu_s_median']:.3f} s  "
              f"cpu x lax {row['cpu_s_median'] / rows[names[0]]['cpu_s_median']:.2f}")
    print(json.dumps({"model": args.model, "batch_size": args.batch_size, "repeats": args.repeats,
                      "backend": jax.default_backend(), "variants": rows}))


if __name__ == "__main__":
    main()
