"""The model zoo: CIFAR ResNets/VGGs, MobileNet-V1, ResNet-50, DeiT-Tiny, and
the loader of torch checkpoints (safetensors) into ResNet-50 and DeiT-Tiny.

Building a model initialises it eagerly (seconds each on a CPU), so every
model is built once per module through the ``zoo`` fixture.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy.special import erf

from sfpk_jax.core.masks import apply_masks, count_prunable, ones_like_masks
from sfpk_jax.models import build, load_pretrained, registered

pytestmark = pytest.mark.slow

CIFAR = ("resnet20", "resnet32", "resnet56", "wrn20", "vgg16_bn", "vgg19_bn")
IMAGENET = ("mobilenet_v1", "resnet50", "deit_tiny")
# Convolutional ImageNet models end in a global pool, so a 64x64 input (a 2x2
# final map) exercises them at a fraction of the cost; DeiT's position
# embedding fixes its input at 224x224 (197 tokens, timm's shapes).
INPUT = {name: (1, 32, 32, 3) for name in CIFAR}
INPUT.update(mobilenet_v1=(1, 64, 64, 3), resnet50=(1, 64, 64, 3), deit_tiny=(1, 224, 224, 3))
CLASSIFIER = {name: "head" if name == "deit_tiny" else "fc" for name in CIFAR + IMAGENET}
NUM_CLASSES = {name: 10 for name in CIFAR}
NUM_CLASSES.update(mobilenet_v1=1000, resnet50=1000, deit_tiny=10)


@pytest.fixture(scope="module")
def zoo():
    """``zoo(name, num_classes)`` -> ``(apply_fn, variables)``, built once per module."""
    cache = {}

    def get(name: str, num_classes: int | None = None):
        num_classes = NUM_CLASSES[name] if num_classes is None else num_classes
        if (name, num_classes) not in cache:
            cache[name, num_classes] = build(name, num_classes, input_shape=INPUT[name])
        return cache[name, num_classes]

    return get


def _images(name: str, batch: int = 1, seed: int = 0) -> jax.Array:
    shape = (batch,) + INPUT[name][1:]
    return jax.random.normal(jax.random.key(seed), shape)


# --- architectures -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "num_classes", "expected"),
    [("resnet20", 100, 276_756), ("resnet20", 10, 270_906), ("wrn20", 100, 1_093_060)],
)
def test_cifar_prunable_counts_match_the_paper_models(zoo, name, num_classes, expected):
    _, variables = zoo(name, num_classes)
    assert count_prunable(variables["params"]) == expected


def test_imagenet_parameter_counts_match_torchvision_and_timm():
    def total(name, num_classes):
        # Shapes alone (nothing is initialised): these models are large to compile.
        variables = jax.eval_shape(lambda: build(name, num_classes, input_shape=INPUT[name])[1])
        return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"]))

    assert total("resnet50", 1000) == 25_557_032  # torchvision resnet50
    assert total("mobilenet_v1", 1000) == 4_230_976  # STR MobileNet-V1 (bias-free classifier)
    # timm deit_tiny_patch16_224 has 5,717,416 with 1000 classes.
    assert total("deit_tiny", 10) == 5_717_416 - 990 * 192 - 990


def test_deit_prunable_rule_selects_linear_layers_and_patch_kernel(zoo):
    _, variables = zoo("deit_tiny")
    per_block = (192 * 576 + 576) + (192 * 192 + 192) + (192 * 768 + 768) + (768 * 192 + 192)
    expected = 16 * 16 * 3 * 192 + 12 * per_block + (192 * 10 + 10)
    assert count_prunable(variables["params"]) == expected


def test_structure_details(zoo):
    resnet = zoo("resnet20")[1]["params"]
    assert "bias" not in resnet["conv"]
    assert set(resnet["blocks_3"]) == {"conv1", "bn1", "conv2", "bn2", "shortcut_0", "shortcut_1"}
    assert resnet["blocks_3"]["shortcut_0"]["kernel"].shape == (1, 1, 16, 32)
    # Identity shortcut: the official lottery form's Identity2d weight, one per channel.
    assert set(resnet["blocks_4"]) == {"conv1", "bn1", "conv2", "bn2", "shortcut"}
    assert resnet["blocks_4"]["shortcut"].shape == (32,)
    vgg = zoo("vgg16_bn")[1]["params"]
    assert vgg["layers_0"]["conv"]["bias"].shape == (64,)  # official VGG convs keep their bias
    assert vgg["fc"]["kernel"].shape == (512, 10)
    mobilenet = zoo("mobilenet_v1")[1]["params"]
    assert mobilenet["blocks_0"]["dw"]["kernel"].shape == (3, 3, 1, 32)  # depthwise
    assert "bias" not in mobilenet["fc"]


@pytest.mark.parametrize("name", CIFAR + IMAGENET)
def test_output_shape_and_eval_contract(zoo, name):
    # Batch 1 like the initialisation, so the eagerly compiled ops are reused.
    apply_fn, variables = zoo(name)
    logits, same = apply_fn(variables, _images(name), False)
    assert logits.shape == (1, NUM_CLASSES[name])
    assert np.all(np.isfinite(logits))
    assert same is variables


def test_train_mode_updates_batch_stats(zoo):
    apply_fn, variables = zoo("resnet20")
    logits, updated = apply_fn(variables, _images("resnet20", 2), True)
    assert logits.shape == (2, 10)
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(updated["batch_stats"])
    assert len(before) == len(after)
    assert all(not np.allclose(b, a) for b, a in zip(before, after))
    assert updated["params"] is variables["params"]


# A residual net, a plain one, one without classifier bias, one without batch norm.
@pytest.mark.parametrize("name", ["resnet20", "vgg16_bn", "mobilenet_v1", "deit_tiny"])
def test_masks_apply_to_the_classifier(zoo, name):
    """A zero mask on the classifier kernel leaves its bias as the logits."""
    apply_fn, variables = zoo(name)
    fc = CLASSIFIER[name]
    params = dict(variables["params"])
    if "bias" in params[fc]:
        # Fresh biases are 0; make them distinctive.
        bias = jnp.arange(NUM_CLASSES[name], dtype=jnp.float32) / 7.0
        params[fc] = {**params[fc], "bias": bias}
    else:
        bias = jnp.zeros((NUM_CLASSES[name],))
    masks = ones_like_masks(params)
    masks[fc] = {**masks[fc], "kernel": jnp.zeros_like(masks[fc]["kernel"])}
    masked = {**variables, "params": apply_masks(params, masks)}
    x = _images(name)
    logits, _ = apply_fn(masked, x, False)
    np.testing.assert_allclose(logits, jnp.broadcast_to(bias, logits.shape), atol=1e-6)
    # Untrained deep nets in eval mode emit tiny logits (MobileNet's are ~1e-12),
    # so only ask that the kernel contributed something.
    unmasked, _ = apply_fn({**variables, "params": params}, x, False)
    assert np.any(unmasked != logits)


def test_unknown_name_lists_registered():
    assert set(CIFAR + IMAGENET) <= set(registered())
    with pytest.raises(ValueError, match="registered models: .*deit_tiny.*resnet50.*wrn20"):
        build("resnet9000")


# --- pretrained conversion ----------------------------------------------------


def _bn_shapes(prefix: str, channels: int) -> dict:
    return {f"{prefix}.{k}": (channels,) for k in ("weight", "bias", "running_mean", "running_var")}


def torchvision_resnet50_shapes(num_classes: int) -> dict:
    """Keys and shapes of torchvision's ``resnet50().state_dict()``, num_batches_tracked aside."""
    shapes = {"conv1.weight": (64, 3, 7, 7), **_bn_shapes("bn1", 64)}
    inplanes = 64
    for layer, (planes, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
        for block in range(blocks):
            p = f"layer{layer}.{block}"
            shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            shapes.update(_bn_shapes(f"{p}.bn1", planes))
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            shapes.update(_bn_shapes(f"{p}.bn2", planes))
            shapes[f"{p}.conv3.weight"] = (4 * planes, planes, 1, 1)
            shapes.update(_bn_shapes(f"{p}.bn3", 4 * planes))
            if block == 0:
                shapes[f"{p}.downsample.0.weight"] = (4 * planes, inplanes, 1, 1)
                shapes.update(_bn_shapes(f"{p}.downsample.1", 4 * planes))
            inplanes = 4 * planes
    shapes.update({"fc.weight": (num_classes, 2048), "fc.bias": (num_classes,)})
    return shapes


def timm_deit_tiny_shapes(num_classes: int) -> dict:
    """Keys and shapes of timm's ``deit_tiny_patch16_224`` state dict."""
    shapes = {
        "cls_token": (1, 1, 192),
        "pos_embed": (1, 197, 192),
        "patch_embed.proj.weight": (192, 3, 16, 16),
        "patch_embed.proj.bias": (192,),
    }
    for i in range(12):
        p = f"blocks.{i}"
        for norm in ("norm1", "norm2"):
            shapes.update({f"{p}.{norm}.weight": (192,), f"{p}.{norm}.bias": (192,)})
        for layer, (out, inp) in {
            "attn.qkv": (576, 192), "attn.proj": (192, 192), "mlp.fc1": (768, 192), "mlp.fc2": (192, 768),
        }.items():  # fmt: skip
            shapes.update({f"{p}.{layer}.weight": (out, inp), f"{p}.{layer}.bias": (out,)})
    shapes.update({"norm.weight": (192,), "norm.bias": (192,)})
    shapes.update({"head.weight": (num_classes, 192), "head.bias": (num_classes,)})
    return shapes


def _random_state(shapes: dict, seed: int, scale: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    return {k: scale * rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}


def timm_deit_reference(state: dict, image: np.ndarray) -> np.ndarray:
    """timm's VisionTransformer forward in float64 numpy, on an NHWC image."""
    s = {k: v.astype(np.float64) for k, v in state.items()}

    def linear(x, name):
        return x @ s[f"{name}.weight"].T + s[f"{name}.bias"]

    def layer_norm(x, name):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-6) * s[f"{name}.weight"] + s[f"{name}.bias"]

    b = image.shape[0]
    patches = image.astype(np.float64).reshape(b, 14, 16, 14, 16, 3)
    x = np.einsum("bpiqjc,ocij->bpqo", patches, s["patch_embed.proj.weight"]).reshape(b, 196, 192)
    x = x + s["patch_embed.proj.bias"]
    x = np.concatenate([np.broadcast_to(s["cls_token"], (b, 1, 192)), x], axis=1) + s["pos_embed"]
    for i in range(12):
        p = f"blocks.{i}"
        qkv = linear(layer_norm(x, f"{p}.norm1"), f"{p}.attn.qkv")
        q, k, v = qkv.reshape(b, 197, 3, 3, 64).transpose(2, 0, 3, 1, 4)
        scores = q @ k.transpose(0, 1, 3, 2) * 64**-0.5
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        x = x + linear((weights @ v).transpose(0, 2, 1, 3).reshape(b, 197, 192), f"{p}.attn.proj")
        hidden = linear(layer_norm(x, f"{p}.norm2"), f"{p}.mlp.fc1")
        hidden = 0.5 * hidden * (1.0 + erf(hidden / np.sqrt(2.0)))
        x = x + linear(hidden, f"{p}.mlp.fc2")
    return linear(layer_norm(x, "norm")[:, 0], "head")


def _save(tmp_path_factory, name: str, tensors: dict) -> str:
    path = str(tmp_path_factory.mktemp("ckpt") / f"{name}.safetensors")
    save_file(tensors, path)
    return path


@pytest.fixture(scope="module")
def resnet50_source():
    state = _random_state(torchvision_resnet50_shapes(1000), seed=1)
    # torch's BN step counters are in every torchvision checkpoint; they are skipped.
    state["bn1.num_batches_tracked"] = np.array(7, np.int64)
    state["layer1.0.downsample.1.num_batches_tracked"] = np.array(7, np.int64)
    return state


@pytest.fixture(scope="module")
def deit_source():
    # Small weights keep the activations of a 12-block random transformer moderate.
    return _random_state(timm_deit_tiny_shapes(10), seed=2, scale=0.05)


@pytest.fixture(scope="module")
def deit_file(tmp_path_factory, deit_source):
    return _save(tmp_path_factory, "deit", deit_source)


def _conv(weight: np.ndarray) -> np.ndarray:
    """A torch conv weight (out, in, kh, kw) in Flax's layout (kh, kw, in, out)."""
    return weight.transpose(2, 3, 1, 0)


def _assert_every_leaf_replaced(before: dict, after: dict):
    assert jax.tree.structure(before) == jax.tree.structure(after)
    for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert not np.array_equal(a, b)


def test_resnet50_conversion(zoo, resnet50_source, tmp_path_factory):
    apply_fn, variables = zoo("resnet50", 1000)
    src = resnet50_source
    loaded = load_pretrained("resnet50", variables, _save(tmp_path_factory, "resnet50", src))
    _assert_every_leaf_replaced(variables, loaded)
    params, stats = loaded["params"], loaded["batch_stats"]
    eq = np.testing.assert_array_equal
    eq(params["conv1"]["kernel"], _conv(src["conv1.weight"]))
    eq(params["layer1_0"]["conv1"]["kernel"], _conv(src["layer1.0.conv1.weight"]))
    eq(params["layer3_0"]["downsample_0"]["kernel"], _conv(src["layer3.0.downsample.0.weight"]))
    eq(params["layer2_1"]["bn3"]["scale"], src["layer2.1.bn3.weight"])
    eq(stats["layer1_0"]["downsample_1"]["var"], src["layer1.0.downsample.1.running_var"])
    eq(stats["bn1"]["mean"], src["bn1.running_mean"])
    eq(params["fc"]["kernel"], src["fc.weight"].T)
    eq(params["fc"]["bias"], src["fc.bias"])


def test_deit_conversion(zoo, deit_source, deit_file):
    apply_fn, variables = zoo("deit_tiny")
    src = deit_source
    loaded = load_pretrained("deit_tiny", variables, deit_file)
    _assert_every_leaf_replaced(variables, loaded)
    params = loaded["params"]
    eq = np.testing.assert_array_equal
    eq(params["blocks_0"]["attn"]["qkv"]["kernel"], src["blocks.0.attn.qkv.weight"].T)
    eq(params["blocks_0"]["attn"]["qkv"]["bias"], src["blocks.0.attn.qkv.bias"])
    eq(params["blocks_11"]["mlp"]["fc2"]["kernel"], src["blocks.11.mlp.fc2.weight"].T)
    eq(params["blocks_5"]["norm2"]["scale"], src["blocks.5.norm2.weight"])
    eq(params["patch_embed"]["proj"]["kernel"], _conv(src["patch_embed.proj.weight"]))
    eq(params["cls_token"], src["cls_token"])
    eq(params["pos_embed"], src["pos_embed"])
    eq(params["head"]["kernel"], src["head.weight"].T)

    # The converted patch conv computes torch's conv: out[o] = sum W[o, c, i, j] x[i, j, c] + b[o].
    patch = np.random.default_rng(3).standard_normal((1, 16, 16, 3), dtype=np.float32)
    conv = nn.Conv(192, (16, 16), strides=16, padding="VALID")
    out = conv.apply({"params": params["patch_embed"]["proj"]}, patch)
    expected = np.einsum("ocij,ijc->o", src["patch_embed.proj.weight"], patch[0])
    np.testing.assert_allclose(out.reshape(-1), expected + src["patch_embed.proj.bias"], rtol=1e-4, atol=1e-4)

    # End to end: the converted model computes timm's forward pass.
    image = np.random.default_rng(5).standard_normal((1, 224, 224, 3), dtype=np.float32)
    logits, _ = apply_fn(loaded, image, False)
    np.testing.assert_allclose(logits, timm_deit_reference(src, image), rtol=1e-4, atol=1e-6)


def _deit_error(zoo, tmp_path_factory, tensors, match, **kwargs):
    _, variables = zoo("deit_tiny")
    path = _save(tmp_path_factory, "deit_bad", tensors)
    with pytest.raises(ValueError, match=match):
        load_pretrained("deit_tiny", variables, path, **kwargs)


def test_missing_key_is_named(zoo, deit_source, tmp_path_factory):
    tensors = {k: v for k, v in deit_source.items() if k != "blocks.3.attn.proj.bias"}
    match = r"missing key 'blocks\.3\.attn\.proj\.bias': expected torch shape \(192,\)"
    _deit_error(zoo, tmp_path_factory, tensors, match)


def test_unexpected_key_is_named(zoo, deit_source, tmp_path_factory):
    tensors = {**deit_source, "blocks.0.attn.extra": np.zeros((4, 2), np.float32)}
    match = r"unexpected key 'blocks\.0\.attn\.extra': found shape \(4, 2\)"
    _deit_error(zoo, tmp_path_factory, tensors, match)


def test_shape_mismatch_is_named(zoo, deit_source, tmp_path_factory):
    tensors = {**deit_source, "blocks.0.mlp.fc1.weight": np.zeros((768, 191), np.float32)}
    match = r"'blocks\.0\.mlp\.fc1\.weight': expected torch shape \(768, 192\).*found \(768, 191\)"
    _deit_error(zoo, tmp_path_factory, tensors, match)


def test_garbage_file_names_the_path(zoo, tmp_path):
    _, variables = zoo("deit_tiny")
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"this is not a safetensors file" * 4)
    with pytest.raises(ValueError, match="garbage.safetensors.*not a valid safetensors"):
        load_pretrained("deit_tiny", variables, path)


def test_classifier_size_mismatch_needs_skip_classifier(zoo, deit_source, tmp_path_factory):
    rng = np.random.default_rng(4)
    tensors = {
        **deit_source,
        "head.weight": rng.standard_normal((1000, 192), dtype=np.float32),
        "head.bias": np.ones(1000, np.float32),
    }
    _deit_error(zoo, tmp_path_factory, tensors, r"1000 classes.*model has 10.*skip_classifier=True")

    _, variables = zoo("deit_tiny")
    path = _save(tmp_path_factory, "deit_1k", tensors)
    params = load_pretrained("deit_tiny", variables, path, skip_classifier=True)["params"]
    eq = np.testing.assert_array_equal
    eq(params["head"]["kernel"], variables["params"]["head"]["kernel"])
    eq(params["head"]["bias"], variables["params"]["head"]["bias"])
    eq(params["blocks_0"]["attn"]["qkv"]["bias"], deit_source["blocks.0.attn.qkv.bias"])


def test_unsupported_model_is_refused(zoo, deit_file):
    with pytest.raises(ValueError, match="no pretrained converter for model 'resnet20'.*deit_tiny, resnet50"):
        load_pretrained("resnet20", zoo("resnet20")[1], deit_file)
