"""A live fssd against hostile and old-fashioned clients, over raw Unix sockets.

After every abuse the worker must be the same process (no crash, no restart)
and the export must still serve a well-behaved client with the right data.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import threading
from pathlib import Path

import pytest
from fsshelp import Fssd
from test_nbd_protocol import info_data, meta_data, opt, req, write

from ipc import nbd

MiB = 1 << 20
SIZE = 64 * MiB


class Closed(Exception):
    """The server hung up."""


class Raw:
    """Just enough of an NBD client to say exactly the bytes a test wants."""

    def __init__(self, path: str):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(15)
        self.s.connect(path)
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
    c = Raw(fssd.sock(export))
    c.go(export, **kw)
    return c


def still_serves(fssd, pid: int, export: str = "data", kind: str = "volume", expect: tuple[int, bytes] | None = None) -> None:
    """The same worker process answers a new, well-behaved client correctly."""
    assert fssd.worker_pid(kind, export) == pid
    c = connect(fssd, export)
    try:
        if expect is not None:
            off, data = expect
            assert c.pread(9, off, len(data)) == data
        if kind == "volume":
            probe = os.urandom(4096)
            assert c.pwrite(10, SIZE - 4096, probe) == 0
            assert c.pread(11, SIZE - 4096, 4096) == probe
        else:
            c.pread(12, 0, 4096)
        c.send(req(nbd.CMD_DISC, 13))
        assert c.hung_up()
    finally:
        c.close()


# One fssd for the whole module (starting one costs seconds); each test keeps to its
# own part of the volume:
#   [0, 64K)        pattern written before fss0 was taken; never written again
#   8M, 12M, 16M, 20M, 24M   regions of single tests
#   40M             never written: reads as zeroes
#   SIZE-4096       still_serves' probe
SNAP = bytes(range(256)) * 256
ZEROES_AT = 40 * MiB


@pytest.fixture(scope="module")
def fssd(tmp_path_factory):
    shm = Path(tempfile.mkdtemp(prefix="fssd-test-nbdmal-", dir="/dev/shm"))
    f = Fssd(tmp_path_factory.mktemp("nbdmal") / "i0", [{"name": "data", "path": str(shm / "data.img"), "size": "64M"}])
    try:
        f.start()
        c = connect(f)
        assert c.pwrite(1, 0, SNAP) == 0
        c.close()
        f.fssconfig("fss0", "data", str(shm / "bs0"))
        yield f
    finally:
        try:
            f.stop()
        finally:
            f.kill_everything()
            shutil.rmtree(shm, ignore_errors=True)


@pytest.fixture
def vol_pid(fssd):
    return fssd.worker_pid("volume", "data")


@pytest.fixture
def snap():
    return SNAP


# -- garbage ----------------------------------------------------------------------------------


def test_http_request_instead_of_nbd(fssd, vol_pid):
    c = Raw(fssd.sock("data"))
    c.recv(18)
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # "GET " as client flags has unknown bits
    assert c.hung_up()
    still_serves(fssd, vol_pid)


def test_garbage_option_magic(fssd, vol_pid):
    c = Raw(fssd.sock("data"))
    c.hello()
    c.send(os.urandom(16) + b"\0" * 16)
    assert c.hung_up()
    still_serves(fssd, vol_pid)


def test_garbage_request_magic(fssd, vol_pid):
    c = connect(fssd)
    assert c.pread(1, ZEROES_AT, 512) == bytes(512)
    c.send(b"\xde\xad\xbe\xef" + bytes(24))
    assert c.hung_up()
    still_serves(fssd, vol_pid)


def test_unknown_option_then_go(fssd, vol_pid):
    c = Raw(fssd.sock("data"))
    c.hello()
    r = c.option(0x4242, b"IHAVEOPT looks like an option but is data")
    assert [t for t, _ in r] == [nbd.REP_ERR_UNSUP]
    assert [t for t, _ in c.option(nbd.OPT_STARTTLS)] == [nbd.REP_ERR_UNSUP]
    assert [t for t, _ in c.option(nbd.OPT_GO, info_data("nope"))] == [nbd.REP_ERR_UNKNOWN]
    assert [t for t, _ in c.option(nbd.OPT_LIST, b"x")] == [nbd.REP_ERR_INVALID]
    assert c.option(nbd.OPT_STRUCTURED_REPLY) == [(nbd.REP_ACK, b"")]
    c.structured = True
    r = c.option(nbd.OPT_GO, info_data("data"))
    assert r[-1][0] == nbd.REP_ACK
    assert c.pread(1, ZEROES_AT, 4096) == bytes(4096)
    c.close()
    still_serves(fssd, vol_pid)


def test_unknown_command_is_einval_and_the_next_request_is_served(fssd, vol_pid):
    c = connect(fssd)
    c.send(req(0x77, 1, 0, 512) + req(nbd.CMD_READ, 2, ZEROES_AT, 512))
    assert c.reply(1)[0] == nbd.EINVAL
    assert c.reply(2, read=True) == (0, bytes(512))
    c.close()
    still_serves(fssd, vol_pid)


def test_bad_flags_on_read_get_a_structured_error(fssd, vol_pid):
    # With structured replies even an early READ error must be a chunk, never a simple reply.
    c = connect(fssd)
    c.send(req(nbd.CMD_READ, 1, 0, 512, flags=nbd.CMD_FLAG_REQ_ONE))
    magic, flags, typ, cookie, n = struct.unpack(">IHHQI", c.recv(20))
    assert (magic, typ, cookie) == (nbd.STRUCTURED_REPLY_MAGIC, nbd.REPLY_TYPE_ERROR, 1)
    assert struct.unpack_from(">I", c.recv(n))[0] == nbd.EINVAL
    assert c.pread(2, 0, 512) == SNAP[:512]
    c.close()


def test_write_past_the_end_is_enospc_and_changes_nothing(fssd, vol_pid):
    c = connect(fssd)
    tail = os.urandom(4096)
    assert c.pwrite(1, SIZE - 4096, tail) == 0
    # Starts inside the volume, ends past it: nothing of it may land.
    assert c.pwrite(2, SIZE - 2048, b"\xff" * 4096) == nbd.ENOSPC
    assert c.pwrite(3, SIZE, b"\xff") == nbd.ENOSPC
    c.send(req(nbd.CMD_WRITE_ZEROES, 4, SIZE - 2048, 4096))
    assert c.reply(4)[0] == nbd.ENOSPC
    c.send(req(nbd.CMD_TRIM, 5, SIZE - 2048, 4096))
    assert c.reply(5)[0] == nbd.EINVAL
    c.send(req(nbd.CMD_READ, 6, SIZE - 2048, 4096))
    assert c.reply(6, read=True)[0] == nbd.EINVAL
    assert c.pread(7, SIZE - 4096, 4096) == tail
    c.close()
    assert os.path.getsize(fssd.volumes[0]["path"]) == SIZE  # the image did not grow
    still_serves(fssd, vol_pid)


def test_writes_to_a_snapshot_are_eperm_and_change_nothing(fssd, snap, vol_pid):
    snap_pid = fssd.worker_pid("snapshot", "fss0")
    c = connect(fssd, "fss0")
    assert c.pwrite(1, 0, b"\xee" * 4096) == nbd.EPERM
    assert c.pwrite(2, 0, b"\xee" * 4096, nbd.CMD_FLAG_FUA) == nbd.EPERM
    for cookie, cmd, flags in [(3, nbd.CMD_TRIM, 0), (4, nbd.CMD_WRITE_ZEROES, 0), (5, nbd.CMD_WRITE_ZEROES, nbd.CMD_FLAG_NO_HOLE)]:
        c.send(req(cmd, cookie, 0, 4096, flags))
        assert c.reply(cookie)[0] == nbd.EPERM
    assert c.pread(6, 0, len(snap)) == snap
    c.close()
    still_serves(fssd, snap_pid, "fss0", "snapshot", expect=(0, snap))
    still_serves(fssd, vol_pid, expect=(0, snap))


def test_oversized_lengths(fssd, vol_pid):
    c = connect(fssd)
    c.send(req(nbd.CMD_READ, 1, 0, 32 * MiB + 1))
    assert c.reply(1, read=True) == (nbd.EOVERFLOW, b"")
    # An oversized WRITE is refused after its payload is read, so the stream stays in sync.
    assert c.pwrite(2, 24 * MiB, b"\xaa" * (32 * MiB + 1)) == nbd.EINVAL
    assert c.pread(3, 24 * MiB, 4096) == bytes(4096)  # and nothing of it landed
    assert c.pread(4, 0, 32 * MiB)[: len(SNAP)] == SNAP  # the maximum itself works
    c.close()
    plain = connect(fssd, structured=False)
    plain.send(req(nbd.CMD_READ, 5, 0, 32 * MiB + 1))
    assert plain.reply(5, 32 * MiB + 1, read=True) == (nbd.EINVAL, b"")  # no payload after a simple error
    assert plain.pread(6, 0, 512) == SNAP[:512]
    plain.close()
    still_serves(fssd, vol_pid)


# -- clients that vanish -------------------------------------------------------------------------


def test_client_vanishes_mid_write_payload(fssd, vol_pid):
    c = connect(fssd)
    before = os.urandom(MiB)
    assert c.pwrite(1, 8 * MiB, before) == 0
    c.send(req(nbd.CMD_WRITE, 2, 8 * MiB, MiB) + b"\x55" * (MiB // 2))  # half the payload, then gone
    c.close()
    still_serves(fssd, vol_pid, expect=(8 * MiB, before))


@pytest.mark.parametrize(
    "sent",
    [
        b"",  # only read the greeting
        b"\0\0",  # half the client flags
        struct.pack(">I", 3) + opt(nbd.OPT_GO, info_data("data"))[:10],  # half an option header
        struct.pack(">I", 3) + opt(nbd.OPT_GO, info_data("data"))[:-3],  # option data cut short
        struct.pack(">I", 3) + opt(nbd.OPT_LIST),  # gone before reading the replies
    ],
    ids=["greeting", "flags", "option-header", "option-data", "unread-replies"],
)
def test_client_vanishes_mid_handshake(fssd, vol_pid, sent):
    c = Raw(fssd.sock("data"))
    c.recv(18)
    c.send(sent)
    c.close()
    still_serves(fssd, vol_pid)


@pytest.mark.parametrize("export", ["data", "fss0"])  # sendfile path and pread path
def test_client_vanishes_mid_read_reply(fssd, snap, vol_pid, export):
    kind = "volume" if export == "data" else "snapshot"
    pid = fssd.worker_pid(kind, export)
    for structured in (True, False):
        c = connect(fssd, export, structured=structured)
        c.send(req(nbd.CMD_READ, 1, 0, 32 * MiB) + req(nbd.CMD_READ, 2, 0, 32 * MiB))
        c.recv(4096)
        c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    still_serves(fssd, pid, export, kind, expect=(0, snap))


# -- old-fashioned clients -------------------------------------------------------------------------


def test_legacy_export_name_client_with_simple_replies(fssd, vol_pid):
    c = Raw(fssd.sock("data"))
    c.hello(flags=1)  # fixed newstyle, but no NO_ZEROES
    c.send(opt(nbd.OPT_EXPORT_NAME, b"data"))
    size, flags = struct.unpack(">QH", c.recv(10))
    assert size == SIZE
    assert flags & nbd.TF_HAS_FLAGS and not flags & nbd.TF_READ_ONLY
    assert not flags & nbd.TF_SEND_DF  # no structured replies were negotiated
    assert c.recv(124) == bytes(124)
    data = os.urandom(3 * 4096 + 17)
    off = 12 * MiB + 12345
    assert c.pwrite(1, off, data) == 0
    assert c.pread(2, off, len(data)) == data
    c.send(req(nbd.CMD_FLUSH, 3))
    assert c.reply(3) == (0, b"")
    c.send(req(nbd.CMD_DISC, 4))
    assert c.hung_up()
    still_serves(fssd, vol_pid, expect=(off, data))


def test_kernel_style_client(fssd, vol_pid):
    # What nbd-client hands the kernel: GO with no info requests, no structured replies.
    c = Raw(fssd.sock("data"))
    size, flags = c.go("data", structured=False)
    assert size == SIZE
    want = nbd.TF_HAS_FLAGS | nbd.TF_SEND_FLUSH | nbd.TF_SEND_FUA | nbd.TF_SEND_TRIM
    assert flags & want == want and not flags & nbd.TF_SEND_DF
    data = os.urandom(128 * 1024)
    a, b = 16 * MiB, 17 * MiB
    # Pipelined as the kernel does: several requests before the first reply.
    c.send(write(1, a, data, nbd.CMD_FLAG_FUA) + write(2, b, data) + req(nbd.CMD_FLUSH, 3))
    assert [c.reply(i) for i in (1, 2, 3)] == [(0, b"")] * 3
    c.send(req(nbd.CMD_READ, 4, a, len(data)) + req(nbd.CMD_READ, 5, b, 4096))
    assert c.reply(4, len(data)) == (0, data)
    assert c.reply(5, 4096) == (0, data[:4096])
    c.send(req(nbd.CMD_TRIM, 6, b, len(data)))
    assert c.reply(6) == (0, b"")
    c.send(req(nbd.CMD_DISC, 7))
    assert c.hung_up()
    still_serves(fssd, vol_pid, expect=(a, data))


def test_many_pipelined_requests_all_answered(fssd, vol_pid):
    c = connect(fssd)
    batch, want = b"", {}
    base = 20 * MiB
    for i in range(1, 401):
        if i % 2:
            batch += write(i, base + i * 4096, bytes([i % 256]) * 4096)
        else:
            batch += req(nbd.CMD_READ, i, base + (i - 1) * 4096, 4096)
            want[i] = bytes([(i - 1) % 256]) * 4096
    # Send from a thread while reading replies, as a real client does (else both sides block).
    sender = threading.Thread(target=c.send, args=(batch,))
    sender.start()
    for i in range(1, 401):  # this server answers in order; a reordering one would need a cookie map
        err, data = c.reply(i, read=i in want)
        assert err == 0
        if i in want:
            assert data == want[i]
    sender.join()
    c.close()
    still_serves(fssd, vol_pid)


# -- known bugs (they fail until fixed) ------------------------------------------------------------


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_pipelined_large_reads_do_not_pile_up(fssd, snap):
    """Replies to pipelined READs must not all wait in memory for the end of the batch.

    A snapshot export (no sendfile) once held every 32 MiB reply of a batch at
    once, so a client that pipelines could push the worker's memory without
    bound. Large replies now leave as soon as they are read: the peak stays
    near one reply.
    """
    pid = fssd.worker_pid("snapshot", "fss0")
    c = connect(fssd, "fss0")
    c.pread(1, 0, 32 * MiB)  # one read alone: the baseline includes one reply's buffers
    base = _peak_rss(pid)
    n = 12
    c.send(b"".join(req(nbd.CMD_READ, 10 + i, (i % 2) * 32 * MiB, 32 * MiB) for i in range(n)))
    for i in range(n):
        err, data = c.reply(10 + i, read=True)
        assert err == 0 and len(data) == 32 * MiB
    c.close()
    grown = _peak_rss(pid) - base
    assert grown < 128 * MiB, f"snapshot worker peak memory grew by {grown // MiB} MiB for {n} pipelined 32 MiB reads"


def test_live_large_read_is_a_data_chunk_then_a_none_chunk(fssd, vol_pid):
    # The volume's large reads leave with sendfile: the data chunk is not flagged DONE
    # (the file could still fail), a NONE chunk flagged DONE ends the reply.
    c = connect(fssd)
    try:
        c.send(req(nbd.CMD_READ, 3, 0, 256 * 1024))
        magic, flags, typ, cookie, length, offset = struct.unpack(">IHHQIQ", c.recv(28))
        assert (magic, flags, typ, cookie, length, offset) == (nbd.STRUCTURED_REPLY_MAGIC, 0, nbd.REPLY_TYPE_OFFSET_DATA, 3, 8 + 256 * 1024, 0)
        assert c.recv(256 * 1024)[: len(SNAP)] == SNAP
        assert struct.unpack(">IHHQI", c.recv(20)) == (nbd.STRUCTURED_REPLY_MAGIC, nbd.REPLY_FLAG_DONE, nbd.REPLY_TYPE_NONE, 3, 0)
    finally:
        c.close()
    still_serves(fssd, vol_pid)


# == a failing sendfile read, against the serving loop with a backend that fails ==========


class ShortFileBackend:
    """A 1 MiB export whose large reads name a file that holds only its first 256 KiB:
    sendfile() runs dry mid-reply, as a volume whose disk fails mid-read would."""

    size = MiB
    read_only = True

    def __init__(self, path: Path, fail_before: bool = False):
        path.write_bytes(SNAP * 4)  # 256 KiB
        self.fd = os.open(path, os.O_RDONLY)
        self.fail_before = fail_before

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def sendfile_source(self, offset: int, length: int):
        if self.fail_before:
            raise OSError(5, "Input/output error")
        return self.fd, offset


@pytest.fixture
def local_server(tmp_path):
    from workers.nbdserve import Server

    made = []

    def start(backend) -> str:
        path = str(tmp_path / "x.sock")
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lst.bind(path)
        lst.listen(8)
        srv = Server(lst, nbd.Export("x", backend.size, True), backend)
        t = threading.Thread(target=srv.serve_forever, daemon=True)
        t.start()
        made.append((srv, t, lst, backend))
        return path

    yield start
    for srv, t, lst, backend in made:
        srv.stop()
        t.join(10)
        lst.close()
        os.close(backend.fd)


def test_sendfile_failure_mid_read_is_an_error_chunk_and_the_connection_lives(local_server, tmp_path):
    c = Raw(local_server(ShortFileBackend(tmp_path / "short")))
    try:
        c.go("x")
        n = 512 * 1024
        c.send(req(nbd.CMD_READ, 5, 0, n))
        # The data chunk is not flagged DONE: its header left before the file failed.
        flags, typ, cookie, length = struct.unpack(">IHHQI", c.recv(20))[1:]
        assert (flags, typ, cookie, length) == (0, nbd.REPLY_TYPE_OFFSET_DATA, 5, 8 + n)
        body = c.recv(length)
        assert body[8 : 8 + 4 * len(SNAP)] == SNAP * 4  # what the file had, then padding
        magic, flags, typ, cookie, length = struct.unpack(">IHHQI", c.recv(20))
        assert (magic, flags, typ, cookie) == (nbd.STRUCTURED_REPLY_MAGIC, nbd.REPLY_FLAG_DONE, nbd.REPLY_TYPE_ERROR, 5)
        err, _ = struct.unpack(">IH", c.recv(length)[:6])
        assert err == nbd.EIO
        # The stream is still in step: a read that fits the file succeeds, ended by a NONE chunk.
        c.send(req(nbd.CMD_READ, 6, 0, 32 * 1024))
        assert c.reply(6, read=True) == (0, bytes(32 * 1024))
    finally:
        c.close()


def test_sendfile_read_success_ends_with_a_none_chunk(local_server, tmp_path):
    c = Raw(local_server(ShortFileBackend(tmp_path / "short")))
    try:
        c.go("x")
        c.send(req(nbd.CMD_READ, 7, 0, 4 * len(SNAP)))
        head = struct.unpack(">IHHQIQ", c.recv(28))
        assert head == (nbd.STRUCTURED_REPLY_MAGIC, 0, nbd.REPLY_TYPE_OFFSET_DATA, 7, 8 + 4 * len(SNAP), 0)
        assert c.recv(4 * len(SNAP)) == SNAP * 4
        assert struct.unpack(">IHHQI", c.recv(20)) == (nbd.STRUCTURED_REPLY_MAGIC, nbd.REPLY_FLAG_DONE, nbd.REPLY_TYPE_NONE, 7, 0)
    finally:
        c.close()


def test_sendfile_failure_with_simple_replies_drops_the_connection(local_server, tmp_path):
    c = Raw(local_server(ShortFileBackend(tmp_path / "short")))
    try:
        c.go("x", structured=False)
        n = 512 * 1024
        c.send(req(nbd.CMD_READ, 5, 0, n))
        assert struct.unpack(">IIQ", c.recv(16)) == (nbd.SIMPLE_REPLY_MAGIC, 0, 5)
        # Simple replies cannot say "failed" after the header: the server must hang up
        # rather than pass the short data off as the export's.
        with pytest.raises(Closed):
            c.recv(n)
    finally:
        c.close()


def test_sendfile_source_failure_before_sending_is_an_error_reply(local_server, tmp_path):
    c = Raw(local_server(ShortFileBackend(tmp_path / "short", fail_before=True)))
    try:
        c.go("x")
        c.send(req(nbd.CMD_READ, 8, 0, 256 * 1024))
        err, _ = c.reply(8, read=True)
        assert err == nbd.EIO
        c.send(req(nbd.CMD_READ, 9, 0, 4096))
        assert c.reply(9, read=True) == (0, bytes(4096))
    finally:
        c.close()
