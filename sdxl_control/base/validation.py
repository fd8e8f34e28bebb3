"""Checking the fields of frozen values (requests, conditions) against their type hints, once, at construction: a
string where a number belongs, NaN or infinity, a bool where a count belongs, a value outside a ``Literal`` — each
an error naming the field, before anything loads.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Size:
    ...     side: int
    ...     def __post_init__(self): check_fields(self, "Size")
    >>> Size("big")
    Traceback (most recent call last):
    ...
    sdxl_control.base.errors.InvalidRequestError: Size: side must be a whole number, got 'big' (str)
"""

from __future__ import annotations

import difflib
import math
import numbers
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from typing import Any

from .errors import InvalidRequestError, SdxlControlError

__all__ = ["check_fields", "finite", "unknown_keys"]

_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _show(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}..." if len(text) > 60 else text


def _accepts(hint: Any, value: Any, adapters: Mapping[type, tuple[tuple[type, ...], str]]) -> str | None:
    """None when ``value`` fits ``hint``, else what was expected."""
    if hint is Any or hint is typing.Any:
        return None
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        expected = []
        for member in typing.get_args(hint):
            problem = _accepts(member, value, adapters)
            if problem is None:
                return None
            expected.append(problem)
        return " or ".join(dict.fromkeys(expected))
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        return None if value in allowed else "one of " + ", ".join(repr(a) for a in allowed)
    if hint is type(None):
        return None if value is None else "None"
    if origin is not None:
        hint = origin  # Mapping[str, Any] -> Mapping; tuple[str, ...] -> tuple
    if hint in (tuple, Sequence):
        return None if isinstance(value, (tuple, list)) else "a list"
    if not isinstance(hint, type):
        return None
    if hint in adapters:
        # converted by the value's own __post_init__ (a (start, end) pair into a Window, say)
        others, description = adapters[hint]
        return None if isinstance(value, (hint, *others)) else description
    if hint is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        return None if ok else _NAMES[float]
    if hint is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return None if ok else _NAMES[int]
    return None if isinstance(value, hint) else _NAMES.get(hint, f"a {hint.__name__}")


def check_fields(
    value: Any,
    what: str,
    *,
    error: type[SdxlControlError] = InvalidRequestError,
    adapters: Mapping[type, tuple[tuple[type, ...], str]] | None = None,
) -> None:
    """Refuse fields of the dataclass ``value`` that do not fit their type hints, and non-finite numbers.

    ``adapters`` maps a hinted type to the other types its ``__post_init__`` converts, and how to name what is
    expected: ``{Window: ((tuple, list), "(start, end) fractions of the schedule")}``.
    """
    hints = _hints(type(value))
    for f in fields(value):
        current = getattr(value, f.name)
        problem = _accepts(hints.get(f.name, Any), current, adapters or {})
        if problem is not None:
            raise error(f"{what}: {f.name} must be {problem}, got {_show(current)} ({type(current).__name__})")
        if isinstance(current, numbers.Real) and not isinstance(current, bool):
            finite(typing.cast(float, current), f"{what}: {f.name}", error)


def finite(value: float, what: str, error: type[SdxlControlError] = InvalidRequestError) -> float:
    """``value`` if it is a finite number, else an error naming ``what``."""
    try:
        ok = math.isfinite(float(value))
    except OverflowError:  # an integer beyond any float
        ok = False
    if not ok:
        raise error(f"{what} must be a finite number, got {value}")
    return value


def unknown_keys(given: Iterable[str], known: Iterable[str], what: str, noun: str = "key") -> str | None:
    """A message naming keys of ``given`` that are not ``known`` (with the nearest known key), or None."""
    known = sorted(known)
    unknown = sorted(str(k) for k in given if k not in known)
    if not unknown:
        return None
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"{what} has unknown {noun}(s) {', '.join(hints)}; its {noun}s are {', '.join(known)}"
