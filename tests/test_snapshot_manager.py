"""The snapshot manager on its own: a SnapshotHost of fakes, no fssd, no worker processes.

Real pieces: the backing-store checks on a real file, the cluster map in shared
memory, the table write. Fake: the volume worker (answers the barrier as told),
the snapshot worker, the VSS gate.
"""

import asyncio
import dataclasses
import errno
import os
import secrets
import socket
from types import SimpleNamespace

import pytest

from daemon import snapshots
from daemon.errors import ControlError
from daemon.snaphost import SnapshotHost, WorkerFlags
from daemon.snapshots import SnapshotManager
from ipc import control, names, workermsg
from ipc.clustermap import ClusterMap, table_clusters

MiB = 1 << 20


class FakeVolumeWorker:
    """Answers AttachSnapshot with `answer` (Attached unless told otherwise); records what it got."""

    def __init__(self, answer="attached"):
        self.alive = True
        self.answer = answer
        self.got: list = []
        self._req = 0
        self.key = "vol"
        self.killed = False

    def next_req(self):
        self._req += 1
        return self._req

    async def call(self, msg, fds=(), timeout=30.0):
        self.got.append(msg)
        if isinstance(msg, workermsg.AttachSnapshot):
            if self.answer == "refused":
                return workermsg.Refused(msg.device, errno.ENOSPC, "no room for the barrier", msg.req)
            return workermsg.Attached(msg.device, 7, msg.req)
        return workermsg.Detached(msg.device, msg.req)

    def kill(self):
        self.killed = True


class FakeSnapshotWorker:
    def __init__(self, kind, key, args):
        self.kind, self.key, self.args = kind, key, args
        self.alive = False
        self.pid = 0
        self.started = 0.0
        self.restarts = 0
        self.last_error = ""
        self.stopped = False

    async def start(self, spare=None):
        self.alive, self.pid = True, 4242

    async def stop(self, timeout=10.0):
        self.stopped, self.alive = True, False


class FakeGate:
    def __init__(self, fail=None):
        self.mounts: list[str] = []
        self.timeout = 3.0
        self.fail = fail
        self.ops: list[str] = []

    async def request(self, op, timeout):
        self.ops.append(op)
        if op == self.fail:
            return False, f"{op} said no", False
        return True, "", False


class Env:
    """A host of fakes around one volume `data` and what the manager did to it."""

    def __init__(self, tmp_path, answer="attached", gate=None):
        self.tmp = tmp_path
        self.prefix = f"fsst{secrets.token_hex(4)}"
        img = tmp_path / "data.img"
        img.write_bytes(b"")
        os.truncate(img, 64 * MiB)
        self.volume = SimpleNamespace(section=SimpleNamespace(name="data", path=str(img), mountpoint=None), size=64 * MiB, worker=FakeVolumeWorker(answer))
        self.gate = gate
        self.changed = 0
        self.recorded: list = []
        self.spawned: list[FakeSnapshotWorker] = []
        self.offloaded: list[str] = []
        self.listeners: list[socket.socket] = []
        self.host = SnapshotHost(
            rundir=str(tmp_path),
            prefix=self.prefix,
            devices=["fss0", "fss1"],
            volumes=lambda: {"data": self.volume},
            find_volume=lambda p: self.volume if p in ("data", str(img)) else None,
            freeze_mounts=lambda: [],
            freeze_max=lambda: 3.0,
            vss=lambda: self.gate,
            listen=self._listen,
            spawn=self._spawn,
            record_made=self.recorded.append,
            changed=self._changed,
            stopping=lambda: False,
            flags=WorkerFlags({}),
            offload=self._offload,
        )
        self.mgr = SnapshotManager(self.host)

    def _listen(self, device):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listeners.append(s)
        return s

    def _spawn(self, kind, key, args):
        w = FakeSnapshotWorker(kind, key, args)
        self.spawned.append(w)
        return w

    def _changed(self):
        self.changed += 1

    async def _offload(self, fn, *args):
        self.offloaded.append(fn.__name__)
        return await asyncio.to_thread(fn, *args)

    def store(self, name="bs0"):
        return os.open(self.tmp / name, os.O_RDWR | os.O_CREAT, 0o600)

    def configure(self, device="fss0", path="data", fds=None, **kw):
        fds = [self.store()] if fds is None else fds
        req = control.Configure(device, path, str(self.tmp / "bs0"), no_suspend=True, **kw)
        return asyncio.run(self.mgr.configure(req, fds, 0)), fds

    def cleanup(self):
        async def drop():
            await self.mgr.unconfigure_all()

        asyncio.run(drop())
        for d in self.host.devices:
            ClusterMap.unlink(names.map_name(self.prefix, d))


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    e.cleanup()


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
        return False
    except OSError as e:
        return e.errno == errno.EBADF


