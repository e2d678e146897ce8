"""A mask is checked wherever it enters, and the error names the leaf (sfpk_jax.core.mask_checks).

Every entry point (apply_masks, keep_masked, sparsity_of, sparsity_report,
save_masked, load_masked, and what a pruner returns to prune) refuses the
same bad masks: values other than 0 and 1 (0.5, NaN), non-numbers, shapes
that do not broadcast over the parameter keeping its rank, masks for leaves
the params lack, and trees that lack the params' leaves.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy

import sfpk_jax
from sfpk_jax import pruners
from sfpk_jax.tools.export import FORMAT

PARAMS = {"conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.ones(4)},
          "dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}


def _good():
    rng = np.random.default_rng(0)
    return {"conv": {"kernel": jnp.asarray(rng.random((3, 3, 2, 4)) > 0.5, jnp.float32),
                     "bias": None},
            "dense": {"kernel": jnp.asarray(rng.random((4, 3)) > 0.5, jnp.float32),
                      "bias": jnp.asarray([1.0, 0.0, 1.0])}}


def _with(leaf_path, value):
    masks = _good()
    outer, inner = leaf_path.split("/")
    masks[outer][inner] = value
    return masks


BAD = {
    "halves": (_with("dense/kernel", jnp.full((4, 3), 0.5)), "dense/kernel holds 0.5"),
    "a NaN": (_with("dense/bias", jnp.asarray([1.0, jnp.nan, 0.0])), "dense/bias holds nan (1 entry"),
    "strings": (_with("dense/kernel", np.full((4, 3), "1")), "dense/kernel has dtype <U1"),
    "transposed": (_with("dense/kernel", jnp.ones((3, 4))), "dense/kernel has shape (3, 4)"),
    "another rank": (_with("conv/kernel", jnp.ones(4)), "conv/kernel has shape (4,)"),
    "particles": (_with("dense/kernel", jnp.ones((2, 4, 3))), "dense/kernel has shape (2, 4, 3)"),
    "an extra leaf": ({**_good(), "head": {"kernel": jnp.ones((3, 2))}},
                      "the masks hold head/kernel, which the params do not have"),
    "a missing leaf": ({"conv": _good()["conv"]}, "the masks have no leaf dense/bias"),
}


def _keep_masked(masks):
    sfpk_jax.keep_masked(optax.adamw(1e-3), masks).init(PARAMS)


def _prune(masks):
    name = "returns_the_masks"
    sfpk_jax.register_pruner(name, lambda *a, **k: sfpk_jax.PruneResult(masks))
    try:
        sfpk_jax.prune(name, None, PARAMS, None, 0.5)
    finally:
        pruners.unregister_pruner(name)


ENTRY_POINTS = {
    "apply_masks": lambda masks: sfpk_jax.apply_masks(PARAMS, masks),
    "keep_masked": _keep_masked,
    "sparsity_of": lambda masks: sfpk_jax.sparsity_of(masks, PARAMS),
    "sparsity_report": lambda masks: sfpk_jax.sparsity_report(masks, PARAMS),
    "save_masked": lambda masks: sfpk_jax.save_masked("/nonexistent/never-written", PARAMS, masks),
    "prune": _prune,
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("case", BAD)
def test_every_entry_point_refuses_a_bad_mask_naming_the_leaf(entry, case):
    masks, expected = BAD[case]
    with pytest.raises(ValueError, match=re.escape(expected)):
        ENTRY_POINTS[entry](masks)


@pytest.mark.parametrize("entry", ["apply_masks", "keep_masked", "sparsity_of", "sparsity_report"])
def test_every_entry_point_takes_good_masks_as_bool_int_or_float(entry):
    for dtype in (bool, np.int32, np.float32):
        ENTRY_POINTS[entry](jax.tree.map(lambda m: np.asarray(m).astype(dtype), _good()))


def test_keep_masked_refuses_bad_values_before_init():
    # The issue's case: the masks scaled by 0.5 would halve the kept entries' gradients.
    with pytest.raises(ValueError, match=r"conv/kernel holds 0\.5"):
        sfpk_jax.keep_masked(optax.sgd(0.1), jax.tree.map(lambda m: m * 0.5, _good()))


def test_sparsity_of_without_params_still_checks_the_values():
    with pytest.raises(ValueError, match=r"dense/kernel holds 0\.5"):
        sfpk_jax.sparsity_of(BAD["halves"][0])


def test_masks_inside_jit_pass_as_they_were_checked_outside():
    # A traced mask cannot be read; it was checked where it became concrete.
    masked = jax.jit(sfpk_jax.apply_masks)(PARAMS, _good())
    np.testing.assert_array_equal(masked["dense"]["kernel"], _good()["dense"]["kernel"])


# load_masked: what the file holds is checked as it enters -------------------------------------


def _write(path, tensors: dict, masked: list[str] | None = None) -> None:
    """A file as save_masked writes one; its listing of masks defaults to those it holds."""
    if masked is None:
        masked = [k.removeprefix("masks/") for k in tensors if k.startswith("masks/")]
    metadata = {"format": FORMAT, "masked": json.dumps(masked)}
    path.write_bytes(safetensors.numpy.save({k: np.asarray(v) for k, v in tensors.items()},
                                            metadata=metadata))


def _tensors(params, masks):
    out = {f"params/{p}": v for p, v in _named(params).items()}
    out.update({f"masks/{p}": v for p, v in _named(masks).items() if v is not None})
    return out


def _named(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in flat}


@pytest.mark.parametrize("change, expected", [
    (lambda t: t.update({"masks/dense/kernel": np.ones((3, 4), np.float32)}),
     "dense/kernel has shape (3, 4)"),
    (lambda t: t.update({"masks/dense/kernel": np.full((4, 3), 0.5, np.float32)}),
     "dense/kernel holds 0.5"),
    (lambda t: t.update({"masks/head/kernel": np.ones((3, 2), np.float32)}),
     "tensors for parameters this model does not have: ['masks/head/kernel']"),
    (lambda t: t.update({"params/dense/bias": np.asarray([1.0, np.inf, 2.0], np.float32)}),
     "parameter dense/bias in"),
])
def test_load_masked_checks_the_masks_and_params_it_reads(tmp_path, change, expected):
    tensors = _tensors(sfpk_jax.apply_masks(PARAMS, _good()), _good())
    change(tensors)
    path = tmp_path / "pruned.safetensors"
    _write(path, tensors)
    with pytest.raises(ValueError, match=re.escape(expected)):
        sfpk_jax.load_masked(path, PARAMS)


def test_load_masked_refuses_a_file_whose_masks_differ_from_its_listing(tmp_path):
    # Without the listing, a deleted mask would load as an unpruned (dense) leaf.
    tensors = _tensors(sfpk_jax.apply_masks(PARAMS, _good()), _good())
    listed = [k.removeprefix("masks/") for k in tensors if k.startswith("masks/")]
    path = tmp_path / "pruned.safetensors"
    lost = {k: v for k, v in tensors.items() if k != "masks/" + listed[0]}
    _write(path, lost, masked=listed)
    with pytest.raises(ValueError, match=re.escape(f"(missing: ['{listed[0]}']")):
        sfpk_jax.load_masked(path, PARAMS)
    _write(path, tensors, masked=listed[1:])
    with pytest.raises(ValueError, match=re.escape(f"not listed: ['{listed[0]}']")):
        sfpk_jax.load_masked(path, PARAMS)
    path.write_bytes(safetensors.numpy.save({k: np.asarray(v) for k, v in tensors.items()},
                                            metadata={"format": FORMAT}))
    with pytest.raises(ValueError, match="does not list its masks"):
        sfpk_jax.load_masked(path, PARAMS)


def test_load_masked_reads_back_what_save_masked_wrote(tmp_path):
    path = tmp_path / "pruned.safetensors"
    sfpk_jax.save_masked(path, PARAMS, _good())
    params, masks = sfpk_jax.load_masked(path, PARAMS)
    jax.tree.map(np.testing.assert_array_equal, masks, _good())
    assert sfpk_jax.sparsity_report(masks, params).regrown == 0
