"""Snapshot sets: one instant across several volumes (issue 12, item 5).

The two-phase barrier (Hold, Attach while held, Release) in the write path, in
a real volume worker over its channel, and in the supervisor's function that
runs it across workers (daemon.barrier); then a real fssd with three volumes
under writers that number their writes in one sequence across the volumes.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
import threading
import time

import msgspec
import pytest

from daemon import barrier
from daemon.errors import ControlError
from daemon.procs import RestartPolicy, Worker
from ipc import workermsg
from ipc.clustermap import ClusterMap
from workers import cow as cowmod
from workers.cow import CopyOnWrite, HoldError, SnapshotTarget
from workers.settings import VolumeSettings

MiB = 1 << 20


# -- the write gate held in two phases (workers/cow.py) ------------------------------


def _waiting_on_gate(c: CopyOnWrite) -> bool:
    return bool(c._gate._cond._waiters)  # a writer sleeps on the closed gate


def _writer(c: CopyOnWrite, done: list):
    def run():
        with c.writing(0, 4096):
            done.append(time.monotonic())

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _target(tmp_path, c: CopyOnWrite, device: str, vol_fd: int) -> SnapshotTarget:
    name = f"/fsst.{os.getpid()}.{device}"
    ClusterMap.unlink(name)
    m = ClusterMap.create(name, 64 << 10, 4 * MiB, 0, 0)
    bs = os.open(tmp_path / f"{device}.bs", os.O_RDWR | os.O_CREAT, 0o600)
    os.truncate(bs, 64 << 10)
    return SnapshotTarget(device, m, bs, vol_fd)


@pytest.fixture
def volume(tmp_path):
    img = tmp_path / "v.img"
    img.write_bytes(b"")
    os.truncate(img, 4 * MiB)
    fd = os.open(img, os.O_RDWR)
    c = CopyOnWrite(fd, 4 * MiB)
    made: list[SnapshotTarget] = []
    yield c, fd, made
    for t in made:
        name = t.map.name
        t.map.close()
        ClusterMap.unlink(name)
        os.close(t.bs_fd)
    os.close(fd)


def test_hold_keeps_writes_out_until_release_and_attach_inside_it(tmp_path, volume):
    c, fd, made = volume
    token, _drain = c.hold()
    done: list[float] = []
    t = _writer(c, done)
    from daemon.waiting import wait_for

    wait_for(lambda: _waiting_on_gate(c), 10, "the writer to wait on the held gate")
    tgt = _target(tmp_path, c, "fss0", fd)
    made.append(tgt)
    assert c.attach(tgt, token, when_ns=123456789) == 0  # inside the hold: the gate stays closed
    assert tgt.map.created_ns == 123456789 and c.targets == (tgt,)
    assert not done and c.held()
    released_at = time.monotonic()
    held_us, expired = c.release(token)
    t.join(10)
    assert not expired and held_us > 0
    assert done and done[0] >= released_at  # the write ran only once the gate opened
    assert not c.held()
    late = _target(tmp_path, c, "fss1", fd)
    made.append(late)  # its map is unlinked at teardown like the others
    with pytest.raises(HoldError):  # that hold is over
        c.attach(late, token)


def test_held_gate_opens_by_itself_after_the_bound(tmp_path, volume):
    c, fd, made = volume
    t0 = time.monotonic()
    token, _ = c.hold(hold_max=0.3)
    with pytest.raises(HoldError) as e:
        c.hold()  # one hold at a time
    assert e.value.errno == errno.EBUSY
    done: list[float] = []
    t = _writer(c, done)
    t.join(10)
    assert done and done[0] - t0 >= 0.3  # waited for the bound, then went on
    tgt = _target(tmp_path, c, "fss0", fd)
    made.append(tgt)
    with pytest.raises(HoldError) as e:
        c.attach(tgt, token)
    assert e.value.errno == errno.ETIMEDOUT and "opened by itself" in e.value.strerror
    assert c.release(token) == (0, True)  # the supervisor learns the hold did not last
    assert c.targets == ()


def test_hold_gives_up_when_writes_do_not_drain(tmp_path, volume):
    c, fd, made = volume
    c.begin(0, 4096)  # a write in flight that does not finish within the bound
    t0 = time.monotonic()
    with pytest.raises(HoldError) as e:
        c.hold(hold_max=0.3)
    assert e.value.errno == errno.ETIMEDOUT and time.monotonic() - t0 >= 0.3
    assert not c.held()
    done: list[float] = []
    _writer(c, done).join(10)  # the gate is open again
    assert done
    c.end()


def test_standalone_attach_is_the_whole_barrier(tmp_path, volume):
    c, fd, made = volume
    tgt = _target(tmp_path, c, "fss0", fd)
    made.append(tgt)
    held = c.attach(tgt)
    assert held >= 0 and not c.held() and c.targets == (tgt,)
    assert c.detach("fss0") is tgt


# -- a real volume worker, driven over its channel ----------------------------------------


def test_worker_hold_without_release_opens_by_itself(tmp_path):
    """A Hold and no Release: the worker opens its gate after HOLD_MAX by itself, a write
    issued meanwhile (qemu-io, a real client) completes only then, and the late Release is
    answered expired."""
    img = tmp_path / "v.img"
    img.write_bytes(b"")
    os.truncate(img, 1 * MiB)
    sock = tmp_path / "v.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen(4)

    def spawn_args(chan_fd):
        s = VolumeSettings(name="v", path=str(img), size=1 * MiB, listen_fd=listener.fileno())
        return "workers.volume", msgspec.json.encode(s).decode(), [listener.fileno()]

    w = Worker("volume", "v", spawn_args, lambda *a: None, lambda *a: None, dict(os.environ), RestartPolicy(max_restarts=0))
    uri = f"nbd+unix:///v?socket={sock}"

    async def main():
        await w.start()
        try:
            held = await w.call(workermsg.Hold(False, w.next_req()), timeout=20)
            assert isinstance(held, workermsg.Held)
            t_hold = time.monotonic()
            again = await w.call(workermsg.Hold(False, w.next_req()), timeout=20)
            assert isinstance(again, workermsg.Refused) and again.errno == errno.EBUSY
            p = await asyncio.create_subprocess_exec("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4096", uri,
                                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = await asyncio.wait_for(p.communicate(), 60)
            took = time.monotonic() - t_hold
            assert p.returncode == 0 and b"wrote 4096/4096" in out, err
            assert took >= cowmod.HOLD_MAX - 0.5, f"the write went through a held gate after {took:.2f} s"
            rel = await w.call(workermsg.Release(held.token, w.next_req()), timeout=20)
            assert isinstance(rel, workermsg.Released) and rel.expired
            # A fresh hold works again, and a Release in time is not expired.
            held = await w.call(workermsg.Hold(False, w.next_req()), timeout=20)
            rel = await w.call(workermsg.Release(held.token, w.next_req()), timeout=20)
            assert isinstance(rel, workermsg.Released) and not rel.expired and rel.held_us < 1_000_000
            # Held, and the supervisor goes away (EOF on the channel): the worker ends at once,
            # well before the bound, so no gate outlives its supervisor.
            held = await w.call(workermsg.Hold(False, w.next_req()), timeout=20)
            assert isinstance(held, workermsg.Held)
            pid = w.pid
            t0 = time.monotonic()
            w.sock.close()
            w.sock = None
            while os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z":
                assert time.monotonic() - t0 < cowmod.HOLD_MAX - 1, "the held worker outlived its supervisor's channel"
                await asyncio.sleep(0.02)
        finally:
            await w.stop(10)

    try:
        asyncio.run(main())
    finally:
        listener.close()
    with open(img, "rb") as f:
        assert f.read(4096) == b"\x5a" * 4096


# -- daemon.barrier: Hold on all, Attach each, Release all; all or none --------------------


class FakeVolume:
    """Plays a volume worker's side of the barrier and logs what it was asked, in order."""

    def __init__(self, key: str, log: list, refuse_attach: bool = False, expire: bool = False):
        self.key, self.log = key, log
        self.refuse_attach, self.expire = refuse_attach, expire
        self.alive = True
        self._req = 0
        self.attached: set[str] = set()
        self.held = False

    def next_req(self):
        self._req += 1
        return self._req

    def kill(self):
        self.alive = False

    async def call(self, msg, fds=(), timeout=30.0):
        await asyncio.sleep(0)  # let the others run: a real channel round trip interleaves
        if isinstance(msg, workermsg.Hold):
            self.log.append(("hold", self.key))
            self.held = True
            return workermsg.Held(7, 3, msg.req)
        if isinstance(msg, workermsg.AttachSnapshot):
            self.log.append(("attach", self.key, msg.hold, msg.when_ns))
            if self.refuse_attach:
                return workermsg.Refused(msg.device, errno.ENOMEM, "no map", msg.req)
            self.attached.add(msg.device)
            return workermsg.Attached(msg.device, 0, msg.req)
        if isinstance(msg, workermsg.Release):
            self.log.append(("release", self.key))
            self.held = False
            return workermsg.Released(msg.token, 50, self.expire, msg.req)
        if isinstance(msg, workermsg.DetachSnapshot):
            self.log.append(("detach", self.key, self.held))
            self.attached.discard(msg.device)
            return workermsg.Detached(msg.device, msg.req)
        raise AssertionError(msg)


