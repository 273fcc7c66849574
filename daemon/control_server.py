"""The control socket RUNDIR/control.sock: framed msgspec requests, one reply each.

Who may connect is the socket's mode (daemon/rundir.py): root, and with
[daemon] group its members; they may list and configure/unconfigure. Every
connection is checked again with SO_PEERCRED, and a Configure carries the
backing store as a descriptor the caller opened (SCM_RIGHTS).

Bounded: at most MAX_CONNECTIONS connections, MAX_PER_UID for any one
non-root uid, RESERVED of them kept for root (so root's fssconfig answers
whatever others hold open); a request is at
most MAX_REQUEST bytes, checked on its length before any of it is kept, and
must arrive whole within FRAME_TIMEOUT (the first one within FRAME_TIMEOUT
of the connect); an idle connection is closed after IDLE_TIMEOUT. Out of
descriptors (EMFILE/ENFILE), accepting pauses with back-off and one warning
a minute.

It carries bytes and vouches for the peer; what a request does is the one
handler's business (daemon/service.py): `await handler(request, fds, peer)`.
"""

from __future__ import annotations

import asyncio
import errno
import grp
import logging
import os
import resource
import socket
import struct
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from daemon import rundir as rundirmod
from daemon.service import Peer
from ipc import control
from ipc.framing import MAX_REQUEST, FrameCodec, FrameError
from workers.logfmt import RateLimited

log = logging.getLogger("control")

Handler = Callable[[control.Request, list[int], Peer], Awaitable[control.Reply]]

MAX_CONNECTIONS = 64
RESERVED = 16  # of MAX_CONNECTIONS, only for root
MAX_PER_UID = 8  # any one uid but root
FRAME_TIMEOUT = 5.0
IDLE_TIMEOUT = 60.0
MAX_FDS = 2 * control.SET_MAX  # per request (a Configure: the store and its directory; a ConfigureSet: each member's)
_RECV = 65536


@dataclass(frozen=True)
class Limits:
    max_connections: int = MAX_CONNECTIONS
    reserved: int = RESERVED  # of max_connections, only for root
    max_per_uid: int = MAX_PER_UID
    frame_timeout: float = FRAME_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13


