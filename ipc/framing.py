"""Length-prefixed msgspec frames (sans-IO): bytes in, messages out.

Used on the control socket (fssconfig <-> supervisor) and on the socketpair
each worker shares with the supervisor. A frame is a u32 big-endian length and
that many bytes of msgpack. Decoding is validation: a frame that does not
decode as the expected union raises FrameError, naming the path.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

# Control messages are small (status of a few dozen snapshots); anything
# larger is a confused or hostile peer, not a request.
MAX_FRAME = 1 << 20

_LEN = struct.Struct(">I")


class FrameError(Exception):
    pass


class FrameCodec:
    """Encoder for any Struct, decoder for one (usually tagged-union) type."""

    def __init__(self, decode_type: Any):
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(decode_type)
        self._buf = bytearray()

    def encode(self, msg: Any) -> bytes:
        body = self._enc.encode(msg)
        if len(body) > MAX_FRAME:
            raise FrameError(f"message of {len(body)} bytes exceeds the frame limit {MAX_FRAME}")
        return _LEN.pack(len(body)) + body

    def feed(self, data: bytes) -> list[Any]:
        """Add received bytes; return every complete message. Raises FrameError on garbage."""
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf)
            if n > MAX_FRAME:
                raise FrameError(f"frame of {n} bytes exceeds the limit {MAX_FRAME}")
            if len(self._buf) < 4 + n:
                break
            body = bytes(self._buf[4 : 4 + n])
            del self._buf[: 4 + n]
            try:
                out.append(self._dec.decode(body))
            except msgspec.DecodeError as e:
                raise FrameError(f"bad message: {e}") from None
        return out

    def wants(self) -> int:
        """Bytes still needed for the next frame (at least 1)."""
        if len(self._buf) < 4:
            return 4 - len(self._buf)
        (n,) = _LEN.unpack_from(self._buf)
        return max(1, 4 + n - len(self._buf))
