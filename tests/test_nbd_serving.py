"""Who serves a connection's requests: the selector thread itself while they are quick,
a thread of the connection's own for anything slow (workers/nbdserve.py).

A Server runs in this process on an in-memory backend that records which thread ran
each request, so the tests see the hand-over, not just the bytes."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from nbdwire import Raw, req, write

from ipc import nbd
from workers import nbdserve
from workers.nbdserve import Limits, Server

SIZE = 64 << 20


class MemBackend:
    """A 64 MiB volume in memory; `quick`: whether writes may go straight to it (quick_write,
write_quick), as VolumeBackend says when no copy or sync must come first."""

    size = SIZE
    read_only = False

    def __init__(self):
        self.buf = bytearray(SIZE)
        self.quick = True
        self.threads: list[tuple[str, str]] = []  # (command, thread name), in order
        self._lock = threading.Lock()

    def _note(self, what: str) -> None:
        with self._lock:
            self.threads.append((what, threading.current_thread().name))

    def read(self, offset: int, length: int) -> bytes:
        self._note("read")
        return bytes(self.buf[offset : offset + length])

    def read_into(self, view, offset: int) -> None:
        self._note("read")
        view[:] = self.buf[offset : offset + len(view)]

    def sendfile_source(self, offset: int, length: int):
        return None

    def quick_write(self, offset: int, length: int) -> bool:
        return self.quick

    def write_quick(self, offset: int, data) -> bool:
        if not self.quick:
            return False
        self.write(offset, data, False)
        return True

    def write(self, offset: int, data, fua: bool) -> None:
        self._note("write")
        self.buf[offset : offset + len(data)] = data

    def flush(self) -> None:
        self._note("flush")

    def names(self, what: str) -> set[str]:
        with self._lock:
            return {n for w, n in self.threads if w == what}


@pytest.fixture
def served(tmp_path):
    made = []

    def start(limits: Limits | None = None):
        path = str(tmp_path / f"s{len(made)}.sock")
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lst.bind(path)
        lst.listen(64)
        backend = MemBackend()
        srv = Server(lst, nbd.Export("m", SIZE, False), backend, limits=limits or Limits())
        t = threading.Thread(target=srv.serve_forever, name="selector", daemon=True)
        t.start()
        made.append((srv, t, lst))
        return path, srv, backend

    yield start
    for srv, t, lst in made:
        srv.stop()
        t.join(10)
        lst.close()


def client(path: str) -> Raw:
    c = Raw(path)
    c.go("m")
    return c


def test_quick_requests_of_many_clients_are_served_without_a_thread_each(served):
    """16 clients each pipeline 32 WRITEs and then 32 READs of what they wrote: every
    request runs in the selector thread (a thread per busy client made them take turns
    on the GIL), and every byte reads back."""
    path, srv, backend = served()
    clients = [client(path) for _ in range(16)]
    try:
        for k, c in enumerate(clients):
            c.send(b"".join(write(i, (k * 32 + i) * 4096, bytes([k + 1, i + 1]) * 2048) for i in range(32)))
        for c in clients:
            assert [c.reply(i)[0] for i in range(32)] == [0] * 32
        for k, c in enumerate(clients):
            c.send(b"".join(req(nbd.CMD_READ, 100 + i, (k * 32 + i) * 4096, 4096) for i in range(32)))
        for k, c in enumerate(clients):
            for i in range(32):
                err, data = c.reply(100 + i, 4096, read=True)
                assert err == 0 and data == bytes([k + 1, i + 1]) * 2048
    finally:
        for c in clients:
            c.close()
    assert backend.names("write") == {"selector"}
    assert backend.names("read") == {"selector"}
    assert srv.requests == 16 * 64


def test_a_slow_request_hands_the_rest_of_the_batch_to_a_thread_in_order(served):
    """WRITEs, a FLUSH, more WRITEs and READs in one send: the FLUSH and what follows it run
    in the connection's own thread, after what came before; every reply arrives."""
    path, _srv, backend = served()
    c = client(path)
    try:
        batch = [write(1, 0, b"a" * 4096), write(2, 4096, b"b" * 4096), req(nbd.CMD_FLUSH, 3),
                 write(4, 8192, b"c" * 4096), req(nbd.CMD_READ, 5, 0, 12288)]
        c.send(b"".join(batch))
        assert [c.reply(i)[0] for i in (1, 2, 3, 4)] == [0, 0, 0, 0]
        assert c.reply(5, 12288, read=True) == (0, b"a" * 4096 + b"b" * 4096 + b"c" * 4096)
    finally:
        c.close()
    order = backend.threads
    assert [w for w, _ in order] == ["write", "write", "flush", "write", "read"]
    assert [n for _, n in order[:2]] == ["selector", "selector"]
    assert {n for _, n in order[2:]} == {"nbd-conn"}


