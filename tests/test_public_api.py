"""The public API of ``sfpk_jax`` and its deprecated aliases.

* ``sfpk_jax.__all__`` is exactly the documented list, every name in it
  imports, and no public attribute of the package is left out of it.
* The names renamed with the density functional (``sparsity`` -> ``density``)
  still work for one release: they return what the new names return and
  emit a :class:`DeprecationWarning`.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sfpk_jax
from sfpk_jax.core import density as density_lib
from sfpk_jax.sfpk.state import SFPKResult, StepTrace, Trace

EXPECTED_ALL = [
    "CheckpointPolicy",
    "MaskLayout",
    "PRUNERS",
    "PruneResult",
    "PrunerSpec",
    "ResumeError",
    "SFPKConfig",
    "SFPKResult",
    "SFPKState",
    "StatefulLoss",
    "StepTrace",
    "apply_masks",
    "count_prunable",
    "density",
    "density_report",
    "initial_state",
    "keep_masked",
    "load_masked",
    "magnitude_prune",
    "make_stepper",
    "masks_from_scores",
    "ones_like_masks",
    "prune",
    "register_pruner",
    "save_masked",
    "sfpk_prune",
    "sfpk_update",
    "split_equinox",
    "split_nnx",
    "spode_config",
    "spode_prune",
]


def test_all_is_the_expected_sorted_list():
    assert EXPECTED_ALL == sorted(EXPECTED_ALL)  # the list above is kept sorted
    assert set(sfpk_jax.__all__) == set(EXPECTED_ALL)
    # Sorted (plain string order), so that a name is easy to find and a diff is clean.
    assert list(sfpk_jax.__all__) == EXPECTED_ALL


def test_all_has_no_duplicates():
    assert len(set(sfpk_jax.__all__)) == len(sfpk_jax.__all__)


@pytest.mark.parametrize("name", EXPECTED_ALL)
def test_every_public_name_imports(name):
    namespace: dict = {}
    exec(f"from sfpk_jax import {name}", namespace)  # the statement users write
    assert namespace[name] is getattr(sfpk_jax, name)
    assert namespace[name] is not None


def test_star_import_gives_exactly_all():
    namespace: dict = {}
    exec("from sfpk_jax import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == EXPECTED_ALL


def test_nothing_public_is_missing_from_all():
    public = {
        name
        for name, value in vars(sfpk_jax).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public - set(sfpk_jax.__all__) == set(), "public but not in __all__"


def test_version_is_a_string():
    assert isinstance(sfpk_jax.__version__, str) and sfpk_jax.__version__
    assert "__version__" not in sfpk_jax.__all__


# ------------------------------------------------------------ deprecated aliases


def _trace_fields(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return {name: jnp.asarray(rng.random(n), jnp.float32) for name in ("density", "energy", "repulsion", "dt")}


def test_step_trace_sparsity_is_density_with_a_warning():
    fields = _trace_fields()
    trace = StepTrace(**fields, faults=jnp.zeros(3, jnp.int32))
    with pytest.warns(DeprecationWarning, match="density"):
        old = trace.sparsity
    assert old is trace.density


def test_result_trace_sparsity_key_reads_density_with_a_warning():
    fields = {k: np.asarray(v)[None] for k, v in _trace_fields(seed=1).items()}
    result = SFPKResult(masks=None, scores=None, particles=None, trace=Trace(fields))
    with pytest.warns(DeprecationWarning, match="density"):
        old = result.trace["sparsity"]
    np.testing.assert_array_equal(old, result.trace["density"])
    # The alias is only a read path: the trace holds no "sparsity" key.
    assert "sparsity" not in result.trace
    with pytest.raises(KeyError):
        result.trace["no such field"]


def test_trace_stays_a_trace_under_tree_maps():
    # Results are copied with tree maps (e.g. to host numpy); the alias must survive.
    trace = Trace({k: np.asarray(v)[None] for k, v in _trace_fields(seed=2).items()})
    copied = jax.tree.map(lambda x: np.asarray(x) * 2, trace)
    assert isinstance(copied, Trace)
    with pytest.warns(DeprecationWarning):
        np.testing.assert_array_equal(copied["sparsity"], 2 * trace["density"])


def _mask(seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.uniform(-1, 1, s), jnp.float32) for s in [(3, 4), (5,), (2, 2, 3)]]


ALIASES = [
    ("global_sparsity", "global_density", ("l2",)),
    ("global_sparsity", "global_density", ("l1", [1, 2, 3])),
    ("layer_sparsity", "layer_density", ("l2",)),
    ("layer_sparsity", "layer_density", ("l1", [4, 1, 1])),
    ("sparsity", "density", ("l2", "global")),
    ("sparsity", "density", ("l1", "local", [1, 2, 1])),
    ("sparsity_and_descent", "density_and_descent", ("l2", "global")),
    ("sparsity_and_descent", "density_and_descent", ("l1", "local")),
]


@pytest.mark.parametrize("old, new, args", ALIASES)
def test_density_aliases_return_the_new_value_with_a_warning(old, new, args):
    mask = _mask()
    expected = getattr(density_lib, new)(mask, *args)
    with pytest.warns(DeprecationWarning, match=f"{old} is now {new}"):
        got = getattr(density_lib, old)(mask, *args)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    assert getattr(density_lib, old).__name__ == old


@pytest.mark.parametrize("new", ["global_density", "layer_density", "density", "density_and_descent"])
def test_new_names_do_not_warn(new):
    # filterwarnings=error turns any warning from the new names into a failure.
    args = ("l2", "global") if new in ("density", "density_and_descent") else ("l2",)
    getattr(density_lib, new)(_mask(1), *args)
