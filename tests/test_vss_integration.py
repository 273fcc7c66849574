"""The real broker process, real queues, real appvss processes, real FIFREEZE.

Every test makes its own ext4 image, loop-mounts it in a tmp dir and freezes
only that (conftest's `ext4`, tests/vsshelp.py); fixtures thaw, unmount, detach, kill and unlink in all cases (a
frozen file system left behind hangs the machine).
"""

import os
import re
import signal
import socket
import subprocess
import time

import msgspec
import pytest
from fsshelp import wait_for
from vsshelp import ENV, PY, ROOT, BrokerProc, is_frozen

from ipc import hyperv
from ipc.names import vss_socket
from ipc.vss_client import Application, BrokerNotRunning, Requestor
from ipc.workermsg import Stop, VssState
from workers import freeze
from workers.broker import BrokerSettings


@pytest.fixture
def brokers(tmp_path):
    made = []

    def start(**kw):
        b = BrokerProc(tmp_path, **kw)
        made.append(b)
        return b

    try:
        yield start
    finally:
        for b in made:
            b.kill()
            freeze.thaw_all(b.settings.freeze_mounts)
            b.mine.close()
            b.log.close()
        for p in is_frozen.blocked:
            p.kill()
            p.wait()
        is_frozen.blocked.clear()


@pytest.fixture
def apps():
    procs = []

    def start(broker, name, *opts, w="0.1"):
        p = subprocess.Popen([PY, "-m", "daemon.cli.appvss", "-n", "-w", w, "--name", name, "-r", broker.rundir, *opts],
                             cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
        procs.append(p)
        line = p.stdout.readline()  # appvss prints this once the broker acknowledged it
        assert line.startswith(f"appvss: registered {name}"), line
        return p

    try:
        yield start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def test_three_appvss_in_turn_and_together(brokers, apps, ext4):
    b = brokers(timeout=0.6, freeze_max=10.0, freeze_mounts=[ext4])
    # The good one: every phase OK, the mount frozen between FREEZE and THAW.
    good = apps(b, "good")
    assert b.req("check").ok
    r = b.req("freeze")
    assert r.ok and r.frozen == [ext4] and r.state == "frozen"
    assert is_frozen(ext4)
    r = b.req("thaw")
    assert r.ok and r.window_ms > 0 and r.frozen == []
    assert not freeze.thaw_one(ext4), "thawed: FITHAW says not frozen"
    for p in is_frozen.blocked:
        assert p.wait(timeout=5) == 0  # the blocked writer went through
    good.terminate()
    assert good.wait(timeout=5) == 0
    # -f 1: the freeze answer comes too late; FREEZE fails, nothing stays frozen.
    apps(b, "late", "-f", "1")
    r = b.req("freeze")
    assert not r.ok and "late" in r.reason and "did not answer FREEZE" in r.reason
    assert r.frozen == [] and not freeze.thaw_one(ext4)
    lst = b.req("list")
    (late,) = [a for a in lst.apps if a.name == "late"]
    assert late.last_answer == "timeout"
    # -f 2: the application refuses; FREEZE fails with its reason.
    apps(b, "bad", "-f", "2")
    b2 = b.req("list")
    wait_for(lambda: {a.name: a for a in b.req("list").apps}["late"].last_answer == "OK", 5, "late app thawed")
    r = b.req("freeze", timeout=2.0)  # long enough for "late" to have answered its THAW; "bad" fails fast
    assert not r.ok and "bad[" in r.reason and "freeze failure simulation" in r.reason
    assert not freeze.thaw_one(ext4)
    # Every application was told THAW afterwards and answered it.
    def all_thawed():
        table = {a.name: a for a in b.req("list").apps}
        return all(a.last_op == "thaw" and a.last_answer == "OK" for a in table.values()) and table
    table = wait_for(all_thawed, 5, "every app thawed")
    assert set(table) == {"late", "bad"} and b2.state == "idle"


def test_broker_sigkill_while_frozen_supervisor_thaws(ext4, fssd_factory, shmdir, apps):
    """A real fssd's supervisor thaws what its broker froze when the broker is SIGKILLed.

    freeze_max is 60 s, so within the bound nobody but the supervisor thaws: a write
    blocked on the freeze completing is the supervisor's doing.
    """
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "16M"}],
                     vss={"enabled": True, "timeout": 2, "freeze_max": 60, "freeze": [ext4]})
    apps(f, "good")
    r = Requestor(str(f.rundir)).request("freeze")
    assert r.ok and r.frozen == [ext4], r
    assert is_frozen(ext4), "the write waits on the freeze"
    (writer,) = is_frozen.blocked
    broker = f.worker_pid("broker", "vss")
    t0 = time.monotonic()
    os.kill(broker, signal.SIGKILL)
    try:
        assert writer.wait(timeout=5) == 0, "the blocked write completed"
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{ext4} still frozen 5 s after the broker's SIGKILL: the supervisor did not thaw it") from None
    assert time.monotonic() - t0 < 5
    assert not freeze.thaw_one(ext4), "thawed: FITHAW says not frozen"
    assert f"thawed {ext4}" in f.log.read_text()


