"""Byte sizes: parse human units at the edges, print them back. Internally everything is bytes."""

from __future__ import annotations

import math
import numbers
import re
from fractions import Fraction

from .errors import UsageError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d{1,30}(?:\.\d{0,30})?|\.\d{1,30})\s*([a-zA-Z]{0,3})\s*$", re.ASCII)
MAX_SIZE = 2**60  # bytes (1 EiB); nbgpu.checks uses the same bound


class SizeError(UsageError):
    """A size string that cannot be read."""


def parse_size(text: str | int | float) -> int:
    """'20GiB' -> 21474836480, '80GB' -> 80e9, '512MiB', '1.5 TiB', or a plain number of bytes (rounded down).

    Decimal text is read exactly ('4.35KB' is 4350 bytes, never 4349.999...); a size must be finite, not negative,
    and at most 1 EiB."""
    if _is_number(text):
        value = int(text) if isinstance(text, numbers.Integral) else float(text)
        if isinstance(value, float) and not math.isfinite(value):
            raise SizeError(f"a size must be a finite number of bytes, not {text!r}")
        if value < 0:
            raise SizeError(f"a size cannot be negative: {text}")
        return _bounded(int(value), text)
    if not isinstance(text, str):
        raise SizeError(f"cannot read a size from {type(text).__name__}: give a number of bytes or a string such "
                        "as '20GiB'")
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise SizeError(
            f"cannot read the size {shown!r}: write a number with a unit, such as 20GiB, 80GB or 512MiB "
            "(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    return _bounded(int(Fraction(match.group(1)) * _UNITS[unit]), text)


def _is_number(value) -> bool:
    """int, float and numpy numbers; never bool."""
    if isinstance(value, bool) or (type(value).__name__ == "bool" and hasattr(value, "dtype")):
        return False
    return isinstance(value, numbers.Real)


def _bounded(nbytes: int, text) -> int:
    if nbytes > MAX_SIZE:
        raise SizeError(f"{text!r} is more than 1 EiB: no machine has that much memory; check the unit")
    return nbytes


def format_size(nbytes: int | float | None, unit: str = "GiB", digits: int = 1) -> str:
    """Bytes to a short human string; None (a value not available) prints as n/a. `unit`: B, KB, ..., GiB, TiB or
    'auto' (the largest binary unit below the value); `digits` after the point, 0 to 12."""
    if not isinstance(unit, str) or (unit.lower() not in _UNITS and unit != "auto"):
        raise UsageError(f"unknown unit {unit!r}: use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB or 'auto'")
    if isinstance(digits, bool) or not isinstance(digits, numbers.Integral) or not 0 <= digits <= 12:
        raise UsageError(f"digits must be a whole number from 0 to 12, not {digits!r}")
    if nbytes is None:
        return "n/a"
    if not _is_number(nbytes):
        raise UsageError(f"format_size takes a number of bytes or None, not {type(nbytes).__name__}")
    if not math.isfinite(nbytes):
        return f"{nbytes} B"
    if unit == "auto":
        unit = next((u for u in ("TiB", "GiB", "MiB", "KiB") if abs(nbytes) >= _UNITS[u.lower()]), "B")
        if unit == "B":
            return f"{int(nbytes)} B"
    return f"{nbytes / _UNITS[unit.lower()]:.{int(digits)}f} {unit}"


GiB = 1024**3
MiB = 1024**2
