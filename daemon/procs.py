"""Worker processes as the supervisor sees them: spawn, channel, exit, restart with back-off.

Each worker is `python -m workers.<kind> SETTINGS_JSON` (started through
workers.launch, which makes the kernel kill it when the supervisor dies) with
one end of a socketpair (the channel) and whatever descriptors it serves
(listening socket, backing stores) inherited through pass_fds, plus the run
directory's locked pid file, so a new instance can tell when every process of
this one is gone. Exits are noticed through a pidfd in the event loop, so a
SIGKILLed worker is seen at once.

A Worker settles the replies to its own requests (`call`, matched by request
id) and restarts itself with back-off under a RestartPolicy; its owner hears
only of unsolicited messages (`on_message`), exits (`on_exit`), restarts and
giving up.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from ipc import names, workermsg
from ipc.channel import send_frame
from ipc.framing import FrameCodec, FrameError

log = logging.getLogger("supervisor")

READY_TIMEOUT = 20.0
# Restarts within this window count toward giving up.
RESTART_WINDOW = 60.0


class WorkerGone(Exception):
    pass


@dataclass
class RestartPolicy:
    """When a worker that died unasked is started again."""

    max_restarts: int  # within RESTART_WINDOW; more and it has failed for good...
    keep_trying: float | None = None  # ...unless it matters too much: retry every this many seconds
    allowed: Callable[[], bool] = lambda: True  # False while the service shuts down
    on_restarted: Callable[["Worker"], None] = lambda w: None
    on_gave_up: Callable[["Worker"], None] = lambda w: None


# What a worker gets when the supervisor dies: the data workers die at once (nothing a
# client queued may run after a new instance starts); the broker thaws first, then exits.
PARENT_DEATH_SIGNAL = {"broker": "TERM"}


class Worker:
    """One supervised process: `python -m MODULE --channel-fd N SETTINGS_JSON`.

    `spawn_args(channel_fd)` returns (module, settings_json, fds to pass)."""

    # The run directory's locked pid file (set by the supervisor): every worker holds it too.
    hold_fd: int | None = None

    def __init__(
        self,
        kind: str,
        key: str,
        spawn_args: Callable[[int], tuple[str, str, list[int]]],
        on_message: Callable[["Worker", Any, list[int]], None],
        on_exit: Callable[["Worker", int], None],
        env: dict[str, str],
        policy: RestartPolicy | None = None,
    ):
        self.kind = kind
        self.key = key
        self.spawn_args = spawn_args
        self.on_message = on_message
        self.on_exit = on_exit
        self.env = env
        self.policy = policy
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.pidfd: int | None = None
        self.codec = FrameCodec(workermsg.FromWorker)
        self.started = 0.0
        self.restarts = 0
        self.recent: collections.deque[float] = collections.deque()
        self.last_error = ""
        self.stopping = False
        self.ready: asyncio.Future | None = None
        self.pending: dict[int, asyncio.Future] = {}
        self._req = 0
        self.restart_handle: asyncio.TimerHandle | None = None
        self.exited: asyncio.Event = asyncio.Event()

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def is_ready(self) -> bool:
        """Alive and has said Ready (since its last start)."""
        r = self.ready
        return (self.alive and self.sock is not None and self.pidfd is not None and r is not None and r.done()
                and not r.cancelled() and r.exception() is None)

    def title(self) -> str:
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                return f.read().split(b"\0")[0].decode(errors="replace").strip()
        except OSError:
            return names.proc_title(f"{self.kind} {self.key}", self.env.get(names.INSTANCE_ENV))

    async def start(self, spare: "Worker | None" = None) -> None:
        """Spawn and wait for its Ready message. With `spare` (a started, idle spare worker,
        workers/spare.py), that process is assigned this worker's settings and descriptors
        instead, if it still takes them; else a fresh process is spawned as usual."""
        loop = asyncio.get_running_loop()
        if spare is not None:
            if spare.ready is not None and not spare.ready.done():  # still starting: it is ahead of a new process
                with contextlib.suppress(asyncio.TimeoutError, WorkerGone):
                    await asyncio.wait_for(asyncio.shield(spare.ready), READY_TIMEOUT)
            if self._assign(spare):
                await self._await_ready()
                return
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        module, settings, fds = self.spawn_args(child.fileno())
        self.ready = loop.create_future()
        self.exited = asyncio.Event()
        self.codec = FrameCodec(workermsg.FromWorker)
        self.proc = None
        launch = ["--supervisor-pid", str(os.getpid()), "--pdeathsig", PARENT_DEATH_SIGNAL.get(self.kind, "KILL")]
        held = [] if self.hold_fd is None else [self.hold_fd]
        if held:
            launch += ["--hold-fd", str(self.hold_fd)]
        try:
            # Spawned from the event loop's thread, which lives as long as the supervisor:
            # PR_SET_PDEATHSIG fires when the thread that forked the worker ends.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "workers.launch", *launch, module, "--channel-fd", str(child.fileno()), settings],
                pass_fds=[child.fileno(), *fds, *held],
                env=self.env,
                stdin=subprocess.DEVNULL,
                cwd="/",
            )
        except OSError as e:
            parent.close()
            self.last_error = f"cannot start: {e}"
            raise
        finally:
            child.close()
        self.started = time.monotonic()
        self.sock = parent
        parent.setblocking(False)
        loop.add_reader(parent.fileno(), self._readable)
        self.pidfd = os.pidfd_open(self.proc.pid)
        loop.add_reader(self.pidfd, self._exited)
        await self._await_ready()

    def _assign(self, spare: "Worker") -> bool:
        """Take over the spare's process and send it this worker's settings and descriptors
        (workermsg.AssignSnapshot). False, with the spare gone, if it can't be done."""
        taken = spare.hand_over()
        if taken is None:
            return False
        proc, sock, pidfd = taken
        _module, settings, fds = self.spawn_args(-1)
        msg = workermsg.AssignSnapshot(settings, list(fds), len(fds))
        try:
            sock.setblocking(True)
            send_frame(sock, self.codec.encode(msg), fds)
            sock.setblocking(False)
        except OSError as e:
            log.warning("%s %s: spare worker (pid %d) did not take the assignment (%s); starting a fresh one", self.kind, self.key, proc.pid, e)
            proc.kill()
            proc.wait()
            sock.close()
            os.close(pidfd)
            return False
        loop = asyncio.get_running_loop()
        self.ready = loop.create_future()
        self.exited = asyncio.Event()
        self.codec = FrameCodec(workermsg.FromWorker)
        self.proc, self.sock, self.pidfd = proc, sock, pidfd
        self.started = time.monotonic()
        loop.add_reader(sock.fileno(), self._readable)
        loop.add_reader(pidfd, self._exited)
        log.debug("%s %s: assigned to spare worker pid %d", self.kind, self.key, proc.pid)
        return True

    def hand_over(self) -> tuple[subprocess.Popen, socket.socket, int] | None:
        """A spare's side of _assign: its process, channel and pidfd, if it is alive and has said
        Ready; this Worker then forgets them and will never restart anything."""
        if not self.is_ready:
            self.stopping = True
            return None
        self.stopping = True
        if self.restart_handle:
            self.restart_handle.cancel()
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.sock.fileno())
        loop.remove_reader(self.pidfd)
        taken = (self.proc, self.sock, self.pidfd)
        self.proc, self.sock, self.pidfd = None, None, None
        self.exited.set()
        return taken

    async def _await_ready(self) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self.ready), READY_TIMEOUT)
        except asyncio.TimeoutError:
            self.last_error = f"not ready within {READY_TIMEOUT:.0f} s"
            self.kill()
            raise WorkerGone(f"{self.kind} {self.key}: {self.last_error}") from None

    def send(self, msg: Any, fds: list[int] = ()) -> None:
        if self.sock is None:
            raise WorkerGone(f"{self.kind} {self.key} is not running")
        data = self.codec.encode(msg)
        self.sock.setblocking(True)
        try:
            send_frame(self.sock, data, fds)
        except OSError as e:
            raise WorkerGone(f"{self.kind} {self.key}: {e}") from None
        finally:
            self.sock.setblocking(False)

    def next_req(self) -> int:
        self._req += 1
        return self._req

    async def call(self, msg: Any, fds: list[int] = (), timeout: float = 30.0) -> Any:
        """Send and await the reply that echoes msg.req (from next_req())."""
        fut = asyncio.get_running_loop().create_future()
        self.pending[msg.req] = fut
        try:
            self.send(msg, fds)
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.pending.pop(msg.req, None)

    def _readable(self) -> None:
        try:
            data, fds, _f, _a = socket.recv_fds(self.sock, 65536, 16)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if not data:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            return
        try:
            msgs = self.codec.feed(data)
        except FrameError as e:
            log.error("%s %s (pid %d) sent garbage: %s", self.kind, self.key, self.pid, e)
            for fd in fds:
                os.close(fd)
            self.kill()
            return
        for i, m in enumerate(msgs):
            mine = fds if i == 0 else []
            if isinstance(m, workermsg.Ready):
                if self.ready and not self.ready.done():
                    self.ready.set_result(m)
                self._close(mine)
            elif getattr(m, "req", 0):
                self._settle(m)
                self._close(mine)  # workers never hand descriptors up with a reply
            else:
                self.on_message(self, m, mine)

    @staticmethod
    def _close(fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)

    def _settle(self, msg: Any) -> None:
        """A reply to one of our requests: to whoever awaits it, or dropped if no one does any more."""
        fut = self.pending.get(msg.req)
        if fut and not fut.done():
            fut.set_result(msg)
        else:
            device = getattr(msg, "device", "")
            log.warning("%s %s: late %s for %s dropped (request %d is no longer waited for)", self.kind, self.key, type(msg).__name__, device, msg.req)

    def _exited(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = None
        status = self.proc.wait()
        if self.sock is not None:
            try:
                loop.remove_reader(self.sock.fileno())
            except (ValueError, OSError):
                pass
            self.sock.close()
            self.sock = None
        if status < 0:
            self.last_error = f"killed by {signal.Signals(-status).name}"
        elif status:
            self.last_error = f"exited with status {status}"
        gone = WorkerGone(f"{self.kind} {self.key} (pid {self.proc.pid}) {self.last_error or 'exited'}")
        if self.ready and not self.ready.done():
            self.ready.set_exception(gone)
            self.ready.exception()  # mark retrieved: start() may already have given up
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(gone)
        self.exited.set()
        self.on_exit(self, status)
        self._schedule_restart()

    def _schedule_restart(self) -> None:
        p = self.policy
        if p is None or self.stopping or not p.allowed():
            return
        log.error("%s %s (pid %d) %s", self.kind, self.key, self.pid, self.last_error or "exited")
        delay = self.note_restart(p.max_restarts)
        if delay is None:
            if p.keep_trying is None:
                p.on_gave_up(self)
                return
            delay = p.keep_trying
            log.critical("%s %s keeps dying; retrying every %.0f s", self.kind, self.key, delay)
        loop = asyncio.get_running_loop()
        self.restart_handle = loop.call_later(delay, lambda: asyncio.ensure_future(self._restart()))
        log.info("%s %s: restarting in %.1f s (restart %d)", self.kind, self.key, delay, self.restarts)

    async def _restart(self) -> None:
        if self.stopping or not self.policy.allowed():
            return
        try:
            await self.start()
            log.info("%s %s: restarted (pid %d)", self.kind, self.key, self.pid)
            self.policy.on_restarted(self)
        except (WorkerGone, OSError) as e:
            log.error("%s %s: restart failed: %s", self.kind, self.key, e)
            if not self.alive and self.pidfd is None:
                # No process, so no exit event will come to try again: schedule it here.
                self.on_exit(self, -1)
                self._schedule_restart()

    def note_restart(self, max_restarts: int) -> float | None:
        """Record a restart; the back-off delay, or None when it died too often to go on."""
        now = time.monotonic()
        self.recent.append(now)
        while self.recent and now - self.recent[0] > RESTART_WINDOW:
            self.recent.popleft()
        if len(self.recent) > max_restarts:
            return None
        self.restarts += 1
        return min(0.1 * 2 ** (len(self.recent) - 1), 5.0)

    def kill(self) -> None:
        if self.alive:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    async def stop(self, timeout: float = 10.0) -> None:
        """Ask it to finish what is in flight and exit; kill it if it won't."""
        self.stopping = True
        if self.restart_handle:
            self.restart_handle.cancel()
        if not self.alive:
            return
        try:
            self.send(workermsg.Stop())
        except WorkerGone:
            pass
        try:
            await asyncio.wait_for(self.exited.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("%s %s (pid %d) did not stop in %.0f s; killing it", self.kind, self.key, self.pid, timeout)
            self.kill()
            await self.exited.wait()
