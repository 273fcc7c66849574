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
# A request on the control socket is a device name, two paths and a few numbers:
# the control server reads at most this much before it has a whole request.
MAX_REQUEST = 1 << 16

_LEN = struct.Struct(">I")


class FrameError(Exception):
    pass


class FrameCodec:
    """Encoder for any Struct, decoder for one (usually tagged-union) type."""

    def __init__(self, decode_type: Any, max_frame: int = MAX_FRAME):
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(decode_type)
        self._buf = bytearray()
        self.max_frame = max_frame  # checked on the length, before any of the body is kept

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
            if n > self.max_frame:
                raise FrameError(f"frame of {n} bytes exceeds the limit {self.max_frame}")
            if len(self._buf) < 4 + n:
                break
            body = bytes(self._buf[4 : 4 + n])
            del self._buf[: 4 + n]
            try:
                out.append(self._dec.decode(body))
            except msgspec.DecodeError as e:
                raise FrameError(f"bad message: {e}") from None
        return out

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held (0 between frames)."""
        return len(self._buf)

    def wants(self) -> int:
        """Bytes still needed for the next frame (at least 1)."""
        if len(self._buf) < 4:
            return 4 - len(self._buf)
        (n,) = _LEN.unpack_from(self._buf)
        return max(1, 4 + n - len(self._buf))
