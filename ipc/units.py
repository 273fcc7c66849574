"""Sizes as people write them ("512M", "1G", "64k") and as fssconfig prints them."""

from __future__ import annotations

_SUFFIX = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string with an optional binary suffix (k, M, G, T, P; B or iB allowed)."""
    if isinstance(value, bool):
        raise ValueError("size must be a number of bytes or a string such as '512M'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("size must not be negative")
        return value
    text = value.strip().upper().removesuffix("IB").removesuffix("B") if value.strip()[-1:].isalpha() else value.strip()
    digits = text.rstrip("KMGTP")
    suffix = text[len(digits):]
    if suffix not in _SUFFIX or len(suffix) > 1 or not digits:
        raise ValueError(f"bad size {value!r}: expected bytes or a number with a suffix k, M, G, T or P")
    try:
        number = float(digits) if "." in digits else int(digits)
    except ValueError:
        raise ValueError(f"bad size {value!r}: expected bytes or a number with a suffix k, M, G, T or P") from None
    if number < 0:
        raise ValueError(f"bad size {value!r}: must not be negative")
    return int(number * _SUFFIX[suffix])


def humanize(n: int) -> str:
    """NetBSD humanize_number(3) style as fssconfig -v prints it: '64K', '1.2M', '512'."""
    units = ["", "K", "M", "G", "T", "P"]
    value = float(n)
    i = 0
    while value >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    if i == 0:
        return str(n)
    if value < 10 and value != int(value):
        return f"{value:.1f}{units[i]}"
    return f"{int(round(value))}{units[i]}"
