"""The NBD serving loop both export kinds share: one thread per connection.

ipc.nbd parses and validates; this loop only moves bytes and calls the
backend: validate (done by the protocol), handle, reply, each once. Replies of
a batch of pipelined requests leave in one sendmsg; large reads leave with
os.sendfile when the backend can name a file for the range, so the data never
passes through Python.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import socket
import threading
from typing import Callable, Protocol

from ipc import nbd

log = logging.getLogger("nbd")

# Reads this large go out with sendfile() (no copy through Python) when possible.
SENDFILE_MIN = 128 * 1024
# sendmsg() takes at most IOV_MAX (1024) buffers. Only replies under
# SENDFILE_MIN are queued (larger ones leave at once), so a batch of pipelined
# requests holds at most OUT_MAX_BUFFERS * SENDFILE_MIN bytes of replies.
OUT_MAX_BUFFERS = 512


class Backend(Protocol):
    """What an export does; raises OSError with a meaningful errno on failure."""

    size: int
    read_only: bool

    def read(self, offset: int, length: int) -> bytes:
        """A small read (a few KiB): the export's bytes, or raise."""

    def read_into(self, view: memoryview, offset: int) -> None:
        """Fill `view` with the export's bytes at `offset`, or raise."""

    def sendfile_source(self, offset: int, length: int) -> tuple[int, int] | None:
        """(fd, file offset) holding exactly these bytes for os.sendfile, or None."""

    def write(self, offset: int, data: memoryview, fua: bool) -> None: ...
    def flush(self) -> None: ...
    def trim(self, offset: int, length: int, fua: bool) -> None: ...
    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None: ...
    def cache(self, offset: int, length: int) -> None: ...
    def extents(self, offset: int, length: int) -> list[tuple[int, int]]: ...


def nbd_errno(e: OSError) -> int:
    """System errors to the protocol's few (one place, as nbdkit's nbd_errno)."""
    return {
        errno.EPERM: nbd.EPERM,
        errno.EROFS: nbd.EPERM,
        errno.EACCES: nbd.EPERM,
        errno.ENOMEM: nbd.ENOMEM,
        errno.EINVAL: nbd.EINVAL,
        errno.ENOSPC: nbd.ENOSPC,
        errno.EFBIG: nbd.ENOSPC,
        errno.EDQUOT: nbd.ENOSPC,
        errno.EOVERFLOW: nbd.EOVERFLOW,
        errno.ENOTSUP: nbd.ENOTSUP,
        errno.ESHUTDOWN: nbd.ESHUTDOWN,
    }.get(e.errno or 0, nbd.EIO)


