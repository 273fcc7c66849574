"""The VSS permission model, tried as root, as a member of [daemon] group and as a stranger.

A user and a group are made for the session (conftest's `users`,
tests/secusers.py: unique names, removed even on failure, and a world-readable
copy of the code for them to run). Each test reproduces one of
issue 9's breaks and shows it refused, the broker still answering root.
"""

import json
import os
import pwd
import grp
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from fsshelp import wait_for
from vsshelp import BrokerProc, is_frozen

from ipc import mqueue, vssproto
from ipc.names import instance_prefix, vss_socket
from ipc.vss_client import Application, Requestor, VssError
from workers import freeze

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def people(users):
    """(group, member, stranger): conftest's session users (tests/secusers.py)."""
    return users.group, users.member, users.stranger


@pytest.fixture
def run_as(users):
    """run_as(user, *python_args, code=None, wait=True, timeout=60, ipc_of=None): our code as that user."""
    started = []

    def run(user, *args, code=None, wait=True, timeout=60, ipc_of=None):
        got = users.py(user, *args, code=code, wait=wait, timeout=timeout, ipc_of=ipc_of)
        if not wait:
            started.append(got)
        return got

    yield run
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()


@pytest.fixture
def brokers(people):
    """Brokers whose run directory other users can reach (tmp_path is 0700)."""
    made, dirs = [], []

    def start(**kw):
        base = Path(tempfile.mkdtemp(prefix="fssd-vss-sec-", dir="/tmp"))
        base.chmod(0o755)
        dirs.append(base)
        b = BrokerProc(base, group=people[0], **kw)
        os.chmod(b.rundir, 0o755)
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
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def broker_log(b) -> str:
    return Path(b.log.name).read_text()


def vssadm(run_as, user, rundir, *args):
    return run_as(user, "-m", "daemon.cli.vssadm", "-r", rundir, *args)


# A raw application: register, open the queues (optionally without saying so), then obey stdin.
RAW_APP = r"""
import json, socket, sys, time
import msgspec
from ipc import mqueue, vssproto
from ipc.names import vss_socket
rundir, name, opened = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
s = socket.socket(socket.AF_UNIX)
s.connect(vss_socket(rundir))
s.sendall(vssproto.frame(vssproto.Register(name)))
(reg,) = vssproto.client_reader().feed(s.recv(65536))
rq, aq = mqueue.open_reader(reg.requests), mqueue.open_writer(reg.answers)
if opened:
    s.sendall(vssproto.frame(vssproto.Opened()))
print(json.dumps({"requests": reg.requests, "answers": reg.answers, "pid": reg.pid}), flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "garbage":
        mqueue.send(aq, b"\xc1 not msgpack", 1)
    elif cmd[0] == "frame":
        s.sendall(vssproto.frame(vssproto.Register(name)))
    elif cmd[0] == "forge":  # answer every request "for" another application, OK
        victim, vpid = cmd[1], int(cmd[2])
        deadline = time.monotonic() + float(cmd[3])
        while time.monotonic() < deadline:
            data = mqueue.receive(rq, 0.1)
            if data:
                req = vssproto.decode_request(data)
                mqueue.send(aq, msgspec.msgpack.encode({"t": "answer", "msgid": req.msgid, "name": victim,
                                                        "pid": vpid, "ok": True}), 1)
        print("forged", flush=True)
"""


def raw_app(run_as, user, b, name, opened=True):
    p = run_as(user, "-c", RAW_APP, b.rundir, name, "1" if opened else "0", wait=False)
    line = p.stdout.readline()
    assert line, p.stderr.read() if p.poll() is not None else "no output"
    return p, json.loads(line)


