"""The broker's state machine with a fake clock and a fake platform (no I/O).

SyncCore carries out the core's actions at once with the fake platform, as the
broker's shell does with the real one (there, hooks and FIFREEZE run off the loop).
"""

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque

import msgspec
import pytest

from fsshelp import wait_for
from ipc.channel import Channel
from ipc.names import instance_prefix
from ipc.vss_client import Application, Requestor
from ipc.vssproto import Answer, Request
from ipc.workermsg import FromWorker, Ready
from workers.broker import BrokerSettings
from workers.vsscore import (BrokerCore, CheckMounts, CloseApp, Freeze, FreezeDone, HooksDone, MountsChecked, Reply,
                             ReportState, RunHooks, SendsFailed, SendToApps, Thaw, ThawDone)

PREFIX = "fssd.test0001"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class FakePlatform:
    def __init__(self):
        self.sent = []  # (queue, msg)
        self.replies = []  # (reply_to, VssReply)
        self.calls = []  # ("freeze", mounts) ("thaw", mounts) ("hooks", action) in order
        self.states = []
        self.alive = set()
        self.unlinked = []
        self.freeze_error = None
        self.hook_error = None
        self.bad_mounts = {}
        self.open_error = ""
        self.send_errors = {}  # queue -> error text

    def open_app(self, name, pid, uid):
        if self.open_error:
            return "", self.open_error
        return app_queue(name, pid), ""

    def send_app(self, queue, msg):
        self.sent.append((queue, msg))
        self.calls.append(("send", queue, getattr(msg, "op", "registered")))
        return self.send_errors.get(queue)

    def close_app(self, queue):
        self.unlinked.append(queue)

    def reply(self, reply_to, reply):
        self.replies.append((reply_to, reply))

    def pid_alive(self, pid):
        return pid in self.alive

    def check_mount(self, mount):
        return self.bad_mounts.get(mount)

    def freeze(self, mounts):
        self.calls.append(("freeze", tuple(mounts)))
        return self.freeze_error

    def thaw(self, mounts):
        self.calls.append(("thaw", tuple(mounts)))
        return []

    def run_hooks(self, action, timeout):
        self.calls.append(("hooks", action))
        return self.hook_error if action == "freeze" else None

    def state(self, state, detail, frozen):
        self.states.append(state)

    # helpers
    def requests_to(self, queue):
        return [m for q, m in self.sent if q == queue and isinstance(m, Request)]


def run_action(p, a):
    """One action on the fake platform; the events that come back at once."""
    if isinstance(a, SendToApps):
        failures = tuple((q, err) for q, m in a.requests if (err := p.send_app(q, m)))
        return [SendsFailed(a.requests[0][1].op, failures)] if failures else []
    if isinstance(a, CloseApp):
        p.close_app(a.queue)
    elif isinstance(a, Reply):
        p.reply(a.reply_to, a.reply)
    elif isinstance(a, ReportState):
        p.state(a.state, a.detail, list(a.frozen))
    elif isinstance(a, RunHooks):
        return [HooksDone(a.action, p.run_hooks(a.action, a.timeout))]
    elif isinstance(a, Freeze):
        return [FreezeDone(p.freeze(list(a.mounts)))]
    elif isinstance(a, Thaw):
        return [ThawDone(tuple(p.thaw(list(a.mounts))))]
    elif isinstance(a, CheckMounts):
        return [MountsChecked(next((r for m in a.mounts if (r := p.check_mount(m))), None))]
    else:
        raise AssertionError(f"unknown action {a!r}")
    return []


class SyncCore(BrokerCore):
    """The core with every action carried out at once, completions handed straight back."""

    def handle(self, event):
        todo, did = deque([event]), []
        while todo:
            for a in super().handle(todo.popleft()):
                did.append(a)
                todo.extend(run_action(self.p, a))
        assert not self.bad_transitions
        return did

    def shutdown(self, reason):
        did = super().shutdown(reason)
        for a in did:
            run_action(self.p, a)
        return did


@pytest.fixture
def env():
    clock, p = Clock(), FakePlatform()
    core = SyncCore(p, PREFIX, ["/mnt/a", "/mnt/b"], timeout=1.0, freeze_max=10.0, clock=clock,
                      wall=lambda: 5.0, msgid_base=100)
    return core, p, clock


def app_queue(name, pid):
    return f"/{PREFIX}.app.{name}.{pid}"


def register(core, p, name, pid, uid=1000):
    p.alive.add(pid)
    app, why = core.register(name, pid, uid)
    assert app is not None and why == "" and app.queue == app_queue(name, pid)
    return app.queue


