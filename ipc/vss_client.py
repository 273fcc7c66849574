"""The VSS client library: applications and requestors talk to the broker.

Both connect to the broker's socket (RUNDIR/vss.sock), which only root and
members of fssd's `[daemon] group` may use. An Application registers there
and gets two queues the broker made for it (owned by its uid, mode 0600):
CHECK / FREEZE / THAW arrive on one, its OK / FAIL answers go on the other.
The connection stays open while it is registered; closing it unregisters.

    with Application(rundir, "mydb") as app:
        while True:
            req = app.receive(timeout=1.0)
            if req is not None:
                ok = flush_and_hold() if req.op == "freeze" else True
                app.answer(req, ok)

A Requestor asks for a transaction and blocks for the reply; every call has
its own connection, so one Requestor may be used from several threads:

    reply = Requestor(rundir).request("freeze", timeout=15)
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time

from ipc import mqueue, vssproto
from ipc.names import vss_socket
from ipc.vssproto import Answer, Opened, Register, Registered, Request, VssReply, VssRequest

log = logging.getLogger("vss.client")

DEFAULT_TIMEOUT = 15.0  # the broker's default phase timeout, as hv_vss


class VssError(Exception):
    pass


class BrokerNotRunning(VssError):
    """No broker socket: fssd (or its broker) is not running for this run directory."""

    def __init__(self, rundir: str):
        super().__init__(not_running(rundir))


class VssPermissionError(VssError):
    pass


class VssTimeout(VssError):
    pass


def not_running(rundir: str) -> str:
    """The one wording every tool uses when there is no broker."""
    return f"fssd is not running (no broker at {rundir})"


def _connect(rundir: str, timeout: float) -> socket.socket:
    path = vss_socket(rundir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        sock.close()
        raise BrokerNotRunning(rundir) from None
    except PermissionError:
        sock.close()
        raise VssPermissionError(f"Permission denied on {path}: only root and fssd's [daemon] group may "
                                 "use the VSS broker") from None
    except OSError as e:
        sock.close()
        raise VssError(f"cannot connect to {path}: {e.strerror or e}") from None
    return sock


def _recv_one(sock: socket.socket, deadline: float, what: str):
    """The broker's next frame, or VssTimeout / VssError."""
    reader = vssproto.client_reader()
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(max(reader.wants(), 65536))
        except TimeoutError:
            break
        except OSError as e:
            raise VssError(f"broker connection lost: {e.strerror or e}") from None
        if not data:
            raise VssError(f"the broker closed the connection before answering {what}")
        try:
            msgs = reader.feed(data)
        except vssproto.ProtocolError as e:
            raise VssError(str(e)) from None
        if msgs:
            return msgs[0]
    raise VssTimeout(f"no reply from the broker to {what} within the wait")


def _send(sock: socket.socket, msg, what: str) -> None:
    try:
        sock.sendall(vssproto.frame(msg))
    except OSError as e:
        raise VssError(f"cannot send {what} to the broker: {e.strerror or e}") from None


class Application:
    def __init__(self, rundir: str, name: str):
        self.rundir = rundir
        self.name = name
        self.pid = os.getpid()
        self._sock: socket.socket | None = None
        self._requests: mqueue.Queue | None = None
        self._answers: mqueue.Queue | None = None

    # -- lifecycle

    def register(self, timeout: float = 5.0) -> None:
        """Register with the broker and open the queues it made for us."""
        if self._sock is not None:
            return
        sock = _connect(self.rundir, timeout)
        try:
            _send(sock, Register(self.name), "the registration")
            msg = _recv_one(sock, time.monotonic() + timeout, "the registration")
            if not msg.ok:
                raise VssError(f"broker refused registration of {self.name!r}: {msg.reason}")
            if not isinstance(msg, Registered):
                raise VssError(f"broker answered the registration of {self.name!r} with a {type(msg).__name__}")
            self.pid = msg.pid or self.pid
            self._requests = mqueue.open_reader(msg.requests)
            self._answers = mqueue.open_writer(msg.answers)
            _send(sock, Opened(), "the registration")
        except BaseException:
            sock.close()
            mqueue.close(self._requests)
            mqueue.close(self._answers)
            self._requests = self._answers = None
            raise
        self._sock = sock

    open = register  # older name

    def close(self) -> None:
        """Unregister (closing the connection is enough) and let go of the queues."""
        mqueue.close(self._requests)
        mqueue.close(self._answers)
        self._requests = self._answers = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    unregister = close

    def __enter__(self) -> "Application":
        self.register()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def fileno(self) -> int:
        """Readable when a request is waiting (for select/poll loops)."""
        assert self._requests is not None
        return self._requests.mqd

    # -- requests

    def receive(self, timeout: float | None = None) -> Request | None:
        """Next CHECK / FREEZE / THAW request, or None after timeout seconds."""
        assert self._requests is not None, "register() first"
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            data = mqueue.receive(self._requests, left)
            if data is not None:
                try:
                    return vssproto.decode_request(data)
                except vssproto.ProtocolError as e:
                    log.warning("%s: dropped: %s", self.name, e)
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def answer(self, req: Request, ok: bool, reason: str = "", timeout: float = 2.0) -> None:
        assert self._answers is not None, "register() first"
        try:
            mqueue.send(self._answers, vssproto.encode(Answer(req.msgid, ok, reason[:400])), timeout)
        except mqueue.QueueFull:
            raise VssTimeout(f"answers queue full for {timeout} s") from None


class Requestor:
    """Asks the broker for check, freeze, thaw, status or list. Thread-safe: state is per call."""

    def __init__(self, rundir: str):
        self.rundir = rundir

    def request(self, op: str, timeout: float | None = None, wait: float | None = None) -> VssReply:
        """Send one request and wait for its reply.

        timeout: per-phase timeout the broker applies (None = its [vss] timeout).
        wait: how long to wait for the reply; by default long enough for every
        phase of a failing FREEZE (apps, hooks, cleanup) to time out.
        """
        if op not in vssproto.REQUEST_OPS:
            raise ValueError(f"unknown VSS operation {op!r}")
        phase = timeout or DEFAULT_TIMEOUT
        wait = wait if wait is not None else (5.0 if op in ("status", "list") else 3 * phase + 5.0)
        msgid = secrets.randbits(64)
        sock = _connect(self.rundir, min(wait, 5.0))
        try:
            _send(sock, VssRequest(msgid, op, timeout), op)  # type: ignore[arg-type]
            try:
                reply = _recv_one(sock, time.monotonic() + wait, op)
            except VssTimeout:
                raise VssTimeout(f"no reply from the broker to {op} within {wait:g} s") from None
        finally:
            sock.close()
        if not isinstance(reply, VssReply):
            raise VssError(f"broker answered {op} with a {type(reply).__name__}")
        if reply.msgid not in (msgid, 0):
            raise VssError(f"broker answered another transaction ({reply.msgid:#x})")
        return reply
