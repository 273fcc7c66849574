"""The VSS client library: applications and requestors talk to the broker.

An Application creates its own queue (its bytes are charged to its own uid,
RLIMIT_MSGQUEUE, see mq_overview(7)), registers, then receives CHECK / FREEZE / THAW
and answers OK or FAIL:

    with Application(prefix, "mydb") as app:
        while True:
            req = app.receive(timeout=1.0)
            if req is not None:
                ok = flush_and_hold() if req.op == "freeze" else True
                app.answer(req, ok)

A Requestor asks for a transaction and blocks for the reply; every call
makes (and removes) its own reply queue, so one Requestor may be used from
several threads at once:

    reply = Requestor(prefix).request("freeze", timeout=15)
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import time

from ipc import mqueue, vssproto
from ipc.names import app_queue, broker_queue, reply_queue
from ipc.vssproto import Answer, Register, Registered, Request, Unregister, VssReply, VssRequest

log = logging.getLogger("vss.client")

DEFAULT_TIMEOUT = 15.0  # the broker's default phase timeout, as hv_vss


class VssError(Exception):
    pass


class BrokerNotRunning(VssError):
    """No broker inbox: fssd (or its broker) is not running for this run directory."""


class VssTimeout(VssError):
    pass


class Application:
    def __init__(self, prefix: str, name: str, pid: int | None = None, mode: int = 0o600):
        self.prefix = prefix
        self.name = name
        self.pid = pid or os.getpid()
        self.queue_name = app_queue(prefix, name, self.pid)
        self._mode = mode
        self._mq: mqueue.Queue | None = None
        self._registered = False

    # -- lifecycle

    def open(self) -> "Application":
        if self._mq is None:
            self._mq = mqueue.create(self.queue_name, self._mode, 10, vssproto.MAX_MESSAGE)
        return self

    def register(self, timeout: float = 5.0) -> None:
        """Register with the broker and wait for its acknowledgement."""
        self.open()
        self._send(Register(self.name, self.pid, self.queue_name), timeout)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self._next(left)
            if isinstance(msg, Registered):
                if not msg.ok:
                    raise VssError(f"broker refused registration of {self.name!r}: {msg.reason}")
                self._registered = True
                return
            # A Request cannot precede our Registered (one queue, FIFO); anything else is noise.
        raise VssTimeout(f"broker did not acknowledge registration of {self.name!r} within {timeout} s")

    def unregister(self, timeout: float = 1.0) -> None:
        if self._registered:
            self._registered = False
            try:
                self._send(Unregister(self.name, self.pid), timeout)
            except VssError as e:
                log.debug("unregister: %s", e)

    def close(self) -> None:
        """Unregister (best effort) and remove our queue."""
        self.unregister()
        mqueue.close(self._mq, unlink_name=True)
        self._mq = None

    def __enter__(self) -> "Application":
        self.open()
        self.register()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def fileno(self) -> int:
        """Readable when a request is waiting (for select/poll loops)."""
        assert self._mq is not None
        return self._mq.mqd

    # -- requests

    def receive(self, timeout: float | None = None) -> Request | None:
        """Next CHECK / FREEZE / THAW request, or None after timeout seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            msg = self._next(left)
            if isinstance(msg, Request):
                return msg
            if msg is None and deadline is not None and time.monotonic() >= deadline:
                return None

    def answer(self, req: Request, ok: bool, reason: str = "", timeout: float = 2.0) -> None:
        self._send(Answer(req.msgid, self.name, self.pid, ok, reason[:400]), timeout)

    # -- internals

    def _next(self, timeout: float | None):
        assert self._mq is not None, "open() first"
        data = mqueue.receive(self._mq, timeout)
        if data is None:
            return None
        try:
            return vssproto.decode_to_app(data)
        except vssproto.ProtocolError as e:
            log.warning("%s: dropped: %s", self.name, e)
            return None

    def _send(self, msg, timeout: float) -> None:
        _send_to_broker(self.prefix, vssproto.encode(msg), timeout)


def _send_to_broker(prefix: str, data: bytes, timeout: float) -> None:
    try:
        mq = mqueue.open_writer(broker_queue(prefix))
    except mqueue.NoQueue:
        raise BrokerNotRunning(f"no broker queue {broker_queue(prefix)}") from None
    try:
        mqueue.send(mq, data, timeout)
    except mqueue.QueueFull:
        raise VssTimeout(f"broker queue full for {timeout} s") from None
    finally:
        mqueue.close(mq)


_serial = itertools.count(1)


class Requestor:
    """Asks the broker for check, freeze, thaw, status or list. Thread-safe: state is per call."""

    def __init__(self, prefix: str):
        self.prefix = prefix

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
        name = f"{reply_queue(self.prefix, os.getpid())}.{next(_serial)}"
        mq = mqueue.create(name, 0o600, 2, vssproto.MAX_REPLY)
        try:
            msg = VssRequest(msgid, op, name, os.getpid(), timeout)  # type: ignore[arg-type]
            _send_to_broker(self.prefix, vssproto.encode(msg), min(wait, 5.0))
            deadline = time.monotonic() + wait
            while (left := deadline - time.monotonic()) > 0:
                data = mqueue.receive(mq, left)
                if data is None:
                    break
                try:
                    reply = vssproto.decode_reply(data)
                except vssproto.ProtocolError as e:
                    log.warning("dropped reply: %s", e)
                    continue
                if reply.msgid == msgid:
                    return reply
                log.debug("dropped reply to another transaction %#x", reply.msgid)
            raise VssTimeout(f"no reply from the broker to {op} within {wait:g} s")
        finally:
            mqueue.close(mq, unlink_name=True)
