"""Physical channel shrinking: the shrunk model computes the masked model's logits."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import sfpk_jax
from benchmarks import shrink_speed
from sfpk_jax.models import make_apply_fn
from sfpk_jax.models.small_cnn import MLP, SmallCNN
from sfpk_jax.models.vgg import VGG
from sfpk_jax.tools.shrink import shrink
from sfpk_jax.train import layers_of

# Two convs, a pool, one more conv; on 8x8 inputs the classifier sees
# 2x2 positions x 8 channels, which exercises the flattened fc rows.
PLAN = (4, 6, "M", 8)
IMAGE = (8, 8, 3)
CLASSES = 5


def no_masks(params):
    return jax.tree.map(lambda _: None, params)


def channel_mask(size, dead, mask_dim, rank):
    m = np.ones(size, np.float32)
    m[list(dead)] = 0.0
    shape = [1] * rank
    shape[-1 if mask_dim == "out" else -2] = size
    return m.reshape(shape)


def assert_same_logits(module, variables, masks, shrunk, input_shape, seed=3):
    x = np.random.default_rng(seed).standard_normal((5, *input_shape)).astype(np.float32)
    masked = {**variables, "params": sfpk_jax.apply_masks(variables["params"], masks)}
    full = module.apply(masked, x, train=False)
    small = shrunk.module.apply(shrunk.variables, x, train=False)
    assert small.shape == full.shape
    np.testing.assert_allclose(np.asarray(small), np.asarray(full), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_vgg():
    module = VGG(plan=PLAN, num_classes=CLASSES)
    variables = shrink_speed.trained_like_variables(module, IMAGE)
    # Layer 0: channel 1 surely emits a positive constant, channel 3 surely 0.
    variables["params"]["layers_0"]["bn"]["bias"][1] = 3.0
    variables["params"]["layers_0"]["bn"]["bias"][3] = -30.0
    return module, variables


def test_vgg_out_masks_are_exact_and_shrink_the_plan(tiny_vgg):
    module, variables = tiny_vgg
    masks = no_masks(variables["params"])
    masks["layers_0"]["conv"]["kernel"] = channel_mask(4, [1, 3], "out", 4)
    masks["layers_1"]["conv"]["kernel"] = channel_mask(6, [0, 2, 5], "out", 4)
    masks["layers_3"]["conv"]["kernel"] = channel_mask(8, [2, 3, 6, 7], "out", 4)
    shrunk = shrink(module, variables, masks)
    layer0, layer1, layer3 = shrunk.report
    assert layer0.indices == (0, 2) and layer0.folded == 1 and layer0.width == 3  # + constant channel
    assert layer1.indices == (1, 3, 4) and layer1.channels == 6
    assert layer3.indices == (0, 1, 4, 5) and layer3.width == 4  # folded into fc's bias
    assert shrunk.module.plan == (layer0.width, layer1.width, "M", 4)
    params = shrunk.variables["params"]
    assert params["layers_0"]["conv"]["kernel"].shape == (3, 3, 3, layer0.width)
    assert params["layers_1"]["conv"]["kernel"].shape == (3, 3, 3, layer1.width)
    assert params["layers_3"]["conv"]["kernel"].shape == (3, 3, layer1.width, 4)
    assert params["fc"]["kernel"].shape == (4 * 4, CLASSES)
    assert shrunk.variables["batch_stats"]["layers_1"]["bn"]["var"].shape == (layer1.width,)
    assert_same_logits(module, variables, masks, shrunk, IMAGE)


def test_vgg_in_masks_are_exact(tiny_vgg):
    module, variables = tiny_vgg
    masks = no_masks(variables["params"])
    masks["layers_0"]["conv"]["kernel"] = channel_mask(3, [2], "in", 4)  # an image channel: kept
    masks["layers_1"]["conv"]["kernel"] = channel_mask(4, [0, 1], "in", 4)
    masks["layers_3"]["conv"]["kernel"] = channel_mask(6, [5], "in", 4)
    # fc rows are 2x2 positions x 8 channels: channel 6 is unread only at every position.
    fc = np.ones((32, 1), np.float32)
    fc[[6, 14, 22, 30]] = 0.0
    fc[[7, 15]] = 0.0
    masks["fc"]["kernel"] = fc
    shrunk = shrink(module, variables, masks)
    assert [r.indices for r in shrunk.report] == [(2, 3), (0, 1, 2, 3, 4), (0, 1, 2, 3, 4, 5, 7)]
    assert all(r.folded == 0 for r in shrunk.report)  # unread channels carry nothing
    assert shrunk.module.plan == (2, 5, "M", 7)
    assert shrunk.variables["params"]["layers_0"]["conv"]["kernel"].shape == (3, 3, 3, 2)
    assert_same_logits(module, variables, masks, shrunk, IMAGE)


def test_vgg_fully_pruned_layers_keep_one_channel(tiny_vgg):
    module, variables = tiny_vgg
    masks = no_masks(variables["params"])
    masks["layers_1"]["conv"]["kernel"] = channel_mask(6, range(6), "out", 4)
    masks["layers_3"]["conv"]["kernel"] = channel_mask(8, range(8), "out", 4)
    shrunk = shrink(module, variables, masks)
    # Layer 1's zero kernel reads nothing, so layer 0 goes too; each keeps one
    # (constant) channel so the module stays valid.
    assert shrunk.module.plan == (1, 1, "M", 1)
    assert [r.kept for r in shrunk.report] == [0, 0, 0]
    assert_same_logits(module, variables, masks, shrunk, IMAGE)


@pytest.mark.parametrize("mask_dim", ["out", "in"])
def test_mlp_is_exact_and_narrower(mask_dim):
    module = MLP(num_classes=4, hidden=12)
    variables = shrink_speed.trained_like_variables(module, (8, 8, 1), seed=1)
    masks = no_masks(variables["params"])
    dead = [0, 3, 4, 7, 11]
    if mask_dim == "out":
        masks["Dense_0"]["kernel"] = channel_mask(12, dead, "out", 2)
        masks["Dense_1"]["bias"] = np.array([1, 0, 1, 1], np.float32)  # dense biases are prunable
    else:
        masks["Dense_0"]["kernel"] = channel_mask(64, [5, 9], "in", 2)  # inputs: kept
        masks["Dense_1"]["kernel"] = channel_mask(12, dead, "in", 2)
    shrunk = shrink(make_apply_fn(module), variables, masks)  # build()'s apply_fn works too
    (layer,) = shrunk.report
    assert layer.indices == (1, 2, 5, 6, 8, 9, 10)
    assert shrunk.module.hidden == 7 and layer.width == 7
    if mask_dim == "out":
        assert layer.folded > 0  # relu(bias) of some dead units reaches the logits
    assert shrunk.variables["params"]["Dense_1"]["kernel"].shape == (7, 4)
    assert_same_logits(module, variables, masks, shrunk, (8, 8, 1))


@pytest.mark.parametrize("which", ["mlp", "vgg"])
def test_the_librarys_own_channel_masks_shrink_exactly(which, tiny_vgg):
    """Masks as the library makes them (the model's layers read off its loss, the classes
    kept, the biases following their kernels): the shrunk model computes the masked model's
    logits, and an MLP's removed units leak nothing (their biases are masked with them)."""
    if which == "mlp":
        module, shape = MLP(num_classes=4, hidden=12), (8, 8, 1)
        variables = shrink_speed.trained_like_variables(module, shape, seed=1)
    else:
        (module, variables), shape = tiny_vgg, IMAGE
    apply_fn = make_apply_fn(module)
    masks = sfpk_jax.magnitude_prune(variables["params"], 0.75, scope="local", mask_dim="out",
                                     prunable=layers_of(apply_fn, variables, shape))
    shrunk = shrink(module, variables, masks)
    assert_same_logits(module, variables, masks, shrunk, shape)
    if which == "mlp":
        assert [r.folded for r in shrunk.report] == [0]
        assert shrunk.module.hidden == 12 - int(0.5 * 12)


