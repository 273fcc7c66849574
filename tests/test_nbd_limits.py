"""Bounded resources on the NBD sockets ([daemon] nbd_* keys), against a live fssd.

Connection caps (total and per peer uid), the handshake deadline, the idle and
stalled-request deadlines, the memory half-sent WRITEs may pin, accept() under
descriptor exhaustion, and idle connections that must not cost a thread each.
Each check is followed by a real client (nbdinfo) being served correctly.
"""

from __future__ import annotations

import os
import resource
import socket
import tempfile
import time
from pathlib import Path

import pytest
from fsshelp import BIN, Fssd, run, wait_for, running
from secusers import Users
from nbdwire import Closed, Raw, connect, info_data, req

from ipc import nbd

MiB = 1 << 20


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def nbdinfo_ok(fssd, export: str = "data") -> None:  # fss0 is as large as data
    out = run("nbdinfo", "--size", fssd.uri(export), timeout=30).stdout
    assert int(out) == 64 * MiB


def refused_in_option_phase(fssd, export: str = "data") -> str:
    """A new connection: greeting, then GO answered NBD_REP_ERR_POLICY; its message."""
    c = Raw(fssd.sock(export))
    try:
        c.hello()
        (typ, msg), = c.option(nbd.OPT_GO, info_data(export))
        assert typ == nbd.REP_ERR_POLICY, typ
        return msg.decode()
    finally:
        c.close()


def make_fssd(tmp_path_factory, name: str, extra: str):
    shm = Path(tempfile.mkdtemp(prefix=f"fssd-test-{name}-", dir="/dev/shm"))
    f = Fssd(tmp_path_factory.mktemp(name) / "i0", [{"name": "data", "path": str(shm / "data.img"), "size": "64M"}], extra=extra)
    return f, shm


