"""The CIFAR zoo in the form of the builder the official ``Utils/load.py`` selects.

``resnet20``, ``resnet56``, ``wrn20`` and ``vgg16_bn`` come from the
lottery-ticket files (``Models/lottery_resnet.py``, ``Models/lottery_vgg.py``),
``resnet32`` and ``vgg19_bn`` from the ProbMask files
(``Models/probmask_cifar_resnet.py``, ``Models/probmask_cifar_vgg_bn.py``).
The counts below are those of the official PyTorch models with 100 classes
(all parameters, and the weights the official code masks); their leaves
correspond one to one, so official checkpoints convert without loss. The
ProbMask VGG-19 has no bias anywhere, which :func:`sfpk_jax.tools.shrink.shrink`
handles by carrying constants in a channel instead of the classifier bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_shrink import assert_same_logits, channel_mask, no_masks

from benchmarks import shrink_speed
from sfpk_jax.core.masks import count_prunable, path_to_str
from sfpk_jax.models import build, cifar_resnet, vgg
from sfpk_jax.models.common import CIFAR_INPUT
from sfpk_jax.models.vgg import POOL, VGG
from sfpk_jax.tools.shrink import shrink

FACTORIES = {"resnet20": cifar_resnet.resnet20, "resnet32": cifar_resnet.resnet32,
             "resnet56": cifar_resnet.resnet56, "wrn20": cifar_resnet.wrn20,
             "vgg16_bn": vgg.vgg16_bn, "vgg19_bn": vgg.vgg19_bn}

# name: (all parameters, masked weights) of the official model, 100 classes.
OFFICIAL_COUNTS = {
    "resnet20": (278_564, 276_756),
    "resnet32": (1_872_032, 1_867_104),
    "resnet56": (862_532, 857_364),
    "wrn20": (1_096_676, 1_093_060),
    "vgg16_bn": (14_774_436, 14_761_764),
    "vgg19_bn": (20_081_088, 20_070_080),
}


def _abstract_params(name: str, num_classes: int = 100):
    """The params tree of a zoo model as shapes (nothing is computed)."""
    module = FACTORIES[name](num_classes)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(CIFAR_INPUT),
                                              train=False))["params"]


def _param_shapes(name: str) -> dict:
    return {path_to_str(p): leaf.shape
            for p, leaf in jax.tree_util.tree_flatten_with_path(_abstract_params(name))[0]}


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_parameter_counts_are_the_official_models(name):
    params = _abstract_params(name)
    total, masked = OFFICIAL_COUNTS[name]
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params)) == total
    assert count_prunable(params) == masked


def test_probmask_forms_have_no_bias_and_a_bias_free_classifier():
    vgg = _param_shapes("vgg19_bn")
    assert not [p for p in vgg if p.endswith("bias") and "/bn/" not in p]
    assert vgg["fc/kernel"] == (512, 100)  # the 1x1 conv classifier on the 1x1 map
    resnet = _param_shapes("resnet32")
    assert resnet["conv/kernel"] == (3, 3, 3, 32) and resnet["fc/kernel"] == (128, 100)
    assert "fc/bias" not in resnet
    assert not [p for p in resnet if p.endswith("/shortcut")]  # parameter-free identities
    assert len([p for p in resnet if p.endswith("conv1/kernel")]) == 15


def test_lottery_identity_shortcuts_carry_a_channel_weight():
    shapes = _param_shapes("resnet20")
    scales = {p: s for p, s in shapes.items() if p.endswith("/shortcut")}
    # Nine blocks, two of which project their shortcut with a 1x1 conv.
    assert len(scales) == 7 and scales["blocks_0/shortcut"] == (16,)
    assert shapes["fc/bias"] == (100,)
    assert "bias" not in {p.rpartition("/")[2] for p in shapes if "conv" in p}


def test_identity_shortcut_weight_scales_the_residual():
    apply_fn, variables = build("resnet20", 10)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: 0.0 * v if path_to_str(p).endswith("/shortcut") else v, variables["params"])
    same, _ = apply_fn(variables, x, False)
    changed, _ = apply_fn({**variables, "params": params}, x, False)
    assert not np.allclose(same, changed)


# --------------------------------------------------------- shrinking VGG-19


PLAN = (4, 6, POOL, 8, POOL)
IMAGE = (8, 8, 3)


@pytest.fixture(scope="module")
def bias_free_vgg():
    module = VGG(plan=PLAN, num_classes=5, bias=False, avg_pool=False)
    variables = shrink_speed.trained_like_variables(module, IMAGE)
    # Channels whose constant relu(BN(0)) is surely positive, in the first and last layer.
    variables["params"]["layers_0"]["bn"]["bias"][1] = 3.0
    variables["params"]["layers_3"]["bn"]["bias"][2] = 3.0
    return module, variables


def test_bias_free_vgg_out_masks_carry_constants_into_the_classifier(bias_free_vgg):
    module, variables = bias_free_vgg
    masks = no_masks(variables["params"])
    masks["layers_0"]["conv"]["kernel"] = channel_mask(4, [1, 3], "out", 4)
    masks["layers_3"]["conv"]["kernel"] = channel_mask(8, [2, 3, 6, 7], "out", 4)
    shrunk = shrink(module, variables, masks)
    first, _, last = shrunk.report
    assert first.indices == (0, 2) and first.width == 3
    # No classifier bias to fold into: the last layer keeps a constant channel.
    assert last.indices == (0, 1, 4, 5) and last.folded >= 1 and last.width == 5
    assert shrunk.module.plan == (3, 6, POOL, 5, POOL)
    assert "bias" not in shrunk.variables["params"]["fc"]
    assert "bias" not in shrunk.variables["params"]["layers_3"]["conv"]
    assert_same_logits(module, variables, masks, shrunk, IMAGE)


def test_bias_free_vgg_in_masks_are_exact(bias_free_vgg):
    module, variables = bias_free_vgg
    masks = no_masks(variables["params"])
    masks["layers_1"]["conv"]["kernel"] = channel_mask(4, [0, 1], "in", 4)
    masks["fc"]["kernel"] = channel_mask(32, [5, 13, 21, 29], "in", 2)
    shrunk = shrink(module, variables, masks)
    # Layer 0 loses the channels layer 1 no longer reads, layer 3 the one fc does not.
    assert [r.kept for r in shrunk.report] == [2, 6, 7]
    assert_same_logits(module, variables, masks, shrunk, IMAGE)
