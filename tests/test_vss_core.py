"""BrokerCore's transition table, driven event by event with nothing carried out.

The platform here has only open_app and pid_alive: any other call from the core
would raise, so these tests also show the core does no I/O and runs nothing inline
(hooks, FIFREEZE and FITHAW are actions whose completion the test hands back).
"""

import pytest

from ipc.vssproto import Answer, Request
from workers.vsscore import (EDGES, STEPS, TABLE, AppAnswered, AppGone, BrokerCore, CheckMounts, Freeze, FreezeDone,
                             HooksDone, Kind, MountsChecked, Phase, Reply, ReportState, Requested, RunHooks,
                             SendToApps, Thaw, ThawDone, Tick)

MOUNTS = ["/mnt/a"]


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class QuickPlatform:
    """What the core may call synchronously, and nothing else."""

    def __init__(self):
        self.alive = set()

    def open_app(self, name, pid, uid):
        return f"/q.{name}.{pid}", ""

    def pid_alive(self, pid):
        return pid in self.alive


def new_core():
    clock, p = Clock(), QuickPlatform()
    core = BrokerCore(p, "fssd.t", MOUNTS, timeout=1.0, freeze_max=10.0, clock=clock, wall=lambda: 5.0,
                      msgid_base=100)
    return core, p, clock


def kinds(actions):
    return [type(a) for a in actions]


def only(actions, cls):
    got = [a for a in actions if isinstance(a, cls)]
    assert len(got) == 1, actions
    return got[0]


def add_app(core, p, name="a", pid=10):
    p.alive.add(pid)
    app, why = core.register(name, pid, 1000)
    assert app is not None, why
    return app.queue


def answer_sent(core, actions, ok=True):
    """Every application answers the Requests in `actions`; the actions that follow."""
    out = []
    for q, m in only(actions, SendToApps).requests:
        out += core.handle(AppAnswered(q, Answer(m.msgid, ok)))
    return out


def reach(phase):
    """A core in `phase`, got there by the events of a real sequence; (core, platform, clock)."""
    core, p, clock = new_core()
    with_app = phase in (Phase.CHECK_APPS, Phase.FREEZE_APPS, Phase.THAW_APPS)
    q = add_app(core, p) if with_app else None
    if phase is Phase.IDLE:
        pass
    elif phase in (Phase.CHECK_APPS, Phase.CHECK_MOUNTS):
        acts = core.handle(Requested("check", 1, "r"))
        assert only(acts, CheckMounts if phase is Phase.CHECK_MOUNTS else SendToApps)
    else:
        acts = core.handle(Requested("freeze", 1, "r"))
        if phase is not Phase.FREEZE_APPS:
            if q:
                acts = answer_sent(core, acts)
            assert only(acts, RunHooks).action == "freeze"
            if phase is Phase.FREEZE_ABORT:
                acts = core.handle(HooksDone("freeze", "hook veto: exit status 3"))
                assert only(acts, RunHooks).action == "thaw"
            elif phase is not Phase.FREEZE_HOOKS:
                acts = core.handle(HooksDone("freeze", None))
                assert only(acts, Freeze).mounts == tuple(MOUNTS)
                if phase is not Phase.FREEZE_FS:
                    acts = core.handle(FreezeDone(None))
                    assert only(acts, Reply).reply.ok
                    if phase in (Phase.AUTO_THAW_FS, Phase.AUTO_THAW_HOOKS):
                        clock.t += 10.0
                        acts = core.handle(Tick())
                        assert kinds(acts) == [ReportState, Thaw]
                        if phase is Phase.AUTO_THAW_HOOKS:
                            acts = core.handle(ThawDone())
                            assert only(acts, RunHooks).action == "thaw"
                    elif phase is not Phase.FROZEN:
                        acts = core.handle(Requested("thaw", 2, "r2"))
                        assert only(acts, Thaw).mounts == tuple(MOUNTS)
                        if phase is not Phase.THAW_FS:
                            acts = core.handle(ThawDone())
                            assert only(acts, RunHooks).action == "thaw"
                            if phase is Phase.THAW_APPS:
                                acts = core.handle(HooksDone("thaw", None))
                                assert only(acts, SendToApps)
    assert core.phase is phase and not core.bad_transitions
    return core, p, clock


