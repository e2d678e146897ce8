"""Every ``>>>`` example in the library's docstrings runs and prints what it says.

The examples are found in every module of ``sfpk_jax`` (so a new one is
tested without being listed here); the main entry points must have one.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import sfpk_jax

MODULES = sorted(m.name for m in pkgutil.walk_packages(sfpk_jax.__path__, "sfpk_jax.")
                 if not m.name.endswith("worker_main"))  # a script: it serves stdin when run


def _examples() -> list[doctest.DocTest]:
    found = []
    for name in MODULES:
        module = importlib.import_module(name)
        found += [t for t in doctest.DocTestFinder().find(module) if t.examples
                  and t.name.startswith(name)]  # each where it is defined, not where re-exported
    return sorted(found, key=lambda t: t.name)


EXAMPLES = _examples()


@pytest.mark.parametrize("test", EXAMPLES, ids=[t.name for t in EXAMPLES])
def test_docstring_example(test):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failures = []
    runner.run(test, out=failures.append)
    assert runner.failures == 0, "".join(failures)


ENTRY_POINTS = ["SFPKConfig", "Execution", "sfpk_prune", "prune", "magnitude_prune",
                "apply_masks", "sparsity_of", "sparsity_report", "keep_masked", "save_masked",
                "recompute_batch_stats",
                "split_nnx", "split_equinox"]


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_the_main_entry_points_carry_an_example(name):
    obj = getattr(sfpk_jax, name)
    assert any(t.name.endswith(f".{obj.__qualname__}") for t in EXAMPLES), (
        f"sfpk_jax.{name} has no >>> example")