def test_stranger_cannot_freeze_member_can(brokers, run_as, people, ext4):
    group, member, stranger = people
    b = brokers(timeout=2.0, freeze_mounts=[ext4])
    st = os.stat(vss_socket(b.rundir))
    assert oct(st.st_mode & 0o7777) == oct(0o660) and st.st_uid == 0 and st.st_gid == grp.getgrnam(group).gr_gid
    # The stranger: refused at connect(), nothing frozen (a write completes).
    for op in ("freeze", "thaw", "status"):
        r = vssadm(run_as, stranger, b.rundir, op)
        assert r.returncode == 1 and "Permission denied" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not is_frozen(ext4)
    r = run_as(stranger, "-m", "daemon.cli.appvss", "-n", "-r", b.rundir)
    assert r.returncode == 1 and "Permission denied" in r.stderr, r.stderr
    # Even through a socket made world-writable, the broker checks the peer itself.
    os.chmod(vss_socket(b.rundir), 0o666)
    r = vssadm(run_as, stranger, b.rundir, "freeze")
    assert r.returncode == 1 and f"Permission denied: only root and members of group {group}" in r.stdout, r
    assert not is_frozen(ext4)
    os.chmod(vss_socket(b.rundir), 0o660)
    # The member may (supplementary group, from SO_PEERGROUPS).
    r = vssadm(run_as, member, b.rundir, "freeze")
    assert r.returncode == 0 and r.stdout.startswith("freeze: OK"), r
    assert is_frozen(ext4)
    r = vssadm(run_as, member, b.rundir, "status")
    assert f"mounts frozen: {ext4}" in r.stdout and "applications held: (none registered)" in r.stdout, r.stdout
    r = vssadm(run_as, member, b.rundir, "thaw")
    assert r.returncode == 0, r
    for p in is_frozen.blocked:
        assert p.wait(timeout=5) == 0  # the blocked write went through
    is_frozen.blocked.clear()
    assert Requestor(b.rundir).request("status").ok


def test_forged_answer_is_impossible(brokers, run_as, people):
    group, member, stranger = people
    b = brokers(timeout=2.0)
    stop = threading.Event()
    with Application(b.rundir, "victimdb") as victim:
        def serve():
            while not stop.is_set():
                req = victim.receive(timeout=0.1)
                if req is not None:
                    victim.answer(req, req.op != "freeze", "not consistent" if req.op == "freeze" else "")

        t = threading.Thread(target=serve)
        t.start()
        try:
            evil, _ = raw_app(run_as, member, b, "evil")
            evil.stdin.write(f"forge victimdb {os.getpid()} 4\n")
            evil.stdin.flush()
            r = Requestor(b.rundir).request("freeze")
            assert not r.ok and f"victimdb[{os.getpid()}] FREEZE failed: not consistent" in r.reason, r.reason
            assert r.state == "idle" and r.frozen == []
            assert {a.name for a in Requestor(b.rundir).request("list").apps} == {"victimdb", "evil"}
            assert evil.stdout.readline().strip() == "forged"
        finally:
            stop.set()
            t.join(5)
    # The queues a member gets: its own uid, 0600; nobody else can open them.
    p, q = raw_app(run_as, member, b, "owned", opened=False)
    for name in (q["requests"], q["answers"]):
        mq = mqueue.open_writer(name)
        try:
            st = os.fstat(mq.mqd)
            assert st.st_uid == pwd.getpwnam(member).pw_uid and st.st_mode & 0o777 == 0o600
            assert (mq.max_messages, mq.max_message_size) == (8, vssproto.MAX_MESSAGE)
        finally:
            mqueue.close(mq)
        r = run_as(stranger, code=f"import posix_ipc\nfrom ipc import mqueue\ntry:\n    mqueue.open_writer({name!r})\n"
                                   "except posix_ipc.PermissionsError:\n    print('EACCES')\n")
        assert r.stdout.strip() == "EACCES", r
    # Once the application says it opened them, the names are gone (nothing to open, nothing to leak).
    p2, q2 = raw_app(run_as, member, b, "named", opened=True)
    wait_for(lambda: not mqueue.exists(q2["requests"]) and not mqueue.exists(q2["answers"]), 5, "names removed")
    assert "victimdb" not in {a.name for a in Requestor(b.rundir).request("list").apps}, "closed: unregistered"