def completion(kind):
    return {Kind.HOOKS_DONE: HooksDone("thaw", None), Kind.FREEZE_DONE: FreezeDone(None),
            Kind.THAW_DONE: ThawDone(), Kind.MOUNTS_CHECKED: MountsChecked(None)}[kind]


def test_every_phase_event_pair_is_defined_or_rejected():
    assert set(TABLE) == {(ph, k) for ph in Phase for k in Kind}
    for (phase, kind), handler in TABLE.items():
        assert callable(getattr(BrokerCore, handler)), handler
        if (phase, kind) in STEPS:
            continue
        if kind in (Kind.CHECK, Kind.FREEZE, Kind.THAW):
            assert handler == "_busy", (phase, kind)
        elif kind in (Kind.HOOKS_DONE, Kind.FREEZE_DONE, Kind.THAW_DONE, Kind.MOUNTS_CHECKED):
            assert handler == "_unexpected", (phase, kind)
    # The requests a phase accepts: only IDLE starts a sequence; FROZEN takes THAW only.
    starts = {(ph, k) for (ph, k), h in TABLE.items() if h.startswith("_start")}
    assert starts == {(Phase.IDLE, Kind.CHECK), (Phase.IDLE, Kind.FREEZE), (Phase.IDLE, Kind.THAW),
                      (Phase.FROZEN, Kind.THAW)}
    assert all(src in Phase and dst in Phase for src, dst in EDGES)


@pytest.mark.parametrize("phase", list(Phase))
def test_rejected_pairs_change_nothing(phase):
    core, p, clock = reach(phase)
    for kind in Kind:
        if TABLE[phase, kind] == "_unexpected":
            assert core.handle(completion(kind)) == [], (phase, kind)
            assert core.phase is phase
        elif TABLE[phase, kind] in ("_busy", "_busy_frozen"):
            txn = core.txn
            acts = core.handle(Requested(kind.value, 77, "other"))
            r = only(acts, Reply)
            assert r.reply_to == "other" and not r.reply.ok and r.reply.reason.startswith("busy"), r.reply.reason
            assert kinds(acts) == [Reply] and core.phase is phase and core.txn is txn
    # A status request is answered in every phase, saying where the broker is.
    acts = core.handle(Requested("status", 78, "asker"))
    assert kinds(acts) == [Reply] and acts[0].reply.ok and acts[0].reply.state == phase.state
    assert core.phase is phase and not core.bad_transitions


def test_phase_changes_of_the_sequences_are_all_in_edges():
    for phase in Phase:
        core, _, _ = reach(phase)  # asserts no bad transition on the way
    core, p, clock = new_core()
    for ev in (Requested("freeze", 1, "r"), HooksDone("freeze", None), FreezeDone("/mnt/a: FIFREEZE failed"),
               HooksDone("thaw", None), Requested("check", 2, "r"), MountsChecked("/mnt/a: not a mount point")):
        core.handle(ev)
    assert core.phase is Phase.IDLE and not core.bad_transitions
    # The check is not blind: a change outside EDGES is recorded (and logged).
    core._set_phase(Phase.FROZEN)
    assert core.bad_transitions == [(Phase.IDLE, Phase.FROZEN)]


def test_hooks_and_fifreeze_are_actions_never_run_inline():
    core, p, clock = new_core()
    q = add_app(core, p)
    acts = core.handle(Requested("freeze", 1, "r"))
    assert kinds(acts) == [ReportState, SendToApps]
    clock.t += 0.25
    acts = answer_sent(core, acts)
    hooks = only(acts, RunHooks)
    assert hooks.action == "freeze" and hooks.timeout == pytest.approx(0.75)  # what is left of the phase
    assert core.phase is Phase.FREEZE_HOOKS and not any(isinstance(a, Reply) for a in acts)
    assert kinds(core.handle(HooksDone("freeze", None))) == [ReportState, Freeze]
    acts = core.handle(FreezeDone(None))
    assert only(acts, Reply).reply.ok and core.phase is Phase.FROZEN and core.frozen == MOUNTS
    # freeze_max: tick() asks for FITHAW; the hooks come only once it is done, the apps after them.
    clock.t += 10.0
    acts = core.tick()
    assert kinds(acts) == [ReportState, Thaw] and core.phase is Phase.AUTO_THAW_FS
    assert acts[0].state == "thawing"
    assert core.tick() == [], "no second thaw while the first runs"
    acts = core.handle(ThawDone())
    assert kinds(acts) == [ReportState, RunHooks] and core.frozen == []
    acts = core.handle(HooksDone("thaw", None))
    sent = only(acts, SendToApps).requests
    assert [(qq, m.op) for qq, m in sent] == [(q, "thaw")] and core.phase is Phase.IDLE
    assert "freeze_max" in only(acts, ReportState).detail


