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
    """NetBSD humanize_number(buf, 5, n, "", HN_AUTOSCALE, HN_B | HN_NOSPACE), as fssconfig -v prints
    sizes: no decimals, at most three digits and a letter (65536 -> '64K', 512 -> '512B')."""
    v = n * 100
    i = 0
    while v >= 100000 - 50 and i < 6:
        v //= 1024
        i += 1
    return f"{(v + 50) // 100}{'BKMGTPE'[i]}"


_STRSUF = {"b": 512, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "w": 4}


def strsuftoll(desc: str, text: str, lo: int, hi: int) -> int:
    """NetBSD strsuftoll(3): a number with one optional suffix b k m g t w, or a product with x/*."""
    for sep in ("x", "*"):
        if sep in text:
            a, b = text.split(sep, 1)
            return strsuftoll(desc, str(strsuftoll(desc, a, 0, 1 << 62) * strsuftoll(desc, b, 0, 1 << 62)), lo, hi)
    t = text.strip()
    mult = 1
    if t and t[-1].lower() in _STRSUF:
        mult = _STRSUF[t[-1].lower()]
        t = t[:-1]
    if not t.isdigit():
        raise ValueError(f"{desc} `{text}': illegal number")
    n = int(t) * mult
    if n < lo:
        raise ValueError(f"{desc} {n} is less than {lo}.")
    if n > hi:
        raise ValueError(f"{desc} {n} is greater than {hi}.")
    return n
