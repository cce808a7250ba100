"""Byte sizes: parse human units at the edges, print them back. Internally everything is bytes."""

from __future__ import annotations

import re

from .errors import UsageError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


class SizeError(UsageError):
    """A size string that cannot be read."""


def parse_size(text: str | int | float) -> int:
    """'20GiB' -> 21474836480, '80GB' -> 80e9, '512MiB', '1.5 TiB', or a plain number of bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise SizeError(f"a size cannot be negative: {text}")
        return int(text)
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise SizeError(
            f"cannot read the size {text!r}: write a number with a unit, such as 20GiB, 80GB or 512MiB "
            "(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(nbytes: int | float | None, unit: str = "GiB", digits: int = 1) -> str:
    """Bytes to a short human string; None (a value not available) prints as n/a."""
    if nbytes is None:
        return "n/a"
    if unit == "auto":
        unit = next((u for u in ("TiB", "GiB", "MiB", "KiB") if abs(nbytes) >= _UNITS[u.lower()]), "B")
        if unit == "B":
            return f"{int(nbytes)} B"
    return f"{nbytes / _UNITS[unit.lower()]:.{digits}f} {unit}"


GiB = 1024**3
MiB = 1024**2
