"""Pipelined requests handled in batches: many WRITEs parsed from one receive, each with its
own reply and its own bytes, whatever the receive boundaries and whatever comes mid-batch
(ipc/nbd.py's ordinary-request loop, workers/nbdserve.py's inlined WRITE).

The sans-IO half feeds a ServerConnection the way the serving loop does
(receive_buffer / received / events, zero-copy payloads copied out before the next
receive); the other half runs the real serving loop and the volume's backend on a
file, through a raw client (tests/nbdwire.py), since only malformed input needs one.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading

import pytest
from nbdwire import Raw, req, write

from ipc import nbd
from ipc.nbd import BadRequest, Export, ProtocolError, Request, ServerConnection

SIZE = 8 << 20
VOL = Export("data", SIZE, False)


def transmission(export: Export = VOL) -> ServerConnection:
    from test_nbd_protocol import ask, negotiated  # the handshake helpers
    from nbdwire import info_data, opt

    conn = negotiated((export,))
    conn.zero_copy = True
    ask(conn, opt(nbd.OPT_STRUCTURED_REPLY))
    ask(conn, opt(nbd.OPT_GO, info_data(export.name)))
    assert conn.state is nbd.State.TRANSMISSION
    return conn


def pump(conn: ServerConnection, stream: bytes, pieces, soft: int) -> list:
    """Deliver `stream` as the serving loop receives it: each receive takes at most the next
    piece size (and never more than the view offered); events after every receive, their
    payloads copied at once (zero-copy views die at the next receive_buffer())."""
    out, pos = [], 0
    sizes = iter(pieces)
    while pos < len(stream):
        view = conn.receive_buffer(soft)
        assert len(view) > 0, "the receive buffer offered no room"
        n = min(len(view), len(stream) - pos, next(sizes))
        view[:n] = stream[pos : pos + n]
        view.release()
        conn.received(n)
        pos += n
        for ev in conn.events():
            if type(ev) is Request:
                ev = ev._replace(data=bytes(ev.data))
            out.append(ev)
    return out


def batch(rng: random.Random, n: int) -> tuple[bytes, list]:
    """n requests, mostly WRITEs (sizes around every boundary that matters), some READs, and
    mid-batch trouble: a WRITE with a bad flag (EINVAL, payload skipped), one past the end
    (ENOSPC, payload skipped), an unknown command. Returns the bytes and the events due."""
    stream, want = [], []
    for cookie in range(1, n + 1):
        kind = rng.random()
        if kind < 0.06:
            data = rng.randbytes(rng.choice((1, 4096, 70000)))
            stream.append(write(cookie, 0, data, flags=nbd.CMD_FLAG_NO_HOLE))
            want.append(("bad", cookie, nbd.EINVAL))
        elif kind < 0.10:
            data = rng.randbytes(5000)
            stream.append(write(cookie, SIZE - 4096, data))
            want.append(("bad", cookie, nbd.ENOSPC))
        elif kind < 0.13:
            stream.append(req(42, cookie))
            want.append(("bad", cookie, nbd.EINVAL))
        elif kind < 0.25:
            off, length = rng.randrange(0, SIZE - 65536), rng.choice((512, 4096, 65536))
            stream.append(req(nbd.CMD_READ, cookie, off, length))
            want.append((Request(nbd.CMD_READ, 0, cookie, off, length, b""),))
        else:
            data = rng.randbytes(rng.choice((1, 27, 28, 4096, 4097, 65536, 65537, 300000)))
            off = rng.randrange(0, SIZE - len(data))
            fua = nbd.CMD_FLAG_FUA if rng.random() < 0.2 else 0
            stream.append(write(cookie, off, data, flags=fua))
            want.append((Request(nbd.CMD_WRITE, fua, cookie, off, len(data), data),))
    return b"".join(stream), want


def check(got: list, want: list) -> None:
    assert len(got) == len(want)
    for ev, w in zip(got, want):
        if w[0] == "bad":
            assert type(ev) is BadRequest and (ev.cookie, ev.errno) == w[1:], (ev, w)
        else:
            assert ev == w[0]


@pytest.mark.parametrize("seed", range(4))
def test_pipelined_writes_split_at_any_receive_boundary_each_come_out_whole(seed):
    rng = random.Random(seed)
    stream, want = batch(rng, 60)
    # Receives of every size: a byte at a time through a header, inside a payload, many
    # requests at once; soft limits below and above the payloads, so the buffer is moved,
    # finished in place and reset in turn.
    pieces = [rng.choice((1, 5, 28, 29, 4000, 4124, 70000, 1 << 20)) for _ in range(len(stream))]
    for soft in (64 << 10, 100 << 10, 1 << 20):
        check(pump(transmission(), stream, pieces, soft), want)


def test_whole_batch_in_one_receive_gives_every_request_in_order():
    stream, want = batch(random.Random(99), 400)
    check(pump(transmission(), stream, [len(stream)], nbd.RECV_BUFFER), want)


def test_a_large_write_still_arriving_past_soft_is_finished_in_place():
    """Its bytes are not moved to the buffer's head: the next receive ends where it ends."""
    conn = transmission()
    soft = 128 << 10
    a = write(1, 0, b"a" * 60000)
    b_payload = os.urandom(200000)
    b = write(2, 4096, b_payload)
    first = (a + b)[:soft]
    view = conn.receive_buffer(soft)
    view[: len(first)] = first
    view.release()
    conn.received(len(first))
    (ev,) = conn.events()
    assert ev.cookie == 1 and bytes(ev.data) == b"a" * 60000
    view = conn.receive_buffer(soft)
    assert conn.filled == soft, "what arrived of the large WRITE stayed where it was"
    assert len(view) == len(a) + len(b) - soft, "the view ends where that WRITE ends"
    rest = (a + b)[soft:]
    view[:] = rest
    view.release()
    conn.received(len(rest))
    (ev,) = conn.events()
    assert (ev.cookie, ev.offset, bytes(ev.data)) == (2, 4096, b_payload)
    assert len(conn.receive_buffer(soft)) == soft, "then the buffer starts at its head again"