def test_configure_list_unconfigure(env):
    reply, fds = env.configure()
    assert isinstance(reply, control.Configured) and reply.barrier_us == 7
    info = env.mgr.info("fss0")
    assert info.in_use and info.volume == "data" and info.pid == 4242 and info.backup == str(env.tmp / "bs0")
    assert not env.mgr.info("fss1").in_use
    assert env.mgr.devices_of("data") == ["fss0"]
    # The all-clear table heads the store, written off the event loop.
    csize = info.cluster_size
    table = table_clusters(info.cluster_count, csize) * csize
    assert os.fstat(fds[0]).st_size == table
    assert "write_table" in env.offloaded
    attach = env.volume.worker.got[0]
    assert isinstance(attach, workermsg.AttachSnapshot) and attach.device == "fss0"
    assert env.spawned[0].kind == "snapshot" and env.spawned[0].key == "fss0"
    assert env.recorded and env.recorded[0][0].fd == fds[0] and env.changed == 1

    asyncio.run(env.mgr.unconfigure("fss0"))
    assert not env.mgr.info("fss0").in_use
    assert isinstance(env.volume.worker.got[-1], workermsg.DetachSnapshot)
    assert env.spawned[0].stopped and closed(fds[0]) and env.changed == 2
    assert "discard" in env.offloaded


@pytest.mark.parametrize(
    "kw, code",
    [
        (dict(device="fss9"), errno.ENXIO),
        (dict(path="nosuch"), errno.ENOENT),
        (dict(fds=[]), errno.EINVAL),
        (dict(cluster=128 * MiB), errno.EINVAL),
        (dict(size=4096), errno.ENOSPC),
    ],
)
def test_configure_refusals_close_the_descriptor_and_change_nothing(env, kw, code):
    fd = env.store()
    fds = kw.pop("fds", [fd])
    with pytest.raises(ControlError) as e:
        env.configure(fds=fds, **kw)
    assert e.value.errno == code
    assert closed(fd) or fds == []
    if fds == []:
        os.close(fd)
    assert all(not env.mgr.info(d).in_use for d in env.host.devices) and env.changed == 0


def test_busy_device_and_stopped_volume_worker(env):
    env.configure()
    with pytest.raises(ControlError) as e:
        env.configure(fds=[env.store("bs1")])
    assert e.value.errno == errno.EBUSY
    env.volume.worker.alive = False
    with pytest.raises(ControlError) as e:
        env.configure(device="fss1", fds=[env.store("bs2")])
    assert e.value.errno == errno.EAGAIN


def test_refused_barrier_leaves_nothing_behind(tmp_path):
    env = Env(tmp_path, answer="refused")
    try:
        fd = env.store()
        with pytest.raises(ControlError) as e:
            env.configure(fds=[fd])
        assert e.value.errno == errno.ENOSPC and "no room for the barrier" in str(e.value)
        assert not env.mgr.info("fss0").in_use and closed(fd) and env.spawned == []
        with pytest.raises(Exception):
            ClusterMap.attach(names.map_name(env.prefix, "fss0"))
    finally:
        env.cleanup()


def test_unconfigure_unknown_device(env):
    with pytest.raises(ControlError) as e:
        asyncio.run(env.mgr.unconfigure("fss1"))
    assert e.value.errno == errno.ENXIO
    with pytest.raises(ControlError) as e:
        asyncio.run(env.mgr.unconfigure("fss7"))
    assert e.value.errno == errno.ENXIO


def test_consistent_without_broker_is_refused(env):
    with pytest.raises(ControlError) as e:
        env.configure(consistent=True)
    assert e.value.errno == errno.EOPNOTSUPP and "VSS broker" in str(e.value)