def test_mlp_by_registry_name():
    module = MLP(num_classes=10)
    variables = shrink_speed.trained_like_variables(module, (8, 8, 1), seed=2)
    masks = no_masks(variables["params"])
    masks["Dense_0"]["kernel"] = channel_mask(64, range(32), "out", 2)
    shrunk = shrink("mlp", variables, sfpk_jax.PruneResult(masks))  # a pruner's result works too
    assert shrunk.module.hidden == 32
    assert_same_logits(module, variables, masks, shrunk, (8, 8, 1))


def test_unsupported_architectures_are_named():
    with pytest.raises(ValueError, match="cannot shrink model 'resnet20'.*apply_masks"):
        shrink("resnet20", {"params": {}}, None)
    with pytest.raises(ValueError, match="cannot shrink a SmallCNN.*VGG"):
        shrink(SmallCNN(), {"params": {}}, None)


def test_unstructured_masks_are_rejected(tiny_vgg):
    module, variables = tiny_vgg
    masks = no_masks(variables["params"])
    masks["layers_1"]["conv"]["kernel"] = np.ones((3, 3, 4, 6), np.float32)
    with pytest.raises(ValueError, match="layers_1/conv/kernel.*not a channel mask.*mask_dim='out'"):
        shrink(module, variables, masks)


def test_bad_variables_are_rejected(tiny_vgg):
    module, variables = tiny_vgg
    with pytest.raises(ValueError, match="batch_stats"):
        shrink(module, {"params": variables["params"]}, None)
    with pytest.raises(ValueError, match="not the params alone"):
        shrink(module, variables["params"], None)
    with pytest.raises(ValueError, match="layers_1/conv/kernel.*plan"):
        shrink(VGG(plan=(4, 7, "M", 8), num_classes=CLASSES), variables, None)
    with pytest.raises(ValueError, match="must mirror"):
        shrink(module, variables, {"extra": {"kernel": np.ones((1, 2), np.float32)}})


def test_benchmark_runs_tiny(capsys):
    """Magnitude channel masks from sfpk_jax.prune, shrunk, timed and checked for exactness."""
    assert shrink_speed.main(["--tiny", "--batch-size", "4", "--repeats", "1",
                              "--sparsities", "0.5,0.9"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert "| 0.9 |" in out and [r["sparsity"] for r in result["rows"]] == [0.5, 0.9]
    for row in result["rows"]:
        assert row["kept_flops"] < row["flops"] and row["kept_params"] < row["params"]
        assert row["max_abs_logit_diff"] <= 1e-5 * max(1.0, row["max_abs_logit"])


def test_benchmark_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        shrink_speed.main(["--tiny", "--repeats", "0"])
    assert exc.value.code == 2 and "--repeats" in capsys.readouterr().err