def _members(vols):
    return [barrier.Member(v, workermsg.AttachSnapshot(f"fss{i}", f"/m{i}"), [0]) for i, v in enumerate(vols)]


def test_barrier_holds_all_before_any_attach_and_releases_after_all():
    log: list = []
    vols = [FakeVolume(f"v{i}", log) for i in range(3)]
    r = asyncio.run(barrier.run(_members(vols)))
    kinds = [e[0] for e in log]
    assert kinds == ["hold"] * 3 + ["attach"] * 3 + ["release"] * 3
    stamps = {e[3] for e in log if e[0] == "attach"}
    assert len(stamps) == 1 and stamps == {r.instant_ns}  # one instant for the set
    assert all(e[2] == 7 for e in log if e[0] == "attach")  # inside the hold
    assert r.held_us == 50


def test_barrier_refusal_detaches_the_others_while_held_then_releases_all():
    log: list = []
    vols = [FakeVolume("v0", log), FakeVolume("v1", log, refuse_attach=True), FakeVolume("v2", log)]
    told: list = []
    members = [m._replace(on_attach=lambda r, d=m.attach.device: told.append((d, type(r).__name__))) for m in _members(vols)]
    with pytest.raises(ControlError) as e:
        asyncio.run(barrier.run(members))
    # Each member hears how its own attach went, even though the set was then undone.
    assert sorted(told) == [("fss0", "Attached"), ("fss1", "Refused"), ("fss2", "Attached")]
    assert e.value.errno == errno.ENOMEM and "fss1: no map" in str(e.value)
    assert all(not v.attached and not v.held for v in vols)
    detaches = [x for x in log if x[0] == "detach"]
    assert {d[1] for d in detaches} == {"v0", "v2"} and all(d[2] for d in detaches)  # still held
    assert [x[0] for x in log][-3:] == ["release"] * 3


