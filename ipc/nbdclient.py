"""The client half of an NBD handshake, sans-IO: what the TCP front replays to an export's worker.

The front negotiates with the remote client itself (TLS, authorization) and,
when the client asks INFO or GO for an export, opens that export's Unix socket
and repeats the client's choices there: structured replies, the meta context
it selected, then the same INFO/GO with the same information requests. The
worker's INFO/GO replies go back to the client byte for byte (with the
read-only bit forced for snapshots), so what the client learns is what the
worker serves.

    hs = ClientHandshake("fss0", nbd.OPT_GO, (3,), structured=True, meta=["base:allocation"])
    hs.receive_data(sock.recv(...)); sock.sendall(hs.data_to_send()) ... until hs.result
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from ipc import nbd

_GREETING = struct.Struct(">QQH")
_REPLY = struct.Struct(">QIII")  # magic, option, type, length
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_INFO_EXPORT = struct.Struct(">HQH")

# Flags a read-only export must not advertise.
_WRITE_FLAGS = nbd.TF_SEND_FUA | nbd.TF_SEND_TRIM | nbd.TF_SEND_WRITE_ZEROES | nbd.TF_SEND_FAST_ZERO
# Everything the worker may say before the INFO/GO answer ends: a handful of replies.
MAX_REPLIES_BYTES = 256 * 1024


class Result(NamedTuple):
    ok: bool  # the worker ACKed INFO/GO
    replies: bytes  # the INFO/GO replies to forward to the client (error replies included)
    size: int
    flags: int  # transmission flags as forwarded
    meta_ids: dict[str, int]  # meta context name -> the worker's id


class HandshakeFailed(Exception):
    """The worker's side of the handshake went wrong (a bug or a dying worker, not the client)."""


def _option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", nbd.IHAVEOPT, opt, len(data)) + data


def _name(name: str) -> bytes:
    raw = name.encode()
    return _U32.pack(len(raw)) + raw


def _take_greeting(buf: bytearray) -> int | None:
    """The server's handshake flags once its whole greeting is in `buf` (then removed), else None."""
    if len(buf) < _GREETING.size:
        return None
    magic, ihaveopt, flags = _GREETING.unpack_from(buf)
    if magic != nbd.NBDMAGIC or ihaveopt != nbd.IHAVEOPT or not flags & nbd.FLAG_FIXED_NEWSTYLE:
        raise HandshakeFailed("the worker did not greet with fixed newstyle")
    del buf[: _GREETING.size]
    return flags


class ClientHandshake:
    def __init__(self, export: str, opt: int, info: tuple[int, ...], structured: bool, meta: list[str], read_only: bool):
        if opt not in (nbd.OPT_INFO, nbd.OPT_GO):
            raise ValueError("only INFO and GO are replayed")
        self.export = export
        self.opt = opt
        self.info = info
        self.structured = structured
        self.meta = meta
        self.read_only = read_only
        self.result: Result | None = None
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._greeted = False
        # The options sent, in order; their replies arrive in that order.
        self._expect: list[int] = []
        self._replies: list[bytes] = []
        self._size = 0
        self._flags = 0
        self._meta_ids: dict[str, int] = {}

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        if self.result is not None:
            raise HandshakeFailed("data after the handshake's end")
        self._buf += data
        if len(self._buf) > MAX_REPLIES_BYTES + 20:
            raise HandshakeFailed("the worker's handshake replies are too long")
        if not self._greeted:
            flags = _take_greeting(self._buf)
            if flags is None:
                return
            self._greeted = True
            self._send_options(flags & nbd.FLAG_NO_ZEROES)
        self._parse_replies()

    def _send_options(self, no_zeroes: int) -> None:
        self._out.append(_U32.pack(nbd.FLAG_FIXED_NEWSTYLE | no_zeroes))
        if self.structured:
            self._out.append(_option(nbd.OPT_STRUCTURED_REPLY))
            self._expect.append(nbd.OPT_STRUCTURED_REPLY)
        if self.meta:
            queries = b"".join(_name(q) for q in self.meta)
            self._out.append(_option(nbd.OPT_SET_META_CONTEXT, _name(self.export) + _U32.pack(len(self.meta)) + queries))
            self._expect.append(nbd.OPT_SET_META_CONTEXT)
        data = _name(self.export) + _U16.pack(len(self.info)) + b"".join(_U16.pack(i) for i in self.info)
        self._out.append(_option(self.opt, data))
        self._expect.append(self.opt)

    def _parse_replies(self) -> None:
        while self.result is None and len(self._buf) >= _REPLY.size:
            magic, opt, rep, length = _REPLY.unpack_from(self._buf)
            if magic != nbd.OPT_REPLY_MAGIC:
                raise HandshakeFailed(f"bad option reply magic {magic:#x}")
            if not self._expect or opt != self._expect[0]:
                raise HandshakeFailed(f"reply to option {opt} where {self._expect[:1]} was expected")
            if length > nbd.MAX_OPTION:
                raise HandshakeFailed(f"option reply of {length} bytes")
            if len(self._buf) < _REPLY.size + length:
                return
            raw = bytes(self._buf[: _REPLY.size + length])
            payload = raw[_REPLY.size :]
            del self._buf[: _REPLY.size + length]
            self._reply(opt, rep, payload, raw)

    def _reply(self, opt: int, rep: int, payload: bytes, raw: bytes) -> None:
        if opt == nbd.OPT_STRUCTURED_REPLY:
            if rep != nbd.REP_ACK:
                raise HandshakeFailed(f"the worker refused structured replies ({rep:#x})")
            self._expect.pop(0)
        elif opt == nbd.OPT_SET_META_CONTEXT:
            if rep == nbd.REP_META_CONTEXT and len(payload) >= 4:
                (ctx_id,) = _U32.unpack_from(payload)
                self._meta_ids[payload[4:].decode(errors="replace")] = ctx_id
            elif rep == nbd.REP_ACK:
                self._expect.pop(0)
            else:
                raise HandshakeFailed(f"the worker refused the meta context ({rep:#x})")
        else:
            if rep == nbd.REP_INFO and len(payload) >= 2 and _U16.unpack_from(payload)[0] == nbd.INFO_EXPORT:
                if len(payload) != _INFO_EXPORT.size:
                    raise HandshakeFailed("malformed NBD_INFO_EXPORT from the worker")
                _t, self._size, flags = _INFO_EXPORT.unpack(payload)
                if self.read_only:
                    flags = (flags | nbd.TF_READ_ONLY) & ~_WRITE_FLAGS
                self._flags = flags
                raw = raw[: _REPLY.size] + _INFO_EXPORT.pack(nbd.INFO_EXPORT, self._size, flags)
            self._replies.append(raw)
            if rep == nbd.REP_ACK or rep & 0x80000000:
                self._expect.pop(0)
                self.result = Result(rep == nbd.REP_ACK, b"".join(self._replies), self._size, self._flags, dict(self._meta_ids))

    def abort(self) -> bytes:
        """NBD_OPT_ABORT, to end an INFO-only connection politely."""
        return _option(nbd.OPT_ABORT)