class Server:
    """Serves one export on a listening socket (owned by the supervisor, inherited)."""

    def __init__(
        self,
        listener: socket.socket,
        export: nbd.Export,
        backend: Backend,
        on_clients: Callable[[int], None] | None = None,
    ):
        self.listener = listener
        self.export = export
        self.backend = backend
        self.on_clients = on_clients
        self._lock = threading.Lock()
        self._conns: dict[int, socket.socket] = {}
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self.requests = 0
        self.errors = 0

    @property
    def clients(self) -> int:
        with self._lock:
            return len(self._conns)

    def serve_forever(self) -> None:
        """Accept until stop(); each client in its own thread."""
        while not self._stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError as e:
                if self._stopping.is_set():
                    break
                # Out of descriptors or memory, an aborted connect: the export must not die of it.
                log.error("%s: accept failed: %s; retrying", self.export.name, e)
                self._stopping.wait(0.1)
                continue
            if self._stopping.is_set():
                sock.close()
                break
            t = threading.Thread(target=self._run_conn, args=(sock,), daemon=True)
            with self._lock:
                self._conns[sock.fileno()] = sock
                self._threads = [x for x in self._threads if x.is_alive()]
                self._threads.append(t)
                if self.on_clients:  # under the lock: counts reach the supervisor in order
                    self.on_clients(len(self._conns))
            t.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting; let every connection finish the requests it has, then close."""
        self._stopping.set()
        try:
            # accept() is woken by shutting the listener down (it stays open for a restart).
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns.values())
            threads = list(self._threads)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RD)  # recv() returns 0 after the buffered requests
            except OSError:
                pass
        for t in threads:
            t.join(timeout)

    # -- one connection --------------------------------------------------------------

    def _run_conn(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        try:
            self._converse(sock)
        except (ConnectionError, BrokenPipeError, TimeoutError) as e:
            log.info("%s: client went away: %s", self.export.name, e)
        except _StreamBroken as e:
            log.warning("%s: closing the connection: %s", self.export.name, e)
        except OSError as e:
            log.warning("%s: connection closed after error: %s", self.export.name, e)
        except Exception:  # a bug must cost one connection, never the worker
            log.exception("%s: internal error; closing this connection", self.export.name)
        finally:
            try:
                sock.close()
            except OSError:
                pass
            with self._lock:
                self._conns.pop(fd, None)
                if self.on_clients:
                    self.on_clients(len(self._conns))

    def _converse(self, sock: socket.socket) -> None:
        # WRITE payloads are views into the connection's receive buffer: the socket's
        # bytes reach pwrite() without another copy. Each batch is handled before the
        # next receive, which is what keeps those views valid.
        conn = nbd.ServerConnection([self.export], zero_copy=True)
        sock.sendall(conn.greeting())
        out: list = []
        backend = self.backend
        reads = _ReadBuffer()
        Request, BadRequest = nbd.Request, nbd.BadRequest
        while True:
            n = sock.recv_into(conn.receive_buffer())
            if n == 0:
                return
            conn.received(n)
            for ev in conn.events():
                cls = type(ev)
                if cls is Request:
                    self._handle(conn, ev, out, sock, backend, reads)
                    if len(out) > OUT_MAX_BUFFERS:
                        _send(sock, out)
                elif cls is BadRequest:
                    self.errors += 1
                    log.info("%s: refused %s: %s", self.export.name, nbd.CMD_NAMES.get(ev.cmd, ev.cmd), ev.reason)
                    out.append(conn.error_reply(ev.cookie, ev.errno, ev.reason))
                    if len(out) > OUT_MAX_BUFFERS:
                        _send(sock, out)
                else:
                    hs = conn.data_to_send()
                    if hs:
                        out.append(hs)
                    if cls is nbd.ProtocolError:
                        log.warning("%s: protocol error, disconnecting: %s", self.export.name, ev.reason)
                        _send(sock, out)
                        return
                    if cls is nbd.Disconnect:
                        _send(sock, out)
                        return
            hs = conn.data_to_send()
            if hs:
                out.append(hs)
            if out:
                _send(sock, out)

    def _handle(self, conn: nbd.ServerConnection, req: nbd.Request, out: list, sock, backend: Backend, reads: "_ReadBuffer") -> None:
        self.requests += 1
        cmd = req.cmd
        try:
            if cmd == nbd.CMD_READ:
                n = req.length
                if n < SENDFILE_MIN:
                    data = backend.read(req.offset, n)  # before the header: a failed read replies an error
                    out.append(conn.read_reply_header(req.cookie, req.offset, n))
                    out.append(data)  # queued: one sendmsg per batch
                    return
                src = backend.sendfile_source(req.offset, n)  # raises before anything is sent: an error reply
                if src is not None:
                    self._sendfile_read(conn, req, src, out, sock)
                    return
                # Large replies leave at once from a buffer this connection reuses.
                view = reads.get(n)
                backend.read_into(view, req.offset)
                out.append(conn.read_reply_header(req.cookie, req.offset, n))
                out.append(view)
                _send_or_break(sock, out)
                return
            if cmd == nbd.CMD_WRITE:
                backend.write(req.offset, req.data, bool(req.flags & nbd.CMD_FLAG_FUA))
            elif cmd == nbd.CMD_FLUSH:
                backend.flush()
            elif cmd == nbd.CMD_TRIM:
                backend.trim(req.offset, req.length, bool(req.flags & nbd.CMD_FLAG_FUA))
            elif cmd == nbd.CMD_WRITE_ZEROES:
                backend.zero(
                    req.offset,
                    req.length,
                    may_trim=not req.flags & nbd.CMD_FLAG_NO_HOLE,
                    fast=bool(req.flags & nbd.CMD_FLAG_FAST_ZERO),
                    fua=bool(req.flags & nbd.CMD_FLAG_FUA),
                )
            elif cmd == nbd.CMD_CACHE:
                backend.cache(req.offset, req.length)
            elif cmd == nbd.CMD_BLOCK_STATUS:
                ext = backend.extents(req.offset, req.length)
                if req.flags & nbd.CMD_FLAG_REQ_ONE:
                    n, f = ext[0]
                    ext = [(min(n, req.length), f)]
                out.append(conn.block_status_reply(req.cookie, ext))
                return
            out.append(conn.simple_reply(req.cookie))
        except OSError as e:
            self.errors += 1
            code = nbd_errno(e)
            if not (cmd == nbd.CMD_WRITE_ZEROES and code == nbd.ENOTSUP):
                log.warning("%s: %s %d+%d failed: %s", self.export.name, nbd.CMD_NAMES[cmd], req.offset, req.length, e)
            out.append(conn.error_reply(req.cookie, code, f"{nbd.CMD_NAMES[cmd]}: {e.strerror or e}"))


    def _sendfile_read(self, conn: nbd.ServerConnection, req: nbd.Request, src: tuple[int, int], out: list, sock) -> None:
        """A large READ straight from the file. The data chunk's header leaves first, so
        with structured replies it is not flagged DONE: a NONE chunk ends the reply, or,
        when the file fails mid-way, the rest of the chunk is padded and an error chunk
        says the read failed. Simple replies have no way to say it: the stream is broken."""
        n = req.length
        structured = conn.structured
        out.append(conn.read_reply_header(req.cookie, req.offset, n, done=not structured))
        _send_or_break(sock, out)
        try:
            _sendfile(sock, src[0], src[1], n)
        except _SendfileFailed as e:
            cause = e.__cause__ or e
            if not structured or e.socket_side:
                raise _StreamBroken(f"READ {req.offset}+{n} failed after its header was sent: {cause}") from e
            self.errors += 1
            log.warning("%s: READ %d+%d failed after %d bytes were sent: %s", self.export.name, req.offset, n, e.sent, cause)
            try:
                _send_zeroes(sock, n - e.sent)
            except OSError as e2:
                raise _StreamBroken(f"READ {req.offset}+{n}: cannot finish the failed chunk: {e2}") from e2
            code = nbd_errno(cause) if isinstance(cause, OSError) else nbd.EIO
            out.append(conn.error_reply(req.cookie, code, f"READ: {getattr(cause, 'strerror', None) or cause}"))
            return
        if structured:
            out.append(conn.read_reply_end(req.cookie))  # queued: leaves with the batch's replies


class _SendfileFailed(Exception):
    """sendfile() stopped after `sent` bytes; socket_side: the client's end failed, not the file."""

    def __init__(self, sent: int, socket_side: bool):
        super().__init__(f"sendfile failed after {sent} bytes")
        self.sent = sent
        self.socket_side = socket_side