def req(core, op, msgid=1, timeout=None):
    core.request(op, msgid, f"requestor{msgid}", timeout)


def last_reply(p):
    return p.replies[-1][1]


def answer_all(core, p, op, ok=True, names=None):
    for q, m in list(p.sent):
        if isinstance(m, Request) and m.op == op:
            name, pid = q.rsplit(".", 2)[-2], int(q.rsplit(".", 1)[-1])
            if names is None or name in names:
                core.answer(q, Answer(m.msgid, ok if names is None else names[name][0],
                                      "" if names is None else names[name][1]))


def test_full_sequence_orders_apps_hooks_and_mounts(env):
    core, p, clock = env
    qa, qb = register(core, p, "a", 10), register(core, p, "b", 11)
    req(core, "check", 1)
    assert not p.replies  # waiting for both apps
    answer_all(core, p, "check")
    r = last_reply(p)
    assert r.ok and r.op == "check" and r.msgid == 1
    req(core, "freeze", 2)
    clock.t += 0.01
    answer_all(core, p, "freeze")
    assert last_reply(p).ok and core.state == "frozen"
    # apps FREEZE, then hooks freeze, then FIFREEZE
    kinds = [c[0] if c[0] != "send" else c[2] for c in p.calls]
    i_freeze = max(i for i, k in enumerate(kinds) if k == "freeze" and p.calls[i][0] == "send")
    assert p.calls[i_freeze + 1] == ("hooks", "freeze") and p.calls[i_freeze + 2] == ("freeze", ("/mnt/a", "/mnt/b"))
    p.calls.clear()
    clock.t += 0.5
    req(core, "thaw", 3)
    # FITHAW first, then hooks thaw, then apps THAW
    assert p.calls[0] == ("thaw", ("/mnt/a", "/mnt/b")) and p.calls[1] == ("hooks", "thaw")
    assert {c[1] for c in p.calls[2:]} == {qa, qb} and all(c[2] == "thaw" for c in p.calls[2:])
    answer_all(core, p, "thaw")
    r = last_reply(p)
    assert r.ok and r.op == "thaw" and r.window_ms == pytest.approx(500, abs=1) and core.state == "idle"
    assert p.states[-1] == "idle" and "frozen" in p.states


def test_freeze_app_failure_thaws_and_fails_with_reason(env):
    core, p, clock = env
    register(core, p, "good", 10)
    register(core, p, "bad", 11)
    req(core, "freeze", 5)
    answer_all(core, p, "freeze", names={"bad": (False, "cannot flush")})
    r = last_reply(p)
    assert not r.ok and "bad[11] FREEZE failed: cannot flush" in r.reason
    assert not any(c[0] == "freeze" for c in p.calls), "no FIFREEZE after an app failed"
    assert core.state == "idle"
    thaws = [q for q, m in p.sent if isinstance(m, Request) and m.op == "thaw"]
    assert len(thaws) == 2, "every app is told THAW"


def test_timeout_fails_phase_and_late_answer_is_dropped(env):
    core, p, clock = env
    register(core, p, "slow", 10)
    req(core, "freeze", 6)
    (freeze_req,) = p.requests_to(app_queue("slow", 10))
    assert core.next_wakeup() <= clock.t + 1.0
    clock.t += 0.99
    core.tick()
    assert not p.replies
    clock.t += 0.02
    core.tick()
    r = last_reply(p)
    assert not r.ok and "did not answer FREEZE within 1 s" in r.reason
    assert r.apps[0].last_answer == "timeout" and r.apps[0].state == "thawing"  # told THAW after the failure
    # The next transaction; the old answer arrives late and must not count.
    req(core, "check", 7)
    core.answer(app_queue("slow", 10), Answer(freeze_req.msgid, True))
    assert len(p.replies) == 1, "late answer must not complete CHECK"
    check_req = p.requests_to(app_queue("slow", 10))[-1]
    core.answer(app_queue("slow", 10), Answer(check_req.msgid, True))
    assert last_reply(p).ok and last_reply(p).msgid == 7


def test_busy_while_in_progress_and_while_frozen(env):
    core, p, clock = env
    register(core, p, "a", 10)
    req(core, "freeze", 1)
    req(core, "check", 2)
    r = last_reply(p)
    assert r.msgid == 2 and not r.ok and "busy" in r.reason
    req(core, "list", 3)
    assert last_reply(p).ok and last_reply(p).state == "freezing"
    answer_all(core, p, "freeze")
    req(core, "freeze", 4)
    assert not last_reply(p).ok and "frozen" in last_reply(p).reason


