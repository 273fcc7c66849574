"""Snapshot reads through the real serving loop: what the client receives is the snapshot's
bytes even when a live write lands after the read has left, and copied clusters go out by
sendfile from the backing store, one piece per run of consecutive store clusters.

A kernel move out of the volume (sendfile, splice) is not a read: the socket keeps a
reference to the volume's page, and a live write after the entry was tested changes the
bytes the client then receives. These tests would catch a read path that moved clusters
still on the volume that way.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
import termios
import threading
import uuid

import pytest
from fsshelp import wait_for
from nbdwire import Raw, req

from ipc import nbd
from ipc.clustermap import ClusterMap
from workers import nbdserve
from workers.cow import SnapshotTarget
from workers.snapshot import SnapshotBackend

CS = 64 * 1024
CLUSTERS = 64
SIZE = CS * CLUSTERS
READ = nbdserve.SENDFILE_MIN  # large enough for the sendfile path, small enough to sit in a socket buffer


@pytest.fixture
def snap(tmp_path):
    """A volume of known bytes, its snapshot's map and store, a live writer (copy, publish,
    overwrite: the volume worker's order) and the snapshot served on a Unix socket."""
    vol = tmp_path / "vol.img"
    old = b"".join(bytes([c % 251 + 1]) * CS for c in range(CLUSTERS))
    vol.write_bytes(old)
    (tmp_path / "bs").touch()
    name = f"/fssd-test-{uuid.uuid4().hex[:12]}"
    cmap = ClusterMap.create(name, CS, SIZE, bs_limit_clusters=0)
    cmap.activate()
    vfd = os.open(vol, os.O_RDWR)
    bfd = os.open(tmp_path / "bs", os.O_RDWR)
    target = SnapshotTarget("fss0", cmap, bfd, vfd)
    reader_map = ClusterMap.attach(name, writable=False)
    backend = SnapshotBackend(vfd, bfd, reader_map)
    path = str(tmp_path / "s.sock")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(4)
    srv = nbdserve.Server(lst, nbd.Export("fss0", SIZE, True), backend)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()

    def live_write(offset: int, data: bytes) -> None:
        if target.needs_copy(offset, len(data)):
            target.copy(offset, len(data))
        os.pwrite(vfd, data, offset)

    yield {"old": old, "path": path, "write": live_write, "backend": backend, "map": cmap, "vfd": vfd, "bfd": bfd}
    srv.stop()
    t.join(10)
    lst.close()
    reader_map.close()
    cmap.close()
    ClusterMap.unlink(name)
    os.close(vfd)
    os.close(bfd)


def waiting_bytes(s: socket.socket) -> int:
    n = array.array("i", [0])
    fcntl.ioctl(s.fileno(), termios.FIONREAD, n, True)
    return n[0]


def read_reply(c: Raw, cookie: int, length: int) -> bytes:
    err, data = c.reply(cookie, read=True)
    assert err == 0 and len(data) == length
    return data


@pytest.mark.parametrize("offset", [CS * 5, CS * 5 + 1000])
def test_a_fresh_read_that_has_left_is_not_changed_by_a_later_live_write(snap, offset):
    c = Raw(snap["path"])
    try:
        c.go("fss0")
        c.send(req(nbd.CMD_READ, 1, offset, READ))
        # The whole reply is in the client's socket, not read yet: the server is done with it.
        wait_for(lambda: waiting_bytes(c.s) >= 28 + READ, 10, "the read reply to arrive")
        snap["write"](offset, b"\0" * READ)  # copies the old clusters, publishes, overwrites
        assert os.pread(snap["vfd"], READ, offset) == b"\0" * READ, "the volume did change"
        assert read_reply(c, 1, READ) == snap["old"][offset : offset + READ]
    finally:
        c.close()


def test_copied_clusters_out_of_order_go_by_sendfile_piece_by_piece(snap):
    old, b = snap["old"], snap["backend"]
    for cl in (12, 10, 11, 14, 13):  # copied in this order: store runs 12 | 10 11 | 14 | 13
        snap["write"](cl * CS + 7, b"\xee")
    off, n = 10 * CS + 100, 4 * CS + 5000
    pieces = b.sendfile_source(off, n)
    t = snap["map"].table
    assert pieces == [
        (snap["bfd"], t[10] * CS + 100, 2 * CS - 100),  # 10 and 11 are one run in the store
        (snap["bfd"], t[12] * CS, CS),
        (snap["bfd"], t[13] * CS, CS),
        (snap["bfd"], t[14] * CS, 5100),
    ]
    assert b"".join(os.pread(fd, k, o) for fd, o, k in pieces) == old[off : off + n]
    assert b.sendfile_source(9 * CS, 3 * CS) is None, "cluster 9 is still on the volume"
    assert b.sendfile_source(10 * CS, 2 * CS) == (snap["bfd"], t[10] * CS), "one run: one piece, as before"
    # Through the serving loop: the data chunk, then the NONE chunk that ends it.
    c = Raw(snap["path"])
    try:
        c.go("fss0")
        c.send(req(nbd.CMD_READ, 2, off, n))
        magic, flags, typ, cookie, length, at = struct.unpack(">IHHQIQ", c.recv(28))
        assert (flags, typ, cookie, length, at) == (0, nbd.REPLY_TYPE_OFFSET_DATA, 2, 8 + n, off)
        assert c.recv(n) == old[off : off + n]
        assert struct.unpack(">IHHQI", c.recv(20)) == (nbd.STRUCTURED_REPLY_MAGIC, nbd.REPLY_FLAG_DONE, nbd.REPLY_TYPE_NONE, 2, 0)
        # A mixed range (copied and not) still reads right, through the buffer.
        c.send(req(nbd.CMD_READ, 3, 8 * CS, 8 * CS))
        assert read_reply(c, 3, 8 * CS) == old[8 * CS : 16 * CS]
    finally:
        c.close()


def test_a_failing_piece_pads_the_chunk_and_reports_the_error(snap, tmp_path):
    """The store's file is shorter than a piece says (as a failing disk would be): the
    chunk is completed with zeroes after what was sent and an error chunk follows."""
    for cl in (21, 20):
        snap["write"](cl * CS, b"\x01")
    b = snap["backend"]
    pieces = b.sendfile_source(20 * CS, 2 * CS)
    assert isinstance(pieces, list) and len(pieces) == 2
    short = os.open(tmp_path / "short", os.O_RDWR | os.O_CREAT)
    try:
        os.pwrite(short, b"z" * 1000, 0)
        b.sendfile_source = lambda offset, length: [pieces[0], (short, 0, CS)]
        c = Raw(snap["path"])
        try:
            c.go("fss0")
            c.send(req(nbd.CMD_READ, 4, 20 * CS, 2 * CS))
            flags, typ, cookie, length = struct.unpack(">IHHQI", c.recv(20))[1:]
            assert (flags, typ, cookie, length) == (0, nbd.REPLY_TYPE_OFFSET_DATA, 4, 8 + 2 * CS)
            body = c.recv(length)[8:]
            assert body[:CS] == snap["old"][20 * CS : 21 * CS] and body[CS : CS + 1000] == b"z" * 1000
            assert body[CS + 1000 :] == bytes(CS - 1000)
            magic, flags, typ, cookie, length = struct.unpack(">IHHQI", c.recv(20))
            assert (flags, typ, cookie) == (nbd.REPLY_FLAG_DONE, nbd.REPLY_TYPE_ERROR, 4)
            assert struct.unpack(">I", c.recv(length)[:4])[0] == nbd.EIO
        finally:
            c.close()
    finally:
        os.close(short)
