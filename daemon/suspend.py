"""Suspending a volume's file systems around the snapshot barrier, as NetBSD's fss(4) does.

fss suspends the mounted file system (vfs_suspend: sync, block writers),
establishes the snapshot and resumes, so a snapshot mounts clean. fssd does
the same with FIFREEZE / FITHAW on the file systems that live on the volume:

* which: the volume's configured `mountpoint`, and every mount fssd can prove
  is on the volume's export (daemon.volmounts; this covers `[vss] freeze`
  mounts on the volume and volumes with no mountpoint configured). Never /,
  never a file system that holds a backing store or a volume image (the
  copy-on-write or the volume's own writes would deadlock), one mount per file
  system. Read-only mounts need nothing.
* who: a separate process, `fssd: suspend fssN` (workers.suspend), freezes
  and thaws. It thaws when the barrier is done, when the supervisor dies
  (EOF), at `[vss] freeze_max`, or on a signal; if it is killed itself, the
  supervisor thaws through its own descriptors of the same directories.
* the snapshot counts only if the barrier finished before the first FITHAW
  (both on the system-wide monotonic clock); otherwise configure fails and
  the snapshot is removed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import subprocess
import sys
import time
from typing import Awaitable, Callable, NamedTuple

import msgspec

from daemon import volmounts
from ipc import suspendmsg
from workers import freeze
from workers.settings import SuspendSettings

log = logging.getLogger("supervisor")

# Test only: keep the window open this many seconds before the barrier (see tests/test_fs_consistent.py).
TEST_HOLD_ENV = "FSSD_TEST_HOLD_SUSPEND"
START_TIMEOUT = 20.0  # the suspend process starting and freezing (a big sync can take a while)
THAW_TIMEOUT = 10.0


class SuspendError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.errno = code


class Target(NamedTuple):
    point: str
    dev: int
    why: str  # "the configured mountpoint" or the proof that it is on the volume


class Plan(NamedTuple):
    targets: list[Target]
    note: str  # when there is nothing to suspend: why, one line
    crash: bool  # nothing to suspend and nothing read-only: the snapshot is crash-consistent


def guarded_devices(store_fds: list[int], images: dict[str, str]) -> dict[int, str]:
    """Device -> what lives there, for every device that backing stores and volume images pass through."""
    guarded: dict[int, str] = {}

    def add(st: os.stat_result, what: str) -> None:
        dev = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
        for d in volmounts.depends_on(dev):
            guarded.setdefault(d, what)

    for fd in store_fds:
        try:
            add(os.fstat(fd), "a backing store")
        except OSError:
            pass
    for path, what in images.items():
        try:
            add(os.stat(path), what)
        except OSError:
            pass
    return guarded


def plan(volume: str, mountpoint: str | None, sock: str, guarded: dict[int, str], exclude: frozenset[int] = frozenset()) -> Plan:
    """What to suspend for a snapshot of `volume`; raises SuspendError when a mount on it cannot be."""
    table = freeze.mounts()
    top = {m.point: m for m in table}  # opening a path reaches the mount on top
    root_dev = os.stat("/").st_dev
    chosen: dict[int, Target] = {}
    read_only: list[str] = []
    candidates: list[tuple[freeze.Mount, str]] = []
    if mountpoint:
        real = os.path.realpath(mountpoint)
        if os.path.ismount(real) and real in top:
            candidates.append((top[real], "the configured mountpoint"))
            note = ""
        else:
            note = f"{volume} is not mounted at its mountpoint {mountpoint}"
    else:
        note = f"{volume} has no mountpoint configured"
    candidates += volmounts.volume_mounts(table, volume, sock)
    seen: set[int] = set()
    for m, why in candidates:
        if m.dev in seen or m.dev in exclude or top.get(m.point, m).dev != m.dev:
            continue  # the same file system again, frozen by the broker already, or covered by another mount
        seen.add(m.dev)
        if m.dev == root_dev or os.path.realpath(m.point) == "/":
            raise SuspendError(errno.EPERM, f"{m.point}: fssd never freezes /")
        if "ro" in m.super_opts:
            read_only.append(m.point)
            continue
        if m.fstype not in freeze.FREEZABLE:
            raise SuspendError(errno.EOPNOTSUPP, f"{m.point}: file system type {m.fstype} cannot be suspended (FIFREEZE); "
                                                 "--no-suspend takes the snapshot crash-consistent")
        if m.dev in guarded:
            raise SuspendError(errno.EDEADLK, f"{m.point} holds {guarded[m.dev]}: suspending it would deadlock")
        chosen[m.dev] = Target(m.point, m.dev, why)
    if chosen:
        return Plan(list(chosen.values()), "", False)
    if read_only:
        return Plan([], f"{volume} is mounted read-only at {', '.join(read_only)}: nothing to suspend", False)
    if not note:
        note = f"{volume} is not mounted at its mountpoint {mountpoint}"
    return Plan([], f"{note}: snapshot is crash-consistent", True)


class Result(NamedTuple):
    held_us: int
    window_ms: float
    sync_ms: float
    already: list[str]  # frozen by someone else before: the barrier ran inside their freeze


async def around(device: str, targets: list[Target], freeze_max: float, barrier: Callable[[], Awaitable[int]],
                 env: dict[str, str], debug: bool = False, use_syslog: bool = False) -> Result:
    """Freeze `targets` in a suspend process, run `barrier`, thaw; the barrier must land inside the freeze."""
    fds: list[int] = []
    try:
        for t in targets:
            try:
                fd = freeze.open_mount(t.point)
            except OSError as e:
                raise SuspendError(e.errno or errno.EIO, f"{t.point}: cannot open: {e.strerror}") from None
            fds.append(fd)
            if os.fstat(fd).st_dev != t.dev:
                raise SuspendError(errno.EAGAIN, f"{t.point}: the mount changed meanwhile; try again")
        return await _Suspension(device, targets, fds, freeze_max, env, debug, use_syslog).run(barrier)
    finally:
        for fd in fds:
            os.close(fd)


class _Suspension:
    def __init__(self, device, targets, fds, freeze_max, env, debug, use_syslog):
        self.device = device
        self.mounts = [t.point for t in targets]
        self.fds = fds
        self.freeze_max = freeze_max
        self.env = env
        self.debug = debug
        self.use_syslog = use_syslog
        self.proc: subprocess.Popen | None = None
        self.chan: socket.socket | None = None
        self.thawed_at: float | None = None  # when whoever thawed began to
        self.thawed: suspendmsg.Thawed | None = None
        self.watch: asyncio.Future | None = None
        self.already: list[str] = []
        self.thaw_errors: list[str] = []

    def _spawn(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        settings = SuspendSettings(self.device, self.mounts, self.fds, self.freeze_max, self.debug, self.use_syslog)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "workers.suspend", "--channel-fd", str(child.fileno()), msgspec.json.encode(settings).decode()],
                pass_fds=[child.fileno(), *self.fds], env=self.env, stdin=subprocess.DEVNULL, cwd="/",
            )
        except OSError as e:
            parent.close()
            raise SuspendError(e.errno or errno.EIO, f"{self.device}: cannot start the suspend process: {e.strerror}") from None
        finally:
            child.close()
        parent.setblocking(False)
        self.chan = parent

    async def _recv(self):
        """The next message, or None on EOF (the suspend process is gone)."""
        loop = asyncio.get_running_loop()
        try:
            data = await loop.sock_recv(self.chan, suspendmsg.MAX_PACKET)
        except OSError:
            return None
        if not data:
            return None
        try:
            return msgspec.msgpack.decode(data, type=suspendmsg.FromSuspend)
        except msgspec.DecodeError:
            return None

    def _thaw_here(self) -> None:
        """The suspend process died: FIFREEZE outlives it, so thaw through our own descriptors."""
        self.thawed_at = time.monotonic()
        for fd, mount in reversed(list(zip(self.fds, self.mounts))):
            if mount in self.already:
                continue  # someone else's freeze
            try:
                freeze.thaw_fd(fd, mount)
            except freeze.FreezeError as e:
                self.thaw_errors.append(str(e))  # logged once everything else is thawed

    def _gone(self) -> str:
        try:
            rc = self.proc.wait(2)
        except subprocess.TimeoutExpired:
            return f"suspend process (pid {self.proc.pid}) stopped answering"
        how = f"killed by {_signame(-rc)}" if rc < 0 else f"exited with status {rc}"
        return f"suspend process (pid {self.proc.pid}) {how}"

    async def run(self, barrier: Callable[[], Awaitable[int]]) -> Result:
        t_start = time.monotonic()
        self._spawn()
        try:
            try:
                first = await asyncio.wait_for(self._recv(), START_TIMEOUT)
            except asyncio.TimeoutError:
                first = None
                self.proc.kill()
            if not isinstance(first, suspendmsg.Frozen):
                if first is None:
                    self._thaw_here()  # it may have frozen some of them before it died
                    reason = self._gone()
                else:
                    reason = first.reason if isinstance(first, suspendmsg.Failed) else f"unexpected {type(first).__name__}"
                code = errno.EBUSY if "already frozen" in reason else errno.EIO
                raise SuspendError(code, f"{self.device}: cannot suspend {', '.join(self.mounts)}: {reason}")
            # Frozen: from here to the thaw, nothing is logged (the log may be on a frozen file system).
            self.already = list(first.already)
            watch = self.watch = asyncio.ensure_future(self._recv())
            hold = _test_hold()
            if hold:
                await asyncio.wait({watch}, timeout=hold)
            held_us = None
            barrier_done_at = None
            barrier_error: BaseException | None = None
            barrier_at = time.monotonic()
            if not watch.done():
                task = asyncio.ensure_future(barrier())
                await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
                if watch.done() and not task.done():
                    self._early(watch.result())  # thaw now if the suspend process died; the barrier still finishes
                try:
                    held_us = await task
                    barrier_done_at = time.monotonic()
                except BaseException as e:  # noqa: BLE001 - re-raised below, after the thaw
                    barrier_error = e
            if not watch.done():
                try:
                    self.chan.send(msgspec.msgpack.encode(suspendmsg.Thaw()))
                except OSError:
                    pass
                try:
                    await asyncio.wait_for(asyncio.shield(watch), THAW_TIMEOUT)
                except asyncio.TimeoutError:
                    self.proc.kill()
                    await watch
            if self.thawed_at is None:
                self._early(watch.result())
        finally:
            await self._reap()
            if self.thaw_errors:
                log.error("%s: %s", self.device, "; ".join(self.thaw_errors))
        if barrier_error is not None:
            raise barrier_error
        if barrier_done_at is None or barrier_done_at > self.thawed_at:
            raise SuspendError(*self._why_early())
        window = self.thawed.window_ms if self.thawed else (self.thawed_at - t_start) * 1000
        if self.thawed and self.thawed.errors:
            log.error("%s: thaw reported: %s", self.device, "; ".join(self.thawed.errors))
        if self.thawed:
            ms = lambda a, b: (b - a) * 1000  # noqa: E731
            log.debug("%s: suspend window %.1f ms = FIFREEZE %.1f + to the barrier %.1f + barrier %.1f + to FITHAW %.1f + FITHAW %.1f "
                      "(syncfs before: %.1f ms)", self.device, window, first.freeze_ms, ms(first.frozen_at, barrier_at),
                      ms(barrier_at, barrier_done_at), ms(barrier_done_at, self.thawed.thaw_at), self.thawed.thaw_ms, first.sync_ms)
        return Result(held_us, window, first.sync_ms, self.already)

    def _early(self, msg) -> None:
        """The suspend process ended the freeze (Thawed), or died (None): record when."""
        if isinstance(msg, suspendmsg.Thawed):
            self.thawed = msg
            self.thawed_at = msg.thaw_at
        elif self.thawed_at is None:
            self._thaw_here()

    def _why_early(self) -> tuple[int, str]:
        what = ", ".join(self.mounts)
        if self.thawed is None:
            return errno.EIO, f"{self.device}: {self._gone()} while {what} was suspended; thawed, snapshot not taken"
        if self.thawed.by == "freeze_max":
            return errno.ETIMEDOUT, f"{self.device}: {what} thawed after freeze_max {self.freeze_max:g} s, before the snapshot was taken; try again"
        return errno.EINTR, f"{self.device}: {what} thawed early ({self.thawed.by}); snapshot not taken"

    async def _reap(self) -> None:
        """Close the channel (to a suspend process still frozen, that is EOF: it thaws) and wait for it."""
        if self.watch is not None and not self.watch.done():
            self.watch.cancel()
        if self.chan is not None:
            self.chan.close()
        if self.proc is None:
            return
        try:
            await asyncio.to_thread(self.proc.wait, 5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)


def _signame(sig: int) -> str:
    import signal

    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _test_hold() -> float:
    try:
        return max(0.0, float(os.environ.get(TEST_HOLD_ENV, "0")))
    except ValueError:
        return 0.0