def test_freeze_max_thaws_on_its_own(env):
    core, p, clock = env
    register(core, p, "a", 10)
    req(core, "freeze", 1)
    answer_all(core, p, "freeze")
    assert core.state == "frozen" and core.next_wakeup() <= clock.t + 10.0
    clock.t += 9.9
    core.tick()
    assert core.state == "frozen"
    clock.t += 0.2
    core.tick()
    assert core.state == "idle" and ("thaw", ("/mnt/a", "/mnt/b")) in p.calls
    assert p.requests_to(app_queue("a", 10))[-1].op == "thaw"


def test_mount_freeze_failure_runs_thaw_hooks_and_tells_apps(env):
    core, p, clock = env
    register(core, p, "a", 10)
    p.freeze_error = "/mnt/b: FIFREEZE failed: Operation not supported"
    req(core, "freeze", 1)
    answer_all(core, p, "freeze")
    r = last_reply(p)
    assert not r.ok and "/mnt/b" in r.reason and core.frozen == []
    i = p.calls.index(("freeze", ("/mnt/a", "/mnt/b")))
    assert p.calls[i + 1] == ("hooks", "thaw") and p.calls[i + 2][2] == "thaw"


def test_hook_failure_fails_freeze_before_fifreeze(env):
    core, p, clock = env
    p.hook_error = "hook /h/10-db freeze: exit status 3"
    req(core, "freeze", 1)  # no apps: straight to hooks
    assert not last_reply(p).ok and "exit status 3" in last_reply(p).reason
    assert not any(c[0] == "freeze" for c in p.calls) and ("hooks", "thaw") in p.calls


def test_check_reports_unfreezable_mount(env):
    core, p, clock = env
    p.bad_mounts["/mnt/b"] = "/mnt/b: file system type tmpfs cannot be frozen"
    req(core, "check", 1)
    assert not last_reply(p).ok and "tmpfs" in last_reply(p).reason


def test_dead_app_is_unregistered_and_queue_unlinked(env):
    core, p, clock = env
    q = register(core, p, "ghost", 10)
    register(core, p, "live", 11)
    req(core, "check", 1, timeout=5.0)
    p.alive.discard(10)
    clock.t += 0.5
    core.tick()  # not yet time to reap
    clock.t += 0.6
    core.tick()
    assert q in p.unlinked and q not in core.apps
    answer_all(core, p, "check", names={"live": (True, "")})
    assert last_reply(p).ok, "a dead app is not waited for"
    assert [a.name for a in last_reply(p).apps] == ["live"]


def test_unregister_and_answers_are_attributed_by_queue(env):
    core, p, clock = env
    qa = register(core, p, "a", 10)
    qv = register(core, p, "victim", 11)
    core.drop(qa, "unregistered (connection closed)")
    assert list(core.apps) == [qv] and qa in p.unlinked
    qe = register(core, p, "evil", 12)
    req(core, "freeze", 1)
    (victim_req,) = p.requests_to(qv)
    core.answer(qe, Answer(victim_req.msgid, True))  # evil answers with the victim's msgid: counts for evil
    core.answer(qv, Answer(victim_req.msgid, False, "not consistent"))
    r = last_reply(p)
    assert not r.ok and "victim[11] FREEZE failed: not consistent" in r.reason
    core.answer("/nosuch", Answer(victim_req.msgid, True))  # an unknown queue changes nothing


def test_caps_per_uid_and_in_all_root_not_capped_per_uid():
    p = FakePlatform()
    core = BrokerCore(p, PREFIX, [], max_apps=5, max_apps_per_uid=2)
    for i in range(2):
        assert core.register("u", 100 + i, 1001)[0] is not None
    app, why = core.register("u", 200, 1001)
    assert app is None and "max_apps_per_uid" in why and "uid 1001" in why
    for i in range(3):
        assert core.register("root", 300 + i, 0)[0] is not None
    app, why = core.register("other", 400, 1002)
    assert app is None and "max_apps" in why and len(core.apps) == 5


def test_queue_creation_failure_is_a_clear_refusal(env):
    core, p, clock = env
    p.open_error = "cannot create its queues: the system's message queue limit is reached"
    app, why = core.register("a", 10, 1000)
    assert app is None and "queue limit" in why and not core.apps


