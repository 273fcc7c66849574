"""The NBD serving loop both export kinds share.

ipc.nbd parses and validates; this loop only moves bytes and calls the
backend: validate (done by the protocol), handle, reply, each once. Replies of
a batch of pipelined requests leave in one sendmsg; large reads leave with
os.sendfile when the backend can name a file for the range, so the data never
passes through Python.

Threads: one selector thread accepts, runs every handshake (non-blocking, with
a deadline), watches every quiet connection and serves the quick requests of
every ready one itself (_serve_inline: small READs, WRITEs the backend says go
straight to the volume), one recv and one sendmsg per batch: threads of one
process take turns on the GIL, so a thread per busy client costs far more than
it serves. A connection whose request is slow (FLUSH, FUA, large, a WRITE that
must copy or sync first, replies the socket won't take now) gets a thread of
its own from that request on, which serves it with plain blocking calls until
the client is quiet for LINGER seconds or quick again for HANDBACK_STREAK
batches, then hands it back. Idle connections cost a descriptor and a few
pages, never a thread.

Bounds (Limits, from [daemon] nbd_* in fssd.toml): connections per export and
per peer uid, the handshake's and a stalled request's deadlines, an optional
idle timeout, and the memory buffered: each connection receives into its first
CONN_FREE bytes freely; anything larger (a big WRITE, a large read buffer) is
taken from the worker's buffer budget before the memory is touched, waiting
while others hold it.
"""

from __future__ import annotations

import errno
import heapq
import logging
import mmap
import os
import resource
import select
import selectors
import socket
import struct
import threading
import time
from typing import Callable, Protocol

import msgspec

from ipc import nbd
from workers.logfmt import RateLimited

log = logging.getLogger("nbd")