def peer_groups(sock: socket.socket, pid: int, gid: int) -> set[int]:
    """The peer's groups as the kernel recorded them at connect (SO_PEERGROUPS), else from /proc."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * 1024)
        return {gid, *struct.unpack(f"{len(raw) // 4}I", raw)}
    except OSError:
        return _peer_groups(pid, gid)


def _peer_groups(pid: int, gid: int) -> set[int]:
    groups = {gid}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return groups


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (workers, sockets and stores all take descriptors)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


class ControlServer:
    def __init__(self, path: str, group: str, handler: Handler, limits: Limits = Limits(),
                 after_reply: Callable[[], None] | None = None):
        self.path = path
        self.group = group  # [daemon] group: may connect (socket mode) and configure
        self.handler = handler
        # Called once each answer is sent (or could not be): background work a request made
        # due (the next spare snapshot worker) then starts without delaying that answer.
        self.after_reply = after_reply
        self.limits = limits
        self.codec = FrameCodec(control.Request)
        self.listener: socket.socket | None = None
        self.conns: dict[int, int] = {}  # id -> uid
        self.tasks: set[asyncio.Task] = set()
        self.busy: set[asyncio.Task] = set()  # carrying out a request
        self._paused = False
        self._backoff = 0.05
        self._emfile = RateLimited(log)
        self._refused = RateLimited(log)
        self._faults = RateLimited(log, 10.0)  # what one client's bad requests cause
        self._loop: asyncio.AbstractEventLoop | None = None
        # Before any worker is spawned, so they inherit it too.
        log.debug("descriptor limit %d", raise_fd_limit())

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        gid = rundirmod.group_gid(self.group)
        self.listener = rundirmod.bind_unix(self.path, group_access=True, gid=gid)
        self.listener.setblocking(False)
        self.listener.listen(128)
        self._loop.add_reader(self.listener.fileno(), self._accept)

    async def stop(self) -> None:
        if self.listener is not None:
            if not self._paused:
                self._loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
        # Connections waiting for a request go now; one whose request is being carried out
        # (a configure holding a freeze) finishes it and answers: it is never cut short.
        idle = [t for t in self.tasks if t not in self.busy]
        for t in idle:
            t.cancel()
        if idle:
            await asyncio.gather(*idle, return_exceptions=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # -- accepting ----------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(64):  # a burst, then back to the loop
            if self.listener is None:
                return
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause(e)
                elif e.errno not in (errno.ECONNABORTED, errno.EPROTO):
                    log.error("control socket: accept failed: %s", e)
                return
            self._backoff = 0.05
            self._admit(sock)

    def _pause(self, e: OSError) -> None:
        """Out of descriptors: stop accepting for a while instead of spinning on the error."""
        self._emfile.warning("control socket: %s; not accepting for %.2f s (%d connections open)", e.strerror, self._backoff, len(self.conns))
        self._loop.remove_reader(self.listener.fileno())
        self._paused = True

        def resume():
            self._paused = False
            if self.listener is not None:
                self._loop.add_reader(self.listener.fileno(), self._accept)

        self._loop.call_later(self._backoff, resume)
        self._backoff = min(self._backoff * 2, 2.0)

    def _privileged(self, uid: int, groups: set[int]) -> bool:
        if uid == 0:
            return True
        group = self.group
        if not group:
            return False
        try:
            return grp.getgrnam(group).gr_gid in groups
        except KeyError:
            return False

    def _admit(self, sock: socket.socket) -> None:
        try:
            pid, uid, gid = peer_credentials(sock)
        except OSError:
            sock.close()
            return
        n = len(self.conns)
        mine = sum(1 for u in self.conns.values() if u == uid)
        why = None
        lim = self.limits
        if n >= lim.max_connections:
            why = f"{n} connections open"
        elif uid != 0 and n >= lim.max_connections - lim.reserved:
            why = f"{n} connections open ({lim.reserved} kept for root)"
        elif uid != 0 and mine >= lim.max_per_uid:
            why = f"uid {uid} has {mine} connections open (at most {lim.max_per_uid})"
        if why:
            self._refused.warning("control socket: refused a connection from uid %d (pid %d): %s", uid, pid, why)
            try:  # a word to a well-behaved client; never wait for a slow one
                sock.setblocking(False)
                sock.send(self.codec.encode(control.Error(errno.EUSERS, f"too many connections to fssd: {why}")))
            except OSError:
                pass
            sock.close()
            return
        sock.setblocking(False)
        key = id(sock)
        self.conns[key] = uid
        task = asyncio.ensure_future(self._serve(sock, pid, uid, peer_groups(sock, pid, gid)))
        self.tasks.add(task)

        def done(t):
            self.tasks.discard(t)
            self.conns.pop(key, None)
            sock.close()

        task.add_done_callback(done)

    # -- one connection -------------------------------------------------------------------

    async def _readable(self, sock: socket.socket, timeout: float) -> None:
        fut = self._loop.create_future()
        fd = sock.fileno()
        self._loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            self._loop.remove_reader(fd)

    async def _send(self, sock: socket.socket, data: bytes) -> None:
        await asyncio.wait_for(self._loop.sock_sendall(sock, data), self.limits.frame_timeout)

    async def _serve(self, sock: socket.socket, pid: int, uid: int, groups: set[int]) -> None:
        codec = FrameCodec(control.Request, MAX_REQUEST)
        fds: list[int] = []
        lim = self.limits
        deadline = time.monotonic() + lim.frame_timeout  # the first request, whole, within this
        first = True
        try:
            while True:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    what = "a request arrived only in part" if codec.buffered else "no request came"
                    self._faults.info("control client uid %d (pid %d) dropped: %s in time", uid, pid, what)
                    return
                try:
                    await self._readable(sock, timeout)
                except asyncio.TimeoutError:
                    continue
                try:
                    data, newfds, flags, _ = socket.recv_fds(sock, _RECV, MAX_FDS)
                except (BlockingIOError, InterruptedError):
                    continue
                fds.extend(newfds)
                if flags & socket.MSG_CTRUNC:
                    self._faults.warning("control client uid %d (pid %d) sent more than %d descriptors; dropped", uid, pid, MAX_FDS)
                    return
                if not data:
                    return
                was_idle = codec.buffered == 0
                try:
                    msgs = codec.feed(data)
                except FrameError as e:
                    self._faults.warning("refused a malformed control request from uid %d (pid %d): %s", uid, pid, e)
                    await self._send(sock, self.codec.encode(control.Error(errno.EMSGSIZE if "exceeds" in str(e) else errno.EINVAL, f"malformed request: {e}")))
                    return
                if was_idle and codec.buffered and not first:
                    deadline = time.monotonic() + lim.frame_timeout  # a request has begun: it must finish soon
                for req in msgs:
                    n = control.declared_fds(req)
                    claimed, rest = fds[:n], fds[n:]
                    fds = []
                    for fd in rest:  # descriptors no request declared
                        os.close(fd)
                    me = asyncio.current_task()
                    self.busy.add(me)
                    try:
                        reply = await self.handler(req, claimed, Peer(pid, uid, self._privileged(uid, groups)))
                        await self._send(sock, self.codec.encode(reply))
                    finally:
                        self.busy.discard(me)
                        if self.after_reply is not None and self.listener is not None:  # not when stopping
                            self.after_reply()
                    if self.listener is None:
                        return  # stopping: answered, and no further requests
                if msgs:
                    first = False
                if not codec.buffered:
                    deadline = time.monotonic() + lim.idle_timeout
        except (ConnectionError, asyncio.TimeoutError, OSError) as e:
            log.debug("control client pid %d went away: %s", pid, e)
        finally:
            for fd in fds:
                os.close(fd)
