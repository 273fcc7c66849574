"""The msgpack the control protocol uses, without msgspec (sans-IO): for fssconfig's quick start.

Importing msgspec (and the typing module it loads) takes a short-lived tool
25 ms or more of a snapshot's creation on a small machine, more than fssd's
own part. fssconfig's configure path therefore builds its one request and
reads its one answer with this: the types msgspec writes for the control
messages (nil, bool, int, float, str, array, map) and nothing else. fssd
still decodes every request with msgspec against ipc.control's Structs (the
boundary that matters: a user talking to root); the encoder writes exactly
msgspec's bytes for the same Struct (tests/test_minipack.py compares them),
and the decoder is strict and bounded: anything else, a truncated or
oversized value or trailing bytes, raises ValueError.
"""

from __future__ import annotations

import struct

MAX_DEPTH = 32

_B = struct.Struct(">B")
_H = struct.Struct(">H")
_I = struct.Struct(">I")
_Q = struct.Struct(">Q")
_b = struct.Struct(">b")
_h = struct.Struct(">h")
_i = struct.Struct(">i")
_q = struct.Struct(">q")
_f = struct.Struct(">f")
_d = struct.Struct(">d")


def encode(obj) -> bytes:
    out = bytearray()
    _enc(obj, out, 0)
    return bytes(out)


def _enc(obj, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    if obj is None:
        out.append(0xC0)
    elif obj is True:
        out.append(0xC3)
    elif obj is False:
        out.append(0xC2)
    elif type(obj) is int:
        _enc_int(obj, out)
    elif type(obj) is float:
        out.append(0xCB)
        out += _d.pack(obj)
    elif type(obj) is str:
        b = obj.encode()
        n = len(b)
        if n < 32:
            out.append(0xA0 | n)
        elif n < 1 << 8:
            out += b"\xd9" + _B.pack(n)
        elif n < 1 << 16:
            out += b"\xda" + _H.pack(n)
        else:
            out += b"\xdb" + _I.pack(n)
        out += b
    elif type(obj) in (list, tuple):
        _header(len(obj), 0x90, 0xDC, out)
        for v in obj:
            _enc(v, out, depth + 1)
    elif type(obj) is dict:
        _header(len(obj), 0x80, 0xDE, out)
        for k, v in obj.items():
            if type(k) is not str:
                raise ValueError(f"map key {k!r} is not a string")
            _enc(k, out, depth + 1)
            _enc(v, out, depth + 1)
    else:
        raise ValueError(f"cannot encode {type(obj).__name__}")


def _header(n: int, fix: int, code16: int, out: bytearray) -> None:
    if n < 16:
        out.append(fix | n)
    elif n < 1 << 16:
        out.append(code16)
        out += _H.pack(n)
    else:
        out.append(code16 + 1)
        out += _I.pack(n)


def _enc_int(n: int, out: bytearray) -> None:
    if 0 <= n < 128:
        out.append(n)
    elif n >= 0:
        if n < 1 << 8:
            out += b"\xcc" + _B.pack(n)
        elif n < 1 << 16:
            out += b"\xcd" + _H.pack(n)
        elif n < 1 << 32:
            out += b"\xce" + _I.pack(n)
        elif n < 1 << 64:
            out += b"\xcf" + _Q.pack(n)
        else:
            raise ValueError(f"integer {n} out of range")
    elif n >= -32:
        out += _b.pack(n)
    elif n >= -(1 << 7):
        out += b"\xd0" + _b.pack(n)
    elif n >= -(1 << 15):
        out += b"\xd1" + _h.pack(n)
    elif n >= -(1 << 31):
        out += b"\xd2" + _i.pack(n)
    elif n >= -(1 << 63):
        out += b"\xd3" + _q.pack(n)
    else:
        raise ValueError(f"integer {n} out of range")


def decode(data: bytes):
    """One value that is all of `data`."""
    view = memoryview(data)
    obj, pos = _dec(view, 0, 0)
    if pos != len(view):
        raise ValueError(f"{len(view) - pos} byte(s) after the value")
    return obj


# (struct, size) of the fixed-width scalars, by type byte
_FIXED = {0xCA: _f, 0xCB: _d, 0xCC: _B, 0xCD: _H, 0xCE: _I, 0xCF: _Q, 0xD0: _b, 0xD1: _h, 0xD2: _i, 0xD3: _q}
# type byte -> (length struct, kind) of strings, arrays and maps with a length field
_SIZED = {0xD9: (_B, "str"), 0xDA: (_H, "str"), 0xDB: (_I, "str"), 0xDC: (_H, "array"), 0xDD: (_I, "array"),
          0xDE: (_H, "map"), 0xDF: (_I, "map")}


def _take(view: memoryview, pos: int, n: int) -> int:
    end = pos + n
    if end > len(view):
        raise ValueError("truncated")
    return end


def _dec(view: memoryview, pos: int, depth: int):
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    end = _take(view, pos, 1)
    c = view[pos]
    pos = end
    if c < 0x80:
        return c, pos
    if c >= 0xE0:
        return c - 0x100, pos
    if 0xA0 <= c <= 0xBF:
        return _str(view, pos, c & 0x1F)
    if 0x90 <= c <= 0x9F:
        return _array(view, pos, c & 0x0F, depth)
    if 0x80 <= c <= 0x8F:
        return _map(view, pos, c & 0x0F, depth)
    if c == 0xC0:
        return None, pos
    if c == 0xC2:
        return False, pos
    if c == 0xC3:
        return True, pos
    fixed = _FIXED.get(c)
    if fixed is not None:
        end = _take(view, pos, fixed.size)
        return fixed.unpack_from(view, pos)[0], end
    sized = _SIZED.get(c)
    if sized is not None:
        st, kind = sized
        end = _take(view, pos, st.size)
        n = st.unpack_from(view, pos)[0]
        if kind == "str":
            return _str(view, end, n)
        if kind == "array":
            return _array(view, end, n, depth)
        return _map(view, end, n, depth)
    raise ValueError(f"unexpected type byte 0x{c:02x}")


def _str(view: memoryview, pos: int, n: int):
    end = _take(view, pos, n)
    try:
        return bytes(view[pos:end]).decode(), end
    except UnicodeDecodeError:
        raise ValueError("a string that is not UTF-8") from None


def _array(view: memoryview, pos: int, n: int, depth: int):
    _take(view, pos, n)  # at least a byte each: a huge count in a short frame fails here
    out = []
    for _ in range(n):
        v, pos = _dec(view, pos, depth + 1)
        out.append(v)
    return out, pos


def _map(view: memoryview, pos: int, n: int, depth: int):
    _take(view, pos, 2 * n)
    out = {}
    for _ in range(n):
        k, pos = _dec(view, pos, depth + 1)
        if type(k) is not str:
            raise ValueError("a map key that is not a string")
        v, pos = _dec(view, pos, depth + 1)
        out[k] = v
    return out, pos