class ContextList:
    """Asks an export's worker which meta contexts match `query` (NBD_OPT_LIST_META_CONTEXT
    after structured replies), then (abort=True) says NBD_OPT_ABORT: how the TCP front learns
    which qemu:dirty-bitmap contexts a snapshot offers, to offer the same ones. With
    abort=False the connection stays in the option phase for the caller to close later.

        cl = ContextList("fss1", "qemu:dirty-bitmap:")
        cl.receive_data(sock.recv(...)); sock.sendall(cl.data_to_send()) ... until cl.result is not None
    """

    def __init__(self, export: str, query: str, abort: bool = True):
        self.export = export
        self.query = query
        self.abort = abort
        self.result: list[str] | None = None
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._greeted = False
        self._names: list[str] = []
        self._structured = False

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        if self.result is not None:
            return  # the ABORT's ACK, or nothing: the caller closes
        self._buf += data
        if len(self._buf) > MAX_REPLIES_BYTES + 20:
            raise HandshakeFailed("the worker's meta context list is too long")
        if not self._greeted:
            flags = _take_greeting(self._buf)
            if flags is None:
                return
            self._greeted = True
            self._out.append(_U32.pack(nbd.FLAG_FIXED_NEWSTYLE | (flags & nbd.FLAG_NO_ZEROES)))
            self._out.append(_option(nbd.OPT_STRUCTURED_REPLY))
            self._out.append(_option(nbd.OPT_LIST_META_CONTEXT, _name(self.export) + _U32.pack(1) + _name(self.query)))
            if self.abort:
                self._out.append(_option(nbd.OPT_ABORT))
        while self.result is None and len(self._buf) >= _REPLY.size:
            magic, opt, rep, length = _REPLY.unpack_from(self._buf)
            if magic != nbd.OPT_REPLY_MAGIC or length > nbd.MAX_OPTION:
                raise HandshakeFailed("malformed option reply from the worker")
            if len(self._buf) < _REPLY.size + length:
                return
            payload = bytes(self._buf[_REPLY.size : _REPLY.size + length])
            del self._buf[: _REPLY.size + length]
            if opt == nbd.OPT_STRUCTURED_REPLY and not self._structured:
                if rep != nbd.REP_ACK:
                    raise HandshakeFailed(f"the worker refused structured replies ({rep:#x})")
                self._structured = True
            elif opt == nbd.OPT_LIST_META_CONTEXT and self._structured:
                if rep == nbd.REP_META_CONTEXT and len(payload) > 4:
                    self._names.append(payload[4:].decode(errors="replace"))
                elif rep == nbd.REP_ACK:
                    self.result = self._names
                else:
                    raise HandshakeFailed(f"the worker refused to list meta contexts ({rep:#x})")
            else:
                raise HandshakeFailed(f"unexpected reply to option {opt}")
