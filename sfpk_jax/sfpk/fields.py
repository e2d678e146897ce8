"""Validated fields of the simulation's frozen dataclasses (:class:`SFPKConfig`, :class:`Execution`).

A field carries a one-line ``help`` in its metadata; a field typed with a
``Literal`` (or ``Literal | None``) takes exactly those values. One error
type, :class:`ConfigError`, names the class, the field, the value and what
it allows, so a caller (the experiments' command line, say) can map it to
its own words.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Any


class ConfigError(ValueError):
    """A field of :class:`~sfpk_jax.SFPKConfig` or :class:`~sfpk_jax.Execution` got a bad value.

    Attributes:
      owner: the class's name, e.g. ``"SFPKConfig"``.
      field: the field's name.
      value: the value given.
      expected: what the field allows, e.g. ``"an integer >= 1"``.
    """

    def __init__(self, owner: str, field: str, value: Any, expected: str):
        super().__init__(f"{owner}.{field}={value!r} must be {expected}")
        self.owner, self.field, self.value, self.expected = owner, field, value, expected


def field(default: Any, text: str) -> Any:
    """A dataclass field whose metadata holds its one-line ``help``."""
    return dataclasses.field(default=default, metadata={"help": text})


@functools.cache
def choices(cls: type) -> dict[str, tuple]:
    """Field name -> the values its ``Literal`` type allows (None included when optional)."""
    found = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        literal = [a for a in args if typing.get_origin(a) is typing.Literal]
        if typing.get_origin(hint) is typing.Literal:
            found[name] = args
        elif literal and all(a is type(None) or a in literal for a in args):
            found[name] = (*((None,) if type(None) in args else ()),
                           *(v for a in literal for v in typing.get_args(a)))
    return found


def check_choices(obj: Any) -> None:
    """Raises :class:`ConfigError` for the first ``Literal``-typed field of ``obj`` out of its values."""
    for name, allowed in choices(type(obj)).items():
        if getattr(obj, name) not in allowed:
            raise ConfigError(type(obj).__name__, name, getattr(obj, name),
                              f"one of {', '.join(map(repr, allowed))}")


def check_int(obj: Any, name: str, low: int = 1, high: int | None = None, why: str = "") -> None:
    """Raises :class:`ConfigError` unless ``obj.name`` is an int in [low, high]."""
    value = getattr(obj, name)
    bad = isinstance(value, bool) or not isinstance(value, int) or value < low
    if not bad and high is not None and value > high:
        bad = True
    if bad:
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(type(obj).__name__, name, value, f"an integer {bound}{why}")


def check_bool(obj: Any, name: str) -> None:
    """Raises :class:`ConfigError` unless ``obj.name`` is True or False."""
    if not isinstance(getattr(obj, name), bool):
        raise ConfigError(type(obj).__name__, name, getattr(obj, name), "True or False")


def check_real(obj: Any, name: str, *, lo=None, hi=None, lo_open=True, hi_open=False,
               what="") -> None:
    """Raises :class:`ConfigError` unless ``obj.name`` is a finite number within the bounds."""
    value = getattr(obj, name)
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if not bad and lo is not None:
        bad = value <= lo if lo_open else value < lo
    if not bad and hi is not None:
        bad = value >= hi if hi_open else value > hi
    if bad:
        raise ConfigError(type(obj).__name__, name, value, f"a finite number {what}")
