"""Typed range checks of settings: each failure is a phrase naming the key, rule and value."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from fedad.errors import FedadError

INT, FLOAT = "a whole number", "a number"


def number(
    values: Mapping[str, Any],
    key: str,
    where: str,
    *,
    whole: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> str | None:
    """Check ``values[key]`` is a number in a range; return what is wrong, or None.

    Parameters
    ----------
    values : Mapping
        A config section.
    key : str
        The key inside it (absent keys are not checked).
    where : str
        The section's dotted name, for the message (``train``, ``strategy``).
    whole : bool
        Require a whole number.
    low, high : float, optional
        Bounds, included unless ``low_open`` / ``high_open``.
    hint : str
        What the value means, added in brackets (``"0 turns early stopping off"``).

    Returns
    -------
    str or None
        E.g. ``"train.local_epochs must be a whole number >= 1, got 0"``.
    """
    if key not in values:
        return None
    value = values[key]
    name = f"{where}.{key}" if where else key
    rule = _rule(whole, low, high, low_open, high_open)
    wrong = f"{name} must be {rule}{f' ({hint})' if hint else ''}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return wrong
    if whole and float(value) != int(value):
        return wrong
    if low is not None and (value < low or (low_open and value == low)):
        return wrong
    if high is not None and (value > high or (high_open and value == high)):
        return wrong
    return None


def choice(values: Mapping[str, Any], key: str, where: str, options: Iterable[str]) -> str | None:
    """Check ``values[key]`` is one of ``options``; return what is wrong, or None."""
    if key not in values:
        return None
    options = list(options)
    if values[key] in options:
        return None
    name = f"{where}.{key}" if where else key
    return f"{name} must be one of {', '.join(map(str, options))}, got {values[key]!r}"


def flag(values: Mapping[str, Any], key: str, where: str) -> str | None:
    """Check ``values[key]`` is true or false; return what is wrong, or None."""
    if key not in values or isinstance(values[key], bool):
        return None
    name = f"{where}.{key}" if where else key
    return f"{name} must be true or false, got {values[key]!r}"


def raise_problems(problems: Iterable[str | None], what: str) -> None:
    """Raise one :class:`FedadError` listing every problem found, if any.

    Parameters
    ----------
    problems : Iterable[str or None]
        Outcomes of the checks above (None = fine).
    what : str
        What cannot happen, e.g. ``"Cannot start the run"``.
    """
    found = [p for p in problems if p]
    if found:
        raise FedadError(
            f"{what}: {'; '.join(found)}. Set "
            f"{'each' if len(found) > 1 else 'it'} on the command line (key=value) or in the "
            "config file that sets it."
        )


def _rule(
    whole: bool, low: float | None, high: float | None, low_open: bool, high_open: bool
) -> str:
    kind = INT if whole else FLOAT
    if low is not None and high is not None:
        left, right = ("(" if low_open else "["), (")" if high_open else "]")
        return f"{kind} in {left}{_show(low)}, {_show(high)}{right}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {_show(low)}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {_show(high)}"
    return kind


def _show(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)