def test_send_failure_drops_the_app_and_fails_the_phase(env):
    core, p, clock = env
    qa, qb = register(core, p, "a", 10), register(core, p, "b", 11)
    p.send_errors[qb] = "its requests queue is full"
    req(core, "freeze", 1)
    r = last_reply(p)
    assert not r.ok and "b[11]: cannot send FREEZE: its requests queue is full" in r.reason
    assert list(core.apps) == [qa] and qb in p.unlinked and core.state == "idle"


def test_every_send_failure_of_a_phase_is_in_its_reason(env):
    core, p, clock = env
    qa, qb = register(core, p, "a", 10), register(core, p, "b", 11)
    p.send_errors[qa] = p.send_errors[qb] = "its requests queue is full"
    req(core, "check", 1)
    r = last_reply(p)
    assert not r.ok and "a[10]: cannot send CHECK" in r.reason and "b[11]: cannot send CHECK" in r.reason
    assert core.apps == {} and {qa, qb} <= set(p.unlinked)


def test_status_while_frozen_says_what_is_held(env):
    core, p, clock = env
    core.hooks_dir = "/etc/fssd/hooks.d"
    register(core, p, "a", 10)
    req(core, "freeze", 1)
    answer_all(core, p, "freeze")
    req(core, "status", 2)
    r = last_reply(p)
    assert r.state == "frozen" and r.held == ["a[10]"] and r.hooks == "/etc/fssd/hooks.d"
    assert r.frozen == r.mounts == ["/mnt/a", "/mnt/b"]
    req(core, "thaw", 3)
    answer_all(core, p, "thaw")
    req(core, "status", 4)
    assert last_reply(p).held == [] and last_reply(p).hooks == ""


def test_request_timeout_overrides_phase_timeout(env):
    core, p, clock = env
    register(core, p, "a", 10)
    req(core, "check", 1, timeout=0.2)
    assert p.requests_to(app_queue("a", 10))[-1].timeout == 0.2
    clock.t += 0.21
    core.tick()
    assert not last_reply(p).ok


def test_shutdown_while_frozen_thaws_and_tells_apps(env):
    core, p, clock = env
    register(core, p, "a", 10)
    req(core, "freeze", 1)
    answer_all(core, p, "freeze")
    core.shutdown("broker stopping")
    assert ("thaw", ("/mnt/a", "/mnt/b")) in p.calls and core.state == "idle"
    assert p.requests_to(app_queue("a", 10))[-1].op == "thaw"


def test_thaw_failure_of_an_app_is_reported_but_fs_thawed(env):
    core, p, clock = env
    register(core, p, "a", 10)
    req(core, "freeze", 1)
    answer_all(core, p, "freeze")
    req(core, "thaw", 2)
    answer_all(core, p, "thaw", ok=False)
    r = last_reply(p)
    assert not r.ok and r.reason.startswith("file systems thawed") and r.frozen == []


# -- the real broker process: its loop keeps answering while a hook runs


@contextlib.contextmanager
def real_broker(tmp_path, **kw):
    """`python -m workers.broker` with these settings (no mounts: nothing is frozen); its rundir."""
    rundir = tmp_path / "run"
    rundir.mkdir()
    settings = BrokerSettings(prefix=instance_prefix(str(rundir)), rundir=str(rundir), **kw)
    mine, theirs = socket.socketpair()
    with open(tmp_path / "broker.log", "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "workers.broker", "--channel-fd", str(theirs.fileno()),
                                 msgspec.json.encode(settings).decode()], pass_fds=(theirs.fileno(),), cwd=ROOT,
                                env=dict(os.environ, PYTHONPATH=ROOT), stderr=logf)
    theirs.close()
    chan = Channel(mine, FromWorker)
    try:
        msg = None
        while not isinstance(msg, Ready):
            got = chan.recv(timeout=10)
            assert got is not None, "broker exited before Ready"
            msg = got[0]
        yield str(rundir)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        mine.close()


def slow_thaw_hook(tmp_path):
    """A hooks dir whose one hook takes 3 s on thaw; (dir, started flag, ended flag)."""
    hooks_dir, started, ended = tmp_path / "hooks.d", tmp_path / "thaw-started", tmp_path / "thaw-ended"
    hooks_dir.mkdir()
    hook = hooks_dir / "10-slow-thaw"
    hook.write_text(f'#!/bin/sh\n[ "$1" = thaw ] || exit 0\ntouch {started}\nsleep 3\ntouch {ended}\n')
    hook.chmod(0o755)
    return str(hooks_dir), started, ended