def test_a_complete_message_past_soft_is_moved_never_an_empty_view():
    conn = transmission()
    soft = 128 << 10
    data = write(1, 0, b"x" * 100000) + write(2, 0, b"y" * 30000)
    view = conn.receive_buffer(soft)
    view[: len(data)] = data
    view.release()
    conn.received(len(data))
    # Not parsed yet (a caller that receives twice): the room offered is never empty.
    assert len(conn.receive_buffer(soft)) > 0
    evs = conn.events()
    assert [(e.cookie, bytes(e.data)) for e in evs] == [(1, b"x" * 100000), (2, b"y" * 30000)]


def test_bad_magic_mid_batch_ends_with_a_protocol_error_after_the_good_requests():
    conn = transmission()
    stream = write(1, 0, b"1" * 4096) + write(2, 4096, b"2" * 4096) + b"\xde\xad" * 14 + write(3, 0, b"3")
    evs = pump(conn, stream, [len(stream)], 1 << 20)
    assert [type(e) for e in evs] == [Request, Request, ProtocolError]
    assert [bytes(e.data) for e in evs[:2]] == [b"1" * 4096, b"2" * 4096]


# == the serving loop with the volume's backend ==========================================


@pytest.fixture
def volume_server(tmp_path):
    """The real serving loop and VolumeBackend over an 8 MiB file (no snapshot attached)."""
    from workers.nbdserve import Server
    from workers.volume import VolumeBackend

    img = tmp_path / "vol.img"
    img.write_bytes(bytes(SIZE))
    fd = os.open(img, os.O_RDWR)
    path = str(tmp_path / "v.sock")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(8)
    srv = Server(lst, Export("data", SIZE, False), VolumeBackend(fd, SIZE))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield path, fd
    srv.stop()
    t.join(10)
    lst.close()
    os.close(fd)


