"""The notebooks execute top to bottom on CPU, so they cannot rot, and warn about nothing.

Importing ``tqdm.auto`` in a kernel without ipywidgets prints ``TqdmWarning:
IProgress not found``; the package uses ``tqdm.std``, so no output of either
notebook may show that warning (or any other).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _execute(name: str, monkeypatch: pytest.MonkeyPatch) -> list:
    """Runs ``notebooks/<name>`` and returns its outputs, after checking none is an error."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # The notebooks train for real: their kernel runs XLA's optimized programs, as a user's
    # does, rather than the suite's quick-to-compile ones (see conftest).
    monkeypatch.delenv("JAX_DISABLE_MOST_OPTIMIZATIONS", raising=False)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "Warning" not in stderr and "IProgress" not in stderr, stderr
    return outputs


def test_quickstart_notebook_runs(monkeypatch):
    outputs = _execute("quickstart.ipynb", monkeypatch)
    text = "".join(o.get("text", "") for o in outputs)
    assert "sparsity 0.9000" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2


def test_nnx_notebook_prunes_and_retrains_an_nnx_model(monkeypatch):
    outputs = _execute("nnx.ipynb", monkeypatch)
    text = "".join(o.get("text", "") for o in outputs)
    assert "sparsity 0.9000" in text
    assert "pruned weights still exactly 0: True" in text
    assert "conv2/kernel" in text  # the density report names NNX paths without '/value'
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 1
