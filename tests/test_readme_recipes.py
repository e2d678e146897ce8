"""The README's "Your own model" recipes (Linen, NNX, Equinox) run as they are written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import sfpk_jax
from sfpk_jax.core.masks import MaskLayout

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"


def _recipes() -> dict[str, str]:
    text = README.read_text()
    section = text[text.index("## Your own model"):text.index("### The API")]
    blocks = re.findall(r"\*\*([^*]+)\*\*.*?```python\n(.*?)```", section, flags=re.S)
    return {name: code for name, code in blocks}


def test_the_readme_has_the_three_recipes():
    assert list(_recipes()) == ["Flax Linen", "Flax NNX", "Equinox"]


@pytest.mark.parametrize("name", ["Flax Linen", "Flax NNX", "Equinox"])
def test_recipe_prunes_to_the_target_and_retrains_with_zeros_kept(name, capsys):
    if name == "Equinox":
        pytest.importorskip("equinox")
    namespace = {"__name__": f"readme_{name.split()[-1].lower()}"}
    exec(compile(_recipes()[name], f"README.md ({name})", "exec"), namespace)
    masks = namespace["masks"]
    params = (namespace["params"] if name != "Flax NNX"
              else namespace["nnx"].state(namespace["model"], namespace["nnx"].Param))
    layout = MaskLayout.from_params(params)
    assert sfpk_jax.sparsity_of(masks, params) == int(0.9 * layout.total) / layout.total
    for path, p, m in zip(layout.paths, layout.gather(params), layout.gather(masks)):
        assert np.all(np.asarray(p)[np.asarray(m) == 0] == 0), path
    if name == "Flax NNX":  # trained in place: the same seed rebuilds the initial weights
        nnx = namespace["nnx"]
        initial = nnx.state(namespace["CNN"](nnx.Rngs(0)), nnx.Param)
    else:
        initial = namespace["split"].params if "split" in namespace else namespace["variables"]["params"]
    before = [np.asarray(x) for x in layout.gather(initial)]
    moved = [not np.allclose(a, np.asarray(b)) for a, b in zip(before, layout.gather(params))]
    assert any(moved)  # retraining changed the kept weights
    assert "total" in capsys.readouterr().out  # the density report was printed
