"""``--n-m``: N:M masks from the command line, resolved into the flags they stand for.

In the experiments ``--n-m N:M`` sets ``--mask-dim N:M`` and ``--sparsity 1 -
N/M`` (:func:`resolve`); in the demo ``--n-m 2:4,1:4`` takes the place of
``--sparsities`` (:func:`patterns`). Either way a flag given against it is a
contradiction, stopped in one line, and the resolved flags are what
config.json records and a resume compares.
"""

from __future__ import annotations

import argparse

from experiments.harness.flags import fail
from sfpk_jax.core import n_m


def _parse(text: str) -> n_m.NM:
    try:
        return n_m.parse(text, "--n-m")
    except ValueError as err:
        fail(str(err))


def resolve(args: argparse.Namespace, given: set[str]) -> None:
    """``--n-m N:M`` sets ``--mask-dim N:M`` and ``--sparsity 1 - N/M``; a contradiction stops.

    Args:
      args: the parsed flags (``n_m``, ``mask_dim``, ``sparsity``).
      given: the attributes set on the command line.
    """
    if args.n_m is None:
        return
    pattern = _parse(args.n_m)
    if args.mask_dim not in (None, str(pattern)):
        fail(f"--n-m={args.n_m} and --mask-dim={args.mask_dim} contradict each other: --n-m "
             "sets the mask kind, give one of them")
    if "sparsity" in given and not n_m.has_sparsity(pattern, args.sparsity):
        fail(f"--n-m={args.n_m} keeps {pattern.n} of every {pattern.m} weights, a sparsity of "
             f"{pattern.sparsity:g}, not --sparsity={args.sparsity:g}: leave --sparsity out")
    args.mask_dim, args.sparsity = str(pattern), pattern.sparsity


def patterns(args: argparse.Namespace, given: set[str]) -> None:
    """The demo's comma-separated ``--n-m`` patterns take the place of ``--sparsities``.

    Sets ``args.patterns`` (``"2:4"``, ...; None for each plain sparsity when
    ``--n-m`` is not given) and ``args.sparsities`` (1 - N/M each).

    Args:
      args: the parsed flags (``n_m``, ``sparsities`` already a list).
      given: the attributes set on the command line.
    """
    if args.n_m is None:
        args.patterns = [None] * len(args.sparsities)
        return
    if "sparsities" in given:
        fail(f"--n-m={args.n_m} and --sparsities={','.join(map(str, args.sparsities))} "
             "contradict each other: an N:M pattern sets its sparsity, give one of them")
    parsed = [_parse(text) for text in args.n_m.split(",")]
    args.patterns = [str(pattern) for pattern in parsed]
    args.sparsities = [pattern.sparsity for pattern in parsed]