def test_consistent_asks_check_freeze_then_thaw_after_the_barrier(env):
    env.gate = FakeGate()
    reply, _ = env.configure(consistent=True)
    assert env.gate.ops == ["check", "freeze", "thaw"]
    assert reply.freeze_window_ms is not None and env.mgr.info("fss0").consistency == "application"


def test_consistent_check_failure_freezes_nothing(env):
    env.gate = FakeGate(fail="check")
    with pytest.raises(ControlError) as e:
        env.configure(consistent=True)
    assert e.value.errno == errno.EAGAIN and "CHECK failed: check said no" in str(e.value)
    assert env.gate.ops == ["check"]
    assert not any(isinstance(m, workermsg.AttachSnapshot) for m in env.volume.worker.got)


def test_lost_and_gave_up_make_the_snapshot_invalid(env):
    env.configure()
    env.mgr.lost("fss0", "backing store full")
    info = env.mgr.info("fss0")
    assert info.state == "invalid" and info.error == "backing store full" and env.changed == 2
    env.mgr.lost("fss1", "not configured: ignored")
    assert env.changed == 2


def test_a_worker_that_could_not_flag_its_store_is_answered_only_once_the_record_is_on_disk(env, tmp_path):
    """record_lost: the volume worker's failure path waits on this answer before it writes
    the volume uncopied, so the reason must be in the state directory when it returns."""
    from test_recovery import _rec

    from daemon.statedir import StateDir

    state = StateDir(str(tmp_path / "state"))
    state.open()
    env.host.state = state
    rec = _rec()
    state.save(rec)
    errors = []
    fake_map = SimpleNamespace(error="", set_error=lambda why: (errors.append(why), setattr(fake_map, "error", why))[0] is None)
    env.mgr.snaps["fss0"] = SimpleNamespace(device="fss0", map=fake_map, record=rec)
    assert asyncio.run(env.mgr.record_lost("fss0", "write error on backing store")) is True
    recs, bad = state.load()
    assert not bad and [r.invalid for r in recs] == ["write error on backing store"]
    assert errors == ["write error on backing store"] and env.changed == 1
    del env.mgr.snaps["fss0"]


# -- change tracking across a volume's processes --------------------------------------------


class FakeProcess(FakeVolumeWorker):
    """One of several processes serving a volume: the two-phase barrier's Hold and Release too."""

    def __init__(self, key, answer):
        super().__init__(answer)
        self.key = key

    async def call(self, msg, fds=(), timeout=30.0):
        if isinstance(msg, workermsg.Hold):
            self.got.append(msg)
            return workermsg.Held(1, 3, msg.req)
        if isinstance(msg, workermsg.Release):
            self.got.append(msg)
            return workermsg.Released(msg.token, 5, False, msg.req)
        return await super().call(msg, fds, timeout)