def test_bad_queues_and_bytes_never_kill_the_broker(brokers, run_as, people):
    group, member, stranger = people
    b = brokers(timeout=0.2)
    prefix = instance_prefix(b.rundir)
    # issue 9's break: names pre-created with a 1-byte message size (the old app queue and inbox names)
    precreated = [f"/{prefix}.vss", f"/{prefix}.app.x", f"/{prefix}.app.x.1"]
    pre = run_as(member, code=(
        "import posix_ipc\n"
        f"for n in {precreated!r}:\n"
        "    posix_ipc.MessageQueue(n, posix_ipc.O_CREX, max_messages=1, max_message_size=1)\n"
        "print('made')\n"))
    try:
        assert pre.stdout.strip() == "made", pre.stderr
        good, _ = raw_app(run_as, member, b, "x")
        garbage, _ = raw_app(run_as, member, b, "garbage")
        chatty, _ = raw_app(run_as, member, b, "chatty")
        deaf, _ = raw_app(run_as, member, b, "deaf")  # never reads its requests
        assert {a.name for a in Requestor(b.rundir).request("list").apps} == {"x", "garbage", "chatty", "deaf"}
        garbage.stdin.write("garbage\n")
        garbage.stdin.flush()
        chatty.stdin.write("frame\n")
        chatty.stdin.flush()
        wait_for(lambda: {a.name for a in Requestor(b.rundir).request("list").apps} == {"x", "deaf"}, 5,
                 "the misbehaving applications dropped")
        # The deaf one's queue fills (8 requests, no answers): the send fails, it is dropped, the check fails.
        reasons = [Requestor(b.rundir).request("check").reason for _ in range(10)]
        assert any("deaf[" in r and "its requests queue is full" in r for r in reasons), reasons
        assert "deaf" not in {a.name for a in Requestor(b.rundir).request("list").apps}
        # Idle and oversized connections are closed; the broker answers root throughout.
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(vss_socket(b.rundir))
            s.sendall((1 << 31).to_bytes(4, "big"))
            s.settimeout(5)
            assert s.recv(10) == b""
        with socket.socket(socket.AF_UNIX) as idle:
            idle.connect(vss_socket(b.rundir))
            idle.settimeout(10)
            assert idle.recv(10) == b"", "closed at the first-frame timeout"
        assert b.proc.poll() is None and Requestor(b.rundir).request("status").ok
        log = broker_log(b)
        assert "Traceback" not in log
        dropped = [ln for ln in log.splitlines() if "garbage[" in ln and "dropped" in ln]
        assert len(dropped) == 1 and "bad answer message" in dropped[0], log
        assert "application chatty[" in log and "unexpected Register after registering" in log, log
    finally:
        for n in precreated:
            mqueue.unlink(n)


HOARDER = r"""
import json, socket, sys
from ipc import vssproto
from ipc.names import vss_socket
socks, ok, reasons = [], 0, set()
for i in range(253):
    s = socket.socket(socket.AF_UNIX)
    s.connect(vss_socket(sys.argv[1]))
    s.sendall(vssproto.frame(vssproto.Register(f"hoard{i}")))
    data = s.recv(65536)
    msgs = vssproto.client_reader().feed(data) if data else []
    if msgs and msgs[0].ok:
        ok += 1
        socks.append(s)
    else:
        reasons.add(msgs[0].reason if msgs else "closed")
        s.close()
print(json.dumps({"ok": ok, "reasons": sorted(reasons)}), flush=True)
sys.stdin.readline()
"""


