"""The one boundary check for what a person passes to nbgpu: every public function and magic reads its arguments
through these helpers, so a wrong value is refused with a UsageError that names the argument and what is expected.

Integers are integers (bool refused, numpy integers accepted and converted), numbers and sizes finite and within
bounds, dtypes normalised through torch's own names ("double" is float64). Nothing here imports torch until a dtype
is read, so `import nbgpu` stays cheap.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import shlex

from .errors import UsageError

MAX_GPUS = 64  # GPUs in one plan or one simulated set
MAX_BATCH = 2**20  # sequences in one batch
MAX_TOKENS = 2**24  # tokens of one sequence (prompt, new tokens, seq_len): 16M, beyond any model's context
MAX_SIZE = 2**60  # bytes: 1 EiB, far above any machine, and still exact in a float and an int64
MAX_INTERVAL = 3600.0  # seconds between monitor samples
DTYPES = ("bfloat16", "float16", "float32", "float64")  # what a plan and a load take
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}


def shown(value, limit: int = 80) -> str:
    """repr(value), cut short, and never failing (a value's own __repr__ may raise)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real message
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _range_text(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" of at least {minimum}"
    if maximum is not None:
        return f" of at most {maximum}"
    return ""


def _is_bool(value) -> bool:
    return isinstance(value, bool) or type(value).__name__ in ("bool_", "bool") and hasattr(value, "dtype")


def integer(value, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """A whole number (numpy integers converted to int); bool and floats such as 1.0 refused."""
    expected = f"{name} must be a whole number{_range_text(minimum, maximum)}"
    if _is_bool(value):
        raise UsageError(f"{expected}, not the boolean {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise UsageError(f"{expected}, not {shown(value)}") from None
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise UsageError(f"{expected}, not {number}")
    return int(number)


def optional_integer(value, name: str, minimum: int | None = None, maximum: int | None = None) -> int | None:
    return None if value is None else integer(value, name, minimum, maximum)


def number(value, name: str, minimum: float | None = None, maximum: float | None = None) -> float:
    """A finite real number within the bounds (ints, floats and numpy numbers; bool and strings refused)."""
    expected = f"{name} must be a finite number{_range_text(minimum, maximum)}"
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise UsageError(f"{expected}, not {shown(value)}")
    try:
        out = float(value)
    except (OverflowError, ValueError):
        raise UsageError(f"{expected}, not {shown(value)}") from None
    if not math.isfinite(out) or (minimum is not None and out < minimum) or (maximum is not None and out > maximum):
        raise UsageError(f"{expected}, not {shown(value)}")
    return out


def interval(value, name: str = "interval", minimum: float = 0.01, maximum: float = MAX_INTERVAL) -> float:
    """Seconds between two events: finite and within [minimum, maximum]."""
    if isinstance(value, str):
        raise UsageError(f"{name}={shown(value)} is not a number of seconds: give e.g. {name}=1.0")
    return number(value, f"{name} (seconds)", minimum, maximum)


def size(value, name: str, *, allow_zero: bool = True) -> int:
    """Bytes, from a number or a string with a unit ('20GiB'); finite, not negative, at most MAX_SIZE."""
    from .units import parse_size

    try:
        out = parse_size(value)
    except UsageError as err:
        raise UsageError(f"{name}: {err}") from None
    if out == 0 and not allow_zero:
        raise UsageError(f"{name} must be more than 0 bytes, not {shown(value)}")
    return out


def optional_size(value, name: str, *, allow_zero: bool = True) -> int | None:
    return None if value is None else size(value, name, allow_zero=allow_zero)


def boolean(value, name: str) -> bool:
    """True or False (numpy booleans accepted); anything else, such as 'yes' or 1, refused."""
    if not _is_bool(value):
        raise UsageError(f"{name} must be True or False, not {shown(value)}")
    return bool(value)


def text(value, name: str, *, allow_none: bool = False, max_length: int = 10_000) -> str | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise UsageError(f"{name} must be a string{' or None' if allow_none else ''}, not {shown(value)}")
    if len(value) > max_length:
        raise UsageError(f"{name} is {len(value)} characters long: give at most {max_length}")
    return value


def choice(value, name: str, options) -> object:
    """One of `options` (compared by equality, bool never taken for 0/1 or 0/1 for bool)."""
    for option in options:
        if type(option) is type(value) and option == value:
            return option
        if _is_bool(value) and isinstance(option, bool) and bool(value) == option:
            return option
    raise UsageError(f"{name} must be one of {', '.join(map(repr, options))}, not {shown(value)}")


def callable_or_none(value, name: str):
    if value is not None and not callable(value):
        raise UsageError(f"{name} must be a function or None, not {shown(value)}")
    return value


def path(value, name: str) -> str:
    """A path given as str or os.PathLike (not bytes), as a str."""
    if not isinstance(value, (str, os.PathLike)):
        raise UsageError(f"{name} must be a path (str or pathlib.Path), not {shown(value)}")
    out = os.fspath(value)
    if not isinstance(out, str):
        raise UsageError(f"{name} must be a text path, not {shown(out)}")
    if not out or "\0" in out:
        raise UsageError(f"{name}={shown(out)} is not a usable path")
    return out


def existing_file(value, name: str) -> str:
    where = path(value, name)
    if not os.path.exists(where):
        raise UsageError(f"there is no file {where!r} ({name})")
    if not os.path.isfile(where):
        raise UsageError(f"{where!r} is not a file ({name})")
    return where


def dtype(value, name: str = "dtype", allowed: tuple[str, ...] | None = DTYPES) -> str:
    """A floating-point dtype by torch's own name: 'bfloat16', 'fp16', 'half', 'double', torch.float64 ...
    -> its canonical name ('float64'); `allowed=None` takes every floating-point dtype torch has."""
    import torch

    if isinstance(value, torch.dtype):
        found = value
    elif isinstance(value, str) or type(value).__module__.startswith("numpy"):
        key = str(value).strip().removeprefix("torch.")
        key = _DTYPE_ALIASES.get(key.lower(), key)
        found = vars(torch).get(key)  # never getattr: torch's module __getattr__ imports submodules on demand
    else:
        found = None
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        found = None
    canonical = str(found).removeprefix("torch.") if found is not None else None
    if canonical is None or (allowed is not None and canonical not in allowed):
        options = ", ".join(allowed or ("a floating-point torch dtype",))
        raise UsageError(f"{name} {shown(value)} is not one nbgpu takes: use {options} "
                         "(torch's names and aliases such as 'bf16', 'half' or 'double' work too)")
    return canonical


def shell_words(line, what: str) -> list[str]:
    """A magic's line split as a shell would split it; an unclosed quote is a UsageError."""
    if not isinstance(line, str):
        raise UsageError(f"{what} takes a line of text, not {shown(line)}")
    try:
        return shlex.split(line)
    except ValueError as err:
        raise UsageError(f"cannot read `{what} {line}`: {err} (close the quotes, or escape the quote with \\)") from err


def positions(total: int, limit: int | None, what: str) -> None:
    """Refuse `total` tokens beyond the model's position limit (when the model has one)."""
    if limit is not None and total > limit:
        has = f"this model has {limit} positions (max_position_embeddings)" if limit != MAX_TOKENS else \
            f"nbgpu takes at most {limit} tokens"
        raise UsageError(f"{what} is {total} tokens, but {has}: give at most {limit} tokens in all")