class FakeTrack:
    """What the manager tells a tracked volume's history, and the maps it hands out."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.calls: list[tuple] = []

    def prepare(self):
        return 2, os.open(self.tmp / "gen-2.map", os.O_RDWR | os.O_CREAT, 0o600)

    def advanced(self, gen, fd, created_ns):
        self.calls.append(("advanced", gen))
        return "ab" * 16 + "-1"

    def unknown(self, gen, fd):
        self.calls.append(("unknown", gen))

    def abandoned(self, gen, fd):
        self.calls.append(("abandoned", gen))
        os.close(fd)

    def persist(self):
        self.calls.append(("persist",))


@pytest.mark.parametrize("answers, history, killed", [
    (("attached", "attached"), [("advanced", 2), ("persist",)], []),  # every process swapped
    (("refused", "refused"), [("abandoned", 2)], []),  # none did: the prepared map goes
    (("attached", "refused"), [("unknown", 2), ("persist",)], ["data [2/2]"]),  # mixed: the refuser restarts
])
def test_the_history_follows_every_process_of_the_volume(tmp_path, answers, history, killed):
    """A volume served by two processes: the next change map rides with each one's attach; the
    history advances only when both swapped, is left for undo when neither did, and otherwise
    moves on without an id while the process that kept the old map is restarted onto the new."""
    e = Env(tmp_path)
    track = FakeTrack(tmp_path)
    procs = [FakeProcess(f"data [{i + 1}/2]", a) for i, a in enumerate(answers)]
    e.volume.workers = procs
    e.host = dataclasses.replace(e.host, tracks=lambda: {"data": track})
    e.mgr = SnapshotManager(e.host)
    try:
        if "refused" in answers:
            with pytest.raises(ControlError):
                e.configure()
        else:
            e.configure()
            assert e.mgr.info("fss0").id == "ab" * 16 + "-1"
        attaches = [m for p in procs for m in p.got if isinstance(m, workermsg.AttachSnapshot)]
        assert len(attaches) == 2 and all(a.track_gen == 2 and a.nfds == 2 for a in attaches)
        assert all(any(isinstance(m, workermsg.Hold) for m in p.got) for p in procs)  # both drained
        for _ in range(50):  # _track_unknown persists in the background
            if track.calls[-1:] == history[-1:]:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert track.calls == history
        assert [p.key for p in procs if p.killed] == killed
    finally:
        e.cleanup()


class RecordWatchingWorker(FakeSnapshotWorker):
    """A snapshot worker whose start lasts until the snapshot's record is on disk (or 5 s):
    it sees the record only if the record is written while the worker starts."""

    record: str = ""
    saw_record = False

    async def start(self, spare=None):
        for _ in range(500):
            if os.path.exists(self.record):
                type(self).saw_record = True
                break
            await asyncio.sleep(0.01)
        await super().start(spare)


def test_the_record_is_written_while_the_worker_starts(env, tmp_path, monkeypatch):
    """The answer waits for both the worker's start and the record (fsynced), which run
    together: a spare's assignment and the state directory's fsyncs overlap."""
    from daemon.statedir import StateDir

    state = StateDir(str(tmp_path / "state"))
    state.open()
    env.host = dataclasses.replace(env.host, state=state, durability=lambda: "power", spawn=lambda k, key, a: RecordWatchingWorker(k, key, a))
    env.mgr = SnapshotManager(env.host)
    RecordWatchingWorker.record = os.path.join(state.snapdir, "fss0.json")
    RecordWatchingWorker.saw_record = False
    reply, _fds = env.configure()
    assert isinstance(reply, control.Configured) and RecordWatchingWorker.saw_record
    recs, bad = state.load()
    assert not bad and [r.device for r in recs] == ["fss0"]

    # A record that can't be written undoes the snapshot, worker included, once the start is over.
    def fail(rec):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state, "save", fail)
    workers = []
    env.host = dataclasses.replace(env.host, spawn=lambda k, key, a: workers.append(FakeSnapshotWorker(k, key, a)) or workers[-1])
    env.mgr.host = env.host
    with pytest.raises(ControlError, match="cannot record the snapshot"):
        env.configure("fss1", fds=[env.store("bs1")])
    assert workers and workers[0].stopped and not env.mgr.info("fss1").in_use


def test_the_next_change_map_is_made_while_the_table_is_laid_out(tmp_path, monkeypatch):
    """Both are fsyncs (the store, the state directory) before the barrier: they overlap. A
    table that can't be written leaves no prepared map behind (abandoned)."""
    import threading

    started = threading.Event()
    overlapped = []

    class SlowTrack(FakeTrack):
        def prepare(self):
            started.set()
            return super().prepare()

    real_write_table = snapshots.write_table

    def write_table(store, header):
        overlapped.append(started.wait(5))  # the map is being made while the table is written
        real_write_table(store, header)

    monkeypatch.setattr(snapshots, "write_table", write_table)
    e = Env(tmp_path)
    track = SlowTrack(tmp_path)
    e.host = dataclasses.replace(e.host, tracks=lambda: {"data": track})
    e.mgr = SnapshotManager(e.host)
    try:
        e.configure()
        assert overlapped == [True] and track.calls == [("advanced", 2), ("persist",)]
        assert e.mgr.info("fss0").id == "ab" * 16 + "-1"

        def failing(store, header):
            started.wait(5)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(snapshots, "write_table", failing)
        track.calls.clear()
        with pytest.raises(ControlError, match="backing store not writable"):
            e.configure("fss1", fds=[e.store("bs1")])
        assert track.calls == [("abandoned", 2)] and not e.mgr.info("fss1").in_use
    finally:
        e.cleanup()
