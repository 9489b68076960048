"""How reports write numbers."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["difficulty_key", "fmt", "num"]


def fmt(value: Any, pct: bool = False, digits: int = 3) -> str:
    """A value for a table: ``–`` for none or NaN, a percentage with ``pct``, floats to ``digits``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if pct:
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.{digits}f}"
    return str(value)


def num(value: float | None, digits: int = 3, missing: str = "-") -> str:
    """A fixed-point number, ``missing`` for none."""
    return missing if value is None else f"{value:.{digits}f}"


def difficulty_key(d: str) -> tuple[int, float, str]:
    """Sort key of difficulty labels: numbers in numeric order, then the others."""
    try:
        return (0, float(d), d)
    except ValueError:
        return (1, 0.0, d)
