"""Changed-block tracking (issue 12): what `fssconfig --changes` reports against full reads.

A real fssd; writes, trims and write-zeroes by qemu-io (NBD_CMD_WRITE, NBD_CMD_TRIM with
`discard`, NBD_CMD_WRITE_ZEROES with `write -z`), several connections at once and racing
the barrier; full reads by nbdcopy; incremental backups read through nbdfuse. Then restarts,
SIGKILLs and a simulated host crash between snapshots: an incremental is still exact, or its
base is refused with the reason. Never a wrong incremental.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import msgspec
import pytest

from daemon import tracking
from daemon.statedir import FileIdentity, VolumeStamp
from fsshelp import Fssd, Mounts, run, running, sha256_file, wait_for
from ipc import trackmap

G = trackmap.GRANULE
SIZE = 32 << 20
BOOT0 = "00000000-0000-0000-0000-000000000000"


# -- ipc/trackmap.py and the restart rules: pure ----------------------------------------------


def test_trackmap_union_and_extents():
    a = bytes([1, 0, 0, 1, 0])
    b = bytes([0, 0, 1, 1, 0])
    u = trackmap.union([a, b])
    assert u == bytes([1, 0, 1, 1, 0])
    size = 4 * G + 100  # the last granule partial
    assert trackmap.changed_ranges(u, size) == [(0, G), (2 * G, 2 * G)]
    assert trackmap.changed_ranges(bytes([0, 0, 0, 0, 1]), size) == [(4 * G, 100)]
    assert trackmap.extents(u, G // 2, 2 * G, size) == [(G // 2, True), (G, False), (G // 2, True)]
    with pytest.raises(ValueError):
        trackmap.union([a, b[:-1]])
    with pytest.raises(ValueError):
        trackmap.union([])
    assert trackmap.map_len(0) == 1 and trackmap.map_len(G) == 1 and trackmap.map_len(G + 1) == 2


def test_trackmap_ids():
    lin = "0123456789abcdef0123456789abcdef"
    assert trackmap.parse_id(trackmap.format_id(lin, 7)) == (lin, 7)
    for bad in ["", "x", lin, lin + "-0", lin + "-01", lin.upper() + "-1", lin + "-1 ", lin[:-1] + "-1", lin + "-12345678901"]:
        assert trackmap.parse_id(bad) is None, bad
    assert " " not in trackmap.format_id(lin, 1)


def _lineage(**kw) -> tracking.Lineage:
    base = dict(uuid="a" * 32, granule=G, volume_size=SIZE, volume_id=FileIdentity(1, 2, "file"), durability="power", boot_id="b1")
    return tracking.Lineage(**{**base, **kw})


def test_restart_rules():
    ident = FileIdentity(1, 2, "file")
    stamp = VolumeStamp(SIZE, 5, 6)
    r = tracking.restart_reason
    assert r(_lineage(), SIZE, ident, stamp, "b2") == ""  # power: any crash
    assert r(_lineage(durability="process"), SIZE, ident, stamp, "b1") == ""  # process crash, same boot
    assert "host restarted without a clean stop" in r(_lineage(durability="process"), SIZE, ident, stamp, "b2")
    assert r(_lineage(durability="process", clean=True, volume_at_stop=stamp), SIZE, ident, stamp, "b2") == ""
    assert "did not stop cleanly" in r(_lineage(durability="none"), SIZE, ident, stamp, "b1")
    assert r(_lineage(durability="none", clean=True, volume_at_stop=stamp), SIZE, ident, stamp, "b1") == ""
    assert r(_lineage(clean=True, volume_at_stop=VolumeStamp(SIZE, 5, 7)), SIZE, ident, stamp, "b1") == \
        "the volume was modified while fssd was not running"
    assert "replaced" in r(_lineage(), SIZE, FileIdentity(1, 3, "file"), stamp, "b1")
    assert "changed size" in r(_lineage(), SIZE * 2, ident, stamp, "b1")


def test_volume_track_generations_retention_and_refusals(tmp_path):
    vol = tmp_path / "vol.img"
    vol.write_bytes(b"")
    os.truncate(vol, SIZE)
    (tmp_path / "state").mkdir(mode=0o700)
    tr = tracking.open_track(str(tmp_path / "state"), "v", str(vol), SIZE, "power", "b1", keep=3)
    try:
        lin = tr.state.uuid
        assert tr.state.current == 1 and tr.cur_fd >= 0
        ids = []
        for _ in range(5):  # five snapshots: generations 1..5 handed out, current 6
            gen, fd = tr.prepare()
            ids.append(tr.advanced(gen, fd, 0))
            tr.persist()
        assert ids == [trackmap.format_id(lin, g) for g in range(1, 6)]
        assert sorted(os.listdir(tr.path)) == ["gen-4.map", "gen-5.map", "gen-6.map", "lineage.json"]
        assert tr.bases(lin, 5) == [3, 4]
        assert tr.check_base(ids[3], lin, 5, lambda _l: "") == (4, 5)
        with pytest.raises(tracking.TrackError, match="older than the change history kept"):
            tr.check_base(ids[1], lin, 5, lambda _l: "")
        with pytest.raises(tracking.TrackError, match="not earlier"):
            tr.check_base(ids[4], lin, 5, lambda _l: "")
        with pytest.raises(tracking.TrackError, match="not a snapshot id"):
            tr.check_base("fss0", lin, 5, lambda _l: "")
        with pytest.raises(tracking.TrackError, match="of volume w, not of v"):
            tr.check_base("b" * 32 + "-1", lin, 5, lambda _l: "w")
        assert tr.changed(4, 5) == []
        with open(os.path.join(tr.path, "gen-5.map"), "r+b") as fh:  # damaged: refused, never "unchanged"
            fh.truncate(10)
        with pytest.raises(tracking.TrackError, match="generation 5 is damaged"):
            tr.changed(4, 5)
        # A refused barrier leaves nothing behind; an unknown one moves on past its generation.
        gen, fd = tr.prepare()
        tr.abandoned(gen, fd)
        assert not os.path.exists(os.path.join(tr.path, trackmap.map_name(gen)))
        gen, fd = tr.prepare()
        tr.unknown(gen, fd)
        tr.persist()
        assert tr.state.current == 7
        # A mark that could not be made durable: every base from before is refused, saying why.
        tr.retire_now("could not record a change")
        with pytest.raises(tracking.TrackError, match="discarded on .*could not record a change; the next backup must be full"):
            tr.check_base(ids[3], tr.state.uuid, 8, lambda _l: "")
        tr.persist()
    finally:
        tr.close()
    # A restart after an unclean stop under "power" keeps the history; a changed size does not.
    tr = tracking.open_track(str(tmp_path / "state"), "v", str(vol), SIZE, "power", "b2", keep=3)
    uuid_kept = tr.state.uuid
    tr.close()
    tr = tracking.open_track(str(tmp_path / "state"), "v", str(vol), SIZE + G, "power", "b2", keep=3)
    try:
        assert tr.state.uuid != uuid_kept
        assert "changed size" in tr.state.retired[-1].reason
    finally:
        tr.close()


@pytest.mark.parametrize("sync", [False, True])
def test_change_map_marks_whole_granules_and_never_fails_the_write(tmp_path, sync):
    from workers.changemap import ChangeMap
    from workers.cow import CopyOnWrite

    size = 10 * G + 512
    path = tmp_path / "gen-1.map"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, trackmap.file_len(size))
    cm = ChangeMap(fd, 1, size, sync, fresh=True)
    vfd = os.open(tmp_path / "vol", os.O_RDWR | os.O_CREAT, 0o600)
    cow = CopyOnWrite(vfd, size)
    cow.track = cm
    for off, n in [(G - 1, 2), (5 * G, G), (10 * G + 100, 1), (3 * G, 0)]:
        with cow.writing(off, n):
            pass
    n = trackmap.map_len(size)
    assert path.read_bytes()[:n] == bytes([1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1])
    # "power": the one coarse region (16 MiB) marked and synced once; "process": never touched.
    assert path.read_bytes()[n:] == (b"\x01\x00" if sync else b"\x00\x00")
    assert bytes(cm.seen) == path.read_bytes()[:n]  # under "power" set only after the sync
    if sync:
        assert cm.group.syncs == 1 and bytes(cm.cseen) == b"\x01"
    cm.close()
    # A map that takes no write: the live write goes on, the failure is reported once.
    ro = os.open(path, os.O_RDONLY)
    bad = ChangeMap(ro, 2, size, sync, fresh=True)
    told = []
    bad.on_failure = told.append
    cow.track = bad
    for off in (7 * G, 8 * G):
        with cow.writing(off, 4096):
            pass
    assert len(told) == 1 and "could not record a change in the map of generation 2" in told[0]
    bad.close()
    os.close(vfd)
    if sync:  # a restarted worker trusts only synced marks: it syncs what a predecessor left
        from tests.crashstates import Recorder

        fd = os.open(path, os.O_RDWR)
        with Recorder({fd: "map"}) as rec:
            again = ChangeMap(fd, 1, size, True)
        assert [e.kind for e in rec.events] == ["sync"] and bytes(again.seen) == path.read_bytes()[:n]
        assert bytes(again.cseen) == b"\x01"  # the coarse region too: no new sync for it
        again.close()


@pytest.mark.parametrize("text, error", [
    ("[daemon]\ntrack_generations = 1\n", "track_generations must be between 2 and 100000 - at `$.daemon`"),
    ("[daemon]\ntrack_generations = \"64\"\n", "Expected `int`, got `str` - at `$.daemon.track_generations`"),
    ('[[volume]]\nname = "v"\npath = "/dev/null"\ntrack = "yes"\n', "Expected `bool`, got `str` - at `$.volume[0].track`"),
])
def test_config_keys_are_checked(tmp_path, text, error):
    from daemon import config

    p = tmp_path / "fssd.toml"
    p.write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.load(str(p))
    assert str(e.value) == f"{p}: {error}"


def test_config_defaults():
    from daemon import config

    assert config.DaemonSection().track_generations == tracking.DEFAULT_GENERATIONS == 64
    assert config.VolumeSection("v", "/v").track is True


def test_trackmap_coarse_expansion():
    per = trackmap.COARSE // G
    size = 2 * trackmap.COARSE + 3 * G  # 3 coarse regions, the last one 3 granules
    n = trackmap.map_len(size)
    assert trackmap.coarse_len(size) == 3 and trackmap.file_len(size) == n + 4 and trackmap.seal_offset(size) == n + 3
    raw = bytearray(trackmap.file_len(size))
    raw[5] = 1  # an exact mark whose coarse mark is there too
    raw[per + 7] = 1  # one whose coarse mark is not (a process crash: it was never lost)
    raw[n] = raw[n + 2] = 1
    wide = trackmap.expand(bytes(raw), size)
    assert len(wide) == n
    assert {g for g, b in enumerate(wide) if b} == set(range(per)) | {per + 7} | set(range(2 * per, n))
    assert not trackmap.sealed(bytes(raw), size)
    raw[n + 3] = trackmap.SEALED
    assert trackmap.sealed(bytes(raw), size) and not trackmap.sealed(bytes(raw[:-1]), size)


@pytest.mark.parametrize("stop", ["host crash", "process crash", "clean"])
def test_unsealed_maps_are_expanded_only_after_a_host_crash(tmp_path, stop):
    """At start: after a host crash under "power", every unsealed map's coarse marks are
    expanded (then it is sealed, but for the current map); after a process crash (same boot)
    or a clean stop the exact marks stand."""
    per = trackmap.COARSE // G
    size = 3 * trackmap.COARSE
    vol = tmp_path / "vol.img"
    vol.write_bytes(bytes(size))
    (tmp_path / "state").mkdir(mode=0o700)
    tr = tracking.open_track(str(tmp_path / "state"), "v", str(vol), size, "power", "b1")
    n = trackmap.map_len(size)
    assert os.fstat(tr.cur_fd).st_size == trackmap.file_len(size)
    base = tr.advanced(*tr.prepare(), 0)  # generation 1 handed out; 2 collects writes
    os.pwrite(tr.cur_fd, b"\x01", per + 3)
    os.pwrite(tr.cur_fd, b"\x01", n + 1)  # its coarse region
    gen, fd = tr.prepare()
    snap = tr.advanced(gen, fd, 0)  # 2 handed out, swapped out but never sealed; 3 current
    os.pwrite(tr.cur_fd, b"\x01", 2 * per)
    os.pwrite(tr.cur_fd, b"\x01", n + 2)
    tr.persist()
    if stop == "clean":
        tr.stop_clean(str(vol))
    tr.close()
    tr = tracking.open_track(str(tmp_path / "state"), "v", str(vol), size, "power", "b2" if stop == "host crash" else "b1")
    try:
        lin = tr.state.uuid
        got = _granules(tr.changed(*tr.check_base(base, lin, 2, lambda _l: "")))
        cur = os.pread(tr.cur_fd, trackmap.file_len(size), 0)
        if stop == "host crash":
            assert got == set(range(per, 2 * per))
            assert {g for g, b in enumerate(cur[:n]) if b} == set(range(2 * per, 3 * per))
        else:
            assert got == {per + 3}
            assert {g for g, b in enumerate(cur[:n]) if b} == {2 * per}
        assert not trackmap.sealed(cur, size)  # still to be written
        with open(os.path.join(tr.path, trackmap.map_name(2)), "rb") as fh:
            assert trackmap.sealed(fh.read(), size)
        assert trackmap.parse_id(snap)[1] == 2
    finally:
        tr.close()


def test_a_barrier_never_recorded_is_covered_at_the_next_start(tmp_path):
    """The supervisor died between a barrier and writing lineage.json: writes after that
    barrier are in the map it prepared, above the recorded current generation. The next
    start continues after it, so a later snapshot's union includes it."""
    vol = tmp_path / "vol.img"
    vol.write_bytes(bytes(SIZE))
    (tmp_path / "state").mkdir(mode=0o700)
    tr = tracking.open_track(str(tmp_path / "state"), "v", str(vol), SIZE, "power", "b1")
    gen, fd = tr.prepare()
    first = tr.advanced(gen, fd, 0)
    tr.persist()  # snapshot 1 recorded; current 2
    gen, fd = tr.prepare()  # snapshot 2's barrier happens, the worker marks gen 3 ...
    os.pwrite(fd, b"\x01", 7)
    tr.close()  # ... and the supervisor is killed before advanced()/persist()
    os.close(fd)
    tr = tracking.open_track(str(tmp_path / "state"), "v", str(vol), SIZE, "power", "b1")
    try:
        assert tr.state.current == 3 and [h.gen for h in tr.state.handed] == [1]
        gen, fd = tr.prepare()
        later = tr.advanced(gen, fd, 0)
        assert trackmap.parse_id(later)[1] == 3
        lin = tr.state.uuid
        m, n = tr.check_base(first, lin, 3, lambda _l: "")
        assert tr.changed(m, n) == [(7 * G, G)]  # the write after the unrecorded barrier is there
    finally:
        tr.close()


