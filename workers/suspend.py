"""`fssd: suspend fssN`: FIFREEZE a volume's file systems for one snapshot barrier, and always FITHAW.

    python -m workers.suspend --channel-fd N SETTINGS_JSON

The supervisor opens and checks the mount directories and passes them as
descriptors (SuspendSettings.fds); this process never resolves a path. It
syncs them (outside the window), freezes them, answers Frozen, and thaws on
the first of:

* Thaw from the supervisor (its barrier is done);
* EOF on the channel: the supervisor is gone, SIGKILL included;
* freeze_max seconds after the first FIFREEZE;
* SIGTERM, SIGINT or SIGHUP.

If this process is killed while frozen, the supervisor sees EOF and thaws
through its own descriptors of the same directories. Nothing is logged
between the freeze and the thaw: the log may live on a frozen file system.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import socket
import sys
import time

import msgspec

from ipc import suspendmsg
from workers import freeze, spawned
from workers.settings import SuspendSettings

log = logging.getLogger("suspend")


def _syncfs(fds: list[int]) -> None:
    """Write back what is dirty before the freeze, so the freeze itself has little left to sync."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    for fd in fds:
        libc.syncfs(fd)


def _wait(chan: socket.socket, wake: int, deadline: float) -> str:
    """Block until the supervisor says Thaw, goes away, a signal comes, or the deadline passes."""
    poller = select.poll()
    poller.register(chan, select.POLLIN)
    poller.register(wake, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return "freeze_max"
        for fd, _ev in poller.poll(left * 1000):
            if fd == wake:
                return "signal"
            try:
                data = chan.recv(suspendmsg.MAX_PACKET)
            except OSError:
                return "supervisor gone"
            if not data:
                return "supervisor gone"
            try:
                msgspec.msgpack.decode(data, type=suspendmsg.ToSuspend)
            except msgspec.DecodeError:
                return "a bad message from the supervisor"
            return "request"


def run(s: SuspendSettings, chan: socket.socket) -> int:
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)  # noted through the wakeup fd, acted on in _wait

    def send(msg) -> None:
        try:
            chan.send(msgspec.msgpack.encode(msg))
        except OSError:
            pass  # the supervisor is gone; the thaw does not depend on it

    t = time.monotonic()
    _syncfs(s.fds)
    sync_ms = (time.monotonic() - t) * 1000
    frozen: list[tuple[int, str]] = []
    already: list[str] = []
    t0 = time.monotonic()
    by = "request"
    try:
        try:
            for fd, mount in zip(s.fds, s.mounts):
                try:
                    freeze.freeze_fd(fd, mount)
                except freeze.AlreadyFrozen:
                    already.append(mount)  # quiescent already (fsfreeze -f before fssconfig): leave it be
                    continue
                frozen.append((fd, mount))
        except freeze.FreezeError as e:
            by = "failed"
            return _fail(send, frozen, str(e))
        freeze_ms = (time.monotonic() - t0) * 1000
        send(suspendmsg.Frozen(sync_ms, freeze_ms, time.monotonic(), already))
        by = _wait(chan, wake_r, t0 + s.freeze_max)
    finally:
        if by != "failed":
            thaw_at = time.monotonic()
            errors = _thaw(frozen)
            t1 = time.monotonic()
            window = (t1 - t0) * 1000
            send(suspendmsg.Thawed(window, thaw_at, by, [str(e) for e in errors], (t1 - thaw_at) * 1000))
            # Only now may anything be logged.
            level = logging.DEBUG if by == "request" and not errors else logging.WARNING
            log.log(level, "%s: thawed %s after %.1f ms (%s)%s", s.device, ", ".join(m for _, m in frozen) or "nothing", window,
                    "the barrier is done" if by == "request" else by, "; " + "; ".join(map(str, errors)) if errors else "")
    return 0


def _thaw(frozen: list[tuple[int, str]]) -> list[freeze.FreezeError]:
    errors = []
    for fd, mount in reversed(frozen):
        try:
            freeze.thaw_fd(fd, mount)
        except freeze.FreezeError as e:
            errors.append(e)
    return errors


def _fail(send, frozen: list[tuple[int, str]], reason: str) -> int:
    errors = _thaw(frozen)
    send(suspendmsg.Failed(reason + "".join(f"; {e}" for e in errors)))
    return 1


def main(argv: list[str] | None = None) -> int:
    return run(*spawned.bootstrap("workers.suspend", SuspendSettings, argv, title=lambda s: f"suspend {s.device}",
                                  log_name=lambda s: f"suspend {s.device}", channel_kind="socket"))

if __name__ == "__main__":
    sys.exit(main())
