"""Shared argument validators whose ``ValueError`` messages carry the argument's name and the bad value."""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_in_range", "check_positive_int"]


def check_positive_int(name: str, value: Any) -> int:
    """Check that ``value`` is an integer >= 1 and return it as a Python ``int``.

    Python and numpy integers are accepted; ``bool``, floats (even integral ones such as ``2.0``) and other types
    are not.

    Args:
        name: the argument's name, used in the error message.
        value: the value to check.

    Returns:
        ``value`` as an ``int``.

    Raises:
        ValueError: when ``value`` is a ``bool``, not an integer or smaller than 1.

    Example::

        >>> check_positive_int("num_instances", 8)
        8
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _format_bound(bound: float) -> str:
    """``0`` for ``0.0``, ``0.5`` for ``0.5``: integral bounds without a trailing ``.0``."""
    bound = float(bound)
    return str(int(bound)) if bound.is_integer() else repr(bound)


def check_in_range(
    name: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> float:
    """Check that ``value`` is a real number between ``low`` and ``high`` and return it as a ``float``.

    Python and numpy integers and floats are accepted; ``bool``, NaN, strings, tensors and other types are not.

    Args:
        name: the argument's name, used in the error message.
        value: the value to check.
        low: lower bound of the interval.
        high: upper bound of the interval.
        low_open: exclude ``low`` itself (the interval is ``(low, ...``).
        high_open: exclude ``high`` itself (the interval is ``..., high)``).

    Returns:
        ``value`` as a ``float``.

    Raises:
        ValueError: when ``value`` is a ``bool``, not a real number, NaN or outside the interval; the message names
            the interval, e.g. ``"prob must be in [0, 1], got 1.5."``.

    Example::

        >>> check_in_range("target_fraction", 0.5, 0.0, 1.0, low_open=True, high_open=True)
        0.5
    """
    if not isinstance(value, bool) and isinstance(value, numbers.Real) and not math.isnan(value):
        above_low = low < value if low_open else low <= value
        below_high = value < high if high_open else value <= high
        if above_low and below_high:
            return float(value)
    interval = f"{'(' if low_open else '['}{_format_bound(low)}, {_format_bound(high)}{')' if high_open else ']'}"
    raise ValueError(f"{name} must be in {interval}, got {value!r}.")
