"""NBD on the wire for tests: the bytes a client sends, and a raw client over a Unix socket.

Real clients (nbdinfo, nbdcopy, qemu-io, nbdfuse) test what fssd serves; this one exists
to say exactly the bytes a test wants, malformed ones included, and to read the replies
byte for byte. The builders are pure (bytes out); only `Raw` does I/O.
"""

from __future__ import annotations

import socket
import struct

from ipc import nbd

# -- what a client sends ----------------------------------------------------------------


def opt(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", nbd.IHAVEOPT, code, len(data)) + data


def info_data(name: str, *infos: int) -> bytes:
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)


def meta_data(name: str, *queries: str) -> bytes:
    n = name.encode()
    out = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def req(cmd: int, cookie: int = 1, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


def write(cookie: int, offset: int, data: bytes, flags: int = 0) -> bytes:
    return req(nbd.CMD_WRITE, cookie, offset, len(data), flags, data)


# -- a raw client ---------------------------------------------------------------------------


class Closed(Exception):
    """The server hung up."""


class Raw:
    """Just enough of an NBD client to say exactly the bytes a test wants."""

    def __init__(self, path: str | None = None, sock: socket.socket | None = None, timeout: float = 15):
        """Connect to the Unix socket `path`, or wrap an already connected `sock`."""
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(path)
        else:
            sock.settimeout(timeout)
        self.s = sock
        self.structured = False

    def close(self) -> None:
        self.s.close()

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                got = self.s.recv(min(n - len(buf), 1 << 20))
            except ConnectionResetError:
                got = b""
            if not got:
                raise Closed(f"server closed after {len(buf)} of {n} bytes")
            buf += got
        return bytes(buf)

    def hung_up(self) -> bool:
        """True once the server closes (reads until EOF; a timeout fails the test)."""
        try:
            while True:
                if not self.s.recv(65536):
                    return True
        except ConnectionResetError:
            return True

    def hello(self, flags: int = 3) -> None:
        magic, ihaveopt, hflags = struct.unpack(">QQH", self.recv(18))
        assert (magic, ihaveopt, hflags) == (nbd.NBDMAGIC, nbd.IHAVEOPT, 3)
        self.send(struct.pack(">I", flags))

    def option(self, code: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send one option, read replies up to the final one: [(type, payload)]."""
        self.send(opt(code, data))
        out = []
        while True:
            magic, o, typ, n = struct.unpack(">QIII", self.recv(20))
            assert magic == nbd.OPT_REPLY_MAGIC and o == code
            out.append((typ, self.recv(n)))
            if typ == nbd.REP_ACK or typ & 0x80000000:
                return out

    def go(self, export: str, structured: bool = True, meta: bool = False, infos=()) -> tuple[int, int]:
        self.hello()
        if structured:
            assert self.option(nbd.OPT_STRUCTURED_REPLY) == [(nbd.REP_ACK, b"")]
            self.structured = True
        if meta:
            r = self.option(nbd.OPT_SET_META_CONTEXT, meta_data(export, nbd.BASE_ALLOCATION))
            assert r[-1][0] == nbd.REP_ACK and len(r) == 2
        r = self.option(nbd.OPT_GO, info_data(export, *infos))
        assert r[-1][0] == nbd.REP_ACK, r
        typ, size, flags = struct.unpack(">HQH", r[0][1])
        return size, flags

    def reply(self, cookie: int, length: int = 0, read: bool = False) -> tuple[int, bytes]:
        """(errno, data) of one reply; `length` = bytes a successful simple READ carries.

        With structured replies a READ must be answered in chunks; other commands may
        get a simple reply (the spec allows it when there is no payload)."""
        if not self.structured:
            magic, err, c = struct.unpack(">IIQ", self.recv(16))
            assert magic == nbd.SIMPLE_REPLY_MAGIC and c == cookie, (hex(magic), c)
            return err, (self.recv(length) if length and not err else b"")
        err, data = 0, bytearray()
        while True:
            (magic,) = struct.unpack(">I", self.recv(4))
            if magic == nbd.SIMPLE_REPLY_MAGIC and not data and not read:
                err, c = struct.unpack(">IQ", self.recv(12))
                assert c == cookie, (c, cookie)
                return err, b""
            flags, typ, c, n = struct.unpack(">HHQI", self.recv(16))
            assert magic == nbd.STRUCTURED_REPLY_MAGIC and c == cookie, (hex(magic), c, cookie)
            payload = self.recv(n)
            if typ == nbd.REPLY_TYPE_OFFSET_DATA:
                data += payload[8:]
            elif typ & 0x8000:
                err, mlen = struct.unpack_from(">IH", payload)
                assert err and 6 + mlen <= n
            elif typ == nbd.REPLY_TYPE_BLOCK_STATUS:
                data += payload
            if flags & nbd.REPLY_FLAG_DONE:
                return err, bytes(data)

    # transmission helpers: one request, its reply
    def pread(self, cookie: int, offset: int, length: int) -> bytes:
        self.send(req(nbd.CMD_READ, cookie, offset, length))
        err, data = self.reply(cookie, length, read=True)
        assert err == 0, f"READ {offset}+{length}: errno {err}"
        assert len(data) == length
        return data

    def pwrite(self, cookie: int, offset: int, data: bytes, flags: int = 0) -> int:
        self.send(write(cookie, offset, data, flags))
        return self.reply(cookie)[0]


def connect(fssd, export: str = "data", **kw) -> Raw:
    """A raw client past the handshake on one of fssd's exports (structured replies by default)."""
    c = Raw(fssd.sock(export))
    c.go(export, **kw)
    return c
