"""`fssd: vss broker`: the I/O shell around workers.vsscore.BrokerCore.

    python -m workers.broker --channel-fd N SETTINGS_JSON

SETTINGS_JSON is msgspec.json.encode(BrokerSettings(...)). The broker listens
on RUNDIR/vss.sock (mode 0660 root:[daemon] group, 0600 without a group),
sends Ready on the channel, then VssState on every phase change. EOF on the
channel or Stop: thaw anything frozen, tell applications THAW, remove the
socket and every application queue, exit 0. SIGTERM does the same.

Who may do what (the kernel says who connected, SO_PEERCRED and
SO_PEERGROUPS): root and members of the group may request CHECK / FREEZE /
THAW / status / list and register applications; nobody else gets past
connect(). An application's two queues are made here, owned by its uid, mode
0600, with attributes chosen here; what arrives on its answers queue is its
answer and nobody else's. Connections are capped (per uid, non-root in all,
root apart so members can't lock root out), must send their first frame
within FIRST_FRAME_TIMEOUT and frames are at most vssproto.MAX_CLIENT_FRAME.

The sequences themselves are BrokerCore's: the loop turns what it reads into
the core's events and carries out the actions it returns. Hook scripts,
FIFREEZE, FITHAW and the mount check run in a thread (one at a time: the core
has one phase), whose completion wakes the loop and goes back to the core as
an event, so the loop keeps answering requests and registrations meanwhile.
Every request, whatever its source, enters through Broker.request().
"""

from __future__ import annotations

import collections
import contextlib
import grp
import logging
import os
import secrets
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import posix_ipc

from ipc import hyperv, mqueue, vssproto
from workers import logfmt
from ipc.channel import Channel, FrameError
from ipc.names import app_queues, vss_socket
from ipc.vssproto import Opened, Register, Registered, Request, VssReply, VssRequest
from ipc.workermsg import Ready, Stop, VssAnswer, VssAsk, VssState
from workers import freeze, hooks, spawned
from workers.settings import BrokerSettings
from workers.vsscore import (JOBS, Action, AppAnswered, AppGone, BrokerCore, CheckMounts, CloseApp, Event, Freeze,
                             FreezeDone, HooksDone, MountsChecked, Reply, ReportState, Requested, RunHooks, SendsFailed,
                             SendToApps, Thaw, ThawDone, Tick)

log = logging.getLogger("vss")

HELD_MAX = 10000  # log records kept while frozen; beyond that the oldest go (and are counted)
DRAIN_MAX = 64  # inbox messages handled per wake-up before looking at the channel again
HYPERV_RETRY = 5.0
CHANNEL_TIMEOUT = 2.0  # longest the broker waits on the supervisor channel, either way
APP_QUEUE_MESSAGES = 8  # per application queue (the kernel's unprivileged ceiling is 10)
FIRST_FRAME_TIMEOUT = 5.0  # a connection that has not sent its Register / VssRequest by then is closed
ROOT_CONNECTIONS = 64  # root's own connections beyond its registrations, counted apart
EXTRA_CONNECTIONS = 4  # per uid beyond its registrations (requests, a registration in progress)
ACCEPT_BACKOFF = 1.0  # seconds without accepting after EMFILE / ENFILE
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13


class HoldingHandler(logging.Handler):
    """While file systems are frozen, keep log records in memory (the log may live on one).

    hold() / let_go(), not release(): logging.Handler.release() is the handler's lock,
    which handle() calls after every emit.
    """

    def __init__(self, target: logging.Handler):
        super().__init__()
        self.target = target
        self.held: collections.deque[logging.LogRecord] = collections.deque(maxlen=HELD_MAX)
        self.holding = False
        self.overflow = 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.holding:
            if len(self.held) == HELD_MAX:
                self.overflow += 1
            self.held.append(record)
        else:
            self.target.handle(record)

    def hold(self) -> None:
        with self.lock:
            self.holding = True

    def let_go(self) -> None:
        with self.lock:
            self.holding = False
            while self.held:
                self.target.handle(self.held.popleft())
            if self.overflow:
                self.target.handle(logging.makeLogRecord({"name": "vss", "levelno": logging.WARNING, "levelname": "WARNING",
                                                          "msg": f"{self.overflow} log records dropped while frozen"}))
                self.overflow = 0


