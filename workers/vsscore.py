"""The VSS broker's state machine, apart from the process that runs it.

BrokerCore holds the application table, the phase and the one transaction in
flight. It does no I/O and never waits: `handle(event)` returns the Actions
the broker's shell (workers.broker) carries out. Whatever can take time (hook
scripts, FIFREEZE, FITHAW, the mount check) is an Action whose completion
comes back as an event (HooksDone, FreezeDone, ThawDone, MountsChecked), so
the shell keeps reading while it runs: a status request or a registration is
answered during a long hook, and a second request is answered FAIL busy.
The sequence (docs/architecture.md):

    CHECK : apps CHECK -> all OK in time? -> mounts freezable? -> OK / FAIL
    FREEZE: apps FREEZE -> hooks freeze -> FIFREEZE each mount -> OK
            (any failure or timeout: thaw what was frozen, hooks thaw, apps THAW, FAIL)
    THAW  : FITHAW -> hooks thaw -> apps THAW -> OK

TABLE says, for every (Phase, Kind) pair, which handler runs; the pairs that
are not a step of a sequence are rejected explicitly (a request during
another is answered busy, a completion that is not the phase's is logged and
dropped). EDGES lists every phase change a handler may make. Every phase
ends: the application phases at their deadline (tick), hooks at their time
limit (workers.hooks), and a freeze no THAW ends within freeze_max is thawed
here. Application answers carry the transaction's 64-bit msgid, so a late
answer to an earlier transaction is logged and dropped.

Applications are identified by their queue (the key of the pair of queues
the shell made for them), never by what a message says: the shell
attributes each answer to the queue it arrived on. Any failure of one
application (its queue, its bytes, its process) drops that application with
one log line; nothing an application does reaches beyond it.
"""

from __future__ import annotations

import enum
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


class Phase(enum.Enum):
    """Where the broker is. `.state` is the word requestors and the supervisor see."""

    IDLE = "idle"
    CHECK_APPS = "check: applications"
    CHECK_MOUNTS = "check: mounts"
    FREEZE_APPS = "freeze: applications"
    FREEZE_HOOKS = "freeze: hooks"
    FREEZE_FS = "freeze: file systems"
    FREEZE_ABORT = "freeze failed: thaw hooks"  # after freeze hooks ran; then apps THAW, FAIL
    FROZEN = "frozen"
    THAW_FS = "thaw: file systems"
    THAW_HOOKS = "thaw: hooks"
    THAW_APPS = "thaw: applications"
    AUTO_THAW_FS = "freeze_max: file systems"  # no THAW within freeze_max: the broker thaws
    AUTO_THAW_HOOKS = "freeze_max: hooks"

    @property
    def state(self) -> str:
        return _STATE[self]


_STATE = {
    Phase.IDLE: "idle", Phase.CHECK_APPS: "checking", Phase.CHECK_MOUNTS: "checking",
    Phase.FREEZE_APPS: "freezing", Phase.FREEZE_HOOKS: "freezing", Phase.FREEZE_FS: "freezing",
    Phase.FREEZE_ABORT: "freezing", Phase.FROZEN: "frozen", Phase.THAW_FS: "thawing",
    Phase.THAW_HOOKS: "thawing", Phase.THAW_APPS: "thawing", Phase.AUTO_THAW_FS: "thawing",
    Phase.AUTO_THAW_HOOKS: "thawing",
}
APP_PHASES = {Phase.CHECK_APPS: "check", Phase.FREEZE_APPS: "freeze", Phase.THAW_APPS: "thaw"}
_APP_STATE = {"check": "checking", "freeze": "freezing", "thaw": "thawing"}


# -- events: what happened (inputs of handle)


class Kind(enum.Enum):
    CHECK = "check"
    FREEZE = "freeze"
    THAW = "thaw"
    QUERY = "status/list"
    ANSWER = "answer"
    APP_GONE = "app gone"
    SENDS_FAILED = "sends failed"
    TICK = "tick"
    HOOKS_DONE = "hooks done"
    FREEZE_DONE = "freeze done"
    THAW_DONE = "thaw done"
    MOUNTS_CHECKED = "mounts checked"


