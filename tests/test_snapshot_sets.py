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
    with pytest.raises(HoldError):  # that hold is over
        c.attach(_target(tmp_path, c, "fss1", fd), token)


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
    with pytest.raises(ControlError) as e:
        asyncio.run(barrier.run(_members(vols)))
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