def replies(c: Raw, n: int) -> dict[int, int]:
    """n replies to WRITEs and refused requests, in whatever order: {cookie: errno}."""
    got = {}
    for _ in range(n):
        (magic,) = struct.unpack(">I", c.recv(4))
        if magic == nbd.SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">IQ", c.recv(12))
        else:
            assert magic == nbd.STRUCTURED_REPLY_MAGIC
            flags, typ, cookie, length = struct.unpack(">HHQI", c.recv(16))
            assert typ == nbd.REPLY_TYPE_ERROR and flags & nbd.REPLY_FLAG_DONE
            (err,) = struct.unpack(">I", c.recv(length)[:4])
        assert cookie not in got, f"two replies to cookie {cookie}"
        got[cookie] = err
    return got


def test_pipelined_writes_sent_at_once_each_get_their_reply_and_land(volume_server):
    path, fd = volume_server
    rng = random.Random(7)
    model = bytearray(SIZE)
    stream, expect = [], {}
    for cookie in range(1, 501):
        if cookie % 97 == 0:  # mid-batch trouble: a flag WRITE may not carry, and one past the end
            stream.append(write(cookie, 0, b"\xff" * 4096, flags=nbd.CMD_FLAG_NO_HOLE))
            expect[cookie] = nbd.EINVAL
            continue
        if cookie % 89 == 0:
            stream.append(write(cookie, SIZE - 100, b"\xff" * 4096))
            expect[cookie] = nbd.ENOSPC
            continue
        n = rng.choice((4096, 4096, 4096, 512, 65536, 300001))
        off = rng.randrange(0, SIZE - n)
        data = rng.randbytes(n)
        model[off : off + n] = data  # in order: a later write to the same bytes wins
        stream.append(write(cookie, off, data, flags=nbd.CMD_FLAG_FUA if cookie % 5 == 0 else 0))
        expect[cookie] = 0
    c = Raw(path)
    try:
        c.go("data")
        blob = b"".join(stream)
        sender = threading.Thread(target=c.send, args=(blob,))  # replies flow while we send
        sender.start()
        got = replies(c, len(expect))
        sender.join()
        assert got == expect
        c.send(req(nbd.CMD_FLUSH, 9999))
        assert replies(c, 1) == {9999: 0}
    finally:
        c.close()
    assert os.pread(fd, SIZE, 0) == bytes(model)


def test_short_input_mid_batch_answers_what_came_whole_then_drops(volume_server):
    path, fd = volume_server
    c = Raw(path)
    try:
        c.go("data")
        whole = write(1, 0, b"A" * 4096) + write(2, 8192, b"B" * 70000) + write(3, 100000, b"C" * 5)
        cut = write(4, 200000, b"D" * 4096)[:1000]  # its header and part of the payload, then EOF
        c.send(whole + cut)
        c.s.shutdown(socket.SHUT_WR)
        assert replies(c, 3) == {1: 0, 2: 0, 3: 0}
        assert c.hung_up()
    finally:
        c.close()
    assert os.pread(fd, 4096, 0) == b"A" * 4096
    assert os.pread(fd, 70000, 8192) == b"B" * 70000
    assert os.pread(fd, 5, 100000) == b"C" * 5
    assert os.pread(fd, 4096, 200000) == bytes(4096), "the cut WRITE never ran"


def test_garbage_mid_batch_answers_the_writes_before_it_then_drops(volume_server):
    path, fd = volume_server
    c = Raw(path)
    try:
        c.go("data")
        c.send(write(1, 0, b"E" * 4096) + write(2, 4096, b"F" * 4096) + b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 64)
        assert replies(c, 2) == {1: 0, 2: 0}
        assert c.hung_up()
    finally:
        c.close()
    assert os.pread(fd, 8192, 0) == b"E" * 4096 + b"F" * 4096