@dataclass(frozen=True)
class Requested:
    """CHECK / FREEZE / THAW / status / list from any requestor; the reply goes to reply_to."""

    op: str
    msgid: int
    reply_to: Any
    timeout: float | None = None

    @property
    def kind(self) -> Kind:
        return Kind.QUERY if self.op in ("status", "list") else Kind(self.op)


@dataclass(frozen=True)
class AppAnswered:
    queue: str  # the queue it arrived on: that application's answer, whatever it says
    answer: Answer
    kind = Kind.ANSWER


@dataclass(frozen=True)
class AppGone:
    """A registration ends: unregistered, gone, or failed (`failed` also fails its phase)."""

    queue: str
    why: str
    failed: bool = False
    kind = Kind.APP_GONE


@dataclass(frozen=True)
class SendsFailed:
    """The Requests of one SendToApps that could not be put on their queues: each of those
    applications is dropped, then the phase is decided once (every failure in the reason)."""

    op: str
    failures: tuple[tuple[str, str], ...]  # (queue, error)
    kind = Kind.SENDS_FAILED


@dataclass(frozen=True)
class Tick:
    kind = Kind.TICK


@dataclass(frozen=True)
class HooksDone:
    action: str
    error: str | None
    kind = Kind.HOOKS_DONE


@dataclass(frozen=True)
class FreezeDone:
    error: str | None  # on error nothing is left frozen
    kind = Kind.FREEZE_DONE


@dataclass(frozen=True)
class ThawDone:
    failed: tuple[str, ...] = ()  # mounts that did not thaw
    kind = Kind.THAW_DONE


@dataclass(frozen=True)
class MountsChecked:
    reason: str | None  # the first mount that cannot be frozen, and why
    kind = Kind.MOUNTS_CHECKED


Event = Requested | AppAnswered | AppGone | SendsFailed | Tick | HooksDone | FreezeDone | ThawDone | MountsChecked


# -- actions: what the shell must do (outputs of handle)


@dataclass(frozen=True)
class SendToApps:
    """Put each Request on its queue without blocking; failures come back as one SendsFailed."""

    requests: tuple[tuple[str, Request], ...]


@dataclass(frozen=True)
class CloseApp:
    queue: str  # remove its queues and end its connection


@dataclass(frozen=True)
class Reply:
    reply_to: Any
    reply: VssReply


@dataclass(frozen=True)
class ReportState:
    state: str
    detail: str
    frozen: tuple[str, ...]


@dataclass(frozen=True)
class RunHooks:
    """Off the loop; completion: HooksDone(action, error)."""

    action: str
    timeout: float


@dataclass(frozen=True)
class Freeze:
    """FIFREEZE each mount, off the loop (never /); completion: FreezeDone."""

    mounts: tuple[str, ...]


@dataclass(frozen=True)
class Thaw:
    """FITHAW each mount, off the loop; completion: ThawDone."""

    mounts: tuple[str, ...]


@dataclass(frozen=True)
class CheckMounts:
    """Can each mount be frozen? Off the loop; completion: MountsChecked."""

    mounts: tuple[str, ...]


Action = SendToApps | CloseApp | Reply | ReportState | RunHooks | Freeze | Thaw | CheckMounts
JOBS = (RunHooks, Freeze, Thaw, CheckMounts)  # the actions that complete with an event


class Platform(Protocol):
    """The two things the core asks synchronously; both are quick and report, never raise."""

    def open_app(self, name: str, pid: int, uid: int) -> tuple[str, str]: ...  # (queue key, "") or ("", error)
    def pid_alive(self, pid: int) -> bool: ...


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
    held: list[str] = field(default_factory=list)  # FREEZE: applications that answered OK
    abort_reason: str = ""


# -- the transition table