def test_barrier_fails_when_a_hold_opened_by_itself():
    log: list = []
    vols = [FakeVolume("v0", log), FakeVolume("v1", log, expire=True)]
    with pytest.raises(ControlError) as e:
        asyncio.run(barrier.run(_members(vols)))
    assert e.value.errno == errno.ETIMEDOUT and "v1" in str(e.value)
    assert all(not v.attached for v in vols)


# -- a real fssd with three volumes ----------------------------------------------------------

VOLS = 3
VOL_SIZE = 64 * MiB
SLOT = 4096
REGION = 32 * MiB  # each writer its own region of every volume: room for 24576 writes a round
WRITERS = 2


def three_volumes(fssd_factory, shmdir, devices=6, **kw):
    vols = []
    for i in range(VOLS):
        img = shmdir / f"v{i}.img"
        img.write_bytes(b"")
        os.truncate(img, VOL_SIZE)
        vols.append({"name": f"v{i}", "path": str(img)})
    return fssd_factory(vols, devices=devices, **kw)


class SeqWriter:
    """Numbers its writes in one sequence across the volumes: write k goes to volume k % 3 at
    its own slot (k // 3) of this writer's region, filled with this round's byte, and is
    acknowledged (qemu-io, one connection per volume) before write k + 1 is issued. Each
    round starts again at 0 with another byte (so a slot from an earlier round reads absent)."""

    def __init__(self, fssd, index: int):
        self.base = index * REGION
        # stdbuf: qemu-io's answers line by line through the pipe, as each write completes.
        self.procs = [subprocess.Popen(["stdbuf", "-oL", "qemu-io", "-f", "raw", fssd.uri(f"v{v}")], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) for v in range(VOLS)]
        self.acked = 0  # writes 0 .. acked-1 of this round are acknowledged
        self.byte = 1
        self.error = ""
        self.stop = threading.Event()
        self.going = threading.Event()  # writes only while set (between rounds it is paused)
        self.idle = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def where(self, k: int) -> tuple[int, int]:
        return k % VOLS, self.base + (k // VOLS) * SLOT

    def start_round(self, byte: int) -> None:
        assert self.idle.wait(60)
        self.byte, self.acked = byte, 0
        self.idle.clear()
        self.going.set()

    def pause(self) -> None:
        self.going.clear()
        self.idle.wait(60)

    def _run(self):
        k = -1
        while not self.stop.is_set():
            if not self.going.is_set():
                self.idle.set()
                self.going.wait()
                continue
            k = self.acked
            v, off = self.where(k)
            if off + SLOT > self.base + REGION:
                self.error = "the writer's region is full"
                return
            p = self.procs[v]
            p.stdin.write(f"write -P {self.byte} {off} {SLOT}\n")
            p.stdin.flush()
            while True:
                line = p.stdout.readline()
                if not line or "failed" in line:
                    self.error = line or "qemu-io exited"
                    return
                if "ops;" in line:  # printed once the write is acknowledged
                    break
            self.acked = k + 1

    def finish(self):
        self.stop.set()
        self.going.set()
        self.thread.join(60)
        for p in self.procs:
            p.stdin.close()
            p.wait(30)
        assert not self.error, self.error


def check_one_instant(w: SeqWriter, images: list[bytes]) -> tuple[int, int]:
    """No snapshot holds a write later than one another snapshot lacks: the writes of this
    round present across the three snapshots are exactly 0 .. n-1. Returns n."""
    mine = bytes([w.byte]) * SLOT
    present = []
    for k in range(w.acked):
        v, off = w.where(k)
        present.append(images[v][off:off + SLOT] == mine)
    n = present.index(False) if False in present else len(present)
    later = [k for k in range(n, len(present)) if present[k]]
    assert not later, (f"the snapshots are not of one instant: write {n} (v{n % VOLS}) is missing but later writes "
                       f"{later[:5]} (v{[k % VOLS for k in later[:5]]}) are there")
    return n


def read_snapshot(fssd, shmdir, device: str) -> bytes:
    out = shmdir / f"{device}.out"
    subprocess.run(["nbdcopy", fssd.uri(device), str(out)], check=True, timeout=120)
    data = out.read_bytes()
    out.unlink()
    return data


def test_set_of_three_volumes_under_writers_is_one_instant(fssd_factory, shmdir):
    import json

    from ipc import trackmap

    G = trackmap.GRANULE

    f = three_volumes(fssd_factory, shmdir)
    writers = [SeqWriter(f, i) for i in range(WRITERS)]
    before: dict[int, tuple[str, bytes]] = {}  # volume -> (id, image) of the previous round's snapshot
    try:
        for rnd in range(4):
            for w in writers:
                w.start_round(rnd + 1)
            progress(writers, [0] * WRITERS, "the writers to get going")
            args = []
            for v in range(VOLS):
                args += [f"fss{v}", f"v{v}", str(shmdir / f"r{rnd}-s{v}")]
            r = f.fssconfig(*args)
            set_id = re_set_line(r.stdout)
            after = [w.acked for w in writers]
            progress(writers, after, "writes after the snapshot")
            for w in writers:
                w.pause()
                assert not w.error, w.error
            listed = json_list(f)
            assert {s["set_id"] for s in listed} == {set_id} and all(s["set_members"] == ["fss0", "fss1", "fss2"] for s in listed)
            assert len({s["taken"] for s in listed}) == 1  # one instant stamped on all three
            plain = f.fssconfig("-l").stdout
            assert all(f"fss{v}: v{v}, set {set_id}" in plain for v in range(VOLS)), plain
            images = [read_snapshot(f, shmdir, f"fss{v}") for v in range(VOLS)]
            for w, a in zip(writers, after):
                n = check_one_instant(w, images)
                # The instant fell inside this round's writes: some before it, some after (the
                # one write a writer has in flight may be in the snapshot before its ack is read).
                assert 60 <= n <= a + 1 < w.acked, (n, a, w.acked)
            # Each member is a tracked snapshot of its own volume's history: what changed since
            # the previous set (unconfigured by now) covers every granule that differs.
            for v, (snap, image) in enumerate(zip(listed, images)):
                assert trackmap.parse_id(snap["id"]), snap["id"]
                if v in before:
                    old_id, old = before[v]
                    assert trackmap.parse_id(old_id)[0] == trackmap.parse_id(snap["id"])[0]
                    got = json.loads(f.fssconfig("--changes", f"fss{v}", "--since", old_id, "--json").stdout)
                    reported = {g for e in got for g in range(e["offset"] // G, (e["offset"] + e["length"] - 1) // G + 1)}
                    differ = {g for g in range(len(image) // G) if image[g * G:(g + 1) * G] != old[g * G:(g + 1) * G]}
                    assert differ and differ <= reported, (sorted(differ - reported), v)
                before[v] = (snap["id"], image)
            for v in range(VOLS):
                f.fssconfig("-u", f"fss{v}")
    finally:
        for w in writers:
            w.finish()


def progress(writers: list[SeqWriter], since: list[int], what: str) -> None:
    """Every writer has 60 more writes acknowledged than `since` (or one failed: reported)."""
    from fsshelp import wait_for

    try:
        wait_for(lambda: all(w.acked >= a + 60 for w, a in zip(writers, since)) or any(w.error for w in writers), 120, what)
    except TimeoutError as e:
        raise AssertionError(f"{e}: acknowledged {[w.acked for w in writers]}, since {since}") from None
    errors = [w.error for w in writers if w.error]
    assert not errors, f"{what}: {errors}, acknowledged {[w.acked for w in writers]}, since {since}"


def re_set_line(out: str) -> str:
    import re

    m = re.match(r"set ([0-9a-f]{12}): fss0, fss1, fss2: snapshot set, barrier (\d+) us$", out.strip())
    assert m, out
    return m.group(1)


def json_list(f) -> list[dict]:
    import json

    return [s for s in json.loads(f.fssconfig("-l", "--json").stdout) if s["in_use"]]


def leftover_state(f, shmdir) -> dict:
    """What a set that failed must not leave: records, export sockets, maps, store files."""
    rec = sorted(os.listdir(f.tmp / "state" / "snapshots")) if (f.tmp / "state" / "snapshots").exists() else []
    socks = sorted(p for p in os.listdir(f.rundir) if p.startswith("fss"))
    maps = sorted(e for e in os.listdir("/dev/shm") if e.startswith(f.prefix))
    stores = sorted(p.name for p in shmdir.iterdir() if p.name.startswith("s"))
    return {"records": rec, "sockets": socks, "maps": maps, "stores": stores}


def test_set_is_all_or_none(fssd_factory, shmdir):
    f = three_volumes(fssd_factory, shmdir)
    images = [(shmdir / f"v{v}.img").read_bytes() for v in range(VOLS)]
    f.fssconfig("fss3", "v1", str(shmdir / "s-alone"))  # fss3 in use
    before = leftover_state(f, shmdir)
    assert before["records"] == ["fss3.json"] and before["stores"] == ["s-alone"]
    # A device in use (fssd refuses, after the other members' stores were opened and checked).
    r = f.fssconfig("fss0", "v0", str(shmdir / "s0"), "fss3", "v1", str(shmdir / "s1"), "fss2", "v2", str(shmdir / "s2"), check=False)
    assert r.returncode == 1 and r.stderr.strip() == "fssconfig: fss3: Device busy", r.stderr
    assert leftover_state(f, shmdir) == before
    # A member whose store is another volume's image: refused by fssd, the image untouched.
    r = f.fssconfig("fss0", "v0", str(shmdir / "s0"), "fss1", "v1", str(shmdir / "v2.img"), check=False)
    assert r.returncode == 1 and "is the image of volume v2" in r.stderr, r.stderr
    assert leftover_state(f, shmdir) == before
    # Two members on one store.
    r = f.fssconfig("fss0", "v0", str(shmdir / "s0"), "fss1", "v1", str(shmdir / "s0"), check=False)
    assert r.returncode == 1 and "another member of this set" in r.stderr, r.stderr
    assert leftover_state(f, shmdir) == before
    # A store that can't be created (fssconfig itself, before asking fssd): the one it made goes.
    r = f.fssconfig("fss0", "v0", str(shmdir / "s0"), "fss1", "v1", str(shmdir / "nodir" / "s1"), check=False)
    assert r.returncode == 1 and "nodir" in r.stderr, r.stderr
    assert leftover_state(f, shmdir) == before
    listed = json_list(f)
    assert [s["device"] for s in listed] == ["fss3"]
    assert [(shmdir / f"v{v}.img").read_bytes() == images[v] for v in range(VOLS)] == [True] * VOLS


def test_bad_set_command_lines_change_nothing(fssd_factory, shmdir):
    f = three_volumes(fssd_factory, shmdir)
    before = leftover_state(f, shmdir)
    s = [str(shmdir / f"s{i}") for i in range(3)]
    cases = [
        (["fss0", "v0", s[0], "fss1", "v1", s[1], "fss2"], "7 arguments: a snapshot set is `device path backup` triples"),
        (["fss0", "v0", s[0], "fss1", "v1", s[1], "fss2", "v2"], "8 arguments"),
        (["fss0", "v0", s[0], "fss0", "v1", s[1]], "fss0 twice in one snapshot set"),
        (["fss0", "v0", s[0], "fss1", "v0", s[1]], "v0 twice in one snapshot set"),
        (["-l", "fss0", "v0", s[0], "fss1", "v1", s[1]], "usage:"),
        (["fss0", "v0", s[0], "fss9", "v1", s[1]], "fss9: Device not configured"),
        (["fss0", "v0", s[0], "fss1", "nosuch", s[1]], "nosuch: no such volume"),
        (["fss0", str(shmdir / "v0.img"), s[0], "fss1", "v0", s[1]], "volume v0 twice in one snapshot set"),
    ]
    for argv, want in cases:
        r = f.fssconfig(*argv, check=False)
        assert r.returncode == 1 and want in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)
        assert leftover_state(f, shmdir) == before, argv


def test_unfinished_set_is_removed_at_start(fssd_factory, shmdir):
    """fssd killed after a set's records were written but before they were marked done (what
    a crash in the middle of configuring the set leaves): the next start removes the whole
    set, records and the stores fssconfig made; a set with one done record comes back whole."""
    import json

    f = three_volumes(fssd_factory, shmdir)
    d = shmdir / "stores"
    d.mkdir()
    f.fssconfig("fss0", "v0", f"{d}/s0", "fss1", "v1", f"{d}/s1", "fss2", "v2", f"{d}/s2")
    f.fssconfig("fss3", "v0", f"{d}/s3", "fss4", "v1", f"{d}/s4")
    recdir = f.tmp / "state" / "snapshots"
    f.kill_everything()
    for dev, done in (("fss0", False), ("fss1", False), ("fss2", False), ("fss3", True), ("fss4", False)):
        p = recdir / f"{dev}.json"
        rec = json.loads(p.read_text())
        assert rec["set_done"] is True and len(rec["set_members"]) in (2, 3)
        rec["set_done"] = done
        p.write_text(json.dumps(rec))
    f.start()
    listed = json_list(f)
    assert [s["device"] for s in listed] == ["fss3", "fss4"] and all(s["state"] == "active" for s in listed)
    assert sorted(os.listdir(recdir)) == ["fss3.json", "fss4.json"]
    assert json.loads((recdir / "fss4.json").read_text())["set_done"] is True  # its set was complete
    assert sorted(os.listdir(d)) == ["s3", "s4"]
    assert "member of snapshot set" in f.log.read_text()


def test_set_suspends_the_file_systems_of_all_volumes_once(fssd_factory, shmdir, mounts, tmp_path):
    """Two volumes with ext4 mounted through nbdfuse + loop at their mountpoints: a plain set
    freezes both in one suspend around one barrier, and -C (VSS) runs CHECK, FREEZE and THAW
    once for the set; every snapshot mounts clean (e2fsck -fn)."""
    import re

    vols = []
    for i in range(2):
        mnt = tmp_path / f"mnt{i}"
        mnt.mkdir()
        vols.append({"name": f"d{i}", "path": str(shmdir / f"d{i}.img"), "size": "64M", "mountpoint": str(mnt)})
    f = fssd_factory(vols, vss={"enabled": True})
    for i in range(2):
        dev = mounts.nbdfuse(f.uri(f"d{i}"), tmp_path / f"fuse{i}")
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(dev)], check=True, timeout=120)
        mounts.loop_mount(dev, tmp_path / f"mnt{i}")
        (tmp_path / f"mnt{i}" / "hello").write_text(f"volume {i}\n" * 1000)
    r = f.fssconfig("fss0", "d0", str(shmdir / "s0"), "fss1", "d1", str(shmdir / "s1"))
    m = re.match(rf"set [0-9a-f]{{12}}: fss0, fss1: file-system-consistent snapshot set, suspended {tmp_path}/mnt0, "
                 rf"{tmp_path}/mnt1 for [0-9.]+ ms, barrier \d+ us$", r.stdout.strip())
    assert m, r.stdout
    assert f.log.read_text().count("suspend window") == 1  # one suspend process for both
    log_before = f.log.read_text()
    r = f.fssconfig("-C", "-v", "fss2", "d0", str(shmdir / "s2"), "fss3", "d1", str(shmdir / "s3"))
    assert re.match(r"set [0-9a-f]{12}: fss2, fss3: application-consistent snapshot set, freeze window [0-9.]+ ms, barrier \d+ us\n",
                    r.stdout), r.stdout
    assert "snapshot set" in r.stdout and "application-consistent (VSS)" in r.stdout
    new = f.log.read_text()[len(log_before):]
    assert [new.count(f"request {op} msgid") for op in ("check", "freeze", "thaw")] == [1, 1, 1], new
    for i, dev in enumerate(("fss0", "fss1", "fss2", "fss3")):
        snap = mounts.nbdfuse(f.uri(dev), tmp_path / f"fuse-{dev}", readonly=True)
        fsck = subprocess.run(["e2fsck", "-fn", str(snap)], capture_output=True, text=True, timeout=120)
        assert fsck.returncode == 0, (dev, fsck.stdout, fsck.stderr)
