"""The VSS broker's state machine, apart from the process that runs it.

BrokerCore holds the application table and the one transaction in flight; it
is driven by handle(message), request(...) and tick(), and acts only through
a Platform (queues, FIFREEZE, hooks, state reports) and a clock, so tests
run it with a fake of each. The sequence (docs/architecture.md):

    CHECK : apps CHECK -> all OK in time? -> mounts freezable? -> OK / FAIL
    FREEZE: apps FREEZE -> hooks freeze -> FIFREEZE each mount -> OK
            (any failure or timeout: thaw what was frozen, hooks thaw, apps THAW, FAIL)
    THAW  : FITHAW -> hooks thaw -> apps THAW -> OK

Every phase ends at its deadline; a freeze no THAW ends within freeze_max is
thawed here; a request arriving while another is in progress is answered
FAIL busy. Application answers carry the transaction's 64-bit msgid, so a
late answer to an earlier transaction is logged and dropped.

Applications are identified by their queue (the Platform's key for the pair
of queues it made for them), never by what a message says: the process
around this core attributes each answer to the queue it arrived on. Any
failure of one application (its queue, its bytes, its process) drops that
application with one log line; nothing an application does reaches beyond it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from ipc.vssproto import AppInfo, Answer, Request, VssReply

log = logging.getLogger("vss")

MAX_APPS = 64  # [vss] max_apps: each application costs two queues of the system's 256
MAX_APPS_PER_UID = 8  # [vss] max_apps_per_uid
REAP_INTERVAL = 1.0  # seconds between liveness checks of registered pids
_PHASE_STATE = {"check": "checking", "freeze": "freezing", "thaw": "thawing"}


class Platform(Protocol):
    """What the core may do to the world. Every method reports errors, none raises."""

    def open_app(self, name: str, pid: int, uid: int) -> tuple[str, str]: ...  # (queue key, "") or ("", error)
    def send_app(self, queue: str, msg: Request) -> str | None: ...
    def close_app(self, queue: str) -> None: ...  # queues removed, the registration ended
    def reply(self, reply_to: Any, reply: VssReply) -> None: ...
    def pid_alive(self, pid: int) -> bool: ...
    def check_mount(self, mount: str) -> str | None: ...
    def freeze(self, mounts: list[str]) -> str | None: ...  # on error nothing is left frozen
    def thaw(self, mounts: list[str]) -> list[str]: ...  # mounts that failed to thaw
    def run_hooks(self, action: str, timeout: float) -> str | None: ...
    def state(self, state: str, detail: str, frozen: list[str]) -> None: ...


@dataclass
class App:
    name: str
    pid: int
    queue: str
    uid: int = 0
    state: str = "idle"
    last_op: str = ""
    last_answer: str = ""
    last_ms: float = 0.0
    sent_at: float = 0.0

    @property
    def key(self) -> str:
        return self.queue

    @property
    def label(self) -> str:
        return f"{self.name}[{self.pid}]"

    def info(self) -> AppInfo:
        return AppInfo(self.name, self.pid, self.state, self.last_op, self.last_answer, round(self.last_ms, 3), self.uid)


@dataclass
class Txn:
    op: str  # check | freeze | thaw
    req_msgid: int
    reply_to: Any
    timeout: float
    started: float
    msgid: int = 0  # of the application phase
    deadline: float = 0.0
    pending: dict[str, App] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    window_ms: float = 0.0


class BrokerCore:
    def __init__(self, platform: Platform, prefix: str, mounts: list[str], timeout: float = 15.0,
                 freeze_max: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, msgid_base: int | None = None,
                 max_apps: int = MAX_APPS, max_apps_per_uid: int = MAX_APPS_PER_UID, hooks_dir: str = ""):
        self.p = platform
        self.prefix = prefix
        self.mounts = list(mounts)
        self.timeout = timeout
        self.freeze_max = freeze_max
        self.clock = clock
        self.wall = wall
        self.max_apps = max_apps
        self.max_apps_per_uid = max_apps_per_uid
        self.hooks_dir = hooks_dir
        self.apps: dict[str, App] = {}
        self.held: list[str] = []  # applications that answered FREEZE OK, while frozen
        self.hooks_ran = False  # freeze hooks ran for the current freeze
        self.txn: Txn | None = None
        self.state = "idle"
        self.since = wall()
        self.frozen: list[str] = []
        self.frozen_at = 0.0
        # Start msgids from the time so a restarted broker never reuses a live one.
        self._msgid = (msgid_base if msgid_base is not None else time.time_ns()) & ((1 << 64) - 1)
        self._cleanup_msgids: deque[int] = deque(maxlen=16)  # THAWs sent without waiting
        self._last_reap = clock()

    # -- inputs

    def register(self, name: str, pid: int, uid: int) -> tuple[App | None, str]:
        """A new application (pid and uid are the kernel's word): the App, or None and why not."""
        if len(self.apps) >= self.max_apps:
            return None, f"too many applications registered ({self.max_apps}, [vss] max_apps)"
        mine = sum(1 for a in self.apps.values() if a.uid == uid)
        if uid != 0 and mine >= self.max_apps_per_uid:
            return None, f"too many applications registered by uid {uid} ({self.max_apps_per_uid}, [vss] max_apps_per_uid)"
        queue, err = self.p.open_app(name, pid, uid)
        if err:
            log.warning("registration of %s[%d] (uid %d) refused: %s", name, pid, uid, err)
            return None, err
        app = App(name, pid, queue, uid)
        self.apps[app.key] = app
        log.info("application %s (uid %d) registered (%d in all)", app.label, uid, len(self.apps))
        return app, ""

    def answer(self, queue: str, a: Answer) -> None:
        """An Answer that arrived on `queue`: it is that application's, whatever it says."""
        app = self.apps.get(queue)
        if app is not None:
            self._on_answer(app, a)

    def drop(self, queue: str, why: str, failed: bool = False) -> None:
        """End a registration: unregistered, gone, or failed (`failed` also fails its phase)."""
        app = self.apps.pop(queue, None)
        if app is None:
            return
        if failed:
            log.warning("application %s dropped: %s", app.label, why)
        else:
            log.info("application %s %s", app.label, why)
        self.p.close_app(app.queue)
        self._drop_pending(app, why, failed)

    def request(self, op: str, req_msgid: int, reply_to: Any, timeout: float | None = None) -> None:
        now = self.clock()
        txn = Txn(op, req_msgid, reply_to, min(timeout or self.timeout, 3600.0), now)
        log.debug("request %s msgid %#x", op, req_msgid)
        if op in ("status", "list"):
            self._reap()
            return self._reply(txn, True)
        if self.txn is not None:
            return self._reply(txn, False, f"busy: {self.txn.op} in progress")
        if op in ("check", "freeze") and self.state == "frozen":
            return self._reply(txn, False, f"busy: file systems are frozen since {self.since:.3f}; thaw first")
        self.txn = txn
        if op == "thaw":
            if self.state == "frozen":
                txn.window_ms = (now - self.frozen_at) * 1000
            self._set_state("thawing", "file systems")
            self._thaw_fs(txn)
        self._start_phase(txn)

    def tick(self) -> None:
        """Deadlines, freeze_max, dead applications. Call at next_wakeup() or sooner."""
        now = self.clock()
        if now - self._last_reap >= REAP_INTERVAL:
            self._reap()
        txn = self.txn
        if txn is not None and now >= txn.deadline and txn.pending:
            for app in txn.pending.values():
                app.state, app.last_answer, app.last_ms = "timeout", "timeout", (now - app.sent_at) * 1000
                txn.failures.append(f"{app.name}[{app.pid}] did not answer {txn.op.upper()} within {txn.timeout:g} s")
            txn.pending.clear()
            self._phase_done(txn)
        if self.state == "frozen" and self.txn is None and now - self.frozen_at >= self.freeze_max:
            log.warning("no THAW within freeze_max %g s: thawing %s", self.freeze_max, " ".join(self.frozen) or "(no mounts)")
            self._thaw_fs(None)
            self._notify_apps_thaw()
            self._set_state("idle", f"thawed by the broker after freeze_max {self.freeze_max:g} s")

    def next_wakeup(self) -> float:
        t = self._last_reap + REAP_INTERVAL
        if self.txn is not None and self.txn.pending:
            t = min(t, self.txn.deadline)
        if self.state == "frozen" and self.txn is None:
            t = min(t, self.frozen_at + self.freeze_max)
        return t

    def shutdown(self, reason: str) -> None:
        """Broker stopping: fail what is in flight, leave nothing frozen, tell apps THAW."""
        txn, self.txn = self.txn, None
        if txn is not None:
            self._reply(txn, False, reason)
        if self.frozen or self.state in ("frozen", "freezing") or (txn and txn.op == "freeze"):
            self._thaw_fs(None)
            self._notify_apps_thaw()
        for app in list(self.apps.values()):
            self.p.close_app(app.queue)
        self.apps.clear()
        self._set_state("idle", reason)

    # -- applications

    def _on_answer(self, app: App, a: Answer) -> None:
        txn = self.txn
        verdict = "OK" if a.ok else f"FAIL: {a.reason}" if a.reason else "FAIL"
        if txn is not None and a.msgid == txn.msgid and app.key in txn.pending:
            del txn.pending[app.key]
            app.last_answer, app.last_ms = verdict, (self.clock() - app.sent_at) * 1000
            app.state = "ok" if a.ok else "failed"
            log.debug("%s %s: %s in %.1f ms", app.label, txn.op, verdict, app.last_ms)
            if not a.ok:
                txn.failures.append(f"{app.label} {txn.op.upper()} failed" + (f": {a.reason}" if a.reason else ""))
            # One failure decides CHECK and FREEZE; THAW waits for everyone.
            if not txn.pending or (txn.failures and txn.op != "thaw"):
                self._phase_done(txn)
        elif a.msgid in self._cleanup_msgids:
            app.state, app.last_op, app.last_answer = ("ok" if a.ok else "failed"), "thaw", verdict
        else:
            log.warning("late answer %#x (%s) from %s dropped: not the current transaction", a.msgid, verdict, app.label)

    def _reap(self) -> None:
        self._last_reap = self.clock()
        for app in [a for a in self.apps.values() if not self.p.pid_alive(a.pid)]:
            self.drop(app.queue, "is gone: unregistered, queues removed")

    def _drop_pending(self, app: App, why: str, failed: bool) -> None:
        txn = self.txn
        if txn is not None and txn.pending.pop(app.key, None) is not None:
            if failed:
                txn.failures.append(f"{app.label}: {why}")
            else:
                log.info("%s %s during %s; not waited for", app.label, why, txn.op.upper())
            if not txn.pending or (txn.failures and txn.op != "thaw"):
                self._phase_done(txn)

    def _send_all(self, op: str, msgid: int, timeout: float) -> tuple[dict, list[str]]:
        pending, errors = {}, []
        now = self.clock()
        for app in list(self.apps.values()):
            err = self.p.send_app(app.queue, Request(msgid, op, timeout))  # type: ignore[arg-type]
            app.last_op, app.sent_at = op, now
            if err:
                errors.append(f"{app.label}: cannot send {op.upper()}: {err}")
                self.drop(app.queue, f"cannot send {op.upper()}: {err}", failed=True)
            else:
                app.state = _PHASE_STATE[op]
                pending[app.key] = app
        return pending, errors

    def _notify_apps_thaw(self) -> None:
        msgid = self._new_msgid()
        self._cleanup_msgids.append(msgid)
        self._send_all("thaw", msgid, self.timeout)

    # -- phases

    def _start_phase(self, txn: Txn) -> None:
        self._reap()
        if self.txn is not txn:  # a reap finished it already (cannot happen before send, but be safe)
            return
        txn.msgid = self._new_msgid()
        txn.deadline = self.clock() + txn.timeout
        self._set_state(_PHASE_STATE[txn.op], f"applications ({len(self.apps)})")
        txn.pending, errors = self._send_all(txn.op, txn.msgid, txn.timeout)
        txn.failures += errors
        if not txn.pending or (txn.failures and txn.op != "thaw"):
            self._phase_done(txn)

    def _phase_done(self, txn: Txn) -> None:
        if self.txn is not txn:
            return
        self.txn = None
        if txn.op == "check":
            self._finish_check(txn)
        elif txn.op == "freeze":
            self._finish_freeze(txn)
        else:
            self._set_state("idle", "thawed")
            ok = not txn.failures
            self._reply(txn, ok, "" if ok else "file systems thawed, but " + "; ".join(txn.failures))

    def _finish_check(self, txn: Txn) -> None:
        self._set_state("idle", "checked")
        if txn.failures:
            return self._reply(txn, False, "; ".join(txn.failures))
        for m in self.mounts:
            reason = self.p.check_mount(m)
            if reason:
                return self._reply(txn, False, reason)
        self._reply(txn, True)

    def _finish_freeze(self, txn: Txn) -> None:
        if txn.failures:
            return self._abort_freeze(txn, "; ".join(txn.failures), hooks_ran=False)
        held = [a.label for a in self.apps.values() if a.last_op == "freeze" and a.state == "ok"]
        left = max(0.0, txn.deadline - self.clock())
        self._set_state("freezing", "hooks")
        err = self.p.run_hooks("freeze", left)
        if err:
            return self._abort_freeze(txn, err, hooks_ran=True)
        self._set_state("freezing", "file systems")
        err = self.p.freeze(self.mounts)
        if err:
            return self._abort_freeze(txn, err, hooks_ran=True)
        self.frozen, self.frozen_at = list(self.mounts), self.clock()
        self.held, self.hooks_ran = held, bool(self.hooks_dir)
        self._set_state("frozen", f"{len(self.frozen)} file systems, {len(self.apps)} applications")
        self._reply(txn, True)

    def _abort_freeze(self, txn: Txn, reason: str, hooks_ran: bool) -> None:
        log.warning("FREEZE failed: %s; thawing", reason)
        if hooks_ran:
            self._hooks_thaw()
        self._notify_apps_thaw()
        self._set_state("idle", f"freeze failed: {reason}")
        self._reply(txn, False, reason)

    def _thaw_fs(self, txn: Txn | None) -> None:
        """FITHAW first, then hooks thaw (before the applications hear THAW)."""
        failed = self.p.thaw(self.frozen) if self.frozen else []
        if failed:
            msg = "FITHAW failed on " + " ".join(failed)
            if txn is not None:
                txn.failures.append(msg)
            log.error("%s", msg)
        self.frozen = failed  # tick() tries again at freeze_max
        self._hooks_thaw()

    def _hooks_thaw(self) -> None:
        err = self.p.run_hooks("thaw", self.timeout)
        if err:
            log.warning("%s", err)

    # -- outputs

    def _set_state(self, state: str, detail: str = "") -> None:
        if state != self.state:
            self.since = self.wall()
        if state != "frozen":
            self.held, self.hooks_ran = [], False
        self.state = state
        self.p.state(state, detail, list(self.frozen))

    def _reply(self, txn: Txn, ok: bool, reason: str = "") -> None:
        elapsed = (self.clock() - txn.started) * 1000
        if txn.op in ("check", "freeze", "thaw"):
            log.info("%s: %s%s (%.1f ms)", txn.op.upper(), "OK" if ok else "FAIL", f": {reason}" if reason else "", elapsed)
        reply = VssReply(msgid=txn.req_msgid, op=txn.op, ok=ok, reason=reason[:2000], elapsed_ms=round(elapsed, 3),  # type: ignore[arg-type]
                         state=self.state, since=self.since, frozen=list(self.frozen), window_ms=round(txn.window_ms, 3),
                         apps=[a.info() for a in self.apps.values()], held=list(self.held),
                         hooks=self.hooks_dir if self.hooks_ran else "", mounts=list(self.mounts))
        self.p.reply(txn.reply_to, reply)

    def _new_msgid(self) -> int:
        self._msgid = (self._msgid + 1) & ((1 << 64) - 1)
        return self._msgid