def test_per_uid_cap_stops_253_registrations_root_still_works(brokers, run_as, people):
    group, member, stranger = people
    b = brokers(timeout=1.0)
    hoarder = run_as(member, "-c", HOARDER, b.rundir, wait=False)
    line = hoarder.stdout.readline()
    assert line, hoarder.stderr.read()
    got = json.loads(line)
    assert got["ok"] == 8, got
    assert got["reasons"] and all("max_apps_per_uid" in r or "too many connections from uid" in r
                                  for r in got["reasons"]), got
    # Root: status, a registration and a check, all while the member holds its 8.
    r = Requestor(b.rundir).request("status")
    assert r.ok and len(r.apps) == 8
    with Application(b.rundir, "rootapp"):
        assert len(Requestor(b.rundir).request("list").apps) == 9
    r = subprocess.run([sys.executable, "-m", "daemon.cli.vssadm", "-r", b.rundir, "status"], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "applications: 8" in r.stdout, r
    hoarder.stdin.write("\n")
    hoarder.stdin.flush()
    hoarder.wait(10)
    wait_for(lambda: Requestor(b.rundir).request("status").apps == [], 5, "the member's registrations ended")
    assert "Traceback" not in broker_log(b)


def _no_queue_budget():
    resource.setrlimit(resource.RLIMIT_MSGQUEUE, (0, 0))


def test_queue_exhaustion_is_a_clear_error_and_root_keeps_working(brokers, run_as, people, ext4):
    group, member, stranger = people
    # A broker that cannot make a single queue (RLIMIT_MSGQUEUE 0): the limit every queue counts against.
    b = brokers(timeout=1.0, freeze_mounts=[ext4], preexec_fn=_no_queue_budget)
    r = run_as(member, "-m", "daemon.cli.appvss", "-n", "-r", b.rundir)
    assert r.returncode == 1 and "cannot create its queues: the system's message queue limit is reached" in r.stderr
    assert "Traceback" not in r.stderr
    with pytest.raises(VssError, match="message queue limit"):
        Application(b.rundir, "rootapp").register()
    # Requestors need no queue: root's vssadm freeze/thaw work.
    for op in ("check", "freeze", "thaw"):
        r = subprocess.run([sys.executable, "-m", "daemon.cli.vssadm", "-r", b.rundir, op], cwd=ROOT,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.startswith(f"{op}: OK"), r
    assert b.proc.poll() is None and "Traceback" not in broker_log(b)


@pytest.fixture
def open_base():
    """A directory other users can traverse (tmp_path is 0700); requested before fssd_factory, so removed after it."""
    base = Path(tempfile.mkdtemp(prefix="fssd-vss-sec-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_fssconfig_C_reports_the_victims_failure_despite_forged_answers(open_base, fssd_factory, shmdir, run_as,
                                                                        people):
    """The supervisor's consistent path (fssconfig -C) through a real fssd with [daemon] group."""
    group, member, stranger = people
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "16M"}],
                     vss={"enabled": True, "timeout": 2, "freeze_max": 5}, extra=f'group = "{group}"', base=open_base)
    st = os.stat(vss_socket(str(f.rundir)))
    assert st.st_mode & 0o777 == 0o660 and st.st_gid == grp.getgrnam(group).gr_gid
    stop = threading.Event()
    with Application(str(f.rundir), "victimdb") as victim:
        def serve():
            while not stop.is_set():
                req = victim.receive(timeout=0.1)
                if req is not None:
                    victim.answer(req, req.op != "freeze", "not consistent" if req.op == "freeze" else "")

        t = threading.Thread(target=serve)
        t.start()
        try:
            class B:  # raw_app needs only the run directory
                rundir = str(f.rundir)

            evil, _ = raw_app(run_as, member, B, "evil")
            evil.stdin.write(f"forge victimdb {os.getpid()} 6\n")
            evil.stdin.flush()
            r = f.fssconfig("-C", "fss0", "data", shmdir / "bs0", check=False)
            assert r.returncode == 1 and "victimdb[" in r.stderr and "not consistent" in r.stderr, r
            assert "fss0: not in use" in f.fssconfig("-l", "fss0").stdout
            evil.kill()
            evil.wait()
        finally:
            stop.set()
            t.join(5)
    # With the failing application gone (and evil), root's fssconfig -C goes through.
    wait_for(lambda: Requestor(str(f.rundir)).request("list").apps == [], 5, "both unregistered")
    r = f.fssconfig("-C", "fss0", "data", shmdir / "bs0", check=False)
    assert r.returncode == 0 and "application-consistent" in r.stdout, r
    f.fssconfig("-u", "fss0")