def test_changes_come_in_pages_and_fssconfig_joins_them(tmp_path, monkeypatch, capsys):
    """A reply holds at most CHANGES_PAGE extents (a frame is at most 1 MiB); fssconfig asks
    again from where the last page ended until it has them all."""
    import asyncio
    from types import SimpleNamespace

    from daemon.cli import fssquery
    from daemon.snapshots import SnapshotManager
    from ipc import control

    monkeypatch.setattr(control, "CHANGES_PAGE", 2)
    vol = tmp_path / "vol.img"
    vol.write_bytes(bytes(SIZE))
    (tmp_path / "state").mkdir(mode=0o700)
    tr = tracking.open_track(str(tmp_path / "state"), "v", str(vol), SIZE, "power", "b1")
    try:
        base = tr.advanced(*tr.prepare(), 0)
        marks = [1, 3, 5, 7, 9]  # five separate extents
        for g in marks:
            os.pwrite(tr.cur_fd, b"\x01", g)
        snap_id = tr.advanced(*tr.prepare(), 0)

        async def offload(fn, *a):
            return fn(*a)

        host = SimpleNamespace(tracks=lambda: {"v": tr}, offload=offload)
        mgr = SnapshotManager(host)
        mgr.snaps["fss1"] = SimpleNamespace(volume="v", id=snap_id, map=SimpleNamespace(valid=True, error=""))
        first = asyncio.run(mgr.changes(control.Changes("fss1", base)))
        assert first.extents == [(G, G), (3 * G, G)] and first.more and first.total == 5

        class Client:
            def request(self, req):
                return asyncio.run(mgr.changes(req))

        assert fssquery.changes(Client(), "fss1", base, True) == 0
        got = json.loads(capsys.readouterr().out)
        assert got == [{"offset": g * G, "length": G} for g in marks]
    finally:
        tr.close()


