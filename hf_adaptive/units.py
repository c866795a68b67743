"""Byte quantities as people write them ("2GiB", "512 MB", 10**9) and back. Pure Python, no torch."""

from __future__ import annotations

import math
import re

from hf_adaptive.validation import show

_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | str, name: str = "memory_budget") -> int:
    """Turn a byte quantity into an int number of bytes.

    Args:
        value: a non-negative int, or a string such as ``"2GiB"``, ``"1.5 GB"``, ``"512MiB"``, ``"4096"``.
            Units (case-insensitive): B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB and K/M/G/T (powers of 1024).
        name: the parameter name used in error messages.
    Returns:
        The number of bytes (rounded down), > 0.
    Raises:
        ValueError / TypeError: naming ``name``, the accepted forms and the value received.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{name} must be an int number of bytes or a string like '2GiB'; got {show(value)} "
                        f"({type(value).__name__}). Fix: pass e.g. {name}='2GiB' or {name}=2*1024**3.")
    if isinstance(value, int):
        number_bytes = value
    else:
        match = _PATTERN.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"{name}={value[:60]!r} is not a byte quantity; use a number followed by one of "
                             f"B, KB, MB, GB, TB, KiB, MiB, GiB, TiB. Fix: e.g. {name}='2GiB' or '512 MB'.")
        number = float(match.group(1)) * _UNITS[unit]
        if not math.isfinite(number):  # hundreds of digits overflow the float (int(inf) would raise OverflowError)
            raise ValueError(f"{name}={value[:40]!r}... is too large a byte quantity. Fix: e.g. {name}='2GiB'.")
        number_bytes = int(number)
    if number_bytes <= 0:
        raise ValueError(f"{name}={show(value)} must be a positive number of bytes; e.g. {name}='2GiB'.")
    return number_bytes


def format_bytes(number_bytes: int | float) -> str:
    """Human-readable binary size, e.g. ``format_bytes(3 * 2**20) == '3.00 MiB'``."""
    size = float(number_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