def test_system_queue_limit_exhausted_by_a_member(brokers, run_as, people):
    """Issue 9's 253 queues, scaled down in a private IPC namespace (queues_max 6, the host's untouched).

    The broker runs without CAP_SYS_RESOURCE, which would let root past queues_max, as in a
    container: registering gets a clear error and root's requests need no queue at all.
    """
    group, member, stranger = people
    b = brokers(timeout=1.0, wrap=["unshare", "--ipc", "--", "setpriv", "--bounding-set=-sys_resource", "--"])
    r = subprocess.run(["nsenter", f"--ipc=/proc/{b.pid}/ns/ipc", "sh", "-c",
                        "echo 6 > /proc/sys/fs/mqueue/queues_max && cat /proc/sys/fs/mqueue/queues_max"],
                       capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == "6", r
    fill = run_as(member, ipc_of=b.pid, code=(
        "import posix_ipc\n"
        "n = 0\n"
        "try:\n"
        "    while n < 100:\n"
        "        posix_ipc.MessageQueue(f'/hog{n}', posix_ipc.O_CREX, max_messages=1, max_message_size=8)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print(n, e)\n"))
    assert fill.stdout.startswith("6 "), fill
    r = run_as(member, "-m", "daemon.cli.appvss", "-n", "-r", b.rundir, ipc_of=b.pid)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r
    assert "cannot create its queues: the system's message queue limit is reached" in r.stderr, r.stderr
    for op in ("status", "check", "freeze", "thaw"):
        r = subprocess.run([sys.executable, "-m", "daemon.cli.vssadm", "-r", b.rundir, op], cwd=ROOT,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r
    # Two queues freed: the same registration goes through (it was the limit, nothing else).
    run_as(member, ipc_of=b.pid, code="import posix_ipc\nfor n in ('/hog0', '/hog1'): posix_ipc.unlink_message_queue(n)\n")
    app = run_as(member, "-m", "daemon.cli.appvss", "-n", "-w", "0", "-r", b.rundir, ipc_of=b.pid, wait=False)
    assert app.stdout.readline().startswith("appvss: registered"), app.stderr.read() if app.poll() is not None else ""
    assert [a.name for a in Requestor(b.rundir).request("list").apps] == ["appvss"]
    assert b.proc.poll() is None and "Traceback" not in broker_log(b)


def test_descriptor_exhaustion_pauses_accepting_with_one_line(brokers):
    """EMFILE on accept: a pause, one warning, no spin; the broker answers once descriptors free up."""
    b = brokers(timeout=1.0)
    in_use = len(os.listdir(f"/proc/{b.pid}/fd"))
    limit = in_use + 3
    resource.prlimit(b.pid, resource.RLIMIT_NOFILE, (limit, limit))
    conns = []
    try:
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX)
            s.connect(vss_socket(b.rundir))
            conns.append(s)
        wait_for(lambda: "VSS socket: accept:" in broker_log(b), 5, "the broker to run out of descriptors")
        assert b.proc.poll() is None
    finally:
        for s in conns:
            s.close()
    assert Requestor(b.rundir).request("status", wait=10).ok
    log = broker_log(b)
    assert log.count("VSS socket: accept:") == 1 and "Too many open files" in log and "Traceback" not in log, log


def test_bad_frames_from_one_member_cannot_fill_the_log(brokers, run_as, people):
    """Each bad connection is closed at once (so no cap slows a loop of them): its log line
    must be rate-limited, or a member fills the log and the disk under it."""
    group, member, stranger = people
    b = brokers()
    before = broker_log(b).count("exceeds the")
    r = run_as(member, code=(
        "import socket\n"
        "n = 0\n"
        "for _ in range(1500):\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        f"    s.connect({vss_socket(b.rundir)!r})\n"
        "    try:\n"
        "        s.sendall((1 << 20).to_bytes(4, 'big'))\n"
        "        n += 1\n"
        "    except OSError:\n"
        "        pass\n"
        "    s.close()\n"
        "print(n)\n"))
    assert int(r.stdout) > 1000, r.stderr
    assert b.proc.poll() is None and Requestor(b.rundir).request("status").ok
    lines = broker_log(b).count("exceeds the") - before
    assert 1 <= lines <= 2, f"{lines} log lines for 1500 bad connections"