# -- against a real fssd ---------------------------------------------------------------------


@pytest.fixture
def shm():
    d = Path(tempfile.mkdtemp(prefix="fssd-track-", dir="/dev/shm"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _fssd(d: Path, extra: str = "", volumes: list[dict] | None = None) -> Fssd:
    vols = volumes or [{"name": "data", "path": str(d / "data.img"), "size": SIZE}]
    return Fssd(d, vols, devices=8, extra=extra)


def _snap(f: Fssd, dev: str, volume: str = "data") -> str:
    f.fssconfig("--no-suspend", dev, volume, str(f.tmp / f"{dev}.store"))
    return _id(f, dev)


def _id(f: Fssd, dev: str) -> str:
    return json.loads(f.fssconfig("-l", "--json", dev).stdout)[0]["id"]


def _changes(f: Fssd, dev: str, since: str) -> list[tuple[int, int]]:
    got = json.loads(f.fssconfig("--changes", dev, "--since", since, "--json").stdout)
    return [(e["offset"], e["length"]) for e in got]


def _granules(extents) -> set[int]:
    out: set[int] = set()
    for off, n in extents:
        out.update(range(off // G, (off + n - 1) // G + 1))
    return out


def _read(f: Fssd, dev: str) -> bytes:
    out = f.tmp / f"{dev}.full"
    run("nbdcopy", f.uri(dev), out)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def _differ(a: bytes, b: bytes) -> set[int]:
    return {g for g in range(-(-len(a) // G)) if a[g * G : (g + 1) * G] != b[g * G : (g + 1) * G]}


def _ops(rng: random.Random, n: int, size: int = SIZE) -> list[tuple[str, int, int]]:
    """Random writes, trims and write-zeroes, 4 KiB aligned (the unit qemu's block layer
    sends trims in), from 4 KiB to 3 granules long, some crossing granule boundaries."""
    out = []
    for _ in range(n):
        kind = rng.choice(["write", "write", "write", "trim", "zero"])
        length = rng.randrange(1, 48) * 4096
        off = rng.randrange(0, (size - length) // 4096) * 4096
        out.append((kind, off, length))
    return out


def _qemu_io_args(ops, seed: int) -> list[str]:
    args = []
    for i, (kind, off, n) in enumerate(ops):
        if kind == "write":
            args += ["-c", f"write -P {(seed * 31 + i) % 250 + 1} {off} {n}"]
        elif kind == "trim":
            args += ["-c", f"discard {off} {n}"]
        else:
            args += ["-c", f"write -z {off} {n}"]
    return args


def _written(ops) -> set[int]:
    return _granules([(off, n) for _k, off, n in ops])


def _qemu_io(f: Fssd, ops, seed: int, volume: str = "data") -> subprocess.Popen:
    return subprocess.Popen(["qemu-io", "-f", "raw", *_qemu_io_args(ops, seed), f.uri(volume)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(procs) -> None:
    for p in procs:
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "error" not in err.lower(), err


def _fill(f: Fssd, seed: int) -> None:
    src = f.tmp / "fill"
    rng = random.Random(seed)
    src.write_bytes(rng.randbytes(SIZE))
    run("nbdcopy", src, f.uri("data"))
    src.unlink()


@pytest.mark.parametrize("processes", [1, 2])
def test_reported_set_is_every_write_trim_and_zero_over_several_connections(shm, processes):
    """Also with the volume served by two processes: each marks the map its barrier swapped in."""
    rng = random.Random(12)
    f = _fssd(shm, extra=f"volume_processes = {processes}")
    with running(f):
        assert sum(w["kind"] == "volume" and w["alive"] for w in f.status()["workers"]) == processes
        _fill(f, 1)
        m = _snap(f, "fss0")
        batches = [_ops(rng, 60) for _ in range(3)]
        _finish([_qemu_io(f, ops, i) for i, ops in enumerate(batches)])  # three connections at once
        n = _snap(f, "fss1")
        reported = _granules(_changes(f, "fss1", m))
        written = set().union(*(_written(ops) for ops in batches))
        diff = _differ(_read(f, "fss0"), _read(f, "fss1"))
        assert diff, "the writes changed nothing?"
        assert diff <= reported, f"granules changed but not reported: {sorted(diff - reported)[:10]}"
        assert reported == written, f"missing {sorted(written - reported)[:10]}, extra {sorted(reported - written)[:10]}"
        # Text output: the same extents, one "offset length" per line; a summary on stderr.
        p = f.fssconfig("--changes", "fss1", "--since", m)
        assert [tuple(map(int, line.split())) for line in p.stdout.splitlines()] == _changes(f, "fss1", m)
        assert f"changed between {m} and {n}" in p.stderr
        assert n == trackmap.format_id(trackmap.parse_id(m)[0], trackmap.parse_id(m)[1] + 1)


def test_writes_racing_the_barrier_land_on_one_side(shm):
    rng = random.Random(7)
    f = _fssd(shm)
    with running(f):
        a = _snap(f, "fss0")
        batches = [_ops(rng, 150) for _ in range(3)]
        # Each writer's first write is a marker: the snapshot is taken once one of them is writing.
        for i, ops in enumerate(batches):
            ops.insert(0, ("write", i * 4 * G, 4096))
        procs = [_qemu_io(f, ops, i) for i, ops in enumerate(batches)]
        img = shm / "data.img"

        def writing():  # (or one already finished: the checks below hold whatever the timing)
            with open(img, "rb") as fh:
                started = any(os.pread(fh.fileno(), 1, i * 4 * G) not in (b"\0", b"") for i in range(3))
            return started or any(p.poll() is not None for p in procs)

        wait_for(writing, 30, "a writer to start")
        b = _snap(f, "fss1")
        _finish(procs)
        c = _snap(f, "fss2")
        written = set().union(*(_written(ops) for ops in batches))
        ab, bc, ac = (_granules(_changes(f, dev, base)) for dev, base in (("fss1", a), ("fss2", b), ("fss2", a)))
        ra, rb, rc = _read(f, "fss0"), _read(f, "fss1"), _read(f, "fss2")
        assert _differ(ra, rb) <= ab and _differ(rb, rc) <= bc and _differ(ra, rc) <= ac
        assert ab | bc == ac == written
        assert ab <= written and bc <= written


def _apply(backup: Path, src: Path, extents) -> int:
    """The incremental: each extent read from the snapshot (through nbdfuse) onto the backup."""
    moved = 0
    with open(src, "rb") as s, open(backup, "r+b") as b:
        for off, n in extents:
            data = os.pread(s.fileno(), n, off)
            assert len(data) == n
            os.pwrite(b.fileno(), data, off)
            moved += n
    return moved


def _incremental(f: Fssd, mounts: Mounts, backup: Path, dev: str, base: str) -> list[tuple[int, int]]:
    src = mounts.nbdfuse(f.uri(dev), f.tmp / f"fuse-{dev}", readonly=True)
    extents = _changes(f, dev, base)
    _apply(backup, src, extents)
    mounts.cleanup()
    return extents


def test_incremental_chain_survives_restarts_and_kills(shm):
    """One full nbdcopy, then four incrementals from the reported extents alone; between the
    snapshots: a clean restart, a SIGKILL of the volume worker under writes, a SIGKILL of the
    supervisor under writes. Each backup is bit-identical to its snapshot; bases are
    unconfigured on the way (and answered long after)."""
    rng = random.Random(5)
    f = _fssd(shm)
    mounts = Mounts()
    backup = shm / "backup.img"
    try:
        f.start()
        _fill(f, 2)
        ids = [_snap(f, "fss0")]
        run("nbdcopy", f.uri("fss0"), backup)
        steps: set[int] = set()
        moved = 0
        for k, event in enumerate(["none", "restart", "kill volume", "kill supervisor"], start=1):
            procs = [_qemu_io(f, _ops(rng, 40), 10 * k + i) for i in range(2)]
            if event.startswith("kill"):
                pid = f.worker_pid("volume", "data") if event == "kill volume" else f.proc.pid
                os.kill(pid, signal.SIGKILL)  # under the writes: some of them fail, that's the point
                for p in procs:
                    p.communicate(timeout=120)
                if event == "kill volume":
                    wait_for(lambda: f.alive_pid("volume", "data") not in (None, pid), 30, "the volume worker's restart")
                else:
                    f.proc.wait(30)
                    f.stop()
                    f.start()  # waits for the killed one's workers to be gone
            else:
                _finish(procs)
                if event == "restart":
                    assert f.stop() == 0
                    f.start()
            assert _id(f, f"fss{k - 1}") == ids[-1], "a snapshot's id changed across a restart"
            ids.append(_snap(f, f"fss{k}"))
            extents = _incremental(f, mounts, backup, f"fss{k}", ids[-2])
            moved += sum(n for _o, n in extents)
            steps |= _granules(extents)
            assert sha256_file(backup) == _sha(f, f"fss{k}"), f"incremental {k} ({event}) differs from its snapshot"
            f.fssconfig("-u", f"fss{k - 1}")  # the base goes; its id stays answerable
        assert 0 < moved < 4 * SIZE
        # A base unconfigured long ago, across all of it: the union of the steps.
        assert _granules(_changes(f, "fss4", ids[0])) == steps
    finally:
        mounts.cleanup()
        try:
            f.stop()
        finally:
            f.kill_everything()


def _sha(f: Fssd, dev: str) -> str:
    out = f.tmp / f"{dev}.sha"
    run("nbdcopy", f.uri(dev), out)
    try:
        return sha256_file(out)
    finally:
        out.unlink()


def _edit_lineage(f: Fssd, volume: str, **changes) -> None:
    p = f.tmp / "state" / "track" / volume / "lineage.json"
    d = json.loads(p.read_bytes())
    d.update(changes)
    p.write_text(json.dumps(d))


def test_process_host_crash_and_offline_write_retire_the_history(shm):
    f = _fssd(shm, extra='durability = "process"')
    with running(f):
        m = _snap(f, "fss0")
        _finish([_qemu_io(f, _ops(random.Random(3), 20), 1)])
        assert f.stop() == 0
        # A host crash: the run was in another boot and never stopped cleanly.
        _edit_lineage(f, "data", clean=False, boot_id=BOOT0)
        f.start()
        n = _snap(f, "fss1")
        assert trackmap.parse_id(n)[0] != trackmap.parse_id(m)[0], "a new history after the crash"
        p = f.fssconfig("--changes", "fss1", "--since", m, check=False)
        assert p.returncode == 1
        assert 'host restarted without a clean stop under durability = "process"' in p.stderr
        assert "the next backup must be full" in p.stderr and len(p.stderr.strip().splitlines()) == 1
        # A clean stop, then the volume image written while fssd is not running.
        assert f.stop() == 0
        with open(shm / "data.img", "r+b") as fh:
            os.pwrite(fh.fileno(), b"offline", 4096)
        f.start()
        _snap(f, "fss2")
        p = f.fssconfig("--changes", "fss2", "--since", n, check=False)
        assert p.returncode == 1 and "the volume was modified while fssd was not running" in p.stderr
        # A clean stop and nothing else: the history goes on.
        o = _snap(f, "fss3")
        assert f.stop() == 0
        f.start()
        q = _snap(f, "fss4")
        assert _changes(f, "fss4", o) == []


@pytest.mark.parametrize("crash", ["process", "host"])
def test_power_supervisor_killed_reports_every_write_within_its_coarse_regions(shm, crash):
    """Under "power", writes, then SIGKILL of the supervisor. Restarted in the same boot (a
    process crash: the page cache kept every exact mark) the report is exact; as after a host
    crash (the recorded boot id differs) the open generation is expanded: every granule of
    each 16 MiB region written, nothing outside those regions."""
    per = trackmap.COARSE // G
    f = _fssd(shm)
    try:
        f.start()
        m = _snap(f, "fss0")
        gen1 = shm / "state" / "track" / "data" / trackmap.map_name(1)
        # The map the barrier swapped out is synced and sealed by the volume worker, off the write path.
        wait_for(lambda: trackmap.sealed(gen1.read_bytes(), SIZE), 30, "generation 1's map to be sealed")
        ops = _ops(random.Random(21), 30, size=12 << 20)  # inside region 0 of 2
        _finish([_qemu_io(f, ops, 3)])
        os.kill(f.proc.pid, signal.SIGKILL)
        f.proc.wait(30)
        f.stop()
        if crash == "host":
            _edit_lineage(f, "data", boot_id=BOOT0)
        f.start()
        _snap(f, "fss1")
        reported = _granules(_changes(f, "fss1", m))
        written = _written(ops)
        regions = {g // per for g in written}
        assert written <= reported
        if crash == "host":
            assert reported == {g for r in regions for g in range(r * per, (r + 1) * per)}
            assert reported != written
            assert "generation 2 was open at a host crash" in f.log.read_text()
        else:
            assert reported == written
    finally:
        try:
            f.stop()
        finally:
            f.kill_everything()


def test_untracked_volume_and_bad_since(shm):
    vols = [{"name": "data", "path": str(shm / "data.img"), "size": SIZE},
            {"name": "other", "path": str(shm / "other.img"), "size": 1 << 20},
            {"name": "plain", "path": str(shm / "plain.img"), "size": 1 << 20, "track": False}]
    f = _fssd(shm, extra="track_generations = 3", volumes=vols)
    with running(f):
        ids = [_snap(f, f"fss{i}") for i in range(4)]  # data: generations 1..4
        other = _snap(f, "fss4", "other")
        plain = _snap(f, "fss5", "plain")
        assert len(plain) == 32 and trackmap.parse_id(plain) is None  # the store's uuid
        assert "id " + ids[0] in f.fssconfig("-l", "-v", "fss0").stdout

        def refused(dev, since, text):
            p = f.fssconfig("--changes", dev, "--since", since, check=False)
            assert p.returncode == 1 and text in p.stderr, p.stderr
            assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr

        refused("fss3", "nonsense", "is not a snapshot id")
        refused("fss3", "", "is not a snapshot id")
        refused("fss3", ids[3], "is not earlier than the snapshot")
        refused("fss1", ids[2], "is not earlier than the snapshot")
        refused("fss3", other, "is a snapshot of volume other, not of data")
        refused("fss3", ids[0], "older than the change history kept ([daemon] track_generations = 3)")
        refused("fss3", plain, "untracked volume")
        refused("fss5", ids[0], "volume plain is not tracked ([[volume]] track = false)")
        refused("fss7", ids[0], "fss7: Device not configured")
        assert _changes(f, "fss3", ids[1]) == []  # nothing written: nothing reported
        p = f.fssconfig("--changes", "fss3", check=False)
        assert p.returncode == 1 and "--changes and --since go together" in p.stderr


# -- power loss under "power": a written granule is never unmarked -------------------------------


def _power_rig(tmp_path, skip_sync: frozenset[str]):
    """The real write path (VolumeBackend + ChangeMap, group commit) over recorded files."""
    from tests.crashstates import Recorder
    from workers.changemap import ChangeMap
    from workers.volume import VolumeBackend

    vsize = trackmap.COARSE + 64 * G + 1536  # 2 coarse regions, the second one 4 MiB + 1536 bytes
    rng = random.Random(4)
    vol = tmp_path / "vol"
    vol.write_bytes(rng.randbytes(vsize))
    vfd = os.open(vol, os.O_RDWR)
    mfd = os.open(tmp_path / "gen-2.map", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(mfd, trackmap.file_len(vsize))
    backend = VolumeBackend(vfd, vsize)
    backend.cow.track = ChangeMap(mfd, 2, vsize, sync=True, fresh=True)
    base = {"vol": vol.read_bytes(), "map": bytes(trackmap.file_len(vsize))}

    def writer(n):
        r = random.Random(100 + n)
        for j in range(40):
            off = r.randrange(0, vsize - 512) // 512 * 512
            length = min(r.choice([512, 4096, 70000, 140000]), vsize - off)
            backend.write(off, memoryview(r.randbytes(length)), fua=False)
            if j % 9 == 8:
                backend.flush()

    import threading

    with Recorder({vfd: "vol", mfd: "map"}, skip_sync=skip_sync) as rec:
        ts = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
    syncs = backend.cow.track.group.syncs
    backend.cow.track.close()
    os.close(vfd)
    return rec.events, base, syncs


def _unmarked_states(events, base, n_cuts=80, subsets=2) -> tuple[int, int]:
    """(crash states, states where a granule differs from before the storm but is not marked
    once recovery expanded the coarse marks, as daemon/tracking.py does after a host crash)."""
    from tests.crashstates import crash_state, cuts

    rng = random.Random(9)
    states = wrong = 0
    for cut in cuts(events, n_cuts, rng):
        for _ in range(subsets):
            imgs = crash_state(events, base, cut, rng)
            states += 1
            changed = _differ(base["vol"], bytes(imgs["vol"][: len(base["vol"])]))
            wide = trackmap.expand(bytes(imgs["map"]), len(base["vol"]))
            marked = {g for g, b in enumerate(wide) if b}
            wrong += bool(changed - marked)
    return states, wrong


def test_power_loss_never_leaves_a_written_granule_unmarked(tmp_path, capsys):
    events, base, syncs = _power_rig(tmp_path, frozenset())
    states, wrong = _unmarked_states(events, base)
    with capsys.disabled():
        print(f"\nchange map, power loss: {states} crash states, {wrong} with a written granule unmarked; {syncs} map syncs")
    assert syncs > 0 and wrong == 0


def test_power_loss_check_fails_without_the_map_sync(tmp_path, capsys):
    events, base, _syncs = _power_rig(tmp_path, frozenset({"map"}))
    states, wrong = _unmarked_states(events, base)
    with capsys.disabled():
        print(f"\nchange map, power loss, map sync switched off: {states} crash states, {wrong} with a written granule unmarked")
    assert wrong > 0


def test_changes_needs_the_rights_of_a_list(shm, users):
    """A member of [daemon] group may ask (as for fssconfig -l); a stranger may not."""
    shm.chmod(0o755)  # the member must reach the run directory (0750 root:group itself)
    f = _fssd(shm, extra=f'group = "{users.group}"')
    with running(f):
        m = _snap(f, "fss0")
        _snap(f, "fss1")
        r = users.fssconfig(users.member, "-r", f.rundir, "--changes", "fss1", "--since", m, "--json")
        assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr
        r = users.fssconfig(users.stranger, "-r", f.rundir, "--changes", "fss1", "--since", m)
        assert r.returncode == 1 and "Permission denied" in r.stderr, r.stderr
