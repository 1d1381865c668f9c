"""Validation at API boundaries: one wording of the ValueError for every config field and argument.

Each check names the field as the caller gives it ("OptimConfig.lr", "num_samples") and says what
is allowed, so a bad value fails before any computation with a message a user can act on.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def check_int(name: str, value: Any, lo: int = 0) -> int:
    """`value` as an int, or a ValueError unless it is an integer (not a bool; an integral
    float such as 3.0 is accepted) >= lo."""
    integral = isinstance(value, int | np.integer) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def check_real(
    name: str, value: Any, *, lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = True
) -> float:
    """`value` as a float, or a ValueError unless it is a finite real number in the interval."""
    allowed = f"a finite number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    ok = isinstance(value, int | float | np.floating | np.integer) and not isinstance(value, bool)
    ok = ok and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, allowed: Sequence) -> None:
    """A ValueError unless `value` is one of `allowed`; a misspelt name gets the nearest allowed one."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}{nearest(value, allowed)}")


def nearest(value: Any, allowed: Sequence) -> str:
    """' (did you mean ...?)' for a string close to an allowed one ("batchnorm" -> "batch"), else ''."""
    names = [a for a in allowed if isinstance(a, str)]
    if not isinstance(value, str) or not value or not names:
        return ""
    low = value.lower()
    close = [a for a in names if low.startswith(a.lower()) or a.lower().startswith(low)]
    close = close or difflib.get_close_matches(low, names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_bool(name: str, value: Any) -> None:
    """A ValueError unless `value` is True or False."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be one of (True, False), got {value!r}")


def check_subset(name: str, values: Sequence, allowed: Sequence) -> None:
    """A ValueError unless `values` is a non-empty selection from `allowed`."""
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"{name}: {bad or 'empty'} not allowed; choose from {list(allowed)}")
