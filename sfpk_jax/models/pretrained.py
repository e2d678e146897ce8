"""Loading PyTorch checkpoints (saved as safetensors) into the Flax models.

The Flax modules of ``resnet50`` and ``deit_tiny`` are named after their
torchvision / timm counterparts, so every Flax leaf has one torch key:

* module names join with ``.``, and a trailing ``_<n>`` is the index ``.<n>``
  (``layer1_0/downsample_0`` is ``layer1.0.downsample.0``);
* ``kernel`` and norm ``scale`` are ``weight``, ``bias`` is ``bias``, batch
  statistics ``mean``/``var`` are ``running_mean``/``running_var``, and other
  parameters (``cls_token``, ``pos_embed``) keep their names;
* a conv kernel is stored by torch as (out, in, kh, kw) and by Flax as
  (kh, kw, in, out); a dense kernel as (out, in) and (in, out).

The file is read with ``safetensors.numpy``, so torch is not needed; convert
a torch state dict once with ``safetensors.torch.save_file(model.state_dict(), path)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import NoReturn

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# Model name -> (convention shown in messages, torch prefix of the classifier).
CONVENTIONS = {
    "resnet50": ("torchvision ResNet-50", "fc"),
    "deit_tiny": ("timm DeiT-Tiny (deit_tiny_patch16_224)", "head"),
}

# torch's BatchNorm counts its updates in a buffer that Flax does not have.
IGNORED_SUFFIX = ".num_batches_tracked"

_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_INDEXED = re.compile(r"^(.*)_(\d+)$")
_MAX_LISTED = 10


def _identity(array: np.ndarray) -> np.ndarray:
    return array


def _conv_to_flax(array: np.ndarray) -> np.ndarray:
    return np.transpose(array, (2, 3, 1, 0))


def _torch_key(path: tuple[str, ...], leaf) -> tuple[str, tuple[int, ...], Callable]:
    """The torch key, torch shape and torch-to-Flax converter of one Flax leaf."""
    collection, *modules, name = path
    parts = [_INDEXED.sub(r"\1.\2", module) for module in modules]
    if (collection, name) in _LEAF_NAMES:
        parts.append(_LEAF_NAMES[(collection, name)])
    elif collection == "params" and modules == []:
        parts.append(name)  # a top-level parameter such as cls_token
    else:
        raise ValueError(f"Flax leaf {'/'.join(path)} has no torch counterpart in this converter")
    shape = tuple(np.shape(leaf))
    if name == "kernel" and len(shape) == 4:
        kh, kw, cin, cout = shape
        return ".".join(parts), (cout, cin, kh, kw), _conv_to_flax
    if name == "kernel" and len(shape) == 2:
        return ".".join(parts), shape[::-1], np.transpose
    return ".".join(parts), shape, _identity


def _read(path: str | os.PathLike) -> dict[str, np.ndarray]:
    import safetensors.numpy  # on first use

    try:
        return safetensors.numpy.load_file(os.fspath(path))
    except safetensors.SafetensorError as err:
        raise ValueError(
            f"{os.fspath(path)!r} is not a valid safetensors file ({err}); write the torch "
            "state dict with safetensors.torch.save_file(model.state_dict(), path)"
        ) from None


def _fail(problems: list[str], convention: str) -> NoReturn:
    listed = problems[:_MAX_LISTED]
    more = len(problems) - len(listed)
    raise ValueError(
        f"checkpoint does not match the Flax model ({convention} naming):\n  "
        + "\n  ".join(listed)
        + (f"\n  ... and {more} more" if more else "")
    )


def load_pretrained(
    name: str,
    variables: dict,
    path: str | os.PathLike,
    *,
    skip_classifier: bool = False,
) -> dict:
    """Fills a built model's variables from a torch checkpoint in safetensors form.

    Args:
      name: the registered model, ``"resnet50"`` (torchvision naming) or
        ``"deit_tiny"`` (timm naming).
      variables: the model's variables from :func:`sfpk_jax.models.build`;
        their shapes are checked against the file.
      path: the ``.safetensors`` file of the torch ``state_dict``.
      skip_classifier: keep the freshly initialised classifier of
        ``variables`` (e.g. to fine-tune on another number of classes); the
        file's classifier, if any, is ignored.

    Returns:
      A new variables dict, same structure and dtypes, every leaf taken from
      the file (the classifier excepted under ``skip_classifier``).

    Raises:
      ValueError: ``name`` has no converter; the file is not valid
        safetensors; a key is missing, unexpected or of the wrong shape; the
        classifier has another number of classes than the model.
    """
    if name not in CONVENTIONS:
        raise ValueError(
            f"no pretrained converter for model {name!r}; supported: {', '.join(sorted(CONVENTIONS))}"
        )
    convention, classifier = CONVENTIONS[name]
    tensors = {k: v for k, v in _read(path).items() if not k.endswith(IGNORED_SUFFIX)}
    flat = traverse_util.flatten_dict(variables)

    targets: dict[str, tuple[tuple[str, ...], tuple[int, ...], Callable]] = {}
    for flax_path, leaf in flat.items():
        key, torch_shape, convert = _torch_key(flax_path, leaf)
        if key in targets:
            raise ValueError(
                f"Flax leaves {'/'.join(targets[key][0])} and {'/'.join(flax_path)} both map to "
                f"torch key {key!r}; rename one of the modules"
            )
        targets[key] = (flax_path, torch_shape, convert)

    head = {k for k in targets if k.startswith(classifier + ".")}
    if skip_classifier:
        targets = {k: v for k, v in targets.items() if k not in head}
        tensors = {k: v for k, v in tensors.items() if not k.startswith(classifier + ".")}
    else:
        weight = f"{classifier}.weight"
        if weight in tensors and weight in targets and np.shape(tensors[weight]) != targets[weight][1]:
            found, expected = np.shape(tensors[weight]), targets[weight][1]
            raise ValueError(
                f"classifier {weight!r} has {found[0]} classes in the file (shape {found}) but the "
                f"model has {expected[0]} (shape {expected}); build the model with "
                f"num_classes={found[0]}, or pass skip_classifier=True to keep the fresh head"
            )

    problems = []
    for key in sorted(targets.keys() - tensors.keys()):
        flax_path, torch_shape, _ = targets[key]
        problems.append(
            f"missing key {key!r}: expected torch shape {torch_shape} for Flax leaf "
            f"{'/'.join(flax_path)}, found none; the file must hold the full {convention} state dict"
            + (" (or pass skip_classifier=True)" if key in head else "")
        )
    for key in sorted(tensors.keys() - targets.keys()):
        problems.append(
            f"unexpected key {key!r}: found shape {np.shape(tensors[key])}, expected no such key; "
            f"the file is not a {convention} state dict, or drop that entry"
        )
    for key in sorted(targets.keys() & tensors.keys()):
        flax_path, torch_shape, _ = targets[key]
        if np.shape(tensors[key]) != torch_shape:
            problems.append(
                f"shape mismatch at {key!r}: expected torch shape {torch_shape} (Flax leaf "
                f"{'/'.join(flax_path)}), found {np.shape(tensors[key])}; the checkpoint is for "
                "another architecture or input size: build the model to match it"
            )
    if problems:
        _fail(problems, convention)

    loaded = dict(flat)
    for key, (flax_path, _, convert) in targets.items():
        loaded[flax_path] = jnp.asarray(convert(tensors[key]), dtype=flat[flax_path].dtype)
    return traverse_util.unflatten_dict(loaded)
