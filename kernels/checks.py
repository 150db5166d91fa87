"""Input checks at the boundary, with messages that name the argument, what was expected and what came."""
from __future__ import annotations

import math
from numbers import Real


def check_finite(name: str, value: Real) -> float:
    """Return ``value`` as float; raise ValueError naming ``name`` if it is not a finite number."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return v


def check_range(name: str, value: Real, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False, unit: str = "") -> float:
    """Return ``value`` as a finite float inside [low, high] (or open ends); raise ValueError naming ``name``."""
    v = check_finite(name, value)
    too_low = v <= low if low_open else v < low
    too_high = v >= high if high_open else v > high
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        unit = f" {unit}" if unit else ""
        raise ValueError(f"{name}: expected a value in {lo}{low:g}, {high:g}{hi}{unit}, got {v:g}")
    return v


def check_int_range(name: str, value: int, low: int, high: int) -> int:
    """Return ``value`` as int inside [low, high]; raise ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (
            isinstance(value, float) and value.is_integer()):
        raise ValueError(f"{name}: expected a whole number, got {value!r}")
    v = int(value)
    if not low <= v <= high:
        raise ValueError(f"{name}: expected a whole number in [{low}, {high}], got {v}")
    return v