_REQUESTS = (Kind.CHECK, Kind.FREEZE, Kind.THAW)
_COMPLETIONS = (Kind.HOOKS_DONE, Kind.FREEZE_DONE, Kind.THAW_DONE, Kind.MOUNTS_CHECKED)

# The steps of the sequences: (phase, kind) -> handler.
STEPS: dict[tuple[Phase, Kind], str] = {
    (Phase.IDLE, Kind.CHECK): "_start_check",
    (Phase.IDLE, Kind.FREEZE): "_start_freeze",
    (Phase.IDLE, Kind.THAW): "_start_thaw",
    (Phase.CHECK_MOUNTS, Kind.MOUNTS_CHECKED): "_mounts_checked",
    (Phase.FREEZE_HOOKS, Kind.HOOKS_DONE): "_freeze_hooks_done",
    (Phase.FREEZE_FS, Kind.FREEZE_DONE): "_fs_frozen",
    (Phase.FREEZE_ABORT, Kind.HOOKS_DONE): "_abort_hooks_done",
    (Phase.FROZEN, Kind.CHECK): "_busy_frozen",
    (Phase.FROZEN, Kind.FREEZE): "_busy_frozen",
    (Phase.FROZEN, Kind.THAW): "_start_thaw",
    (Phase.THAW_FS, Kind.THAW_DONE): "_fs_thawed",
    (Phase.THAW_HOOKS, Kind.HOOKS_DONE): "_thaw_hooks_done",
    (Phase.AUTO_THAW_FS, Kind.THAW_DONE): "_auto_fs_thawed",
    (Phase.AUTO_THAW_HOOKS, Kind.HOOKS_DONE): "_auto_hooks_done",
}


def _build_table() -> dict[tuple[Phase, Kind], str]:
    table: dict[tuple[Phase, Kind], str] = {}
    for phase in Phase:
        # In every phase: queries are answered, answers attributed (a late one dropped),
        # registrations may end, and time passes.
        table[phase, Kind.QUERY] = "_query"
        table[phase, Kind.ANSWER] = "_answer"
        table[phase, Kind.APP_GONE] = "_app_gone"
        table[phase, Kind.SENDS_FAILED] = "_sends_failed"
        table[phase, Kind.TICK] = "_tick"
        for kind in _REQUESTS:
            table[phase, kind] = "_busy"  # rejected: one transaction at a time
        for kind in _COMPLETIONS:
            table[phase, kind] = "_unexpected"  # rejected: not this phase's job
    table.update(STEPS)
    return table


TABLE = _build_table()
REJECTIONS = ("_busy", "_busy_frozen", "_unexpected")