def test_requestor_dies_after_freeze_broker_thaws_within_freeze_max(brokers, ext4):
    b = brokers(timeout=1.0, freeze_max=1.0, freeze_mounts=[ext4])
    code = ("import sys; from ipc.vss_client import Requestor; "
            f"sys.exit(0 if Requestor({b.rundir!r}).request('freeze').ok else 1)")
    assert subprocess.run([PY, "-c", code], cwd=ROOT, env=ENV, timeout=10).returncode == 0
    t0 = time.monotonic()
    assert is_frozen(ext4)
    wait_for(lambda: b.req("status").state == "idle", 3.0, "broker thaws on its own")
    assert time.monotonic() - t0 < 1.0 + 1.0
    assert not freeze.thaw_one(ext4)
    # The supervisor hears about it on the channel.
    while not any(s.state == "idle" and "freeze_max" in s.detail for s in b.states):
        b.next_msg(VssState, timeout=2.0)


def test_hyperv_stand_in_byte_for_byte(brokers, apps, tmp_path):
    path = str(tmp_path / "hv.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    srv.settimeout(5)
    b = brokers(timeout=1.0, hyperv_device="unix:" + path)
    kernel, _ = srv.accept()
    kernel.settimeout(5)

    def recv12():
        buf = b""
        while len(buf) < 12:
            chunk = kernel.recv(12 - len(buf))
            assert chunk, "broker closed the channel"
            buf += chunk
        return buf

    try:
        assert recv12() == bytes([hyperv.VSS_OP_REGISTER1]) + bytes(11)
        kernel.sendall(hyperv.VSS_OP_REGISTER1.to_bytes(4, "little"))
        apps(b, "good")
        for op in (hyperv.VSS_OP_HOT_BACKUP, hyperv.VSS_OP_FREEZE, hyperv.VSS_OP_THAW, hyperv.VSS_OP_GET_DM_INFO):
            msg = hyperv.request_message(op, flags=5 if op == hyperv.VSS_OP_HOT_BACKUP else 0)
            kernel.sendall(msg)
            ans = recv12()
            assert ans == hyperv.HV_S_OK.to_bytes(4, "little") + msg[4:], op
        apps(b, "bad", "-f", "2")
        kernel.sendall(hyperv.request_message(hyperv.VSS_OP_HOT_BACKUP))
        assert hyperv.parse_answer(recv12()) == hyperv.HV_S_OK
        kernel.sendall(hyperv.request_message(hyperv.VSS_OP_FREEZE))
        assert hyperv.parse_answer(recv12()) == hyperv.HV_E_FAIL
        kernel.sendall(hyperv.request_message(hyperv.VSS_OP_THAW))
        assert hyperv.parse_answer(recv12()) == hyperv.HV_S_OK
    finally:
        kernel.close()
        srv.close()


STOCK_HOOK = """#!/bin/sh
# qemu-ga fsfreeze-hook.d style script, unchanged: argv[1] is freeze or thaw.
case "$1" in
    freeze) echo "freeze $(date +%s)" >> "{log}"; echo flushed ;;
    thaw)   echo "thaw" >> "{log}" ;;
    *)      exit 1 ;;
esac
exit 0
"""


def test_hooks_order_skip_rules_and_failure(brokers, apps, ext4, tmp_path):
    hooks_dir, log = tmp_path / "fsfreeze-hook.d", tmp_path / "hooks.log"
    hooks_dir.mkdir()
    for name, body, mode in [
        ("10-stock", STOCK_HOOK.format(log=log), 0o755),
        ("20-probe", f"#!/bin/sh\necho \"$1 20 $(cat /proc/self/mountinfo | grep -c {ext4})\" >> {log}\n", 0o755),
        ("30-fail.sample", "#!/bin/sh\nexit 1\n", 0o755),  # skipped by name
        ("40-noexec", "#!/bin/sh\nexit 1\n", 0o644),  # skipped: not executable
        ("50-old~", "#!/bin/sh\nexit 1\n", 0o755),
    ]:
        p = hooks_dir / name
        p.write_text(body)
        p.chmod(mode)
    b = brokers(timeout=2.0, freeze_mounts=[ext4], hooks_dir=str(hooks_dir))
    apps(b, "good")
    assert b.req("freeze").ok
    assert is_frozen(ext4)
    assert b.req("thaw").ok
    lines = log.read_text().split("\n")
    assert lines[0].startswith("freeze ") and lines[1] == "freeze 20 1" and lines[2:4] == ["thaw", "thaw 20 1"]
    # A hook failing on freeze fails FREEZE before any FIFREEZE, and thaw hooks still run.
    bad = hooks_dir / "15-veto"
    bad.write_text("#!/bin/sh\n[ \"$1\" = freeze ] && { echo 'database busy' >&2; exit 3; }\nexit 0\n")
    bad.chmod(0o755)
    log.write_text("")
    r = b.req("freeze")
    assert not r.ok and "15-veto freeze: exit status 3: database busy" in r.reason
    assert not freeze.thaw_one(ext4)
    # Only the stock hook (before the veto, in glob order) ran freeze; every hook then ran thaw.
    lines = log.read_text().split("\n")
    assert re.fullmatch(r"freeze \d+", lines[0]) and lines[1:] == ["thaw", "thaw 20 1", ""], lines


def test_check_refuses_unfreezable_and_root_never_frozen(brokers, tmp_path):
    b = brokers(timeout=1.0, freeze_mounts=[str(tmp_path)])
    r = b.req("check")
    assert not r.ok and "not a mount point" in r.reason
    assert "fssd never freezes /" in freeze.check_freezable("/")
    with pytest.raises(freeze.FreezeError, match="refusing"):
        freeze.freeze_all(["/"])


def test_malformed_messages_dead_apps_busy_and_stop(brokers, apps):
    b = brokers(timeout=1.0)
    body = msgspec.msgpack.encode({"t": "answer", "msgid": 1})
    for junk in (b"\x00\x00\x00\x02\xc1\xc1", b"\x00\x00\x00\x08\x81\xa1t\xa5nosuch",
                 len(body).to_bytes(4, "big") + body, (1 << 30).to_bytes(4, "big") + b"x" * 100):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(vss_socket(b.rundir))
            s.sendall(junk)
            try:
                got = s.recv(100)
            except ConnectionResetError:  # closed with our bytes unread
                got = b""
            assert got == b"", "closed without an answer"
    assert b.req("status").ok, "broker still serving after garbage"
    slow = apps(b, "slow", "-c", "1", w="0.3")
    victim = apps(b, "victim")
    assert "victim" in {a.name for a in b.req("list").apps}
    victim.kill()
    victim.wait()
    wait_for(lambda: "victim" not in {a.name for a in b.req("list").apps}, 3, "dead app unregistered")
    # A request during another is answered busy, not dropped.
    import threading
    first = {}
    t = threading.Thread(target=lambda: first.update(r=b.req("check")))
    t.start()
    wait_for(lambda: b.req("status").state == "checking", 3, "check in progress")
    r = b.req("freeze")
    assert not r.ok and r.reason.startswith("busy")
    t.join(10)
    assert not first["r"].ok and "slow" in first["r"].reason
    slow.kill()
    b.chan.send(Stop())
    assert b.proc.wait(timeout=5) == 0
    assert not os.path.exists(vss_socket(b.rundir))
    with pytest.raises(BrokerNotRunning):
        Requestor(b.rundir).request("status")


def test_vssadm_cli(brokers, apps, tmp_path):
    out = subprocess.run([PY, "-m", "daemon.cli.vssadm", "-r", str(tmp_path / "nowhere"), "status"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip() == f"vssadm: fssd is not running (no broker at {tmp_path / 'nowhere'})"
    for opts in (["-n"], []):  # the same words from appvss, in the foreground or daemonizing
        out = subprocess.run([PY, "-m", "daemon.cli.appvss", *opts, "-r", str(tmp_path / "nowhere")], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 1
        assert out.stderr.strip() == f"appvss: fssd is not running (no broker at {tmp_path / 'nowhere'})", out
    b = brokers(timeout=1.0)
    apps(b, "db")
    out = subprocess.run([PY, "-m", "daemon.cli.vssadm", "-r", b.rundir, "check"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("check: OK")
    out = subprocess.run([PY, "-m", "daemon.cli.vssadm", "-r", b.rundir, "list", "--json"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True)
    doc = msgspec.json.decode(out.stdout)
    assert out.returncode == 0 and doc["apps"][0]["name"] == "db" and doc["apps"][0]["last_answer"] == "OK"


def test_application_library_in_process(brokers):
    b = brokers(timeout=1.0)
    with Application(b.rundir, "lib") as app:
        import threading
        res = {}
        t = threading.Thread(target=lambda: res.update(r=b.req("check")))
        t.start()
        req = app.receive(timeout=5)
        assert req is not None and req.op == "check"
        app.answer(req, False, "not today")
        t.join(5)
        assert not res["r"].ok and "lib[" in res["r"].reason and "not today" in res["r"].reason
    assert b.req("list").apps == [], "closing the application unregistered it"


def test_appvss_stops_at_once_on_sigterm_mid_work_and_prints_its_daemon_pid(brokers, apps):
    import signal
    import threading

    b = brokers(timeout=5.0)
    slow = apps(b, "slow", "-f", "1", w="1")  # a FREEZE would take 1 s + 10 s
    res = {}
    t = threading.Thread(target=lambda: res.update(r=b.req("freeze")))
    t.start()
    wait_for(lambda: b.req("status").state == "freezing", 3, "FREEZE sent")
    t0 = time.monotonic()
    slow.send_signal(signal.SIGTERM)
    assert slow.wait(timeout=3) == 0
    assert time.monotonic() - t0 < 1.0
    t.join(10)
    assert res["r"].ok, "an application that unregistered is not waited for"
    assert b.req("list").apps == []
    # Without -n: the pid is printed (the daemon's, after the double fork) before the prompt returns.
    out = subprocess.run([PY, "-m", "daemon.cli.appvss", "-w", "0", "--name", "bg", "-r", b.rundir], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0 and out.stdout.startswith("appvss: registered bg pid "), out
    pid = int(out.stdout.split()[-1])
    try:
        assert [(a.name, a.pid) for a in b.req("list").apps] == [("bg", pid)]
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: b.req("list").apps == [], 3, "the daemon unregistered on SIGTERM")


def test_vssadm_status_says_what_a_freeze_holds(brokers, apps):
    b = brokers(timeout=1.0)
    db = apps(b, "db")

    def vssadm(*args):
        return subprocess.run([PY, "-m", "daemon.cli.vssadm", "-r", b.rundir, *args], cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=30)

    assert "frozen: (nothing)" in vssadm("status").stdout
    assert vssadm("freeze").returncode == 0
    out = vssadm("status").stdout
    assert "state: frozen" in out and f"applications held: db[{db.pid}]" in out, out
    assert "freeze hooks run: (no hooks_dir)" in out and "mounts frozen: (none configured)" in out, out
    assert "(none)" not in out.replace("(none configured)", ""), out
    assert vssadm("thaw").returncode == 0


def test_application_queues_never_reuse_an_existing_name(monkeypatch, tmp_path):
    import posix_ipc

    from workers import broker as br

    platform = br.ProcessPlatform(BrokerSettings(prefix="fssd.test0002", rundir=str(tmp_path)), None, None)
    tokens = iter(["aaaa", "bbbb"])
    monkeypatch.setattr(br.secrets, "token_hex", lambda n: next(tokens))
    squat = posix_ipc.MessageQueue("/fssd.test0002.app.aaaa", posix_ipc.O_CREX, max_messages=1, max_message_size=1)
    key = ""
    try:
        key, err = platform.open_app("x", 1, 4321)
        assert err == "" and key == "/fssd.test0002.app.bbbb"
        for mq in (platform.queues[key].requests, platform.queues[key].answers):
            st = os.fstat(mq.mqd)
            assert st.st_uid == 4321 and st.st_mode & 0o777 == 0o600
            assert (mq.max_messages, mq.max_message_size) == (br.APP_QUEUE_MESSAGES, 512)
        assert squat.max_message_size == 1  # the squatter's queue is neither used nor removed
    finally:
        platform.close_app(key)
        squat.unlink()
        squat.close()
    assert platform.queues == {}
    from ipc import mqueue
    assert not mqueue.exists("/fssd.test0002.app.bbbb") and not mqueue.exists("/fssd.test0002.ans.bbbb")
