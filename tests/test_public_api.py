"""The public API of ``sfpk_jax``: its names, their signatures, and a light import.

* ``sfpk_jax.__all__`` is exactly the documented list (at most 25 names),
  ``import *`` gives exactly it, and no public attribute is left out of it.
* ``import sfpk_jax`` loads none of the application's heavy dependencies
  (checked in a fresh interpreter): each loads when its feature is used.
* The entry points take everything after ``sparsity`` by keyword, string
  options are ``Literal`` types, and both result types follow the
  :class:`~sfpk_jax.pruners.PruningResult` protocol.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import types
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import sfpk_jax
from sfpk_jax import pruners

ROOT = Path(__file__).resolve().parents[1]

EXPECTED_ALL = [
    "CheckpointPolicy",
    "ConfigError",
    "Execution",
    "PruneResult",
    "ResumeError",
    "SFPKConfig",
    "SFPKResult",
    "StatefulLoss",
    "WorkerError",
    "apply_masks",
    "is_n_m",
    "keep_masked",
    "load_masked",
    "magnitude_prune",
    "prune",
    "recompute_batch_stats",
    "register_pruner",
    "save_masked",
    "sfpk_prune",
    "sparsity_of",
    "sparsity_report",
    "split_equinox",
    "split_nnx",
]


def test_all_is_the_expected_sorted_list():
    assert EXPECTED_ALL == sorted(EXPECTED_ALL)  # the list above is kept sorted
    assert list(sfpk_jax.__all__) == EXPECTED_ALL
    assert len(EXPECTED_ALL) <= 25


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


# What a user who prunes their own model does not need loaded: the data
# stack, checkpoints, plots, the model zoo, the experiments' harness.
HEAVY = ("grain", "orbax", "tensorflow_datasets", "PIL", "sklearn", "matplotlib", "safetensors",
         "tensorstore", "experiments", "benchmarks")
ZOO = tuple(f"sfpk_jax.models.{m}" for m in ("cifar_resnet", "deit", "mobilenet", "resnet50",
                                             "small_cnn", "vgg"))


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after ``code``."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
        cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_import_loads_no_heavy_dependency():
    loaded = _modules_after("import sfpk_jax")
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY
                   or m.startswith("sfpk_jax.models"))  # the zoo, its registry included
    assert not heavy, f"import sfpk_jax loads {heavy}"


@pytest.mark.slow
def test_each_dependency_loads_with_its_feature():
    # The check above would pass if nothing ever loaded them; they do, on use.
    loaded = _modules_after("import jax, sfpk_jax\nfrom sfpk_jax import models\n"
                            "models.registered()\nfrom sfpk_jax.data import load_digits\n"
                            "load_digits()")
    assert "sklearn" in loaded and set(ZOO) <= loaded
    assert "grain" not in loaded  # in-memory digits need no pipeline


@pytest.mark.parametrize("fn", [sfpk_jax.sfpk_prune, sfpk_jax.prune, sfpk_jax.magnitude_prune])
def test_everything_after_sparsity_is_keyword_only(fn):
    parameters = list(inspect.signature(fn).parameters.values())
    names = [p.name for p in parameters]
    after = parameters[names.index("sparsity") + 1:]
    assert after and all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in after), names


def _literal_values(hint) -> tuple:
    """The values of every Literal in ``hint`` (``int | Literal["auto"]`` gives ``("auto",)``)."""
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    return tuple(v for arg in typing.get_args(hint) for v in _literal_values(arg))


@pytest.mark.parametrize("cls", [sfpk_jax.SFPKConfig, sfpk_jax.Execution])
def test_string_options_are_literal_types(cls):
    hints = typing.get_type_hints(cls)
    for name, value in ((f.name, getattr(cls(), f.name)) for f in cls.__dataclass_fields__.values()):
        if isinstance(value, str):
            assert value in _literal_values(hints[name]), f"{cls.__name__}.{name}: {hints[name]}"


def test_prune_is_typed_with_the_result_protocol():
    assert inspect.signature(sfpk_jax.prune).return_annotation in ("PruningResult",
                                                                  pruners.PruningResult)
    params = {"w": jax.random.normal(jax.random.key(0), (4, 4))}
    one_shot = sfpk_jax.prune("magnitude", None, params, None, 0.5, prunable="w")
    assert isinstance(one_shot, pruners.PruningResult)
    assert isinstance(sfpk_jax.SFPKResult(masks={}, scores={}, particles={}, trace={}),
                      pruners.PruningResult)
    assert not isinstance(jnp.zeros(3), pruners.PruningResult)


def test_the_registry_is_behind_functions():
    assert not any(isinstance(v, dict) for k, v in vars(pruners).items() if not k.startswith("_"))
    assert {"sfpk", "spode", "magnitude", "random", "snip", "grasp", "synflow"} <= set(
        pruners.names())


def test_version_is_a_string():
    assert isinstance(sfpk_jax.__version__, str) and sfpk_jax.__version__
    assert "__version__" not in sfpk_jax.__all__
