"""`fssd: listen ADDRESS`: NBD over TCP (and TLS) for every export one [[listen]] table allows.

Each export is served by its own worker on a Unix socket, and a TLS session
cannot be handed from one process to another, so one front process per TCP
address does the handshake itself and then relays bytes:

  1. fixed-newstyle negotiation with ipc.nbd.ServerConnection in proxy mode:
     with `tls = "require"` nothing but STARTTLS (or ABORT) is answered before
     TLS (NBD_REP_ERR_TLS_REQD); STARTTLS runs the TLS handshake with Python's
     ssl, the client certificate checked against ca-cert.pem (verify_peer);
  2. LIST shows only the exports this client may open, and any option naming
     another gets NBD_REP_ERR_POLICY (logged with the peer and its subject);
  3. INFO/GO for an allowed export: the front connects to RUNDIR/<export>.sock
     as root, replays the client's choices there (ipc.nbdclient: structured
     replies, meta context, the same INFO/GO) and forwards the worker's
     replies (read-only forced for snapshots); after GO it relays both ways
     with a bounded buffer until either side closes.

Exports are read on demand: a snapshot is a `fssN.sock` in the run directory
(volume names can't start with `fss`), the live volumes are those the
supervisor names (spawn settings, ListenUpdate on SIGHUP). The listening socket
is the supervisor's, inherited, so clients queue while this process restarts.

Threads: one accepts; each connection has one thread: the handshake with
blocking calls under one deadline (TLS included), then workers.relay on
non-blocking sockets (one SSL object must not be used from two threads at
once). TLS runs on memory BIOs (workers.tlsstream).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import ssl
import sys
import threading
import time

import msgspec

from ipc import listenpolicy, names, nbd, workermsg
from ipc.channel import Channel
from ipc.listenpolicy import Client, ListenSection
from ipc.nbdclient import ClientHandshake, ContextList, HandshakeFailed
from workers import relay, spawned
from workers.tlsstream import PlainStream, Timeout, TLSStream

log = logging.getLogger("listen")

# Handshake receive size (options are at most 64 KiB).
HS_CHUNK = 64 * 1024
WARN_EVERY = 10.0


class FrontSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """workers.tcpfront: one [[listen]] table (the contract of workers.settings: debug, use_syslog last)."""

    listen: ListenSection
    listen_fd: int
    rundir: str
    volumes: list[str]
    debug: bool = False
    use_syslog: bool = False


class TLSFilesError(Exception):
    pass


def tls_context(listen: ListenSection) -> ssl.SSLContext | None:
    """The server context from tls_dir (qemu's layout); None for tls = "off"."""
    if listen.tls == "off":
        return None
    d = listen.tls_dir
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(os.path.join(d, "server-cert.pem"), os.path.join(d, "server-key.pem"))
        if listen.verify_peer:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(os.path.join(d, "ca-cert.pem"))
            crl = os.path.join(d, "ca-crl.pem")
            if os.path.exists(crl):
                ctx.load_verify_locations(crl)
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except (OSError, ssl.SSLError) as e:
        raise TLSFilesError(f"cannot load the TLS credentials in {d}: {e}") from None
    return ctx


class _Warn:
    """A recurring condition logged at most once per WARN_EVERY seconds, with the count between."""

    def __init__(self):
        self._next = 0.0
        self._n = 0
        self._lock = threading.Lock()

    def __call__(self, level: int, msg: str, *args) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._n += 1
                return
            n, self._n = self._n, 0
            self._next = now + WARN_EVERY
        log.log(level, msg + (f" ({n} more since)" if n else ""), *args)


class _WarnPer:
    """_Warn per key (a client): one noisy client does not hide another's refusals."""

    def __init__(self, max_keys: int = 1024):
        self._by: dict[str, _Warn] = {}
        self._max = max_keys
        self._lock = threading.Lock()

    def __call__(self, key: str, level: int, msg: str, *args) -> None:
        with self._lock:
            w = self._by.get(key)
            if w is None:
                if len(self._by) >= self._max:
                    self._by.clear()
                w = self._by[key] = _Warn()
        w(level, msg, *args)


class _Closed(Exception):
    """The connection is over (reason logged by whoever raised it, if worth it)."""


class Front:
    def __init__(self, listener: socket.socket, settings: FrontSettings):
        self.listener = listener
        self.rundir = settings.rundir
        self.listen = settings.listen
        self.volumes = frozenset(settings.volumes)
        self.ctx = tls_context(settings.listen)
        self._lock = threading.Lock()
        self._count = 0
        self._per_client: dict[str, int] = {}
        self._socks: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._warn_cap = _Warn()
        self._warn_tls = _WarnPer()
        self._warn_drop = _Warn()
        self._warn_policy = _WarnPer()
        if self.listen.tls == "off":
            log.warning("%s: plain TCP (tls = \"off\"): exports and data cross the network unencrypted and clients are known by address only", self.listen.address)

    # -- configuration -------------------------------------------------------------

    def update(self, listen: ListenSection, volumes: list[str]) -> None:
        """SIGHUP: new credentials and rules for new connections; open ones are untouched."""
        try:
            ctx = tls_context(listen)
        except TLSFilesError as e:
            log.error("%s; keeping the credentials in use", e)
            ctx = self.ctx
        self.listen, self.volumes, self.ctx = listen, frozenset(volumes), ctx
        if listen.tls == "off":
            log.warning("%s: plain TCP (tls = \"off\"): exports and data cross the network unencrypted and clients are known by address only", listen.address)
        log.info("%s: reloaded (TLS credentials from %s, %d allow rule(s))", listen.address, listen.tls_dir if ctx else "-", len(listen.allow))

    def exports_for(self, client: Client, listen: ListenSection) -> list[nbd.Export]:
        """The exports that exist now and this client may open (names only: the worker has the rest)."""
        found = [v for v in self.volumes]
        try:
            with os.scandir(self.rundir) as it:
                for e in it:
                    if e.name.endswith(".sock") and listenpolicy.is_snapshot(e.name[:-5]):
                        found.append(e.name[:-5])
        except OSError as e:
            log.error("cannot list %s: %s", self.rundir, e)
        return [nbd.Export(n, 0, listenpolicy.is_snapshot(n)) for n in sorted(found) if listenpolicy.allowed(listen.allow, client, n)]

    # -- accepting -------------------------------------------------------------------

    def serve_forever(self) -> None:
        self.listener.setblocking(False)
        poll = select.poll()
        poll.register(self.listener, select.POLLIN)
        poll.register(self._wake_r, select.POLLIN)
        while not self._stopping.is_set():
            poll.poll()
            for _ in range(64):
                try:
                    sock, addr = self.listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        self._warn_cap(logging.WARNING, "%s: cannot accept: %s; backing off", self.listen.address, e.strerror)
                        time.sleep(0.1)
                    break
                self._admit(sock, addr)

    def _admit(self, sock: socket.socket, addr) -> None:
        listen = self.listen
        with self._lock:
            if self._count >= listen.max_connections:
                full = True
            else:
                full = False
                self._count += 1
                self._socks.add(sock)
        if full:
            # Before TLS nothing can be said safely; the spec lets a server hang up.
            self._warn_cap(logging.WARNING, "%s: refusing %s: at most %d connections", listen.address, _fmt(addr), listen.max_connections)
            sock.close()
            return
        try:
            threading.Thread(target=self._connection, args=(sock, addr, listen, self.ctx), name=f"conn {_fmt(addr)}", daemon=True).start()
        except RuntimeError as e:
            log.error("%s: cannot start a thread for %s: %s", listen.address, _fmt(addr), e)
            self._forget(sock, None)
            sock.close()

    def _forget(self, sock: socket.socket, key: str | None) -> None:
        with self._lock:
            self._count -= 1
            self._socks.discard(sock)
            if key is not None:
                left = self._per_client.get(key, 1) - 1
                if left:
                    self._per_client[key] = left
                else:
                    self._per_client.pop(key, None)

    def _claim(self, client: Client, listen: ListenSection) -> str | None:
        """Count the connection for its client; the refusal message when the client is at its cap."""
        with self._lock:
            n = self._per_client.get(client.key, 0)
            if n >= listen.max_connections_per_client:
                return f"too many connections from {client.key} (at most {listen.max_connections_per_client})"
            self._per_client[client.key] = n + 1
        return None

    def stop(self) -> None:
        self._stopping.set()
        os.write(self._wake_w, b"x")
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- one connection -------------------------------------------------------------------

    def _connection(self, sock: socket.socket, addr, listen: ListenSection, ctx: ssl.SSLContext | None) -> None:
        key = None
        client = Client(address=addr[0])
        io: PlainStream | TLSStream = PlainStream(sock)
        unix = None
        # The worker connection of the latest dirty-bitmap question stays open until the
        # export is opened: closing it first could leave the snapshot with no client for a
        # moment, and `fssconfig -c` unconfigures a snapshot then.
        probe: list[socket.socket] = []
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            deadline = time.monotonic() + listen.handshake_timeout
            state = {"client": client}
            conn = nbd.ServerConnection([], tls=ctx is not None, allowed=lambda name: listenpolicy.allowed(listen.allow, state["client"], name),
                                        dirty_bitmaps=lambda name: self._dirty_bitmaps(name, deadline, probe))
            if ctx is None or not listen.verify_peer:
                # Known by address alone: counted now.
                refusal = self._claim(client, listen)
                if refusal is None:
                    key = client.key
                else:
                    self._warn_policy(client.key, logging.WARNING, "%s: %s: %s", listen.address, _fmt(addr), refusal)
                    conn.refusal = refusal
            _send_all(io, conn.greeting(), deadline)
            while True:
                conn.set_exports(self.exports_for(state["client"], listen))
                evs = conn.events()
                for ev in evs:
                    t = type(ev)
                    if t is nbd.StartTLS:
                        _send_all(io, conn.data_to_send(), deadline)
                        io = self._start_tls(sock, ctx, addr, deadline)
                        if listen.verify_peer:
                            client = Client(address=addr[0], subject=listenpolicy.subject_from_peercert(io.getpeercert() or {}))
                            state["client"] = client
                            refusal = self._claim(client, listen)
                            if refusal is None:
                                key = client.key
                            else:
                                self._warn_policy(client.key, logging.WARNING, "%s: %s %s: %s", listen.address, _fmt(addr), client.subject_text, refusal)
                                conn.refusal = refusal
                        conn.tls_started()
                        log.debug("%s: %s: TLS %s, %s", listen.address, _fmt(addr), io.version(), client.subject_text)
                    elif t is nbd.PolicyRefused:
                        self._warn_policy(client.key, logging.WARNING, "%s: refused %s %s export %r (%s): not allowed", listen.address, _fmt(addr), client.subject_text, ev.name, _OPT_NAMES.get(ev.opt, ev.opt))
                    elif t is nbd.ExportWanted:
                        _send_all(io, conn.data_to_send(), deadline)
                        unix, replies, export = self._open_export(conn, ev, deadline, probe)
                        if export is not None:
                            _close_all(probe)  # the export is open: the held connection has done its job
                        if conn.export_answered(ev.opt, replies, export) is not None:
                            _send_all(io, conn.data_to_send(), deadline)
                            first = conn.take_buffered()
                            del conn
                            log.info("%s: %s %s opened %s", listen.address, _fmt(addr), client.subject_text, ev.name)
                            if io.tls:
                                why = relay.relay_tls(io, unix, first, listen.idle_timeout, self._stopping)
                            else:
                                why = relay.relay_plain(sock, unix, first, listen.idle_timeout, self._stopping)
                            log.info("%s: %s %s closed %s: %s", listen.address, _fmt(addr), client.subject_text, ev.name, why)
                            return
                    elif t is nbd.Disconnect:
                        _send_all(io, conn.data_to_send(), deadline)
                        return
                    elif t is nbd.ProtocolError:
                        _send_all(io, conn.data_to_send(), deadline)
                        self._warn_drop(logging.INFO, "%s: %s %s: %s; disconnecting", listen.address, _fmt(addr), client.subject_text, ev.reason)
                        return
                _send_all(io, conn.data_to_send(), deadline)
                if conn.state is not nbd.State.OPTIONS and conn.state is not nbd.State.CLIENT_FLAGS:
                    return
                data = _recv(io, deadline)
                if not data:
                    return
                conn.receive_data(data)
        except _Closed as e:
            if str(e):
                self._warn_drop(logging.INFO, "%s: %s %s: %s", listen.address, _fmt(addr), client.subject_text, e)
        except Exception:  # a bug costs this connection, never the listener
            log.exception("%s: %s: internal error; closing this connection", listen.address, _fmt(addr))
        finally:
            _close_all(probe)
            if io.tls:
                io.close_notify()
            for s in (unix, sock):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass
            self._forget(sock, key)

    def _start_tls(self, sock: socket.socket, ctx: ssl.SSLContext, addr, deadline: float) -> TLSStream:
        t = TLSStream(sock, ctx)
        try:
            t.handshake(deadline)
            return t
        except Timeout:
            raise _Closed("handshake timeout during TLS") from None
        except (ssl.SSLError, OSError) as e:
            self._warn_tls(addr[0], logging.WARNING, "%s: TLS handshake with %s failed: %s", self.listen.address, _fmt(addr), getattr(e, "verify_message", None) or getattr(e, "reason", None) or e)
            raise _Closed("") from None

    def _dirty_bitmaps(self, name: str, deadline: float, probe: list[socket.socket]) -> list[str]:
        """The qemu:dirty-bitmap contexts a snapshot's worker offers now (its own LIST answer),
        so a remote client can select them as a local one can; [] if it cannot say. The worker
        connection is left open in `probe` (the one before it closed once this one is open)."""
        if not listenpolicy.is_snapshot(name):
            return []
        u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        keep = False
        try:
            u.settimeout(max(0.001, deadline - time.monotonic()))
            u.connect(names.export_socket(self.rundir, name))
            cl = ContextList(name, nbd.QEMU_DIRTY_BITMAP, abort=False)
            while cl.result is None:
                data = u.recv(HS_CHUNK)
                if not data:
                    raise HandshakeFailed("the worker closed the connection")
                cl.receive_data(data)
                out = cl.data_to_send()
                if out:
                    u.sendall(out)
            _close_all(probe)
            probe.append(u)
            keep = True
            return [c[len(nbd.QEMU_DIRTY_BITMAP) :] for c in cl.result if c.startswith(nbd.QEMU_DIRTY_BITMAP)]
        except (HandshakeFailed, OSError) as e:
            log.debug("%s: cannot list the dirty bitmaps of %s: %s", self.listen.address, name, e)
            return []
        finally:
            if not keep:
                u.close()

    def _open_export(self, conn: nbd.ServerConnection, ev: nbd.ExportWanted, deadline: float, hold: list[socket.socket]):
        """Connect to the export's worker and replay the negotiation; (socket or None, replies, Export or None).
        After a successful INFO the worker connection is kept in `hold` (the one before it closed
        once this one is open), so the export never has no client between INFO and GO."""
        path = names.export_socket(self.rundir, ev.name)
        u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            u.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                u.connect(path)
            except FileNotFoundError:
                u.close()
                return None, nbd.option_reply(ev.opt, nbd.REP_ERR_UNKNOWN, f"no export named {ev.name!r}"), None
            except socket.timeout:
                raise
            except OSError as e:
                u.close()
                return None, nbd.option_reply(ev.opt, nbd.REP_ERR_SHUTDOWN, f"export {ev.name!r} is not available: {e.strerror}"), None
            meta = [name for _, name in conn.meta]
            hs = ClientHandshake(ev.name, ev.opt, ev.info, conn.structured, meta, read_only=listenpolicy.is_snapshot(ev.name))
            while hs.result is None:
                u.settimeout(max(0.001, deadline - time.monotonic()))
                data = u.recv(HS_CHUNK)
                if not data:
                    raise HandshakeFailed("the worker closed the connection during the handshake")
                hs.receive_data(data)
                out = hs.data_to_send()
                if out:
                    u.sendall(out)
            res = hs.result
            for ctx_id, name in conn.meta:  # the ids the client was told are the ones the worker will use
                if res.meta_ids.get(name) != ctx_id:
                    raise HandshakeFailed(f"the worker chose meta context id {res.meta_ids.get(name)} for {name}, not {ctx_id}")
            if ev.opt == nbd.OPT_GO and res.ok:
                u.settimeout(None)
                return u, res.replies, nbd.Export(ev.name, res.size, bool(res.flags & nbd.TF_READ_ONLY))
            if ev.opt == nbd.OPT_INFO and res.ok:
                _close_all(hold)
                hold.append(u)
                return None, res.replies, None
            try:
                u.sendall(hs.abort())
            except OSError:
                pass
            u.close()
            return None, res.replies, None
        except (HandshakeFailed, OSError) as e:
            u.close()
            if isinstance(e, socket.timeout):
                raise _Closed("handshake timeout while opening the export") from None
            log.error("%s: opening %s failed: %s", self.listen.address, ev.name, e)
            return None, nbd.option_reply(ev.opt, nbd.REP_ERR_SHUTDOWN, f"export {ev.name!r} is not available"), None


_OPT_NAMES = {nbd.OPT_INFO: "INFO", nbd.OPT_GO: "GO", nbd.OPT_LIST: "LIST", nbd.OPT_SET_META_CONTEXT: "SET_META_CONTEXT", nbd.OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT"}


def _close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        try:
            s.close()
        except OSError:
            pass
    socks.clear()


def _fmt(addr) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _send_all(stream: PlainStream | TLSStream, data: bytes, deadline: float) -> None:
    if not data:
        return
    try:
        stream.sendall(data, deadline)
    except Timeout:
        raise _Closed("handshake timeout (the client does not read)") from None
    except (OSError, ssl.SSLError) as e:
        raise _Closed(f"client went away during the handshake: {e}") from None


def _recv(stream: PlainStream | TLSStream, deadline: float) -> bytes:
    try:
        return stream.recv(HS_CHUNK, deadline)
    except Timeout:
        raise _Closed("handshake timeout") from None
    except (OSError, ssl.SSLError) as e:
        raise _Closed(f"client went away during the handshake: {e}") from None


def run(settings: FrontSettings, chan: Channel) -> int:
    listener = socket.socket(fileno=settings.listen_fd)
    try:
        front = Front(listener, settings)
    except TLSFilesError as e:
        log.error("%s", e)
        return 1
    signal.signal(signal.SIGHUP, lambda *_: front.update(front.listen, list(front.volumes)))
    acceptor = threading.Thread(target=front.serve_forever, name="accept", daemon=True)
    acceptor.start()
    chan.send(workermsg.Ready(kind="listen", pid=os.getpid()))
    log.info("listening on %s (tls %s%s)", settings.listen.address, settings.listen.tls, ", client certificates required" if settings.listen.tls != "off" and settings.listen.verify_peer else "")
    for msg, fds in spawned.supervisor_messages(chan):
        for fd in fds:
            os.close(fd)
        if isinstance(msg, workermsg.ListenUpdate):
            front.update(msg.listen, msg.volumes)
        else:
            log.warning("ignoring unexpected message %s", type(msg).__name__)
    front.stop()
    acceptor.join(5)
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(*spawned.bootstrap("workers.tcpfront", FrontSettings, argv,
                                  title=lambda s: f"listen {s.listen.address}", log_name=lambda s: f"listen {s.listen.address}"))


if __name__ == "__main__":
    sys.exit(main())
