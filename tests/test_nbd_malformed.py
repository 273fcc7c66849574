"""A live fssd against hostile and old-fashioned clients, over raw Unix sockets.

After every abuse the worker must be the same process (no crash, no restart)
and the export must still serve a well-behaved client with the right data.
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import threading
from pathlib import Path

import pytest
from fsshelp import Fssd, running
from nbdwire import Closed, Raw, connect, info_data, opt, req, write

from ipc import nbd

MiB = 1 << 20
SIZE = 64 * MiB


def still_serves(module_fssd, pid: int, export: str = "data", kind: str = "volume", expect: tuple[int, bytes] | None = None) -> None:
    """The same worker process answers a new, well-behaved client correctly."""
    assert module_fssd.worker_pid(kind, export) == pid
    c = connect(module_fssd, export)
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


# One fssd for the whole module (starting one costs seconds; named apart from conftest's
# per-test `fssd`), each test keeping to its own part of the volume:
#   [0, 64K)        pattern written before fss0 was taken; never written again
#   8M, 12M, 16M, 20M, 24M   regions of single tests
#   40M             never written: reads as zeroes
#   SIZE-4096       still_serves' probe
SNAP = bytes(range(256)) * 256
ZEROES_AT = 40 * MiB


@pytest.fixture(scope="module")
def module_fssd(tmp_path_factory):
    shm = Path(tempfile.mkdtemp(prefix="fssd-test-nbdmal-", dir="/dev/shm"))
    f = Fssd(tmp_path_factory.mktemp("nbdmal") / "i0", [{"name": "data", "path": str(shm / "data.img"), "size": "64M"}])
    with running(f, shm):
        c = connect(f)
        assert c.pwrite(1, 0, SNAP) == 0
        c.close()
        f.fssconfig("fss0", "data", str(shm / "bs0"))
        yield f


@pytest.fixture
def vol_pid(module_fssd):
    return module_fssd.worker_pid("volume", "data")


@pytest.fixture
def snap():
    return SNAP


# -- garbage ----------------------------------------------------------------------------------


def test_http_request_instead_of_nbd(module_fssd, vol_pid):
    c = Raw(module_fssd.sock("data"))
    c.recv(18)
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # "GET " as client flags has unknown bits
    assert c.hung_up()
    still_serves(module_fssd, vol_pid)


def test_garbage_option_magic(module_fssd, vol_pid):
    c = Raw(module_fssd.sock("data"))
    c.hello()
    c.send(os.urandom(16) + b"\0" * 16)
    assert c.hung_up()
    still_serves(module_fssd, vol_pid)


def test_garbage_request_magic(module_fssd, vol_pid):
    c = connect(module_fssd)
    assert c.pread(1, ZEROES_AT, 512) == bytes(512)
    c.send(b"\xde\xad\xbe\xef" + bytes(24))
    assert c.hung_up()
    still_serves(module_fssd, vol_pid)


def test_unknown_option_then_go(module_fssd, vol_pid):
    c = Raw(module_fssd.sock("data"))
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
    still_serves(module_fssd, vol_pid)


def test_unknown_command_is_einval_and_the_next_request_is_served(module_fssd, vol_pid):
    c = connect(module_fssd)
    c.send(req(0x77, 1, 0, 512) + req(nbd.CMD_READ, 2, ZEROES_AT, 512))
    assert c.reply(1)[0] == nbd.EINVAL
    assert c.reply(2, read=True) == (0, bytes(512))
    c.close()
    still_serves(module_fssd, vol_pid)


def test_bad_flags_on_read_get_a_structured_error(module_fssd, vol_pid):
    # With structured replies even an early READ error must be a chunk, never a simple reply.
    c = connect(module_fssd)
    c.send(req(nbd.CMD_READ, 1, 0, 512, flags=nbd.CMD_FLAG_REQ_ONE))
    magic, flags, typ, cookie, n = struct.unpack(">IHHQI", c.recv(20))
    assert (magic, typ, cookie) == (nbd.STRUCTURED_REPLY_MAGIC, nbd.REPLY_TYPE_ERROR, 1)
    assert struct.unpack_from(">I", c.recv(n))[0] == nbd.EINVAL
    assert c.pread(2, 0, 512) == SNAP[:512]
    c.close()


def test_write_past_the_end_is_enospc_and_changes_nothing(module_fssd, vol_pid):
    c = connect(module_fssd)
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
    assert os.path.getsize(module_fssd.volumes[0]["path"]) == SIZE  # the image did not grow
    still_serves(module_fssd, vol_pid)


def test_writes_to_a_snapshot_are_eperm_and_change_nothing(module_fssd, snap, vol_pid):
    snap_pid = module_fssd.worker_pid("snapshot", "fss0")
    c = connect(module_fssd, "fss0")
    assert c.pwrite(1, 0, b"\xee" * 4096) == nbd.EPERM
    assert c.pwrite(2, 0, b"\xee" * 4096, nbd.CMD_FLAG_FUA) == nbd.EPERM
    for cookie, cmd, flags in [(3, nbd.CMD_TRIM, 0), (4, nbd.CMD_WRITE_ZEROES, 0), (5, nbd.CMD_WRITE_ZEROES, nbd.CMD_FLAG_NO_HOLE)]:
        c.send(req(cmd, cookie, 0, 4096, flags))
        assert c.reply(cookie)[0] == nbd.EPERM
    assert c.pread(6, 0, len(snap)) == snap
    c.close()
    still_serves(module_fssd, snap_pid, "fss0", "snapshot", expect=(0, snap))
    still_serves(module_fssd, vol_pid, expect=(0, snap))


def test_oversized_lengths(module_fssd, vol_pid):
    c = connect(module_fssd)
    c.send(req(nbd.CMD_READ, 1, 0, 32 * MiB + 1))
    assert c.reply(1, read=True) == (nbd.EOVERFLOW, b"")
    # An oversized WRITE is refused after its payload is read, so the stream stays in sync.
    assert c.pwrite(2, 24 * MiB, b"\xaa" * (32 * MiB + 1)) == nbd.EINVAL
    assert c.pread(3, 24 * MiB, 4096) == bytes(4096)  # and nothing of it landed
    assert c.pread(4, 0, 32 * MiB)[: len(SNAP)] == SNAP  # the maximum itself works
    c.close()
    plain = connect(module_fssd, structured=False)
    plain.send(req(nbd.CMD_READ, 5, 0, 32 * MiB + 1))
    assert plain.reply(5, 32 * MiB + 1, read=True) == (nbd.EINVAL, b"")  # no payload after a simple error
    assert plain.pread(6, 0, 512) == SNAP[:512]
    plain.close()
    still_serves(module_fssd, vol_pid)


# -- clients that vanish -------------------------------------------------------------------------


def test_client_vanishes_mid_write_payload(module_fssd, vol_pid):
    c = connect(module_fssd)
    before = os.urandom(MiB)
    assert c.pwrite(1, 8 * MiB, before) == 0
    c.send(req(nbd.CMD_WRITE, 2, 8 * MiB, MiB) + b"\x55" * (MiB // 2))  # half the payload, then gone
    c.close()
    still_serves(module_fssd, vol_pid, expect=(8 * MiB, before))


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
def test_client_vanishes_mid_handshake(module_fssd, vol_pid, sent):
    c = Raw(module_fssd.sock("data"))
    c.recv(18)
    c.send(sent)
    c.close()
    still_serves(module_fssd, vol_pid)


@pytest.mark.parametrize("export", ["data", "fss0"])  # sendfile path and pread path
def test_client_vanishes_mid_read_reply(module_fssd, snap, vol_pid, export):
    kind = "volume" if export == "data" else "snapshot"
    pid = module_fssd.worker_pid(kind, export)
    for structured in (True, False):
        c = connect(module_fssd, export, structured=structured)
        c.send(req(nbd.CMD_READ, 1, 0, 32 * MiB) + req(nbd.CMD_READ, 2, 0, 32 * MiB))
        c.recv(4096)
        c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    still_serves(module_fssd, pid, export, kind, expect=(0, snap))


# -- old-fashioned clients -------------------------------------------------------------------------


def test_legacy_export_name_client_with_simple_replies(module_fssd, vol_pid):
    c = Raw(module_fssd.sock("data"))
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
    still_serves(module_fssd, vol_pid, expect=(off, data))


def test_kernel_style_client(module_fssd, vol_pid):
    # What nbd-client hands the kernel: GO with no info requests, no structured replies.
    c = Raw(module_fssd.sock("data"))
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
    still_serves(module_fssd, vol_pid, expect=(a, data))


def test_many_pipelined_requests_all_answered(module_fssd, vol_pid):
    c = connect(module_fssd)
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
    still_serves(module_fssd, vol_pid)


# -- large reads -----------------------------------------------------------------------------------


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_pipelined_large_reads_do_not_pile_up(module_fssd, snap):
    """Replies to pipelined READs must not all wait in memory for the end of the batch.

    A snapshot export (no sendfile) once held every 32 MiB reply of a batch at
    once, so a client that pipelines could push the worker's memory without
    bound. Large replies now leave as soon as they are read: the peak stays
    near one reply.
    """
    pid = module_fssd.worker_pid("snapshot", "fss0")
    c = connect(module_fssd, "fss0")
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


def test_live_large_read_is_a_data_chunk_then_a_none_chunk(module_fssd, vol_pid):
    # The volume's large reads leave with sendfile: the data chunk is not flagged DONE
    # (the file could still fail), a NONE chunk flagged DONE ends the reply.
    c = connect(module_fssd)
    try:
        c.send(req(nbd.CMD_READ, 3, 0, 256 * 1024))
        magic, flags, typ, cookie, length, offset = struct.unpack(">IHHQIQ", c.recv(28))
        assert (magic, flags, typ, cookie, length, offset) == (nbd.STRUCTURED_REPLY_MAGIC, 0, nbd.REPLY_TYPE_OFFSET_DATA, 3, 8 + 256 * 1024, 0)
        assert c.recv(256 * 1024)[: len(SNAP)] == SNAP
        assert struct.unpack(">IHHQI", c.recv(20)) == (nbd.STRUCTURED_REPLY_MAGIC, nbd.REPLY_FLAG_DONE, nbd.REPLY_TYPE_NONE, 3, 0)
    finally:
        c.close()
    still_serves(module_fssd, vol_pid)


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