# Every phase change a handler may make (shutdown apart: it ends in IDLE from anywhere).
EDGES: frozenset[tuple[Phase, Phase]] = frozenset({
    (Phase.IDLE, Phase.CHECK_APPS), (Phase.IDLE, Phase.FREEZE_APPS), (Phase.IDLE, Phase.THAW_FS),
    (Phase.CHECK_APPS, Phase.CHECK_MOUNTS), (Phase.CHECK_APPS, Phase.IDLE),
    (Phase.CHECK_MOUNTS, Phase.IDLE),
    (Phase.FREEZE_APPS, Phase.FREEZE_HOOKS), (Phase.FREEZE_APPS, Phase.IDLE),
    (Phase.FREEZE_HOOKS, Phase.FREEZE_FS), (Phase.FREEZE_HOOKS, Phase.FREEZE_ABORT),
    (Phase.FREEZE_FS, Phase.FROZEN), (Phase.FREEZE_FS, Phase.FREEZE_ABORT),
    (Phase.FREEZE_ABORT, Phase.IDLE),
    (Phase.FROZEN, Phase.THAW_FS), (Phase.FROZEN, Phase.AUTO_THAW_FS),
    (Phase.THAW_FS, Phase.THAW_HOOKS), (Phase.THAW_HOOKS, Phase.THAW_APPS), (Phase.THAW_APPS, Phase.IDLE),
    (Phase.AUTO_THAW_FS, Phase.AUTO_THAW_HOOKS), (Phase.AUTO_THAW_HOOKS, Phase.IDLE),
})


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
        self.phase = Phase.IDLE
        self.since = wall()
        self.frozen: list[str] = []
        self.frozen_at = 0.0
        self.bad_transitions: list[tuple[Phase, Phase]] = []  # a handler left EDGES (a bug; tests look)
        # Start msgids from the time so a restarted broker never reuses a live one.
        self._msgid = (msgid_base if msgid_base is not None else time.time_ns()) & ((1 << 64) - 1)
        self._cleanup_msgids: deque[int] = deque(maxlen=16)  # THAWs sent without waiting
        self._last_reap = clock()
        self._out: list[Action] = []

    @property
    def state(self) -> str:
        return self.phase.state

    # -- inputs

    def handle(self, event: Event) -> list[Action]:
        """One event in, the actions it calls for out (in order). Never blocks, never raises."""
        self._out = []
        getattr(self, TABLE[self.phase, event.kind])(event)
        out, self._out = self._out, []
        return out

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

    # Shorthands for handle().
    def request(self, op: str, req_msgid: int, reply_to: Any, timeout: float | None = None) -> list[Action]:
        return self.handle(Requested(op, req_msgid, reply_to, timeout))

    def answer(self, queue: str, a: Answer) -> list[Action]:
        return self.handle(AppAnswered(queue, a))

    def drop(self, queue: str, why: str, failed: bool = False) -> list[Action]:
        return self.handle(AppGone(queue, why, failed))

    def tick(self) -> list[Action]:
        """Deadlines, freeze_max, dead applications. Call at next_wakeup() or sooner."""
        return self.handle(Tick())

    def next_wakeup(self) -> float:
        t = self._last_reap + REAP_INTERVAL
        if self.phase in APP_PHASES and self.txn is not None and self.txn.pending:
            t = min(t, self.txn.deadline)
        if self.phase is Phase.FROZEN:
            t = min(t, self.frozen_at + self.freeze_max)
        return t

    def shutdown(self, reason: str) -> list[Action]:
        """Broker stopping: fail what is in flight, leave nothing frozen, tell apps THAW.

        The shell carries these out in order and waits for each (no job may be in flight:
        it lets the running one finish and hands in its event first).
        """
        self._out = []
        txn, self.txn = self.txn, None
        if txn is not None:
            self._reply(txn, False, reason)
        if self.frozen or self.state in ("frozen", "freezing") or (txn and txn.op == "freeze"):
            if self.frozen:
                self._emit(Thaw(tuple(self.frozen)))
            self._emit(RunHooks("thaw", self.timeout))
            self.frozen = []
            self._notify_apps_thaw()
        for app in list(self.apps.values()):
            self._emit(CloseApp(app.queue))
        self.apps.clear()
        self._set_phase(Phase.IDLE, reason, check=False)
        out, self._out = self._out, []
        return out

    # -- handlers of events in every phase

    def _query(self, ev: Requested) -> None:
        self._reap()
        self._reply(self._new_txn(ev), True)

    def _busy(self, ev: Requested) -> None:
        what = self.txn.op if self.txn is not None else "the broker's own thaw (freeze_max)"
        self._reply(self._new_txn(ev), False, f"busy: {what} in progress")

    def _busy_frozen(self, ev: Requested) -> None:
        self._reply(self._new_txn(ev), False, f"busy: file systems are frozen since {self.since:.3f}; thaw first")

    def _unexpected(self, ev: Event) -> None:
        log.error("%s in phase %s: not expected, dropped", ev.kind.value, self.phase.value)

    def _answer(self, ev: AppAnswered) -> None:
        app = self.apps.get(ev.queue)
        if app is None:
            return
        a, txn = ev.answer, self.txn
        verdict = "OK" if a.ok else f"FAIL: {a.reason}" if a.reason else "FAIL"
        if self.phase in APP_PHASES and txn is not None and a.msgid == txn.msgid and app.key in txn.pending:
            del txn.pending[app.key]
            app.last_answer, app.last_ms = verdict, (self.clock() - app.sent_at) * 1000
            app.state = "ok" if a.ok else "failed"
            log.debug("%s %s: %s in %.1f ms", app.label, txn.op, verdict, app.last_ms)
            if not a.ok:
                txn.failures.append(f"{app.label} {txn.op.upper()} failed" + (f": {a.reason}" if a.reason else ""))
            self._maybe_apps_done(txn)
        elif a.msgid in self._cleanup_msgids:
            app.state, app.last_op, app.last_answer = ("ok" if a.ok else "failed"), "thaw", verdict
        else:
            log.warning("late answer %#x (%s) from %s dropped: not the current transaction", a.msgid, verdict, app.label)

    def _sends_failed(self, ev: SendsFailed) -> None:
        txn = self.txn
        for queue, error in ev.failures:
            self._app_gone(AppGone(queue, f"cannot send {ev.op.upper()}: {error}", failed=True), decide=False)
        if self.phase in APP_PHASES and txn is not None:
            self._maybe_apps_done(txn)

    def _app_gone(self, ev: AppGone, decide: bool = True) -> None:
        app = self.apps.pop(ev.queue, None)
        if app is None:
            return
        if ev.failed:
            log.warning("application %s dropped: %s", app.label, ev.why)
        else:
            log.info("application %s %s", app.label, ev.why)
        self._emit(CloseApp(app.queue))
        txn = self.txn
        if self.phase in APP_PHASES and txn is not None and txn.pending.pop(app.key, None) is not None:
            if ev.failed:
                txn.failures.append(f"{app.label}: {ev.why}")
            else:
                log.info("%s %s during %s; not waited for", app.label, ev.why, txn.op.upper())
            if decide:
                self._maybe_apps_done(txn)

    def _tick(self, ev: Tick) -> None:
        now = self.clock()
        if now - self._last_reap >= REAP_INTERVAL:
            self._reap()
        txn = self.txn
        if self.phase in APP_PHASES and txn is not None and now >= txn.deadline and txn.pending:
            for app in txn.pending.values():
                app.state, app.last_answer, app.last_ms = "timeout", "timeout", (now - app.sent_at) * 1000
                txn.failures.append(f"{app.name}[{app.pid}] did not answer {txn.op.upper()} within {txn.timeout:g} s")
            txn.pending.clear()
            self._apps_done(txn)
        if self.phase is Phase.FROZEN and now - self.frozen_at >= self.freeze_max:
            log.warning("no THAW within freeze_max %g s: thawing %s", self.freeze_max, " ".join(self.frozen) or "(no mounts)")
            self._set_phase(Phase.AUTO_THAW_FS, "file systems (freeze_max)")
            if self.frozen:
                self._emit(Thaw(tuple(self.frozen)))
            else:
                self._auto_fs_thawed(ThawDone())

    # -- the sequences

    def _start_check(self, ev: Requested) -> None:
        self.txn = self._new_txn(ev)
        self._start_apps(self.txn, Phase.CHECK_APPS)

    def _start_freeze(self, ev: Requested) -> None:
        self.txn = self._new_txn(ev)
        self._start_apps(self.txn, Phase.FREEZE_APPS)

    def _start_thaw(self, ev: Requested) -> None:
        txn = self.txn = self._new_txn(ev)
        if self.phase is Phase.FROZEN:
            txn.window_ms = (txn.started - self.frozen_at) * 1000
        self._set_phase(Phase.THAW_FS, "file systems")
        if self.frozen:
            self._emit(Thaw(tuple(self.frozen)))  # FITHAW first, then hooks thaw, then the apps
        else:
            self._fs_thawed(ThawDone())

    def _fs_thawed(self, ev: ThawDone) -> None:
        self._thawed(ev, self.txn)
        self._set_phase(Phase.THAW_HOOKS, "hooks")
        self._emit(RunHooks("thaw", self.timeout))

    def _thaw_hooks_done(self, ev: HooksDone) -> None:
        if ev.error:
            log.warning("%s", ev.error)
        assert self.txn is not None
        self._start_apps(self.txn, Phase.THAW_APPS)

    def _mounts_checked(self, ev: MountsChecked) -> None:
        txn, self.txn = self.txn, None
        assert txn is not None
        self._set_phase(Phase.IDLE, "checked")
        self._reply(txn, not ev.reason, ev.reason or "")

    def _freeze_hooks_done(self, ev: HooksDone) -> None:
        assert self.txn is not None
        if ev.error:
            return self._abort_freeze(self.txn, ev.error)
        self._set_phase(Phase.FREEZE_FS, "file systems")
        self._emit(Freeze(tuple(self.mounts)))

    def _fs_frozen(self, ev: FreezeDone) -> None:
        txn = self.txn
        assert txn is not None
        if ev.error:
            return self._abort_freeze(txn, ev.error)
        self.txn = None
        self.frozen, self.frozen_at = list(self.mounts), self.clock()
        self._set_phase(Phase.FROZEN, f"{len(self.frozen)} file systems, {len(self.apps)} applications")
        self.held, self.hooks_ran = txn.held, bool(self.hooks_dir)
        self._reply(txn, True)

    def _abort_freeze(self, txn: Txn, reason: str) -> None:
        """Freeze hooks ran (and FIFREEZE left nothing frozen): thaw hooks, then apps THAW, then FAIL."""
        log.warning("FREEZE failed: %s; thawing", reason)
        txn.abort_reason = reason
        self._set_phase(Phase.FREEZE_ABORT, "thaw hooks after a failure")
        self._emit(RunHooks("thaw", self.timeout))

    def _abort_hooks_done(self, ev: HooksDone) -> None:
        if ev.error:
            log.warning("%s", ev.error)
        txn, self.txn = self.txn, None
        assert txn is not None
        self._notify_apps_thaw()
        self._set_phase(Phase.IDLE, f"freeze failed: {txn.abort_reason}")
        self._reply(txn, False, txn.abort_reason)

    def _auto_fs_thawed(self, ev: ThawDone) -> None:
        self._thawed(ev, None)
        self._set_phase(Phase.AUTO_THAW_HOOKS, "hooks (freeze_max)")
        self._emit(RunHooks("thaw", self.timeout))

    def _auto_hooks_done(self, ev: HooksDone) -> None:
        if ev.error:
            log.warning("%s", ev.error)
        self._notify_apps_thaw()
        self._set_phase(Phase.IDLE, f"thawed by the broker after freeze_max {self.freeze_max:g} s")

    def _thawed(self, ev: ThawDone, txn: Txn | None) -> None:
        if ev.failed:
            msg = "FITHAW failed on " + " ".join(ev.failed)
            if txn is not None:
                txn.failures.append(msg)
            log.error("%s", msg)
        self.frozen = list(ev.failed)

    # -- application phases

    def _start_apps(self, txn: Txn, phase: Phase) -> None:
        self._reap()
        txn.msgid = self._new_msgid()
        txn.deadline = self.clock() + txn.timeout
        self._set_phase(phase, f"applications ({len(self.apps)})")
        txn.pending = self._send_all(txn.op, txn.msgid, txn.timeout)
        self._maybe_apps_done(txn)

    def _maybe_apps_done(self, txn: Txn) -> None:
        # One failure decides CHECK and FREEZE; THAW waits for everyone.
        if not txn.pending or (txn.failures and txn.op != "thaw"):
            self._apps_done(txn)

    def _apps_done(self, txn: Txn) -> None:
        if self.txn is not txn or self.phase not in APP_PHASES:
            return
        txn.pending.clear()
        if self.phase is Phase.CHECK_APPS:
            if txn.failures:
                self.txn = None
                self._set_phase(Phase.IDLE, "checked")
                return self._reply(txn, False, "; ".join(txn.failures))
            self._set_phase(Phase.CHECK_MOUNTS, "file systems")
            self._emit(CheckMounts(tuple(self.mounts)))
        elif self.phase is Phase.FREEZE_APPS:
            if txn.failures:
                # Nothing ran beyond the applications: tell them THAW and fail.
                reason = "; ".join(txn.failures)
                log.warning("FREEZE failed: %s; thawing", reason)
                self.txn = None
                self._notify_apps_thaw()
                self._set_phase(Phase.IDLE, f"freeze failed: {reason}")
                return self._reply(txn, False, reason)
            txn.held = [a.label for a in self.apps.values() if a.last_op == "freeze" and a.state == "ok"]
            self._set_phase(Phase.FREEZE_HOOKS, "hooks")
            self._emit(RunHooks("freeze", max(0.0, txn.deadline - self.clock())))
        else:
            self.txn = None
            self._set_phase(Phase.IDLE, "thawed")
            ok = not txn.failures
            self._reply(txn, ok, "" if ok else "file systems thawed, but " + "; ".join(txn.failures))

    def _send_all(self, op: str, msgid: int, timeout: float) -> dict[str, App]:
        now = self.clock()
        pending = {}
        for app in self.apps.values():
            app.last_op, app.sent_at, app.state = op, now, _APP_STATE[op]
            pending[app.key] = app
        if pending:
            self._emit(SendToApps(tuple((q, Request(msgid, op, timeout)) for q in pending)))  # type: ignore[arg-type]
        return pending

    def _notify_apps_thaw(self) -> None:
        """THAW to every application without waiting (after a failed or broker-ended freeze)."""
        msgid = self._new_msgid()
        self._cleanup_msgids.append(msgid)
        self._send_all("thaw", msgid, self.timeout)

    def _reap(self) -> None:
        self._last_reap = self.clock()
        for app in [a for a in self.apps.values() if not self.p.pid_alive(a.pid)]:
            self._app_gone(AppGone(app.queue, "is gone: unregistered, queues removed"))

    # -- outputs

    def _emit(self, action: Action) -> None:
        self._out.append(action)

    def _new_txn(self, ev: Requested) -> Txn:
        log.debug("request %s msgid %#x", ev.op, ev.msgid)
        return Txn(ev.op, ev.msgid, ev.reply_to, min(ev.timeout or self.timeout, 3600.0), self.clock())

    def _set_phase(self, phase: Phase, detail: str = "", check: bool = True) -> None:
        if check and phase is not self.phase and (self.phase, phase) not in EDGES:
            log.error("phase change %s -> %s is not in the table", self.phase.value, phase.value)
            self.bad_transitions.append((self.phase, phase))
        if phase.state != self.state:
            self.since = self.wall()
        if phase.state != "frozen":
            self.held, self.hooks_ran = [], False
        self.phase = phase
        self._emit(ReportState(phase.state, detail, tuple(self.frozen)))

    def _reply(self, txn: Txn, ok: bool, reason: str = "") -> None:
        elapsed = (self.clock() - txn.started) * 1000
        if txn.op in ("check", "freeze", "thaw"):
            log.info("%s: %s%s (%.1f ms)", txn.op.upper(), "OK" if ok else "FAIL", f": {reason}" if reason else "", elapsed)
        reply = VssReply(msgid=txn.req_msgid, op=txn.op, ok=ok, reason=reason[:2000], elapsed_ms=round(elapsed, 3),  # type: ignore[arg-type]
                         state=self.state, since=self.since, frozen=list(self.frozen), window_ms=round(txn.window_ms, 3),
                         apps=[a.info() for a in self.apps.values()], held=list(self.held),
                         hooks=self.hooks_dir if self.hooks_ran else "", mounts=list(self.mounts))
        self._emit(Reply(txn.reply_to, reply))

    def _new_msgid(self) -> int:
        self._msgid = (self._msgid + 1) & ((1 << 64) - 1)
        return self._msgid