@pytest.fixture(scope="module")
def tight(tmp_path_factory, users):
    """Small caps and short deadlines, so each bound is reached in a test's time; a
    snapshot fss0, whose export the [daemon] group's members may open too."""
    f, shm = make_fssd(
        tmp_path_factory,
        "nbdlim",
        "\n".join(
            [
                f'group = "{users.group}"',
                "nbd_max_connections = 48",
                "nbd_max_connections_per_uid = 40",
                "nbd_handshake_timeout = 1.5",
                "nbd_request_timeout = 4",
                "nbd_idle_timeout = 8",
                'nbd_buffer_limit = "64M"',
            ]
        ),
    )
    with running(f, shm):
        f.fssconfig("fss0", "data", str(shm / "bs0"))
        yield f


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Room for a thousand connections (root's: not capped per uid), the default deadlines."""
    # One volume process: the accept back-off test starves exactly that process of descriptors.
    f, shm = make_fssd(tmp_path_factory, "nbdwide", "nbd_max_connections = 1100\nvolume_processes = 1")
    with running(f, shm):
        yield f


def close_all(conns) -> None:
    for c in conns:
        c.close()


def member_connections(fssd, users: Users, n: int, export: str = "fss0") -> list[Raw]:
    """n connections whose peer credentials (SO_PEERCRED) are a [daemon] group member's:
    a child drops to that user and group, connects through a descriptor of the run
    directory opened before (the test's tmp directory is root's alone), and hands the
    sockets back."""
    uid, gid = users.uid(users.member), users.gid()
    ours, theirs = socket.socketpair()
    dfd = os.open(fssd.rundir, os.O_PATH | os.O_DIRECTORY)
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on, only os._exit
        code = 1
        try:
            os.setgroups([gid])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            socks = []
            for _ in range(n):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(f"/proc/self/fd/{dfd}/{export}.sock")
                socks.append(s)
            socket.send_fds(theirs, [b"x"], [s.fileno() for s in socks])
            code = 0
        finally:
            os._exit(code)
    os.close(dfd)
    theirs.close()
    try:
        _, fds, _, _ = socket.recv_fds(ours, 1, n)
    finally:
        ours.close()
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and len(fds) == n
    out = []
    for fd in fds:
        out.append(Raw(sock=socket.socket(fileno=fd)))
    return out


# -- connection caps ---------------------------------------------------------------------


def test_connections_over_the_cap_are_refused_in_the_option_phase(tight, users):
    pid = tight.worker_pid("snapshot", "fss0")
    held = [connect(tight, "fss0") for _ in range(44)]  # root: past the per-uid 40, which root is spared
    try:
        for c in member_connections(tight, users, 4):
            held.append(c)
            c.go("fss0")
        msg = refused_in_option_phase(tight, "fss0")
        assert "too many connections to fss0 (at most 48)" in msg
        p = run("nbdinfo", "--size", tight.uri("fss0"), check=False, timeout=30)
        assert p.returncode != 0 and "server policy prevents NBD_OPT_GO" in p.stderr, p.stderr
        # The held connections are served all the while.
        assert held[0].pread(1, 0, 4096) == bytes(4096)
        assert held[-1].pread(2, 0, 4096) == bytes(4096)
        held.pop().close()
        wait_for(lambda: run("nbdinfo", "--size", tight.uri("fss0"), check=False).returncode == 0, what="a free slot")
    finally:
        close_all(held)
    assert tight.worker_pid("snapshot", "fss0") == pid
    nbdinfo_ok(tight, "fss0")
    assert "too many connections to fss0" in tight.log.read_text()


def test_one_uid_at_its_cap_leaves_room_for_root(tight, users):
    held = member_connections(tight, users, 41)
    try:
        for c in held[:40]:
            c.go("fss0")
        # The member's 41st connection is refused, with the reason ...
        held[40].hello()
        (typ, msg), = held[40].option(nbd.OPT_GO, info_data("fss0"))
        assert typ == nbd.REP_ERR_POLICY
        assert f"too many connections to fss0 from uid {users.uid(users.member)} (at most 40)" in msg.decode()
        # ... while root, a different peer, is served at once.
        nbdinfo_ok(tight, "fss0")
        c = connect(tight, "fss0")
        assert c.pread(1, 0, 4096) == bytes(4096)
        c.close()
    finally:
        close_all(held)


# -- deadlines -------------------------------------------------------------------------------


def test_a_silent_handshake_is_dropped_at_the_timeout(tight):
    c = Raw(tight.sock("data"))
    try:
        t0 = time.monotonic()
        c.recv(18)  # the greeting; then nothing
        assert c.hung_up()
        took = time.monotonic() - t0
        assert 1.2 < took < 6, took
    finally:
        c.close()
    nbdinfo_ok(tight)


def test_a_trickling_handshake_is_dropped_at_the_timeout(tight):
    # Each option answered promptly, yet the whole option phase has 1.5 s.
    c = Raw(tight.sock("data"))
    try:
        t0 = time.monotonic()
        c.hello()
        with pytest.raises((Closed, BrokenPipeError, ConnectionResetError)):
            while time.monotonic() - t0 < 10:
                assert c.option(nbd.OPT_LIST)[-1][0] == nbd.REP_ACK
                time.sleep(0.2)  # the slow client under test, not a wait for readiness
        assert time.monotonic() - t0 < 6
    finally:
        c.close()


def test_an_idle_connection_is_dropped_at_the_idle_timeout(tight):
    c = connect(tight)
    try:
        assert c.pread(1, 0, 512) == bytes(512)
        t0 = time.monotonic()
        assert c.hung_up()
        assert 7 < time.monotonic() - t0 < 14
    finally:
        c.close()


def test_a_half_sent_request_is_dropped_at_the_request_timeout(tight):
    c = connect(tight)
    try:
        c.send(req(nbd.CMD_WRITE, 1, 0, 65536) + bytes(1000))
        t0 = time.monotonic()
        assert c.hung_up()
        assert 3.5 < time.monotonic() - t0 < 8
    finally:
        c.close()
    nbdinfo_ok(tight)


# -- memory ----------------------------------------------------------------------------------


def test_half_sent_large_writes_do_not_grow_the_worker_past_its_budget(tight):
    """40 clients each send a 32 MiB WRITE's header and up to 16 MiB of it, then stall.
    Without a budget that is 640 MiB resident; the bound is the 64 MiB budget plus
    1 MiB per connection (plus slack for the interpreter)."""
    pid = tight.worker_pid("volume", "data")
    # An honest maximal WRITE first: the budget must not get in its way.
    c = connect(tight)
    big = os.urandom(32 * MiB)
    assert c.pwrite(1, 0, big) == 0
    assert c.pread(2, 0, 32 * MiB) == big
    c.close()
    del big
    base = rss(pid)
    conns = [connect(tight) for _ in range(40)]
    peak = base
    try:
        chunk = bytes(1 * MiB)
        sent = [0] * len(conns)
        for c in conns:
            c.s.setblocking(False)
            c.s.send(req(nbd.CMD_WRITE, 9, 0, 32 * MiB))
        # Push until the budgeted payloads are in (at most 20 s), then one more second.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if sum(sent) >= 32 * MiB:
                deadline = min(deadline, time.monotonic() + 1)
            for i, c in enumerate(conns):
                if sent[i] < 16 * MiB:
                    try:
                        sent[i] += c.s.send(chunk[: 16 * MiB - sent[i]])
                    except BlockingIOError:
                        pass
            peak = max(peak, rss(pid))
            time.sleep(0.02)  # sampling period of the RSS probe
        bound = 64 * MiB + 40 * MiB + 48 * MiB
        print(f"volume worker RSS grew by {(peak - base) / MiB:.0f} MiB; clients got {sum(sent) / MiB:.0f} MiB in")
        # Two payloads fit the budget and were taken whole; the rest wait in the clients'
        # socket buffers, not in the worker (without a budget all 640 MiB get in).
        assert sum(sent) >= 32 * MiB
        assert peak - base < bound, f"RSS grew by {(peak - base) / MiB:.0f} MiB (bound {bound / MiB:.0f} MiB)"
    finally:
        close_all(conns)
    assert tight.worker_pid("volume", "data") == pid
    c = connect(tight)
    try:
        probe = os.urandom(4 * MiB)
        assert c.pwrite(3, 8 * MiB, probe) == 0
        assert c.pread(4, 8 * MiB, len(probe)) == probe
    finally:
        c.close()
    nbdinfo_ok(tight)


# -- threads and descriptors ----------------------------------------------------------------


def test_a_thousand_idle_connections_do_not_cost_a_thousand_threads(wide):
    pid = wide.worker_pid("volume", "data")
    before = threads(pid)
    mem = rss(pid)
    held = []
    try:
        for i in range(1000):
            c = Raw(wide.sock("data"))
            held.append(c)
            if i % 2:
                c.go("data")  # idle in transmission
            else:
                c.hello()  # idle in the option phase (well within the 10 s deadline)
        during = threads(pid)
        grown = rss(pid) - mem
        print(f"threads of the volume worker: {before} before, {during} with 1000 idle connections; RSS +{grown / MiB:.0f} MiB")
        assert during < before + 20, (before, during)
        assert grown < 100 * MiB
        # They are live connections: one of them is served at once.
        assert held[1].pread(1, 0, 4096) == bytes(4096)
    finally:
        close_all(held)
    nbdinfo_ok(wide)


def test_nbdcopy_is_unaffected_by_hundreds_of_idle_and_stalled_connections(wide, tmp_path):
    held = []
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(32 * MiB))
    try:
        for i in range(300):
            c = Raw(wide.sock("data"))
            held.append(c)
            if i % 3 == 0:
                c.go("data")  # idle
            elif i % 3 == 1:
                c.hello()  # in the option phase
            else:
                c.go("data")
                c.send(req(nbd.CMD_WRITE, 1, 0, 1 * MiB) + bytes(4096))  # a WRITE sent in part
        run("nbdcopy", "-C", 4, "-T", 4, src, wide.uri("data"))
        back = tmp_path / "back.img"
        back.write_bytes(b"")
        run("nbdcopy", "-C", 4, "-T", 4, wide.uri("data"), back)
        assert back.read_bytes()[: 32 * MiB] == src.read_bytes()
    finally:
        close_all(held)


