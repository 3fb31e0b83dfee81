"""Checks of values at the library's boundary (config fields, flags), one message format:
``"<name> must be <rule>, got <value>"`` as a ``ValueError`` (the CLI prints it as one line)."""

from __future__ import annotations

import math
import numbers

__all__ = ["at_least", "finite", "fraction"]


def at_least(name: str, value, lo: int, *, optional: bool = False) -> None:
    """``value`` is an integer >= ``lo`` (or None when ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}{' (or None)' if optional else ''}, got {value!r}")


def finite(name: str, value, *, lo: float | None = None, hi: float | None = None, strict: bool = False,
           optional: bool = False) -> None:
    """``value`` is a finite real in ``[lo, hi]`` (``strict``: ``(lo, hi)``), or None when ``optional``."""
    if value is None and optional:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if strict else value >= lo
    if ok and hi is not None:
        ok = value < hi if strict else value <= hi
    if not ok:
        lb, rb = ("(", ")") if strict else ("[", "]")
        if lo is not None and hi is not None:
            rng = f" in {lb}{lo:g}, {hi:g}{rb}"
        elif lo is not None:
            rng = f" {'>' if strict else '>='} {lo:g}"
        elif hi is not None:
            rng = f" {'<' if strict else '<='} {hi:g}"
        else:
            rng = ""
        raise ValueError(f"{name} must be a finite number{rng}, got {value!r}")


def fraction(name: str, value, *, optional: bool = False) -> None:
    """``value`` lies strictly between 0 and 1."""
    finite(name, value, lo=0.0, hi=1.0, strict=True, optional=optional)
