"""What a run shows while it works: progress bars on a terminal, else plain log lines.

On a terminal (and without ``--no-progress``) each phase has a bar that
names it (``pretrain``, ``retrain``, ``SFPK sfpk-round1``, ...) and stays on
screen when done. Otherwise (``--no-progress``, or stdout redirected to a
file, as in a batch job) there are no bars, so a captured log holds no
carriage-return updates; instead one time-stamped line per epoch and per 10
SFPK steps goes to stdout, through the ``logging`` loggers ``experiments``
(the runs' own lines) and ``sfpk_jax`` (the library's: SFPK's steps, and its
warnings, e.g. a resume under another execution).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Iterator

from tqdm.std import tqdm  # not tqdm.auto: in a notebook without ipywidgets it warns

from experiments.harness.flags import bars

LOG = logging.getLogger("experiments")
# The run's lines and the library's, both shown.
_SHOWN = (LOG, logging.getLogger("sfpk_jax"))


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
    """Shows the run's and the library's INFO lines on stdout when there are no bars
    (see :func:`bars`), their warnings always."""
    for logger in _SHOWN:
        if not any(isinstance(h, _Stdout) for h in logger.handlers):
            handler = _Stdout()
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            logger.addHandler(handler)
            # Not also through the root logger's handlers (absl installs one): once is enough.
            logger.propagate = False
        logger.setLevel(logging.WARNING if bars(args) else logging.INFO)


def bar(args: argparse.Namespace, **kwargs) -> tqdm:
    """A tqdm bar (``kwargs``: ``desc``, ``total``, ...), disabled when :func:`bars` says so."""
    return tqdm(disable=not bars(args), **kwargs)


def counted(items: Iterable, progress: tqdm) -> Iterator:
    """``items``, advancing ``progress`` by one after each."""
    for item in items:
        yield item
        progress.update(1)