def test_accept_backs_off_when_descriptors_run_out(wide):
    pid = wide.worker_pid("volume", "data")
    nofile = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    open_fds = len(os.listdir(f"/proc/{pid}/fd"))
    logged_before = wide.log.read_text().count("cannot accept connections")
    conns = []
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_fds + 8, nofile[1]))
        for _ in range(40):  # beyond the limit: they wait in the listen backlog
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(wide.sock("data"))
            conns.append(s)
        wait_for(lambda: "cannot accept connections: Too many open files" in wide.log.read_text(), what="the warning")
        cpu0 = sum(int(x) for x in Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[11:13])
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2:
            time.sleep(0.1)  # the back-off under test: two seconds of it
        cpu1 = sum(int(x) for x in Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[11:13])
        assert cpu1 - cpu0 < 0.5 * os.sysconf("SC_CLK_TCK"), "accept() is spinning"
        assert wide.log.read_text().count("cannot accept connections") - logged_before == 1
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, nofile)
        for s in conns:
            s.close()
    assert wide.worker_pid("volume", "data") == pid
    wait_for(lambda: run("nbdinfo", "--size", wide.uri("data"), check=False).returncode == 0, what="accepting again")


def test_a_bad_limit_is_refused_at_start(tight):
    """A bad value stops fssd with one line naming the key."""
    bad = Fssd(tight.tmp.parent / "bad", [{"name": "x", "path": str(tight.tmp / "none.img"), "size": "1M"}], extra='nbd_buffer_limit = "1M"')
    p = run(BIN / "fssd", "-c", bad.config, "-d", check=False, timeout=30)
    assert p.returncode == 2
    assert "nbd_buffer_limit must be at least 64M" in p.stderr + p.stdout
    assert "at `$.daemon`" in p.stderr + p.stdout


