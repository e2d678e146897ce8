"""Progress bars that draw only where they can redraw themselves.

A tqdm bar redraws itself with carriage returns on stderr. In a terminal or a
notebook that is a bar; in a log file or a batch job's captured output it is
a pile of half-lines, so there the library shows none and logs plain lines
instead (loggers under ``sfpk_jax``).
"""

from __future__ import annotations

import sys

from tqdm.std import tqdm  # not tqdm.auto: in a notebook without ipywidgets it warns


def shown(progress: bool) -> bool:
    """Whether a bar asked for with ``progress`` is drawn: only on a terminal or in a notebook."""
    notebook = type(sys.stderr).__module__.startswith("ipykernel")
    return progress and (notebook or sys.stderr.isatty())


def bar(progress: bool, **kwargs) -> tqdm:
    """A tqdm bar (``kwargs``: ``desc``, ``total``, an iterable, ...), drawn when :func:`shown`.

    Use it in a ``with`` block, so that it is closed however the loop ends.
    """
    return tqdm(disable=not shown(progress), **kwargs)