# Reads this large go out with sendfile() (no copy through Python) when possible.
SENDFILE_MIN = 128 * 1024
# sendmsg() takes at most IOV_MAX (1024) buffers. Only replies under
# SENDFILE_MIN are queued (larger ones leave at once); a batch is sent once it
# holds OUT_MAX_BUFFERS buffers or OUT_MAX_BYTES bytes.
OUT_MAX_BUFFERS = 512
OUT_MAX_BYTES = 1 << 20
# Receive-buffer bytes each connection uses without asking the worker's budget:
# pipelined small requests and every handshake fit.
CONN_FREE = 1 << 20
# A serving thread gives its connection back to the selector after this many
# seconds without a byte from the client (SO_RCVTIMEO: no cost per request).
LINGER = 0.5
# A serving thread whose client sent only quick requests (see Server._serve_inline) for
# this many batches in a row hands it back to the selector thread.
HANDBACK_STREAK = 64
# The selector thread serves at most this many requests of one connection's receive itself
# (a few ms): a longer burst goes to a thread, so one client can't hold up the others.
INLINE_MAX = 256
# How often a process sharing the listening socket with others rechecks whether it is the busier one.
BALANCE_EVERY = 0.02
# Connections over a cap are told so in the option phase (NBD_REP_ERR_POLICY),
# up to this many at a time; beyond that they are closed at once.
MAX_REFUSING = 16
# Back-off of accept() when descriptors or memory run out, and how often it is logged.
ACCEPT_BACKOFF_MIN = 0.05
ACCEPT_BACKOFF_MAX = 1.0
WARN_EVERY = 60.0
# Environment variable through which the supervisor hands its workers the Limits.
LIMITS_ENV = "FSSD_NBD_LIMITS"


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-export bounds ([daemon] nbd_* keys)."""

    max_connections: int = 64
    max_connections_per_uid: int = 32
    handshake_timeout: float = 10.0
    # 0: a connection may stay idle for ever.
    idle_timeout: float = 0.0
    # A request (or a reply) whose bytes stop moving for this long: the connection is dropped.
    request_timeout: float = 30.0
    # Per worker: receive and read buffers beyond each connection's CONN_FREE bytes.
    buffer_limit: int = 256 << 20

    @classmethod
    def from_environment(cls) -> "Limits":
        raw = os.environ.get(LIMITS_ENV)
        if not raw:
            return cls()
        try:
            return msgspec.json.decode(raw, type=cls)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            log.error("ignoring %s (%s); using the default NBD limits", LIMITS_ENV, e)
            return cls()


class Backend(Protocol):
    """What an export does; raises OSError with a meaningful errno on failure."""

    size: int
    read_only: bool

    def read(self, offset: int, length: int) -> bytes:
        """A small read (a few KiB): the export's bytes, or raise."""

    def read_into(self, view: memoryview, offset: int) -> None:
        """Fill `view` with the export's bytes at `offset`, or raise."""

    def sendfile_source(self, offset: int, length: int) -> tuple[int, int] | list[tuple[int, int, int]] | None:
        """Where these bytes lie for os.sendfile, if they never change once named (the
        socket may still reference the file's pages after the reply has left): (fd, file
        offset) holding exactly them, or [(fd, file offset, length), ...] pieces in order;
        None: read_into() them."""

    def write(self, offset: int, data: memoryview, fua: bool) -> None: ...
    def flush(self) -> None: ...
    def trim(self, offset: int, length: int, fua: bool) -> None: ...
    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None: ...
    def cache(self, offset: int, length: int) -> None: ...
    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """base:allocation: (length, NBD_STATE_* flags) from offset on."""

    # Optional (snapshot exports with change tracking): the qemu:dirty-bitmap contexts.
    # dirty_bitmaps() -> bitmap names offered now; dirty_extents(name, offset, length)
    # -> (length, NBD_STATE_DIRTY or 0) from offset on, or raise.


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
        limits: Limits | None = None,
    ):
        self.listener = listener
        self.export = export
        self.backend = backend
        self.on_clients = on_clients
        self.limits = limits if limits is not None else Limits.from_environment()
        self._budget = _Budget(self.limits.buffer_limit)
        bitmaps = getattr(backend, "dirty_bitmaps", None)
        self._bitmaps = (lambda _export: bitmaps()) if bitmaps is not None else None
        self._lock = threading.Lock()
        self._conns: set[_Conn] = set()  # served connections (refused ones are not counted)
        self._per_peer: dict[str, int] = {}
        self._threads: set[threading.Thread] = set()
        self._handback: list[_Conn] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = threading.Event()
        self._loop_done = threading.Event()
        self._running = False
        # Selector-thread state.
        self._sel: selectors.BaseSelector | None = None
        self._watched: set[_Conn] = set()
        self._timers: list = []
        self._seq = 0
        self._refusing = 0
        self.requests = 0
        self.errors = 0
        self._warn_accept = RateLimited(log, WARN_EVERY)
        # Connections taken per wake-up. Processes sharing one listening socket set 1, so a
        # burst of clients is spread between them instead of landing in whichever woke first.
        self.accept_batch = 64
        # Processes sharing the socket: "am I serving more clients than another of them?" Then
        # this one stops accepting (rechecked every BALANCE_EVERY s) so the next client goes
        # to a less busy process; a client left waiting two checks in a row is taken anyway
        # (the other may be stuck or restarting).
        self.defer_accept: Callable[[], bool] | None = None
        self._warn_refuse = RateLimited(log, WARN_EVERY)
        self._warn_drop = RateLimited(log, 10.0)
        self._warn_budget = RateLimited(log, WARN_EVERY)
        self._rcvtimeo = _timeval(LINGER)
        self._sndtimeo = _timeval(self.limits.request_timeout)

    @property
    def clients(self) -> int:
        with self._lock:
            return len(self._conns)

    # -- the selector thread ---------------------------------------------------------

    def serve_forever(self) -> None:
        """Accept, negotiate and watch quiet connections until stop()."""
        _raise_fd_limit()
        self._running = True
        sel = self._sel = selectors.DefaultSelector()
        self.listener.setblocking(False)
        sel.register(self.listener, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        listening, backoff, resume_at = True, 0.0, 0.0
        balanced_out, waiting_seen, next_balance = False, False, 0.0
        timers = self._timers
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                if self.defer_accept is not None and now >= next_balance and (listening or balanced_out):
                    next_balance = now + BALANCE_EVERY
                    busier = self.defer_accept()
                    if busier and listening:
                        sel.unregister(self.listener)
                        listening, balanced_out, waiting_seen, resume_at = False, True, False, _NEVER
                    elif balanced_out and not busier:
                        sel.register(self.listener, selectors.EVENT_READ, None)
                        listening, balanced_out = True, False
                    elif balanced_out:
                        waiting = bool(select.select([self.listener], [], [], 0)[0])
                        if waiting and waiting_seen:  # nobody else took it: this process does
                            self._accept_some(0.0)
                            waiting = False
                        waiting_seen = waiting
                timeout = max(0.0, timers[0][0] - now) if timers else None
                if not listening:
                    wait = max(0.0, (next_balance if balanced_out else resume_at) - now)
                    timeout = wait if timeout is None else min(timeout, wait)
                for key, mask in sel.select(timeout):
                    data = key.data
                    if data is None:
                        backoff = self._accept_some(backoff)
                        next_balance = 0.0  # one more client here: am I the busier one now?
                        if backoff:  # out of descriptors or memory: stop asking for a while
                            sel.unregister(self.listener)
                            listening, resume_at = False, time.monotonic() + backoff
                    elif data is _WAKE:
                        self._take_handbacks()
                    elif data in self._watched:
                        try:
                            self._on_event(data, mask)
                        except Exception:  # a bug must cost one connection, never the export
                            log.exception("%s: internal error; closing this connection", self.export.name)
                            self._drop(data)
                now = time.monotonic()
                if not listening and not balanced_out and now >= resume_at:
                    sel.register(self.listener, selectors.EVENT_READ, None)
                    listening = True
                while timers and timers[0][0] <= now:
                    due, _, c = heapq.heappop(timers)
                    if c.timer == due:
                        c.timer = _NEVER
                    if c not in self._watched:
                        continue
                    if c.deadline <= now:
                        self._expire(c)
                    elif c.deadline < c.timer:  # moved later meanwhile: wait for the new one
                        self._set_deadline(c, c.deadline)
        except Exception:
            log.exception("%s: internal error in the connection loop", self.export.name)
            raise
        finally:
            with self._lock:
                back, self._handback = self._handback, []
            for c in back:
                self._close(c)
            for c in list(self._watched):
                self._drop(c)
            sel.close()
            self._loop_done.set()

    def _accept_some(self, backoff: float) -> float:
        """Accept what is waiting; the next back-off (0: none)."""
        for _ in range(self.accept_batch):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return 0.0
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    backoff = min(ACCEPT_BACKOFF_MAX, max(ACCEPT_BACKOFF_MIN, backoff * 2))
                    self._warn_accept(logging.WARNING, "%s: cannot accept connections: %s; backing off", self.export.name, e.strerror)
                    return backoff
                continue  # ECONNABORTED and the like: that client is gone, the next may be fine
            try:
                self._admit(sock)
            except OSError as e:
                log.info("%s: client went away while connecting: %s", self.export.name, e)
                sock.close()
        return 0.0

    def _admit(self, sock: socket.socket) -> None:
        lim = self.limits
        peer = _peer(sock)
        refusal = None
        with self._lock:
            if len(self._conns) >= lim.max_connections:
                refusal = f"too many connections to {self.export.name} (at most {lim.max_connections})"
            elif peer != _ROOT and self._per_peer.get(peer, 0) >= lim.max_connections_per_uid:
                refusal = f"too many connections to {self.export.name} from {peer} (at most {lim.max_connections_per_uid})"
        if refusal is not None:
            self._warn_refuse(logging.WARNING, "%s: refusing a connection: %s", self.export.name, refusal)
            if self._refusing >= MAX_REFUSING:
                sock.close()
                return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._rcvtimeo)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._sndtimeo)
        proto = nbd.ServerConnection([self.export], zero_copy=True, refusal=refusal, dirty_bitmaps=self._bitmaps)
        c = _Conn(sock, peer, proto, refusal is not None)
        c.pending = proto.greeting()
        if c.refused:
            self._refusing += 1
        else:
            with self._lock:
                self._conns.add(c)
                self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
                if self.on_clients:  # under the lock: counts reach the supervisor in order
                    self.on_clients(len(self._conns))
        self._watch(c, time.monotonic() + lim.handshake_timeout)
        self._flush(c)

    def _watch(self, c: _Conn, deadline: float) -> None:
        """The selector watches `c` (readable; writable too while replies wait) until `deadline`."""
        events = selectors.EVENT_READ
        if c.pending:
            # Replies the client does not read: stop reading its options until they leave.
            events = selectors.EVENT_WRITE if len(c.pending) > 65536 else events | selectors.EVENT_WRITE
        if c in self._watched:
            if events != c.events:
                self._sel.modify(c.sock, events, c)
        else:
            self._sel.register(c.sock, events, c)
            self._watched.add(c)
        c.events = events
        self._set_deadline(c, deadline)

    def _set_deadline(self, c: _Conn, deadline: float) -> None:
        """Timers are lazy: a connection has at most one entry due before its deadline
        (c.timer); a deadline moved later is found when that entry comes due and pushed
        again then, so a busy connection pushes nothing per request."""
        c.deadline = deadline
        if deadline < c.timer:
            c.timer = deadline
            self._seq += 1
            heapq.heappush(self._timers, (deadline, self._seq, c))

    def _unwatch(self, c: _Conn) -> None:
        if c in self._watched:
            self._watched.discard(c)
            self._sel.unregister(c.sock)

    def _flush(self, c: _Conn) -> None:
        """Send what the handshake has queued, as far as the socket takes it now."""
        if c.pending:
            try:
                n = c.sock.send(c.pending, socket.MSG_DONTWAIT)
            except BlockingIOError:
                n = 0
            except OSError as e:
                self._warn_drop(logging.INFO, "%s: client went away during the handshake: %s", self.export.name, e)
                self._drop(c)
                return
            c.pending = c.pending[n:]
        if c in self._watched:
            self._watch(c, c.deadline)

    def _on_event(self, c: _Conn, mask: int) -> None:
        if c.proto.state is nbd.State.TRANSMISSION and not c.pending:
            self._serve_inline(c)
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(c)
            if c not in self._watched:
                return
        if not mask & selectors.EVENT_READ:
            return
        try:
            n = c.sock.recv_into(c.proto.receive_buffer(CONN_FREE), 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as e:
            self._warn_drop(logging.INFO, "%s: client went away during the handshake: %s", self.export.name, e)
            self._drop(c)
            return
        if n == 0:
            self._drop(c)
            return
        c.proto.received(n)
        evs = c.proto.events(until_ready=True)
        c.pending += c.proto.data_to_send()
        for ev in evs:
            cls = type(ev)
            if cls is nbd.Ready:
                self._flush(c)
                if c.closed:
                    return
                if c.proto.buffered or c.pending:
                    self._activate(c)  # requests came with GO, or replies wait: a thread takes over now
                else:
                    self._watch(c, self._quiet_deadline(c))
                return
            if cls is nbd.ProtocolError:
                self._warn_drop(logging.WARNING, "%s: protocol error during the handshake, disconnecting: %s", self.export.name, ev.reason)
            self._flush(c)  # best effort: the final replies (ABORT's ACK)
            self._drop(c)
            return
        self._flush(c)

    def _serve_inline(self, c: _Conn) -> None:
        """Serve what a readable connection sent, here in the selector thread, while it is
        quick: READs under SENDFILE_MIN and WRITEs the backend says will not wait (no copy
        for a snapshot, no sync). Any other request, a message larger than the free
        share, or a reply the socket will not take at once hands the connection to a
        thread of its own (_activate) from that request on.

        Why: threads of one process take turns on the GIL, and every blocking call
        hands it over, so many busy connections each in its own thread spend their
        time passing the GIL (one process: 122k 4 KiB reads/s with one client, 53k
        with four). Here one thread serves every connection that is ready: one
        recv and one sendmsg per batch, no hand-over."""
        conn, sock = c.proto, c.sock
        view = conn.receive_buffer(CONN_FREE)
        if conn.filled + len(view) > CONN_FREE:  # a message beyond the free share: budgeted in a thread
            view.release()
            self._activate(c)
            return
        try:
            n = sock.recv_into(view, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as e:
            log.info("%s: client went away: %s", self.export.name, e)
            self._drop(c)
            return
        finally:
            view.release()
        if n == 0:
            self._drop(c)
            return
        conn.received(n)
        evs = conn.events()
        if len(evs) > INLINE_MAX:  # a burst this long would hold up every other client: a thread takes it
            self._activate(c, evs)
            return
        out: list = []
        queued = 0
        backend = self.backend
        read = getattr(backend, "read", None)  # (test doubles may lack one; a READ then fails as a bug does)
        write_quick = getattr(backend, "write_quick", _never)  # a read-only export gets no WRITE Request anyway
        Request, READ, WRITE, FUA, ok_reply = nbd.Request, nbd.CMD_READ, nbd.CMD_WRITE, nbd.CMD_FLAG_FUA, nbd.ok_reply
        for i, ev in enumerate(evs):
            cls = type(ev)
            if cls is Request:
                cmd = ev.cmd
                if cmd == READ and ev.length < SENDFILE_MIN:
                    self.requests += 1
                    try:
                        data = read(ev.offset, ev.length)  # before the header: a failed read replies an error
                        out.append(conn.read_reply_header(ev.cookie, ev.offset, ev.length))
                        out.append(data)
                        queued += ev.length
                    except OSError as e:
                        out.append(self._failed(conn, ev, e))
                    continue_batch = True
                elif cmd == WRITE and ev.length < SENDFILE_MIN and not ev.flags & FUA:
                    try:
                        continue_batch = write_quick(ev.offset, ev.data)  # False: nothing done, it would wait
                        if continue_batch:
                            self.requests += 1
                            out.append(ok_reply(ev.cookie))
                    except OSError as e:
                        self.requests += 1
                        out.append(self._failed(conn, ev, e))
                        continue_batch = True
                else:
                    continue_batch = False
                if not continue_batch:  # slow or large: a thread takes over from this request on
                    if self._send_inline(c, out):
                        self._activate(c, evs[i:])
                    return
            elif cls is nbd.BadRequest:
                self.errors += 1
                log.info("%s: refused %s: %s", self.export.name, nbd.CMD_NAMES.get(ev.cmd, ev.cmd), ev.reason)
                out.append(conn.error_reply(ev.cookie, ev.errno, ev.reason))
            else:  # Disconnect or ProtocolError: the replies before it still go out
                if not self._send_inline(c, out):
                    return
                if c.pending:  # a thread sends the rest, then ends the connection as it says
                    self._activate(c, evs[i:])
                    return
                if cls is nbd.ProtocolError:
                    log.warning("%s: protocol error, disconnecting: %s", self.export.name, ev.reason)
                self._drop(c)
                return
            if len(out) > OUT_MAX_BUFFERS or queued > OUT_MAX_BYTES:
                if not self._send_inline(c, out):
                    return
                if c.pending:  # the socket took part: a thread finishes it (and the rest)
                    self._activate(c, evs[i + 1 :])
                    return
                queued = 0
        if not self._send_inline(c, out):
            return
        if c.pending:
            self._activate(c, [])
            return
        if conn.buffered or self.limits.idle_timeout:
            self._set_deadline(c, self._quiet_deadline(c))
        elif c.deadline != _NEVER:
            c.deadline = _NEVER

    def _send_inline(self, c: _Conn, out: list) -> bool:
        """Send the queued replies without waiting: what the socket does not take now
        stays in c.pending (for a thread to send). False: the connection is gone."""
        if not out:
            return not c.closed
        try:
            sent = c.sock.sendmsg(out, [], socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            log.info("%s: client went away: %s", self.export.name, e)
            out.clear()
            self._drop(c)
            return False
        for k, b in enumerate(out):
            if sent >= len(b):
                sent -= len(b)
                continue
            c.pending = b"".join([memoryview(b)[sent:], *out[k + 1 :]])
            break
        out.clear()
        return True

    def _quiet_deadline(self, c: _Conn) -> float:
        if c.proto.buffered:  # half a request: it must go on arriving
            return time.monotonic() + self.limits.request_timeout
        if self.limits.idle_timeout:
            return time.monotonic() + self.limits.idle_timeout
        return _NEVER

    def _expire(self, c: _Conn) -> None:
        lim = self.limits
        if c.proto.state is not nbd.State.TRANSMISSION:
            why = f"handshake not finished within {lim.handshake_timeout:g} s"
        elif c.proto.buffered:
            why = f"a request stalled for {lim.request_timeout:g} s"
        else:
            why = f"idle for {lim.idle_timeout:g} s"
        self._warn_drop(logging.INFO, "%s: closing a connection: %s", self.export.name, why)
        self._drop(c)

    def _drop(self, c: _Conn) -> None:
        """Close a connection the selector holds."""
        self._unwatch(c)
        if c.closed:
            return
        if c.refused:
            self._refusing -= 1
        self._close(c)

    def _activate(self, c: _Conn, evs: list | None = None) -> None:
        """A thread of its own serves `c`, starting with `evs` (None: what is buffered)."""
        self._unwatch(c)
        c.deadline = _NEVER
        t = threading.Thread(target=self._run_conn, args=(c, evs), name="nbd-conn", daemon=True)
        with self._lock:
            self._threads.add(t)
        try:
            t.start()
        except RuntimeError as e:  # no thread to be had (memory, pids): this client waits no longer
            with self._lock:
                self._threads.discard(t)
            self._warn_drop(logging.WARNING, "%s: closing a connection: cannot start a thread: %s", self.export.name, e)
            self._close(c)

    def _take_handbacks(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            back, self._handback = self._handback, []
        for c in back:
            self._watch(c, self._quiet_deadline(c))

    def _hand_back(self, c: _Conn) -> bool:
        """From a serving thread: the client went quiet; the selector watches it again."""
        self._release(c, keep=0)
        with self._lock:
            if self._stopping.is_set():
                return False
            self._handback.append(c)
        try:
            os.write(self._wake_w, b"w")
        except BlockingIOError:
            pass  # the pipe is full: the selector is about to wake anyway
        return True

    # -- stopping --------------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting; let every served connection finish the requests it has, then close."""
        self._stopping.set()
        try:
            os.write(self._wake_w, b"s")
        except BlockingIOError:
            pass
        if self._running:
            self._loop_done.wait(timeout)
        with self._lock:
            busy = [c for c in self._conns if not c.closed]
            threads = list(self._threads)
        for c in busy:
            try:
                c.sock.shutdown(socket.SHUT_RD)  # recv() returns 0 after the buffered requests
            except OSError:
                pass
        self._budget.close()
        for t in threads:
            t.join(timeout)

    # -- a serving thread --------------------------------------------------------------

    def _run_conn(self, c: _Conn, evs: list | None) -> None:
        quiet = False
        try:
            if c.pending:
                c.sock.sendall(c.pending)
                c.pending = b""
            quiet = self._converse(c, evs)
        except (ConnectionError, BrokenPipeError, TimeoutError) as e:
            log.info("%s: client went away: %s", self.export.name, e)
        except BlockingIOError:
            log.warning("%s: closing the connection: the client took no reply bytes for %g s", self.export.name, self.limits.request_timeout)
        except _StreamBroken as e:
            log.warning("%s: closing the connection: %s", self.export.name, e)
        except OSError as e:
            log.warning("%s: connection closed after error: %s", self.export.name, e)
        except Exception:  # a bug must cost one connection, never the worker
            log.exception("%s: internal error; closing this connection", self.export.name)
        finally:
            if not (quiet and self._hand_back(c)):
                self._close(c)
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _close(self, c: _Conn) -> None:
        if c.closed:
            return
        c.closed = True
        with self._lock:
            served = c in self._conns
            if served:
                self._conns.discard(c)
                left = self._per_peer.get(c.peer, 1) - 1
                if left:
                    self._per_peer[c.peer] = left
                else:
                    self._per_peer.pop(c.peer, None)
        try:
            c.sock.close()
        except OSError:
            pass
        self._budget.give(c.held + c.reads_held)
        c.held = c.reads_held = 0
        c.reads_mv = c.reads = None
        if served:
            with self._lock:
                if self.on_clients:
                    self.on_clients(len(self._conns))

    def _release(self, c: _Conn, keep: int) -> None:
        """Give the budget back: the read buffer always, the receive buffer's share when
        what is buffered lies within `keep` bytes (the pages beyond return to the system)."""
        if c.reads is not None:
            c.reads_mv = None
            try:
                c.reads.close()
            except BufferError:  # a reply still refers to it: unmapped when that is gone
                pass
            c.reads = None
        give = c.reads_held
        c.reads_held = 0
        if c.proto.release_memory(keep):
            give += c.held
            c.held = 0
        self._budget.give(give)

    def _read_view(self, c: _Conn, n: int) -> memoryview:
        """A buffer for a large read reply, paid for from the budget first."""
        if n > c.reads_held:
            if not self._budget.take(n - c.reads_held, 0):
                self._release(c, keep=CONN_FREE)  # wait holding nothing idle (see _converse)
                if not self._budget.take(n, self.limits.request_timeout):
                    self._warn_budget(logging.WARNING, "%s: buffer budget of %d bytes exhausted; refusing a read", self.export.name, self.limits.buffer_limit)
                    raise OSError(errno.ENOMEM, "the server's buffer budget is exhausted")
            c.reads_held = n
        if c.reads_mv is None:
            c.reads = mmap.mmap(-1, nbd.MAX_PAYLOAD)
            c.reads_mv = memoryview(c.reads)
        return c.reads_mv[:n]

    def _converse(self, c: _Conn, evs: list | None = None) -> bool:
        """Serve requests until the client leaves (False) or is quiet for LINGER (True).

        WRITE payloads are views into the connection's receive buffer: the socket's
        bytes reach pwrite() without another copy. Each batch is handled before the
        next receive, which is what keeps those views valid."""
        conn, sock = c.proto, c.sock
        out: list = []
        queued = 0
        backend = self.backend
        write = getattr(backend, "write", None)  # a read-only export never gets a WRITE Request
        budget = self._budget
        Request, BadRequest = nbd.Request, nbd.BadRequest
        WRITE, READ, FUA, ok_reply = nbd.CMD_WRITE, nbd.CMD_READ, nbd.CMD_FLAG_FUA, nbd.ok_reply
        quick_write = getattr(backend, "quick_write", _never)
        streak = 0  # batches in a row the selector thread could have served itself
        if evs is None:
            evs = conn.events()  # what arrived with the handshake or while the selector watched
        while True:
            slow = False
            last = None
            for ev in evs:
                cls = type(ev)
                if cls is Request:
                    if ev.cmd == WRITE:  # the small-write hot path: _handle's WRITE branch, inlined
                        self.requests += 1
                        last = ev
                        try:
                            write(ev.offset, ev.data, ev.flags & FUA)
                            out.append(ok_reply(ev.cookie))
                        except OSError as e:
                            out.append(self._failed(conn, ev, e))
                        if len(out) > OUT_MAX_BUFFERS:
                            _send(sock, out)
                            queued = 0
                        continue
                    if ev.cmd != READ or ev.length >= SENDFILE_MIN:
                        slow = True
                    queued += self._handle(conn, ev, out, sock, backend, c)
                    if len(out) > OUT_MAX_BUFFERS or queued > OUT_MAX_BYTES:
                        _send(sock, out)
                        queued = 0
                elif cls is BadRequest:
                    self.errors += 1
                    log.info("%s: refused %s: %s", self.export.name, nbd.CMD_NAMES.get(ev.cmd, ev.cmd), ev.reason)
                    out.append(conn.error_reply(ev.cookie, ev.errno, ev.reason))
                    if len(out) > OUT_MAX_BUFFERS:
                        _send(sock, out)
                        queued = 0
                else:
                    if cls is nbd.ProtocolError:
                        log.warning("%s: protocol error, disconnecting: %s", self.export.name, ev.reason)
                    _send(sock, out)
                    return False  # ProtocolError or Disconnect
            if out:
                _send(sock, out)
                queued = 0
            # Back to the selector thread once this client's requests have been quick for a
            # while (a sampled WRITE: a wrong guess costs time, never correctness).
            if slow or (last is not None and not _inline_write(last, quick_write)):
                streak = 0
            else:
                streak += 1
                if streak >= HANDBACK_STREAK and not conn.buffered:
                    return True
            if budget.waiters and (c.held or c.reads_held):
                self._release(c, keep=CONN_FREE)  # others wait for memory this connection is not using
            # Receive within the free share, except for a message larger than it (a big
            # WRITE), whose bytes are paid for from the budget before they are touched.
            view = conn.receive_buffer(CONN_FREE)
            extra = conn.filled + len(view) - CONN_FREE
            if extra > c.held:
                if not budget.take(extra - c.held, 0):
                    # Wait holding nothing the others may be waiting for (what this connection
                    # has buffered lies within its free share: it never reads past a message).
                    view.release()
                    self._release(c, keep=CONN_FREE)
                    if not budget.take(extra - c.held, self.limits.request_timeout):
                        self._warn_budget(logging.WARNING, "%s: buffer budget of %d bytes exhausted; refusing a WRITE", self.export.name, self.limits.buffer_limit)
                        if not conn.refuse_pending_write(nbd.ENOMEM, "the server's buffer budget is exhausted"):
                            raise _StreamBroken("no buffer for the next message")
                        evs = conn.events()
                        continue
                    view = conn.receive_buffer(CONN_FREE)
                c.held = extra
            try:
                n = sock.recv_into(view)
            except BlockingIOError:  # SO_RCVTIMEO: quiet for LINGER
                return True
            if n == 0:
                return False
            conn.received(n)
            evs = conn.events()

    def _handle(self, conn: nbd.ServerConnection, req: nbd.Request, out: list, sock, backend: Backend, c: _Conn) -> int:
        """Execute one request and queue (or send) its reply; the bytes of reply data queued."""
        self.requests += 1
        cmd = req.cmd
        try:
            if cmd == nbd.CMD_READ:
                n = req.length
                if n < SENDFILE_MIN:
                    data = backend.read(req.offset, n)  # before the header: a failed read replies an error
                    out.append(conn.read_reply_header(req.cookie, req.offset, n))
                    out.append(data)  # queued: one sendmsg per batch
                    return n
                src = backend.sendfile_source(req.offset, n)  # raises before anything is sent: an error reply
                if src is not None:
                    self._sendfile_read(conn, req, src, out, sock)
                    return 0
                # Large replies leave at once from a buffer this connection reuses.
                view = self._read_view(c, n)
                backend.read_into(view, req.offset)
                out.append(conn.read_reply_header(req.cookie, req.offset, n))
                out.append(view)
                _send_or_break(sock, out)
                return 0
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
                out.append(_block_status(conn, req, backend))
                return 0
            out.append(conn.simple_reply(req.cookie))
            return 0
        except OSError as e:
            out.append(self._failed(conn, req, e))
            return 0

    def _failed(self, conn: nbd.ServerConnection, req: nbd.Request, e: OSError) -> bytes:
        """The error reply of a request the backend failed (logged, but not an expected ENOTSUP)."""
        self.errors += 1
        cmd = req.cmd
        code = nbd_errno(e)
        if not (cmd == nbd.CMD_WRITE_ZEROES and code == nbd.ENOTSUP):
            log.warning("%s: %s %d+%d failed: %s", self.export.name, nbd.CMD_NAMES[cmd], req.offset, req.length, e)
        return conn.error_reply(req.cookie, code, f"{nbd.CMD_NAMES[cmd]}: {e.strerror or e}")


    def _sendfile_read(self, conn: nbd.ServerConnection, req: nbd.Request, src: tuple[int, int] | list[tuple[int, int, int]], out: list, sock) -> None:
        """A large READ straight from the file. The data chunk's header leaves first, so
        with structured replies it is not flagged DONE (doc/proto.md: not while an error
        can still be detected): a NONE chunk ends the reply, or, when the file fails
        mid-way, the chunk is completed with zero padding and an error chunk says the
        read failed. Simple replies have no way to say it: the stream is broken."""
        n = req.length
        structured = conn.structured
        out.append(conn.read_reply_header(req.cookie, req.offset, n, done=not structured))
        _send_or_break(sock, out)
        pieces = src if type(src) is list else ((src[0], src[1], n),)
        done = 0
        try:
            for fd, off, k in pieces:
                try:
                    _sendfile(sock, fd, off, k)
                except _SendfileFailed as e:
                    e.sent += done  # of the whole reply
                    raise
                done += k
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


def _inline_write(req: nbd.Request, quick_write) -> bool:
    """Is this WRITE one the selector thread serves itself: small, no FUA, and the backend
    says it goes straight to the volume?"""
    return req.length < SENDFILE_MIN and not req.flags & nbd.CMD_FLAG_FUA and quick_write(req.offset, req.length)


def _never(_offset: int, _what) -> bool:
    return False


_WAKE = object()
_NEVER = float("inf")


class _Conn:
    """One client connection: owned by the selector thread or by one serving thread at a time."""

    __slots__ = ("sock", "peer", "proto", "refused", "pending", "deadline", "timer", "events", "held", "reads", "reads_mv", "reads_held", "closed")

    def __init__(self, sock: socket.socket, peer: str, proto: nbd.ServerConnection, refused: bool):
        self.sock = sock
        self.peer = peer
        self.proto = proto
        self.refused = refused
        self.pending = b""  # handshake replies not sent yet
        self.deadline = _NEVER
        self.timer = _NEVER  # the earliest entry this connection has in the timer heap
        self.events = 0
        self.held = 0  # budget bytes the receive buffer may use beyond CONN_FREE
        self.reads: mmap.mmap | None = None  # buffer for large read replies
        self.reads_mv: memoryview | None = None
        self.reads_held = 0
        self.closed = False


class _Budget:
    """The worker's buffer bytes beyond each connection's CONN_FREE, taken before use."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.waiters = 0  # read without the lock by holders: "give back what you don't use"
        self.closed = False
        self._cond = threading.Condition()

    def take(self, n: int, timeout: float) -> bool:
        with self._cond:
            if self.used + n <= self.limit:
                self.used += n
                return True
            if n > self.limit or self.closed or timeout <= 0:
                return False
            self.waiters += 1
            try:
                self._cond.wait_for(lambda: self.closed or self.used + n <= self.limit, timeout)
            finally:
                self.waiters -= 1
            if self.closed or self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        if n:
            with self._cond:
                self.used -= n
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


_PEERCRED = struct.Struct("3i")  # pid, uid, gid
_ROOT = "uid 0"  # not capped per uid (as the VSS broker's registrations): the total cap still holds


def _peer(sock: socket.socket) -> str:
    """Whom a connection's per-peer cap counts it for: the uid on a Unix socket, else the host."""
    if sock.family == socket.AF_UNIX:
        _pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        return f"uid {uid}"
    try:
        return f"host {sock.getpeername()[0]}"
    except OSError:
        return "host ?"


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))


def _raise_fd_limit() -> None:
    """Idle connections cost a descriptor each: allow as many as the hard limit does."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):
        pass


def _block_status(conn: nbd.ServerConnection, req: nbd.Request, backend: Backend) -> bytes:
    """BLOCK_STATUS: one chunk per selected meta context (base:allocation, qemu:dirty-bitmap:*).
    Any failure is raised before anything is queued: an error reply for the whole request."""
    chunks = []
    for ctx_id, name in conn.meta:
        if name == nbd.BASE_ALLOCATION:
            ext = backend.extents(req.offset, req.length)
        else:
            ext = backend.dirty_extents(name[len(nbd.QEMU_DIRTY_BITMAP) :], req.offset, req.length)
        chunks.append((ctx_id, ext))
    try:
        return conn.block_status_reply(req.cookie, req.length, bool(req.flags & nbd.CMD_FLAG_REQ_ONE), chunks)
    except ValueError as e:
        raise OSError(errno.EIO, str(e)) from None