class HyperVChannel:
    """The kernel's VSS channel (or a stand-in on a Unix socket), bytes moved only."""

    def __init__(self, where: str):
        self.where = where
        self.sock: socket.socket | None = None
        self.fd = -1
        self.conn = hyperv.DaemonConnection()

    def open(self) -> None:
        self.conn = hyperv.DaemonConnection()
        if self.where.startswith("unix:"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(self.where[5:])
            self.fd = self.sock.fileno()
        else:
            self.fd = os.open(self.where, os.O_RDWR | os.O_CLOEXEC)
        self.write(self.conn.start())

    def write(self, data: bytes) -> None:
        if self.sock is not None:
            self.sock.sendall(data)
        else:
            os.write(self.fd, data)

    def read(self) -> bytes:
        return self.sock.recv(4096) if self.sock is not None else os.read(self.fd, 4096)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        elif self.fd >= 0:
            os.close(self.fd)
        self.sock, self.fd = None, -1


@dataclass(eq=False)
class Conn:
    """A client of the broker's socket, as the kernel describes it."""

    sock: socket.socket
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]
    deadline: float  # for the first frame
    reader: vssproto.FrameReader = field(default_factory=vssproto.broker_reader)
    kind: str = ""  # "" until the first frame, then "app" or "request"
    queue: str = ""  # the application's key, once registered
    closed: bool = False


@dataclass(eq=False)
class AppQueues:
    requests: mqueue.Queue
    answers: mqueue.Queue
    conn: Conn | None = None
    named: bool = True  # the names exist until the application says it opened both


def queue_error(e: BaseException) -> str:
    """posix_ipc's errors for the queue limits, said so the administrator knows which limit."""
    text = str(e) or type(e).__name__
    if "Insufficient space" in text or "maximum number" in text or isinstance(e, MemoryError):
        return f"the system's message queue limit is reached (fs.mqueue.queues_max, RLIMIT_MSGQUEUE): {text}"
    return text


