"""Linux's Hyper-V VSS channel (/dev/vmbus/hv_vss), sans-IO: bytes in, events out.

Facts from include/uapi/linux/hyperv.h and tools/hv/hv_vss_daemon.c
(docs/architecture.md, VSS sequence): every message is the 12-byte packed `hv_vss_msg`,
an 8-byte header (u8 operation, 7 reserved) whose first 4 bytes double as the
`int error` of a reply, then a u32 of flags. The daemon registers by writing
a message with operation VSS_OP_REGISTER1; the kernel answers with a 4-byte
u32 (its version, = VSS_OP_REGISTER1). Then the kernel hands over FREEZE,
THAW and HOT_BACKUP (the capability check) one at a time, and the daemon
answers by writing the same 12 bytes back with `error` set to HV_S_OK or
HV_E_FAIL. A read from the char device returns whole messages; a stream
socket standing in for it may split or join them, so input is buffered.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

VSS_OP_CREATE = 0
VSS_OP_DELETE = 1
VSS_OP_HOT_BACKUP = 2
VSS_OP_GET_DM_INFO = 3
VSS_OP_BU_COMPLETE = 4
VSS_OP_FREEZE = 5
VSS_OP_THAW = 6
VSS_OP_AUTO_RECOVER = 7
VSS_OP_REGISTER = 128
VSS_OP_REGISTER1 = 129

HV_S_OK = 0x00000000
HV_E_FAIL = 0x80004005

MSG_SIZE = 12
VERSION_SIZE = 4

_MSG = struct.Struct("<B7sI")  # operation, reserved[7], flags (vss_cf / dm_info)
_ERROR = struct.Struct("<I")  # error overlays the first 4 header bytes (little-endian x86/arm64)

# Host operations the broker serves, as its own requests (FreeBSD's mapping).
OP_TO_REQUEST = {VSS_OP_HOT_BACKUP: "check", VSS_OP_FREEZE: "freeze", VSS_OP_THAW: "thaw"}
OP_NAMES = {
    VSS_OP_CREATE: "CREATE", VSS_OP_DELETE: "DELETE", VSS_OP_HOT_BACKUP: "HOT_BACKUP",
    VSS_OP_GET_DM_INFO: "GET_DM_INFO", VSS_OP_BU_COMPLETE: "BU_COMPLETE", VSS_OP_FREEZE: "FREEZE",
    VSS_OP_THAW: "THAW", VSS_OP_AUTO_RECOVER: "AUTO_RECOVER",
}


class HvProtocolError(ValueError):
    pass


@dataclass(frozen=True)
class Registered:
    """The kernel accepted the handshake; version is what it reported."""

    version: int


@dataclass(frozen=True)
class HostRequest:
    operation: int
    flags: int
    raw: bytes  # the 12 bytes, echoed back in the answer

    @property
    def op(self) -> str | None:
        """check, freeze, thaw; None for operations answered HV_S_OK without a phase."""
        return OP_TO_REQUEST.get(self.operation)

    @property
    def name(self) -> str:
        return OP_NAMES.get(self.operation, f"op {self.operation}")


def register_message() -> bytes:
    return _MSG.pack(VSS_OP_REGISTER1, bytes(7), 0)


def answer(req: HostRequest, ok: bool) -> bytes:
    """The daemon's reply: the request's bytes with `error` written over the header."""
    return _ERROR.pack(HV_S_OK if ok else HV_E_FAIL) + req.raw[4:]


def request_message(operation: int, flags: int = 0) -> bytes:
    """What the kernel sends (used by stand-ins in tests and benchmarks)."""
    return _MSG.pack(operation, bytes(7), flags)


def parse_answer(data: bytes) -> int:
    """The `error` of a daemon's 12-byte answer (for stand-ins)."""
    if len(data) != MSG_SIZE:
        raise HvProtocolError(f"answer of {len(data)} bytes, expected {MSG_SIZE}")
    return _ERROR.unpack_from(data)[0]


class DaemonConnection:
    """The daemon's side of the channel: handshake first, then host requests."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.registered = False

    def start(self) -> bytes:
        """Bytes to write first: the REGISTER1 handshake."""
        return register_message()

    def receive_data(self, data: bytes) -> list[Registered | HostRequest]:
        self._buf += data
        events: list[Registered | HostRequest] = []
        if not self.registered:
            if len(self._buf) < VERSION_SIZE:
                return events
            (version,) = _ERROR.unpack_from(self._buf)
            del self._buf[:VERSION_SIZE]
            if version != VSS_OP_REGISTER1:
                raise HvProtocolError(f"invalid version negotiation: kernel answered {version}")
            self.registered = True
            events.append(Registered(version))
        while len(self._buf) >= MSG_SIZE:
            raw = bytes(self._buf[:MSG_SIZE])
            del self._buf[:MSG_SIZE]
            operation, _reserved, flags = _MSG.unpack(raw)
            events.append(HostRequest(operation, flags, raw))
        return events
