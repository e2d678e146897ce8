"""The library's progress bars: drawn on a terminal, plain log lines elsewhere, closed on errors."""

from __future__ import annotations

import io
import logging
import sys

import numpy as np
import optax
import pytest

from sfpk_jax.data import load_digits
from sfpk_jax.models import build
from sfpk_jax.runtime import progress
from sfpk_jax.train import train


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def small():
    digits = load_digits(seed=0)
    apply_fn, variables = build("mlp")
    return apply_fn, variables, digits.x_train[:128], digits.y_train[:128]


def _train(small, **kwargs):
    apply_fn, variables, x, y = small
    return train(apply_fn, variables, x, y, batch_size=64, optimizer=optax.sgd(0.01), **kwargs)


def test_a_bar_is_drawn_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress.shown(True)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert progress.shown(True) and not progress.shown(False)


def test_training_into_a_log_file_writes_lines_not_carriage_returns(small, monkeypatch, caplog):
    log = io.StringIO()  # stderr redirected to a file: no terminal
    monkeypatch.setattr(sys, "stderr", log)
    with caplog.at_level(logging.INFO, logger="sfpk_jax.train"):
        _train(small, epochs=2, desc="retrain")
    assert "\r" not in log.getvalue()
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "retrain: epoch 1/2", "retrain: epoch 2/2"]


def test_training_on_a_terminal_draws_a_bar_that_stays(small, monkeypatch, caplog):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    with caplog.at_level(logging.INFO, logger="sfpk_jax.train"):
        _train(small, epochs=2, desc="retrain")
    final = sys.stderr.getvalue().split("\r")[-1]
    assert final.startswith("retrain") and "2/2" in final and final.endswith("\n")
    assert not caplog.records  # the bar says it: no log lines beside it


def test_the_bars_are_closed_when_training_fails(small, monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    apply_fn, variables, x, y = small
    x = np.full_like(x, np.nan)
    with pytest.raises(FloatingPointError):
        train(apply_fn, variables, x, y, epochs=2, batch_size=64, optimizer=optax.sgd(0.01))
    # A closed bar ends its line; one left open would leave the cursor on it.
    assert sys.stderr.getvalue().endswith("\n")
    from tqdm.std import tqdm
    assert not tqdm._instances