def test_broker_answers_while_a_long_thaw_hook_runs(tmp_path):
    hooks_dir, started, ended = slow_thaw_hook(tmp_path)
    thaw = {}
    with real_broker(tmp_path, timeout=10.0, hooks_dir=hooks_dir) as rundir:
        req = Requestor(rundir)
        assert req.request("freeze").ok
        t = threading.Thread(target=lambda: thaw.update(r=req.request("thaw")))
        t.start()
        wait_for(started.exists, 5, "the thaw hook started")
        t0 = time.monotonic()
        r = req.request("status")
        assert r.ok and r.state == "thawing"
        r = req.request("check")
        assert not r.ok and r.reason == "busy: thaw in progress"
        with Application(rundir, "newcomer"):  # registration is answered too
            assert "newcomer" in {a.name for a in req.request("list").apps}
        answered = time.monotonic() - t0
        assert answered < 1.5 and not ended.exists() and "r" not in thaw, "answered while the hook still ran"
        t.join(15)
        assert thaw["r"].ok and ended.exists() and thaw["r"].state == "idle"


def test_broker_answers_while_its_own_freeze_max_thaw_runs_hooks(tmp_path):
    hooks_dir, started, ended = slow_thaw_hook(tmp_path)
    with real_broker(tmp_path, timeout=10.0, freeze_max=0.3, hooks_dir=hooks_dir) as rundir:
        req = Requestor(rundir)
        assert req.request("freeze").ok
        wait_for(started.exists, 5, "freeze_max reached: the thaw hook started")
        t0 = time.monotonic()
        r = req.request("status")
        assert r.ok and r.state == "thawing"
        r = req.request("freeze")
        assert not r.ok and r.reason == "busy: the broker's own thaw (freeze_max) in progress"
        assert time.monotonic() - t0 < 1.5 and not ended.exists(), "answered while the hook still ran"
        wait_for(lambda: req.request("status").state == "idle", 10, "the broker's thaw ends")
        assert ended.exists()


def test_broker_settings_carry_syslog_to_its_logging(monkeypatch):
    import logging

    import msgspec

    from workers import logfmt
    from workers import broker

    s = msgspec.json.decode(msgspec.json.encode(broker.BrokerSettings("p", "/run/x", use_syslog=True)),
                            type=broker.BrokerSettings)
    assert s.use_syslog and not broker.BrokerSettings("p", "/run/x").use_syslog
    calls = []
    monkeypatch.setattr(logfmt, "setup", lambda name, debug=False, use_syslog=False: calls.append((name, use_syslog)))
    root = logging.getLogger()
    saved = list(root.handlers)
    root.addHandler(logging.NullHandler())
    try:
        broker._setup_logging(False, s.use_syslog)
    finally:
        root.handlers[:] = saved
    assert calls == [("vss", True)]


def test_log_records_are_held_while_frozen_and_logging_from_a_thread_does_not_block():
    import logging
    import threading

    from workers.broker import HoldingHandler

    got = []

    class ListHandler(logging.Handler):
        def emit(self, record):
            got.append(record.getMessage())

    h = HoldingHandler(ListHandler())
    rec = lambda msg: logging.makeLogRecord({"name": "vss", "msg": msg, "levelno": logging.INFO})  # noqa: E731
    h.handle(rec("before"))
    h.hold()
    h.handle(rec("frozen 1"))
    h.handle(rec("frozen 2"))
    assert got == ["before"], "records are kept while frozen, every one of them"
    t = threading.Thread(target=lambda: h.handle(rec("from a thread")), daemon=True)
    t.start()
    t.join(2)
    assert not t.is_alive(), "the handler's lock was left taken"
    h.let_go()
    assert got == ["before", "frozen 1", "frozen 2", "from a thread"]


def test_shell_entry_point_takes_a_request_from_any_source(tmp_path):
    """Broker.request is where every source's request becomes a core event; a callable gets the reply."""
    from workers.broker import Broker

    b = Broker(BrokerSettings(prefix=PREFIX, rundir=str(tmp_path), timeout=1.0), None)
    got = []
    try:
        b.request("status", 7, got.append)
        b.request("check", 8, got.append)  # no applications, no mounts: answered at once
        b.request("thaw", 9, got.append, timeout=2.0)  # nothing frozen, no hooks: thawed at once
    finally:
        b.close()
    assert [(r.msgid, r.op, r.ok, r.state) for r in got] == [(7, "status", True, "idle"), (8, "check", True, "idle"),
                                                             (9, "thaw", True, "idle")]