def test_requests_during_a_long_thaw_hook_busy_status_and_registration():
    core, p, clock = reach(Phase.THAW_HOOKS)
    clock.t += 14.0  # hooks have their own time limit; the core does not end this phase
    assert core.tick() == [] and core.phase is Phase.THAW_HOOKS
    r = only(core.handle(Requested("check", 5, "c")), Reply).reply
    assert not r.ok and r.reason == "busy: thaw in progress"
    r = only(core.handle(Requested("list", 6, "l")), Reply).reply
    assert r.ok and r.state == "thawing"
    q = add_app(core, p, "late", 20)
    acts = core.handle(HooksDone("thaw", "hook /h/1 thaw: timed out"))
    assert [qq for qq, m in only(acts, SendToApps).requests] == [q], "the new app hears THAW too"
    acts = core.handle(AppAnswered(q, Answer(only(acts, SendToApps).requests[0][1].msgid, True)))
    r = only(acts, Reply).reply
    assert r.ok and r.op == "thaw" and r.msgid == 2 and core.phase is Phase.IDLE


def test_app_phase_timeout_and_late_answer():
    core, p, clock = new_core()
    q = add_app(core, p)
    acts = core.handle(Requested("check", 1, "r", timeout=0.5))
    (qq, req), = only(acts, SendToApps).requests
    assert req == Request(req.msgid, "check", 0.5) and core.next_wakeup() == pytest.approx(clock.t + 0.5)
    clock.t += 0.49
    assert core.tick() == []
    clock.t += 0.02
    acts = core.tick()
    r = only(acts, Reply).reply
    assert not r.ok and "did not answer CHECK within 0.5 s" in r.reason and core.phase is Phase.IDLE
    assert not any(isinstance(a, CheckMounts) for a in acts), "mounts are not checked after a failure"
    # The answer comes after its transaction ended: dropped, in IDLE and in the next one.
    assert core.handle(AppAnswered(q, Answer(req.msgid, True))) == []
    acts = core.handle(Requested("freeze", 2, "r2"))
    assert core.handle(AppAnswered(q, Answer(req.msgid, True))) == [] and core.phase is Phase.FREEZE_APPS
    assert core.apps[q].last_answer == "timeout"


def test_freeze_failure_after_hooks_thaws_hooks_before_failing():
    core, p, clock = reach(Phase.FREEZE_FS)
    acts = core.handle(FreezeDone("/mnt/a: FIFREEZE failed: Operation not supported"))
    assert only(acts, RunHooks).action == "thaw" and not any(isinstance(a, Reply) for a in acts)
    assert core.phase is Phase.FREEZE_ABORT and core.frozen == []
    r = only(core.handle(Requested("thaw", 9, "t")), Reply).reply
    assert not r.ok and r.reason == "busy: freeze in progress"
    acts = core.handle(HooksDone("thaw", None))
    r = only(acts, Reply).reply
    assert not r.ok and "Operation not supported" in r.reason and core.phase is Phase.IDLE


def test_app_gone_mid_phase_and_shutdown_while_a_freeze_runs():
    core, p, clock = new_core()
    qa, qb = add_app(core, p, "a", 10), add_app(core, p, "b", 11)
    acts = core.handle(Requested("freeze", 1, "r"))
    msgid = only(acts, SendToApps).requests[0][1].msgid
    core.handle(AppAnswered(qa, Answer(msgid, True)))
    acts = core.handle(AppGone(qb, "unregistered (connection closed)"))
    assert only(acts, RunHooks).action == "freeze", "a gone app is not waited for"
    core.handle(HooksDone("freeze", None))
    assert core.phase is Phase.FREEZE_FS
    # The shell lets FIFREEZE finish and hands in FreezeDone before shutdown.
    core.handle(FreezeDone(None))
    acts = core.shutdown("broker stopping")
    assert kinds(acts)[:2] == [Thaw, RunHooks] and only(acts, SendToApps).requests[0][1].op == "thaw"
    assert core.phase is Phase.IDLE and core.frozen == [] and core.apps == {}
