"""What a run shows while it works: progress bars on a terminal, else plain log lines.

On a terminal (and without ``--no-progress``) each phase has a bar that
names it (``pretrain``, ``retrain``, ``SFPK sfpk-round1``, ...) and stays on
screen when done. Otherwise (``--no-progress``, or stdout redirected to a
file, as in a batch job) there are no bars, so a captured log holds no
carriage-return updates; instead one time-stamped line per epoch and per 10
SFPK steps goes to stdout, through the ``logging`` logger ``sfpk_jax``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Iterator

from tqdm.std import tqdm  # not tqdm.auto: in a notebook without ipywidgets it warns

from experiments.harness.flags import bars

LOG = logging.getLogger("experiments.harness")
_PACKAGE_LOG = logging.getLogger("sfpk_jax")


class _Stdout(logging.Handler):
    """Writes each record to the current ``sys.stdout``, flushed.

    Looked up at every line rather than held, so that a later redirection
    (pytest's capture, a notebook) is followed.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stdout, flush=True)
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


def configure(args: argparse.Namespace) -> None:
    """Shows the package's INFO lines on stdout when there are no bars (see :func:`bars`)."""
    if not any(isinstance(h, _Stdout) for h in _PACKAGE_LOG.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        _PACKAGE_LOG.addHandler(handler)
        # Not also through the root logger's handlers (absl installs one): once is enough.
        _PACKAGE_LOG.propagate = False
    _PACKAGE_LOG.setLevel(logging.WARNING if bars(args) else logging.INFO)


def bar(args: argparse.Namespace, **kwargs) -> tqdm:
    """A tqdm bar (``kwargs``: ``desc``, ``total``, ...), disabled when :func:`bars` says so."""
    return tqdm(disable=not bars(args), **kwargs)


def counted(items: Iterable, progress: tqdm) -> Iterator:
    """``items``, advancing ``progress`` by one after each."""
    for item in items:
        yield item
        progress.update(1)