class ProcessPlatform:
    """The quick half of the world: application queues, replies, state reports to the supervisor
    (BrokerCore's Platform is its open_app and pid_alive)."""

    def __init__(self, settings: BrokerSettings, chan: Channel | None, holder: HoldingHandler | None):
        self.s = settings
        self.chan = chan
        self.holder = holder
        self.queues: dict[str, AppQueues] = {}
        self.hv: HyperVChannel | None = None
        self.on_open = lambda key, q: None  # the Broker watches the answers queue
        self.on_close = lambda q: None  # ... and closes the registration's connection

    def open_app(self, name: str, pid: int, uid: int) -> tuple[str, str]:
        """Two queues for this application only: uid's, 0600, attributes ours, names unguessable."""
        for _ in range(3):  # a name someone made already (64 random bits): never reused, another one
            req_name, ans_name = app_queues(self.s.prefix, secrets.token_hex(8))
            made: list[mqueue.Queue] = []
            try:
                for qname in (req_name, ans_name):
                    made.append(mqueue.create_owned(qname, uid, APP_QUEUE_MESSAGES, vssproto.MAX_MESSAGE))
                break
            except (posix_ipc.Error, OSError, ValueError, MemoryError) as e:
                for mq in made:
                    mqueue.close(mq, unlink_name=True)
                if not isinstance(e, posix_ipc.ExistentialError):
                    return "", f"cannot create its queues: {queue_error(e)}"
        else:
            return "", "cannot create its queues: every name tried exists"
        q = AppQueues(made[0], made[1])
        self.queues[req_name] = q
        self.on_open(req_name, q)
        return req_name, ""

    def send_app(self, queue: str, msg: Request) -> str | None:
        q = self.queues.get(queue)
        if q is None:
            return "not registered"
        try:
            mqueue.send(q.requests, vssproto.encode(msg), timeout=0)
        except mqueue.QueueFull:
            return "its requests queue is full"
        except (posix_ipc.Error, OSError, ValueError, vssproto.ProtocolError) as e:
            return str(e) or type(e).__name__
        return None

    def close_app(self, queue: str) -> None:
        q = self.queues.pop(queue, None)
        if q is None:
            return
        self.on_close(q)
        mqueue.close(q.requests, unlink_name=q.named)
        mqueue.close(q.answers, unlink_name=q.named)

    def unname_app(self, queue: str) -> None:
        q = self.queues.get(queue)
        if q is not None and q.named:
            q.named = False
            mqueue.unlink(q.requests.name)
            mqueue.unlink(q.answers.name)

    def reply(self, reply_to, reply: VssReply) -> None:
        """To whoever asked: a socket requestor (Conn), the Hyper-V channel (HostRequest), or a
        callable taking the VssReply (a request that came in some other way)."""
        if isinstance(reply_to, hyperv.HostRequest):
            if self.hv is not None and self.hv.fd >= 0:
                code = "HV_S_OK" if reply.ok else "HV_E_FAIL"
                log.info("hyper-v %s: %s", reply_to.name, code)
                try:
                    self.hv.write(hyperv.answer(reply_to, reply.ok))
                except OSError as e:
                    log.error("hyper-v: cannot answer %s: %s", reply_to.name, e)
            return
        if not isinstance(reply_to, Conn):
            reply_to(reply)
            return
        if reply_to.closed:
            log.info("requestor pid %d gone before the %s reply", reply_to.pid, reply.op)
            return
        send_and_close(reply_to, reply)

    def pid_alive(self, pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # A zombie child of ours (tests) counts as gone.
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
        except (OSError, IndexError):
            return True

    def state(self, state: str, detail: str, frozen: list[str]) -> None:
        log.debug("state %s (%s)", state, detail)
        if self.chan is not None:
            try:
                self.chan.send(VssState(state, detail, frozen))
            except TimeoutError:
                # A supervisor that does not read must not stall a freeze (freeze_max must fire).
                # The frame may be torn now, so stop reporting rather than send garbage.
                log.error("supervisor does not read its channel for %g s: no more state reports", CHANNEL_TIMEOUT)
                self.chan = None
            except OSError:
                pass  # the supervisor is gone; EOF handling stops us


def _answer_on(chan: Channel, req: int):
    """reply_to for a VssAsk: the VssReply's verdict, back on the supervisor channel."""

    def send(reply: VssReply) -> None:
        try:
            chan.send(VssAnswer(reply.ok, reply.reason, req))
        except OSError as e:
            log.error("supervisor channel: cannot answer %s: %s", reply.op, e)

    return send


def send_and_close(conn: Conn, msg) -> None:
    """One frame to a client, never blocking the broker; then the connection ends."""
    try:
        data = vssproto.frame(msg)
        if conn.sock.send(data) < len(data):
            log.warning("pid %d does not read: reply cut short", conn.pid)
    except (OSError, vssproto.ProtocolError) as e:
        log.info("reply to pid %d not sent: %s", conn.pid, e)
    conn.closed = True
    conn.sock.close()


def peer_credentials(sock: socket.socket) -> tuple[int, int, int, frozenset[int]]:
    """(pid, uid, gid, groups) of the peer at connect time: the kernel's word, no /proc race."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        groups = set(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError:
        # More than 256 groups (ERANGE) or an old kernel: the group database's view of the uid.
        import pwd

        try:
            groups = set(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
        except (KeyError, OSError):
            groups = set()
    return pid, uid, gid, frozenset(groups | {gid})


class Broker:
    def __init__(self, settings: BrokerSettings, chan: Channel | None, holder: HoldingHandler | None = None):
        self.s = settings
        self.chan = chan
        self.platform = ProcessPlatform(settings, chan, holder)
        self.core = BrokerCore(self.platform, settings.prefix, settings.freeze_mounts, settings.timeout,
                               settings.freeze_max, max_apps=settings.max_apps,
                               max_apps_per_uid=settings.max_apps_per_uid, hooks_dir=settings.hooks_dir or "")
        self.platform.on_open = self._watch_answers
        self.platform.on_close = self._unwatch_app
        self.holder = holder
        self.sel = selectors.DefaultSelector()
        # The one slow action in flight (hooks, FIFREEZE, FITHAW, mount check) runs in a thread;
        # it writes a byte here when done and the loop hands its event to the core.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._job: threading.Thread | None = None
        self._job_result: tuple[Callable[[Any, BaseException | None], Event], Any, BaseException | None] | None = None
        self.inline = False  # stopping: slow actions run on the loop, one after the other
        self.stopping = False
        self._hv_next_try = 0.0
        self.listener: socket.socket | None = None
        self._sock_id = (0, 0)
        self.sock_path = vss_socket(settings.rundir)
        self.gid: int | None = None
        self.conns: set[Conn] = set()
        self._accept_paused_until = 0.0
        self._accept_failures = 0
        # Lines a peer can cause: at most one per 10 s each, with a count (the log stays bounded).
        self._warn_accept = logfmt.RateLimited(log, 10.0)
        self._warn_refused = logfmt.RateLimited(log, 10.0)
        self._faults = logfmt.RateLimited(log, 10.0)
        self._refused = 0

    def start(self) -> None:
        if self.s.group:
            try:
                self.gid = grp.getgrnam(self.s.group).gr_gid
            except KeyError:
                log.warning("group %s does not exist: the VSS socket is root-only", self.s.group)
        self._listen()
        self.sel.register(self._wake_r, selectors.EVENT_READ, "job")
        if self.chan is not None:
            self.chan.sock.settimeout(CHANNEL_TIMEOUT)
            self.sel.register(self.chan.sock, selectors.EVENT_READ, "channel")
        if self.s.hyperv_device:
            self.platform.hv = HyperVChannel(self.s.hyperv_device)
            self._open_hyperv()
        log.info("VSS broker ready: socket %s (%s), timeout %g s, freeze_max %g s, mounts %s, hooks %s",
                 self.sock_path, f"root and group {self.s.group}" if self.gid is not None else "root only",
                 self.s.timeout, self.s.freeze_max, " ".join(self.s.freeze_mounts) or "(none)", self.s.hooks_dir or "(none)")
        if self.chan is not None:
            self.chan.send(Ready(kind="broker", pid=os.getpid()))

    def _listen(self) -> None:
        """Bind RUNDIR/vss.sock with its final mode (umask around bind), then hand it to the group."""
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.sock_path)
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(f"{self.sock_path} exists and is not a socket")
            os.unlink(self.sock_path)  # a killed broker's
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o117 if self.gid is not None else 0o177)
        try:
            sock.bind(self.sock_path)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old)
        st = os.lstat(self.sock_path)
        self._sock_id = (st.st_dev, st.st_ino)
        if self.gid is not None:
            os.chown(self.sock_path, 0, self.gid, follow_symlinks=False)
        sock.listen(64)
        sock.setblocking(False)
        self.listener = sock
        self.sel.register(sock, selectors.EVENT_READ, "listen")

    def run(self) -> None:
        try:
            while not self.stopping:
                wait = min(max(self.core.next_wakeup() - time.monotonic(), 0.0), 0.5)
                for key, _ in self.sel.select(wait):
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "channel":
                        self._on_channel()
                    elif key.data == "hyperv":
                        self._on_hyperv()
                    elif key.data == "job":
                        self._job_finished()
                    elif isinstance(key.data, Conn):
                        self._on_conn(key.data)
                    elif isinstance(key.data, str):
                        self._drain_answers(key.data)
                self._feed(Tick())
                self._expire_conns()
                hv = self.platform.hv
                if hv is not None and hv.fd < 0 and time.monotonic() >= self._hv_next_try:
                    self._open_hyperv()
        finally:
            self.close()

    def close(self) -> None:
        # Let the slow action in flight end (a FIFREEZE cannot be taken back), hand in its event,
        # then everything runs inline: FITHAW, hooks thaw, THAW to the applications.
        self.inline = True
        self._job_finished(wait=True)
        for action in self.core.shutdown("broker stopping"):
            self._do(action)  # their completions are not handed in: the core has ended
        self._unregister(self._wake_r)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1
        hv = self.platform.hv
        if hv is not None and hv.fd >= 0:
            hv.close()
        for conn in list(self.conns):
            self._close_conn(conn)
        if self.listener is not None:
            self._unregister(self.listener)
            self.listener.close()
            self.listener = None
            with contextlib.suppress(OSError):
                st = os.lstat(self.sock_path)
                if (st.st_dev, st.st_ino) == self._sock_id:  # ours, not a successor's
                    os.unlink(self.sock_path)

    # -- requests and the core's actions

    def request(self, op: str, msgid: int, reply_to: Any, timeout: float | None = None) -> None:
        """The one way a VSS request (CHECK / FREEZE / THAW / status / list) reaches the core, from
        any source: the socket (a Conn), the Hyper-V channel (a hyperv.HostRequest) or the
        supervisor's channel. The VssReply goes to reply_to, now or when the sequence ends
        (ProcessPlatform.reply): a Conn, a HostRequest, or any callable taking the VssReply.
        A request while another is in progress is answered FAIL busy. Never blocks."""
        self._feed(Requested(op, msgid, reply_to, timeout))

    def _feed(self, *events: Event) -> None:
        """Hand events to the core and carry out its actions, until nothing follows at once."""
        todo = collections.deque(events)
        while todo:
            for action in self.core.handle(todo.popleft()):
                todo.extend(self._do(action))

    def _do(self, a: Action) -> list[Event]:
        """Carry out one action; what comes back at once (a send that failed, a job run inline)."""
        if isinstance(a, SendToApps):
            failures = tuple((q, err) for q, m in a.requests if (err := self.platform.send_app(q, m)))
            return [SendsFailed(a.requests[0][1].op, failures)] if failures else []
        if isinstance(a, CloseApp):
            self.platform.close_app(a.queue)
        elif isinstance(a, Reply):
            self.platform.reply(a.reply_to, a.reply)
        elif isinstance(a, ReportState):
            self.platform.state(a.state, a.detail, list(a.frozen))
        elif isinstance(a, JOBS):
            return self._start_job(a)
        return []

    def _start_job(self, a: RunHooks | Freeze | Thaw | CheckMounts) -> list[Event]:
        work, done, trivial = self._job_parts(a)
        if trivial or self.inline:
            try:
                return [done(work(), None)]
            except Exception as e:
                return [done(None, e)]
        if self._job is not None:  # the core runs one phase at a time: cannot happen
            log.error("%s while another action runs: refused", type(a).__name__)
            return [done(None, RuntimeError("another action is running"))]

        def run() -> None:
            try:
                self._job_result = (done, work(), None)
            except BaseException as e:  # reported to the core as the action's failure
                self._job_result = (done, None, e)
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"j")

        self._job = threading.Thread(target=run, name=f"vss {type(a).__name__}", daemon=True)
        self._job.start()
        return []

    def _job_finished(self, wait: bool = False) -> None:
        with contextlib.suppress(OSError):
            while os.read(self._wake_r, 64):
                pass
        job = self._job
        if job is None or (self._job_result is None and not wait):  # the result is set before the byte
            return
        job.join()
        self._job = None
        assert self._job_result is not None
        done, result, exc = self._job_result
        self._job_result = None
        self._feed(done(result, exc))

    def _job_parts(self, a) -> tuple[Callable[[], Any], Callable[[Any, BaseException | None], Event], bool]:
        """(work, done, trivial) for a slow action: work runs off the loop and does no logging;
        done turns its result (or exception) into the core's event, on the loop."""
        if isinstance(a, RunHooks):
            hooks_dir, action = self.s.hooks_dir, a.action

            def hooks_done(res: hooks.HooksResult | None, exc: BaseException | None) -> Event:
                if exc is not None:
                    return HooksDone(action, f"hooks {action}: {exc}")
                assert res is not None
                for run in res.runs:
                    log.info("hook %s %s: %s (%.0f ms)%s", run.path, action,
                             "timed out" if run.returncode is None else f"exit {run.returncode}", run.seconds * 1000,
                             f": {run.output}" if run.output else "")
                return HooksDone(action, None if res.ok else res.reason)

            return (lambda: hooks.run_hooks(hooks_dir, action, a.timeout)), hooks_done, not hooks_dir
        if isinstance(a, Freeze):
            mounts = list(a.mounts)
            if mounts and self.holder:
                self.holder.hold()

            def frozen(_res: Any, exc: BaseException | None) -> Event:
                if exc is None:
                    return FreezeDone(None)
                if self.holder:
                    self.holder.let_go()
                if isinstance(exc, freeze.FreezeError):
                    return FreezeDone(str(exc))
                if isinstance(exc, OSError):
                    return FreezeDone(f"cannot open mount: {exc}")
                return FreezeDone(f"FIFREEZE: {exc}")

            return (lambda: freeze.freeze_all(mounts) if mounts else None), frozen, not mounts
        if isinstance(a, Thaw):
            mounts = list(a.mounts)

            def thawed(errors: list[freeze.FreezeError] | None, exc: BaseException | None) -> Event:
                if self.holder:
                    self.holder.let_go()
                if exc is not None:
                    log.error("FITHAW: %s", exc)
                    return ThawDone(tuple(mounts))
                for e in errors or []:
                    log.error("%s", e)
                return ThawDone(tuple(e.mount for e in errors or []))

            return (lambda: freeze.thaw_all(mounts)), thawed, not mounts
        assert isinstance(a, CheckMounts)
        mounts = list(a.mounts)

        def check() -> str | None:
            for m in mounts:
                reason = freeze.check_freezable(m)
                if reason:
                    return reason
            return None

        return check, (lambda res, exc: MountsChecked(res if exc is None else f"cannot check mounts: {exc}")), not mounts

    # -- the socket

    def _unregister(self, obj) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.sel.unregister(obj)

    def _accept(self) -> None:
        assert self.listener is not None
        for _ in range(DRAIN_MAX):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                # EMFILE / ENFILE: stop accepting for a while rather than spin; one line per 10 s.
                self._accept_failures += 1
                now = time.monotonic()
                self._warn_accept.warning("VSS socket: accept: %s; pausing %g s at a time (%d time(s) so far)",
                                          e.strerror or e, ACCEPT_BACKOFF, self._accept_failures)
                self._unregister(self.listener)
                self._accept_paused_until = now + ACCEPT_BACKOFF
                return
            try:
                pid, uid, gid, groups = peer_credentials(sock)
            except OSError as e:
                self._faults.warning("VSS socket: no peer credentials: %s", e)
                sock.close()
                continue
            sock.setblocking(False)
            conn = Conn(sock, pid, uid, gid, groups, time.monotonic() + FIRST_FRAME_TIMEOUT)
            why = self._over_cap(conn)
            if why:
                self._refuse(conn, why)
                continue
            self.conns.add(conn)
            self.sel.register(sock, selectors.EVENT_READ, conn)

    def _over_cap(self, conn: Conn) -> str:
        if conn.uid == 0:
            cap = self.s.max_apps + ROOT_CONNECTIONS
            n = sum(1 for c in self.conns if c.uid == 0)
            return f"too many connections from root ({cap})" if n >= cap else ""
        others = [c for c in self.conns if c.uid != 0]
        total = self.s.max_apps + 4 * EXTRA_CONNECTIONS
        per_uid = self.s.max_apps_per_uid + EXTRA_CONNECTIONS
        if len(others) >= total:
            return f"too many connections ({total})"
        if sum(1 for c in others if c.uid == conn.uid) >= per_uid:
            return f"too many connections from uid {conn.uid} ({per_uid})"
        return ""

    def _refuse(self, conn: Conn, why: str) -> None:
        """A one-line refusal to the client; the log says it once per 10 s, with a count."""
        self._refused += 1
        self._warn_refused.warning("VSS socket: refused pid %d uid %d: %s (%d refusal(s) in all)", conn.pid, conn.uid, why,
                                   self._refused)
        send_and_close(conn, VssReply(msgid=0, op="status", ok=False, reason=why))

    def _close_conn(self, conn: Conn) -> None:
        self.conns.discard(conn)
        self._unregister(conn.sock)
        if not conn.closed:
            conn.closed = True
            conn.sock.close()

    def _expire_conns(self) -> None:
        now = time.monotonic()
        if self.listener is not None and self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        for conn in [c for c in self.conns if not c.kind and now >= c.deadline]:
            self._faults.info("VSS socket: pid %d uid %d sent nothing within %g s: closed", conn.pid, conn.uid,
                     FIRST_FRAME_TIMEOUT)
            self._close_conn(conn)

    def _on_conn(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(conn.reader.wants())
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            return self._conn_ended(conn, "unregistered (connection closed)")
        try:
            msgs = conn.reader.feed(data)
        except vssproto.ProtocolError as e:
            if conn.queue:
                return self._conn_ended(conn, str(e), failed=True)
            self._faults.warning("VSS socket: pid %d uid %d: %s: closed", conn.pid, conn.uid, e)
            return self._close_conn(conn)
        for msg in msgs:
            if not conn.kind:
                self._first_message(conn, msg)
            elif conn.queue and isinstance(msg, Opened):
                self.platform.unname_app(conn.queue)
            else:
                return self._conn_ended(conn, f"unexpected {type(msg).__name__} after registering", failed=True)
            if conn.closed or conn.kind == "request":
                return

    def _conn_ended(self, conn: Conn, why: str, failed: bool = False) -> None:
        queue = conn.queue
        self._close_conn(conn)
        if queue:
            self._feed(AppGone(queue, why, failed))

    def _authorized(self, conn: Conn) -> bool:
        return conn.uid == 0 or (self.gid is not None and self.gid in conn.groups)

    def _first_message(self, conn: Conn, msg) -> None:
        if not self._authorized(conn):
            who = f"root and members of group {self.s.group}" if self.gid is not None else "root"
            self._faults.warning("VSS socket: pid %d uid %d refused: not root or in the group", conn.pid, conn.uid)
            reason = f"Permission denied: only {who} may use the VSS broker"
            self.conns.discard(conn)
            self._unregister(conn.sock)
            if isinstance(msg, Register):
                return send_and_close(conn, Registered(msg.name, False, reason))
            return send_and_close(conn, VssReply(msgid=msg.msgid, op=msg.op, ok=False, reason=reason))
        if isinstance(msg, VssRequest):
            # From here the connection only waits for its reply (ProcessPlatform.reply closes it).
            conn.kind = "request"
            self.conns.discard(conn)
            self._unregister(conn.sock)
            self.request(msg.op, msg.msgid, conn, msg.timeout)
            return
        if not isinstance(msg, Register):
            self._faults.warning("VSS socket: pid %d uid %d began with %s: closed", conn.pid, conn.uid, type(msg).__name__)
            return self._close_conn(conn)
        conn.kind = "app"
        app, why = self.core.register(msg.name, conn.pid, conn.uid)
        if app is None:
            self.conns.discard(conn)
            self._unregister(conn.sock)
            return send_and_close(conn, Registered(msg.name, False, why))
        req_name, ans_name = self.platform.queues[app.queue].requests.name, self.platform.queues[app.queue].answers.name
        self.platform.queues[app.queue].conn = conn
        conn.queue = app.queue
        try:
            data = vssproto.frame(Registered(msg.name, True, "", req_name, ans_name, conn.pid))
            if conn.sock.send(data) < len(data):
                raise OSError("short send")
        except OSError as e:
            self._conn_ended(conn, f"acknowledgement not sent: {e}", failed=True)

    # -- application queues

    def _watch_answers(self, key: str, q: AppQueues) -> None:
        self.sel.register(q.answers.mqd, selectors.EVENT_READ, key)

    def _unwatch_app(self, q: AppQueues) -> None:
        self._unregister(q.answers.mqd)
        if q.conn is not None:
            q.conn.queue = ""
            self._close_conn(q.conn)

    def _drain_answers(self, key: str) -> None:
        q = self.platform.queues.get(key)
        if q is None:
            return
        for _ in range(DRAIN_MAX):
            try:
                data = mqueue.receive(q.answers, 0)
            except (posix_ipc.Error, OSError) as e:
                return self._feed(AppGone(key, f"its answers queue failed: {e}", failed=True))
            if data is None:
                return
            try:
                answer = vssproto.decode_answer(data)
            except vssproto.ProtocolError as e:
                return self._feed(AppGone(key, str(e), failed=True))
            self._feed(AppAnswered(key, answer))
            if key not in self.platform.queues:
                return

    def _on_channel(self) -> None:
        assert self.chan is not None
        try:
            got = self.chan.recv(timeout=CHANNEL_TIMEOUT)
        except (FrameError, OSError) as e:
            log.error("supervisor channel: %s", e)
            got = None
        if got is None:
            log.info("supervisor gone: stopping")
            self.stopping = True
            return
        msg, fds = got
        for fd in fds:
            os.close(fd)
        if isinstance(msg, Stop):
            self.stopping = True
        elif isinstance(msg, VssAsk):  # the supervisor's own -C: answered on this channel
            self.request(msg.op, msg.req, _answer_on(self.chan, msg.req), msg.timeout)

    def _open_hyperv(self) -> None:
        hv = self.platform.hv
        assert hv is not None
        try:
            hv.open()
        except OSError as e:
            self._hv_next_try = time.monotonic() + HYPERV_RETRY
            log.error("hyper-v: cannot open %s: %s (retry in %g s)", hv.where, e, HYPERV_RETRY)
            return
        self.sel.register(hv.fd, selectors.EVENT_READ, "hyperv")

    def _hyperv_lost(self, why: str) -> None:
        hv = self.platform.hv
        assert hv is not None
        log.error("hyper-v: %s: channel closed", why)
        self.sel.unregister(hv.fd)
        hv.close()
        self._hv_next_try = time.monotonic() + HYPERV_RETRY

    def _on_hyperv(self) -> None:
        hv = self.platform.hv
        assert hv is not None
        try:
            data = hv.read()
        except BlockingIOError:
            return
        except OSError as e:
            return self._hyperv_lost(str(e))
        if not data:
            return self._hyperv_lost("end of file")
        try:
            events = hv.conn.receive_data(data)
        except hyperv.HvProtocolError as e:
            return self._hyperv_lost(str(e))
        for ev in events:
            if isinstance(ev, hyperv.Registered):
                log.info("hyper-v: kernel module version: %d", ev.version)
            elif ev.op is None:
                # As hv_vss_daemon: an operation it does not serve is answered OK.
                log.info("hyper-v: %s answered HV_S_OK without a phase", ev.name)
                try:
                    hv.write(hyperv.answer(ev, True))
                except OSError as e:
                    return self._hyperv_lost(str(e))
            else:
                log.info("hyper-v: %s -> %s", ev.name, ev.op.upper())
                self.request(ev.op, int.from_bytes(os.urandom(8), "little"), ev)


def _setup_logging(debug: bool, use_syslog: bool = False) -> HoldingHandler:
    logfmt.setup("vss", debug, use_syslog)
    root = logging.getLogger()
    target = root.handlers[0]
    holder = HoldingHandler(target)
    root.removeHandler(target)
    root.addHandler(holder)
    return holder


def main(argv: list[str] | None = None) -> int:
    settings, chan = spawned.bootstrap("workers.broker", BrokerSettings, argv, title=lambda s: "vss broker",
                                       log_name=lambda s: "vss", channel_kind="optional")
    holder = _setup_logging(settings.debug, settings.use_syslog)
    broker = Broker(settings, chan, holder)

    def on_term(signum, frame):
        broker.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        broker.start()
    except OSError as e:
        log.error("cannot start: %s", e)
        broker.close()
        return 1
    broker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