def test_a_connection_goes_back_to_the_selector_once_its_writes_are_quick(served):
    """While the backend says writes would wait (a snapshot copy, a sync), they run in the
    connection's thread; once they are quick again the thread hands the client back
    after HANDBACK_STREAK batches, and the selector thread serves it again."""
    path, _srv, backend = served()
    backend.quick = False
    c = client(path)
    try:
        for i in range(8):
            assert c.pwrite(i, i * 4096, b"x" * 4096) == 0
        assert backend.names("write") == {"nbd-conn"}
        backend.quick = True
        for i in range(nbdserve.HANDBACK_STREAK + 8):
            assert c.pwrite(i, i * 4096, b"y" * 4096) == 0
        assert backend.threads[-1] == ("write", "selector")
        assert c.pread(9, 0, 4096) == b"y" * 4096
    finally:
        c.close()


def test_replies_the_client_reads_late_all_arrive_in_order(served):
    """300 READs of 64 KiB sent at once, replies read only afterwards (19 MiB, far more
    than the socket holds): what the socket does not take at once is finished by a
    thread; nothing is lost or reordered."""
    path, _srv, backend = served()
    for i in range(300):
        backend.buf[i * 65536 : i * 65536 + 4] = struct.pack(">I", i)
    c = client(path)
    try:
        c.send(b"".join(req(nbd.CMD_READ, i, i * 65536, 65536) for i in range(300)))
        for i in range(300):
            err, data = c.reply(i, 65536, read=True)
            assert err == 0 and data[:4] == struct.pack(">I", i) and len(data) == 65536
    finally:
        c.close()
    assert "nbd-conn" in backend.names("read")


def test_a_busy_connection_keeps_one_timer_and_still_expires_when_idle(served):
    """With an idle timeout every batch moves the deadline: the timer heap must not grow
    per request (one entry per connection), and the client is still closed once idle."""
    path, srv, _backend = served(Limits(idle_timeout=0.5))
    c = client(path)
    try:
        for i in range(2000):
            assert c.pwrite(i, (i % 64) * 4096, b"z" * 4096) == 0
        assert len(srv._timers) <= 2
        c.s.settimeout(10)
        started = time.monotonic()
        assert c.hung_up()
        assert time.monotonic() - started >= 0.3
    finally:
        c.close()


def test_replies_before_a_disconnect_all_arrive_before_the_close(served):
    """15 READs of 64 KiB (less than a batch sends at once, more than the socket takes) and
    NBD_CMD_DISC in one send: every reply reaches the client, which reads them only
    afterwards, and then the server closes."""
    path, _srv, backend = served()
    backend.buf[:4] = b"DATA"
    c = client(path)
    try:
        c.send(b"".join(req(nbd.CMD_READ, i, 0, 65536) for i in range(15)) + req(nbd.CMD_DISC, 999))
        for i in range(15):
            err, data = c.reply(i, 65536, read=True)
            assert err == 0 and data[:4] == b"DATA"
        assert c.hung_up()
    finally:
        c.close()


def test_a_long_burst_goes_to_a_thread_so_others_are_not_held_up(served):
    """One receive holding more than INLINE_MAX requests (2000 pipelined 1-byte READs, 56 KB sent
    at once) is served by the connection's own thread, so the selector thread stays free
    for the other clients meanwhile; every reply arrives."""
    path, _srv, backend = served()
    c = client(path)
    n = 2000
    try:
        c.send(b"".join(req(nbd.CMD_READ, i, (i % 256) * 4096, 1) for i in range(n)))  # replies fit the socket
        for i in range(n):
            assert c.reply(i, 1, read=True)[0] == 0
    finally:
        c.close()
    assert "nbd-conn" in backend.names("read")
