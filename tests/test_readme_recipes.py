"""The README's quickstart and docs/your_model.md's recipes (Linen, NNX, Equinox, 2:4) run as
written."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np
import pytest

import sfpk_jax
from sfpk_jax.core.masks import MaskLayout

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
YOUR_MODEL = ROOT / "docs" / "your_model.md"
# The README's promise: a quickstart short enough to read at a glance.
QUICKSTART_LINES = 20
# The README is a front door: the detail lives in docs/.
README_LINES = 200


def _section(path: Path, start: str, end: str) -> str:
    text = path.read_text()
    return text[text.index(start):text.index(end, text.index(start))]


def _quickstart() -> str:
    blocks = re.findall(r"```python\n(.*?)```", _section(README, "## Quickstart", "\n## "), flags=re.S)
    assert len(blocks) == 1, "the README's quickstart is one python block"
    return blocks[0]


def _recipes() -> dict[str, str]:
    section = _section(YOUR_MODEL, "# Your own model", "## Which weights are pruned")
    blocks = re.findall(r"\*\*([^*]+)\*\*.*?```python\n(.*?)```", section, flags=re.S)
    return {name: code for name, code in blocks}


def _run(code: str, where: str, name: str) -> dict:
    namespace = {"__name__": name}
    # dont_inherit: this module's `from __future__ import annotations` must not leak into the
    # recipe (Equinox modules defined there would get string annotations).
    exec(compile(code, where, "exec", dont_inherit=True), namespace)
    return namespace


def _check_pruned_and_retrained(masks, params, initial) -> None:
    """Exactly 90% of the prunable weights removed, zeros kept, the kept weights trained."""
    layout = MaskLayout.from_params(params)
    assert sfpk_jax.sparsity_of(masks, params) == int(0.9 * layout.total) / layout.total
    for path, p, m in zip(layout.paths, layout.gather(params), layout.gather(masks)):
        assert np.all(np.asarray(p)[np.asarray(m) == 0] == 0), path
    before = [np.asarray(x) for x in layout.gather(initial)]
    moved = [not np.allclose(a, np.asarray(b)) for a, b in zip(before, layout.gather(params))]
    assert any(moved)  # retraining changed the kept weights


def test_the_quickstart_is_short():
    assert len(_quickstart().splitlines()) <= QUICKSTART_LINES


def test_the_readme_is_short():
    assert len(README.read_text().splitlines()) <= README_LINES


def test_quickstart_prunes_to_the_target_and_retrains_with_zeros_kept(capsys):
    namespace = _run(_quickstart(), "README.md (quickstart)", "readme_quickstart")
    # Retrained in place: the same seed rebuilds the initial weights.
    initial = namespace["model"].init(jax.random.key(0), namespace["data"].x_train[:1])["params"]
    _check_pruned_and_retrained(namespace["masks"], namespace["params"], initial)
    assert "total" in capsys.readouterr().out  # the sparsity report was printed


def test_your_model_has_the_three_recipes():
    assert list(_recipes()) == ["Flax Linen", "Flax NNX", "Equinox"]


@pytest.mark.parametrize("name", ["Flax Linen", "Flax NNX", "Equinox"])
def test_recipe_prunes_to_the_target_and_retrains_with_zeros_kept(name, capsys):
    if name == "Equinox":
        pytest.importorskip("equinox")
    namespace = _run(_recipes()[name], f"docs/your_model.md ({name})",
                     f"your_model_{name.split()[-1].lower()}")
    if name == "Flax NNX":  # trained in place: the same seed rebuilds the initial weights
        nnx = namespace["nnx"]
        params = nnx.state(namespace["model"], nnx.Param)
        initial = nnx.state(namespace["CNN"](nnx.Rngs(0)), nnx.Param)
    else:
        params = namespace["params"]
        initial = namespace["split"].params if "split" in namespace else namespace["variables"]["params"]
    _check_pruned_and_retrained(namespace["masks"], params, initial)
    out = capsys.readouterr().out
    assert "total" in out  # the sparsity report was printed
    # Right after pruning, with the batch-norm statistics re-estimated, the model still
    # classifies well (with stale statistics a pruned model can fall to chance).
    dense, pruned = map(float, re.search(r"dense ([\d.]+), right after pruning ([\d.]+)", out).groups())
    assert dense > 0.8 and pruned > 0.7, out


def test_the_2_4_recipe_keeps_two_of_every_four_while_retraining(capsys):
    text = YOUR_MODEL.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text[text.index("## N:M masks"):], flags=re.S)
    assert len(blocks) == 1, "docs/your_model.md's N:M section is one python block"
    namespace = _run(blocks[0], "docs/your_model.md (2:4)", "your_model_2_4")
    masks, params = namespace["masks"], namespace["params"]
    kernels = {path: m for path, m in zip(*_paths_and_leaves(masks)) if m is not None}
    # Every kernel but the first (its input is the image's one channel) takes the pattern.
    assert sorted(kernels) == ["Conv_1/kernel", "Dense_0/kernel", "Dense_1/kernel"]
    for path, m in kernels.items():
        groups = np.asarray(m).reshape(*m.shape[:-2], m.shape[-2] // 4, 4, m.shape[-1])
        assert np.all(groups.sum(axis=-2) == 2), path
        p = np.asarray(_leaf(params, path))
        assert np.all(p[np.asarray(m) == 0] == 0), path  # the pattern held while training
    out = capsys.readouterr().out
    assert out.startswith("()") and "regrown" not in out


def _paths_and_leaves(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat], \
        [leaf for _, leaf in flat]


def _leaf(tree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree
