"""FLOPs and parameter counts against hand counts."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sfpk_jax
from sfpk_jax.core.layers import trace_layers
from sfpk_jax.models import make_apply_fn
from sfpk_jax.tools.flops import layer_costs, summary


class TwoLayerCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(4, (3, 3), padding="SAME", use_bias=False)(x))      # 8x8x2 -> 8x8x4
        x = nn.Conv(6, (3, 3), strides=2, padding="VALID")(x)                   # -> 3x3x6
        return nn.Dense(5)(x.reshape((x.shape[0], -1)))                          # 54 -> 5


@pytest.fixture(scope="module")
def model():
    module = TwoLayerCNN()
    x = jnp.zeros((1, 8, 8, 2))
    return make_apply_fn(module), dict(module.init(jax.random.key(0), x)), x


def test_dense_counts_match_hand_counts(model):
    apply_fn, variables, x = model
    rows = {r.path: r for r in layer_costs(apply_fn, variables, x)}
    assert rows["Conv_0"].flops == 8 * 8 * (3 * 3 * 2 * 4)
    assert rows["Conv_0"].params == 3 * 3 * 2 * 4
    assert rows["Conv_1"].flops == 3 * 3 * (3 * 3 * 4 * 6)
    assert rows["Conv_1"].params == 3 * 3 * 4 * 6 + 6
    assert rows["Dense_0"].flops == 54 * 5
    assert rows["Dense_0"].params == 54 * 5 + 5
    assert all(r.kept_flops == r.flops and r.kept_params == r.params for r in rows.values())


def test_channel_masks_scale_the_counts(model):
    apply_fn, variables, x = model
    layers = trace_layers(lambda p, b: apply_fn({**variables, "params": p}, b, False)[0].sum(),
                          variables["params"], x)
    masks = sfpk_jax.core.masks.ones_like_masks(variables["params"], layers, mask_dim="out")
    drop_two = np.ones((1, 1, 1, 4), np.float32)
    drop_two[..., :2] = 0
    masks["Conv_0"]["kernel"] = jnp.asarray(drop_two)
    rows = {r.path: r for r in layer_costs(apply_fn, variables, x, masks)}
    assert rows["Conv_0"].kept_flops == 8 * 8 * (3 * 3 * 2 * 2)
    assert rows["Conv_0"].kept_params == 3 * 3 * 2 * 2
    assert rows["Conv_1"].kept_flops == rows["Conv_1"].flops
    totals = summary(list(rows.values()))
    assert totals["kept_flops"] == sum(r.kept_flops for r in rows.values())
    assert 0 < totals["flops_kept_fraction"] < 1


def test_zoo_resnet20_flops_are_the_known_figure():
    apply_fn, variables = sfpk_jax.models.build("resnet20", num_classes=10)
    rows = layer_costs(apply_fn, variables, jnp.zeros((1, 32, 32, 3)))
    # ResNet-20 (CIFAR) is ~40.6M multiply-adds and 0.27M prunable weights.
    assert 40.0e6 < summary(rows)["flops"] < 41.5e6


@pytest.mark.slow  # runs the structured-pruning report script
def test_structured_report_runs(tmp_path):
    import json

    from benchmarks import structured_report

    assert structured_report.main(["--models", "resnet20", "--sparsity", "0.75",
                                   "--out", str(tmp_path)]) == 0
    (report,) = json.loads((tmp_path / "report.json").read_text())
    total = report["total"]
    assert total["params"] == 276_756
    # Every hidden layer keeps half its output channels (sqrt(1 - 0.75)); the classifier
    # keeps all of its outputs, the classes.
    *hidden, classifier = report["layers"]
    assert classifier["kept_params"] == classifier["params"]
    for layer in hidden:
        assert layer["kept_params"] / layer["params"] == pytest.approx(0.5, abs=0.02), layer
    assert sum(layer["kept_flops"] for layer in report["layers"]) == total["kept_flops"]
    assert structured_report.main(["--models", "resnet20", "--out", str(tmp_path)]) == 2
