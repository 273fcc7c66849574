"""The TCP front's relay: bytes both ways between a client and an export's worker.

One thread per connection drives both directions on non-blocking sockets
(one SSL object must never be used from two threads at once). A socket is
read again only when poll() says it is readable, so a request costs few
system calls; at most CHUNK bytes of plaintext (and their ciphertext) are held
per direction, so a client that stops reading stops its worker's replies,
not the front's memory. Returns why it ended.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time

from workers.tlsstream import RAW_CHUNK, TLSStream

CHUNK = 256 * 1024
_WANT = (BlockingIOError, InterruptedError)
POLLIN, POLLOUT = select.POLLIN, select.POLLOUT


class _Poller:
    def __init__(self, client: socket.socket, unix: socket.socket, idle: float):
        self.poll = select.poll()
        self.cfd, self.ufd = client.fileno(), unix.fileno()
        self.poll.register(self.cfd, POLLIN)
        self.poll.register(self.ufd, POLLIN)
        self.idle = idle
        self.last = time.monotonic()

    def wait(self, cmask: int, umask: int) -> list | None:
        """Ready (fd, events); None once nothing has moved for the idle timeout."""
        self.poll.modify(self.cfd, cmask)
        self.poll.modify(self.ufd, umask)
        if not self.idle:
            return self.poll.poll()
        left = self.idle - (time.monotonic() - self.last)
        if left <= 0:
            return None
        return self.poll.poll(left * 1000)


class _Ended(Exception):
    """The relay is over; the argument says why."""


def _push(sock: socket.socket, view: memoryview, who: str) -> tuple[memoryview | None, bool]:
    """Send what the socket takes now: (what is left, or None; whether anything moved)."""
    try:
        k = sock.send(view)
    except _WANT:
        return view, False
    except OSError as e:
        raise _Ended(f"{who} connection failed: {e}") from None
    return (view[k:] if k < len(view) else None), True


def relay_plain(client: socket.socket, unix: socket.socket, first: bytes, idle: float, stopping: threading.Event) -> str:
    try:
        return _relay_plain(client, unix, first, idle, stopping)
    except _Ended as e:
        return str(e)


def _relay_plain(client: socket.socket, unix: socket.socket, first: bytes, idle: float, stopping: threading.Event) -> str:
    client.setblocking(False)
    unix.setblocking(False)
    ubuf, dbuf = memoryview(bytearray(CHUNK)), memoryview(bytearray(CHUNK))
    up: memoryview | None = memoryview(first) if first else None  # client -> worker, unsent
    down: memoryview | None = None  # worker -> client, unsent
    c_r = u_r = True  # may have something to read
    p = _Poller(client, unix, idle)
    while not stopping.is_set():
        moved = False
        if up is None and c_r:
            try:
                k = client.recv_into(ubuf)
                if not k:
                    return "client closed"
                c_r = k == CHUNK  # a short read drained the socket: wait for poll
                up = ubuf[:k]
                moved = True
            except _WANT:
                c_r = False
            except OSError as e:
                return f"client connection failed: {e}"
        if up is not None:
            up, sent = _push(unix, up, "worker")
            moved |= sent
        if down is None and u_r:
            try:
                k = unix.recv_into(dbuf)
                if not k:
                    return "the export's worker closed the connection"
                u_r = k == CHUNK
                down = dbuf[:k]
                moved = True
            except _WANT:
                u_r = False
            except OSError as e:
                return f"worker connection failed: {e}"
        if down is not None:
            down, sent = _push(client, down, "client")
            moved |= sent
        if moved:
            p.last = time.monotonic()
            continue
        ready = p.wait((POLLIN if up is None else 0) | (POLLOUT if down is not None else 0), (POLLIN if down is None else 0) | (POLLOUT if up is not None else 0))
        if ready is None:
            return f"idle for {idle:g} s"
        for fd, ev in ready:
            if ev & ~POLLOUT:
                if fd == p.cfd:
                    c_r = True
                else:
                    u_r = True
    return "fssd is stopping"


def relay_tls(t: TLSStream, unix: socket.socket, first: bytes, idle: float, stopping: threading.Event) -> str:
    """As relay_plain, with the client's bytes decrypted and encrypted in memory (TLSStream's BIOs)."""
    try:
        return _relay_tls(t, unix, first, idle, stopping)
    except _Ended as e:
        return str(e)


def _relay_tls(t: TLSStream, unix: socket.socket, first: bytes, idle: float, stopping: threading.Event) -> str:
    sock, obj, inc, out = t.sock, t.obj, t.inc, t.out
    sock.setblocking(False)
    unix.setblocking(False)
    raw = memoryview(bytearray(RAW_CHUNK))
    ubuf, dbuf = memoryview(bytearray(CHUNK)), memoryview(bytearray(CHUNK))
    up: memoryview | None = memoryview(first) if first else None  # plaintext to the worker, unsent
    ct: memoryview | None = None  # ciphertext to the client, unsent
    s_r = u_r = True
    client_eof = False
    p = _Poller(sock, unix, idle)
    while not stopping.is_set():
        moved = False
        if up is None:
            if client_eof:
                return "client closed"
            n = 0
            starved = False  # OpenSSL asked for more than is buffered
            while n < CHUNK:
                if starved or (not inc.pending and not obj.pending()):
                    starved = False
                    # Nothing buffered to decrypt: read the socket (a short read drained it,
                    # so the next read waits for poll: no EAGAIN round trips).
                    if not s_r:
                        break
                    try:
                        k = sock.recv_into(raw)
                    except _WANT:
                        s_r = False
                        break
                    except OSError as e:
                        return f"client connection failed: {e}"
                    if not k:
                        inc.write_eof()
                        client_eof = True
                        break
                    s_r = k == RAW_CHUNK
                    inc.write(raw[:k])
                try:
                    # Into our buffer: without one, read() allocates its whole length per record.
                    k = obj.read(CHUNK - n, ubuf[n:])
                except ssl.SSLWantReadError:  # a partial record: the rest is still on its way
                    if not s_r:
                        break
                    starved = True
                    continue
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    client_eof = True
                    break
                except ssl.SSLError as e:
                    return f"TLS failed: {e.reason or e}"
                if not k:
                    client_eof = True
                    break
                n += k
            if n:
                up = ubuf[:n]
                moved = True
        if up is not None:
            up, sent = _push(unix, up, "worker")
            moved |= sent
        if ct is None:
            if u_r:
                try:
                    k = unix.recv_into(dbuf)
                    if not k:
                        return "the export's worker closed the connection"
                    u_r = k == CHUNK
                    obj.write(dbuf[:k])
                    moved = True
                except _WANT:
                    u_r = False
                except ssl.SSLError as e:
                    return f"TLS failed: {e.reason or e}"
                except OSError as e:
                    return f"worker connection failed: {e}"
            if out.pending:  # replies, and whatever TLS itself has to say (key updates)
                ct = memoryview(out.read())
        if ct is not None:
            ct, sent = _push(sock, ct, "client")
            moved |= sent
        if moved:
            p.last = time.monotonic()
            continue
        ready = p.wait((POLLIN if up is None else 0) | (POLLOUT if ct is not None else 0), (POLLIN if ct is None else 0) | (POLLOUT if up is not None else 0))
        if ready is None:
            return f"idle for {idle:g} s"
        for fd, ev in ready:
            if ev & ~POLLOUT:
                if fd == p.cfd:
                    s_r = True
                else:
                    u_r = True
    return "fssd is stopping"