# sendfile() errors that come from the socket (the stream is gone), not from the file.
_SOCKET_ERRNOS = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EAGAIN, errno.ETIMEDOUT, errno.ESHUTDOWN}
_ZEROES = bytes(256 * 1024)


def _send_zeroes(sock: socket.socket, n: int) -> None:
    while n:
        k = min(n, len(_ZEROES))
        sock.sendall(memoryview(_ZEROES)[:k])
        n -= k


class _StreamBroken(Exception):
    """A reply was cut short mid-way: the connection must be closed."""


class _ReadBuffer:
    """One connection's buffer for large read replies (anonymous memory: paid for as used)."""

    def __init__(self):
        self._mm: mmap.mmap | None = None
        self._mv: memoryview | None = None

    def get(self, n: int) -> memoryview:
        if self._mv is None:
            self._mm = mmap.mmap(-1, nbd.MAX_PAYLOAD)
            self._mv = memoryview(self._mm)
        return self._mv[:n]


def _send_or_break(sock: socket.socket, out: list) -> None:
    """A send from inside a request handler: a failure ends the connection, never a reply."""
    try:
        _send(sock, out)
    except OSError as e:
        out.clear()
        raise _StreamBroken(f"send failed: {e}") from e


def _send(sock: socket.socket, out: list) -> None:
    if not out:
        return
    if len(out) == 1:
        sock.sendall(out[0])
    else:
        sent = sock.sendmsg(out)
        for b in out:  # a short sendmsg: finish buffer by buffer, without joining them
            if sent >= len(b):
                sent -= len(b)
                continue
            sock.sendall(memoryview(b)[sent:])
            sent = 0
    out.clear()


def _sendfile(sock: socket.socket, fd: int, offset: int, length: int) -> int:
    sfd = sock.fileno()
    start, end = offset, offset + length
    while offset < end:
        try:
            n = os.sendfile(sfd, fd, offset, end - offset)
        except OSError as e:
            raise _SendfileFailed(offset - start, e.errno in _SOCKET_ERRNOS) from e
        if n == 0:
            # The file is shorter than the header promised.
            raise _SendfileFailed(offset - start, False) from OSError(errno.EIO, "short read from the volume during sendfile")
        offset += n
    return length