# -- the budget against honest clients (the serving loop alone, an in-memory backend) -------


class CountingBackend:
    """A 1 GiB export that keeps a digest of each write (no storage)."""

    size = 1 << 30
    read_only = False

    def __init__(self):
        import hashlib
        import threading

        self._h = hashlib.sha256
        self._lock = threading.Lock()
        self.writes: dict[int, bytes] = {}

    def write(self, offset: int, data, fua: bool) -> None:
        d = self._h(data).digest()
        with self._lock:
            self.writes[offset] = d

    def flush(self) -> None:
        pass


def test_concurrent_maximal_writes_all_succeed_within_a_small_budget(tmp_path):
    """Six clients write 32 MiB each at once through a 64 MiB budget: they take turns
    (waiters never hold memory others wait for); none is refused."""
    import hashlib
    import threading

    from workers.nbdserve import Limits, Server

    path = str(tmp_path / "b.sock")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(16)
    backend = CountingBackend()
    srv = Server(lst, nbd.Export("b", backend.size, False), backend, limits=Limits(buffer_limit=64 * MiB, request_timeout=20))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    payloads = [bytes([i + 1]) * (32 * MiB) for i in range(6)]
    results: dict[int, int] = {}

    def client(i: int) -> None:
        c = Raw(path)
        c.s.settimeout(60)
        try:
            c.go("b")
            results[i] = c.pwrite(i, i * 32 * MiB, payloads[i])
        finally:
            c.close()

    try:
        workers = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(90)
        assert results == {i: 0 for i in range(6)}
        assert backend.writes == {i * 32 * MiB: hashlib.sha256(p).digest() for i, p in enumerate(payloads)}
        assert srv._budget.used <= 64 * MiB
    finally:
        srv.stop()
        t.join(10)
        lst.close()
