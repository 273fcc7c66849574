"""Unit tests of the cluster map, the copy-on-write decisions and the snapshot read path."""

import os
import uuid

import pytest

from ipc.clustermap import CLUSTER_MAX, ClusterMap, MapState, choose_cluster_size, table_clusters
from workers import snapshot as snapmod
from workers.cow import CopyOnWrite, SnapshotTarget, WriteGate
from workers.snapshot import SnapshotBackend

CS = 4096
CLUSTERS = 64
SIZE = CS * CLUSTERS


@pytest.fixture
def world(tmp_path):
    """A volume of known content, a backing store, an active map; all removed afterwards."""
    vol = tmp_path / "vol.img"
    old = bytes((i // CS) % 251 + 1 for i in range(SIZE))
    vol.write_bytes(old)
    bs = tmp_path / "bs"
    bs.touch()
    name = f"/fssd-test-{uuid.uuid4().hex[:12]}"
    cmap = ClusterMap.create(name, CS, SIZE, bs_limit_clusters=0)
    cmap.activate()
    vfd = os.open(vol, os.O_RDWR)
    bfd = os.open(bs, os.O_RDWR)
    target = SnapshotTarget("fss0", cmap, bfd, vfd)
    reader = SnapshotBackend(vfd, bfd, ClusterMap.attach(name, writable=False))
    yield {"old": old, "vfd": vfd, "bfd": bfd, "map": cmap, "target": target, "reader": reader, "name": name}
    os.close(vfd)
    os.close(bfd)
    ClusterMap.unlink(name)


def live_write(w, offset, data):
    """What the volume worker does: copy what the snapshot needs, then write."""
    t = w["target"]
    if t.needs_copy(offset, len(data)):
        t.copy(offset, len(data))
    os.pwrite(w["vfd"], data, offset)


def snap_read(w, offset, length):
    buf = bytearray(length)
    w["reader"].read_into(memoryview(buf), offset)
    return bytes(buf)


def test_cluster_size_rules_follow_fss():
    assert choose_cluster_size(0, 1 << 30) == 64 * 1024  # default MAXPHYS
    assert choose_cluster_size(3000, 1 << 30) == 4096  # rounded up to a power of two
    assert choose_cluster_size(512, 1 << 30, bs_block=4096) == 4096  # never below the store's block
    huge = 1 << 44  # 16 TiB: raised until at most 2^24 clusters
    cs = choose_cluster_size(64 * 1024, huge)
    # fss: csize = bsize / FSS_CLUSTER_MAX + 1, then the next power of two: 2^20 + 1 -> 2 MiB.
    assert huge // cs <= CLUSTER_MAX and cs == 1 << 21
    odd = (1 << 40) + 512  # just over 2^24 clusters of 64 KiB: raised, so the map fits
    assert -(-odd // choose_cluster_size(0, odd)) <= CLUSTER_MAX
    with pytest.raises(ValueError):
        choose_cluster_size(1 << 32, 1 << 40)
    # 1 GiB at 64 KiB: a 4 KiB header page and 16384 entries of 8 bytes -> "192K backup" when fresh
    assert table_clusters(16384, 65536) == 3


def test_map_header_round_trip_and_first_error_wins(world):
    m, name = world["map"], world["name"]
    other = ClusterMap.attach(name, writable=False)
    assert (other.cluster_size, other.cluster_count, other.volume_size) == (CS, CLUSTERS, SIZE)
    assert other.state == MapState.ACTIVE and other.usable and other.created_ns > 0
    assert other.bs_next == table_clusters(CLUSTERS, CS)
    assert m.set_error("backing store full") is True
    assert m.set_error("write error on backing store") is False
    assert other.error == "backing store full" and not other.usable


def test_copy_on_write_copies_once_and_only_what_is_touched(world):
    m, t = world["map"], world["target"]
    first = m.bs_next
    live_write(world, CS * 3 + 100, b"\xff" * (CS + 10))  # touches clusters 3 and 4
    assert [m.table[c] for c in (2, 3, 4, 5)] == [0, first, first + 1, 0]
    assert m.bs_next == first + 2 and m.copies == 2
    assert not t.needs_copy(CS * 3, 2 * CS), "fast path: everything already copied"
    live_write(world, CS * 3, b"\xee" * CS)  # already copied: no new copy
    assert m.copies == 2
    assert os.pread(world["bfd"], CS, first * CS) == world["old"][3 * CS : 4 * CS]
    assert snap_read(world, 0, SIZE) == world["old"]


def test_full_store_invalidates_and_stops_copying(world):
    m = world["map"]
    name = world["name"]
    small = ClusterMap.create(name + "b", CS, SIZE, bs_limit_clusters=table_clusters(CLUSTERS, CS) + 2)
    try:
        small.activate()
        t = SnapshotTarget("fss1", small, world["bfd"], world["vfd"])
        t.copy(0, 2 * CS)
        assert small.usable
        t.copy(5 * CS, CS)  # a third cluster does not fit
        assert not small.usable and small.error == "backing store full" and not t.active
        t.copy(9 * CS, CS)  # nothing more is attempted
        assert small.copies == 2
    finally:
        small.close()
        ClusterMap.unlink(name + "b")
    assert m.usable, "another snapshot's map is not touched"


def test_write_error_on_the_store_invalidates(world, tmp_path):
    ro = tmp_path / "ro"
    ro.touch()
    fd = os.open(ro, os.O_RDONLY)  # writes fail with EBADF
    try:
        t = SnapshotTarget("fss0", world["map"], fd, world["vfd"])
        t.copy(0, CS)
        assert world["map"].error == "write error on backing store" and world["map"].table[0] == 0
    finally:
        os.close(fd)
    with pytest.raises(OSError) as e:
        snap_read(world, 0, CS)
    assert e.value.errno == 5  # EIO


@pytest.mark.parametrize("offset,length", [(CS * 10, CS), (CS * 10 - 100, 3 * CS + 200)])
def test_read_path_race_a_write_between_volume_read_and_retest(world, monkeypatch, offset, length):
    """The live write lands after the snapshot read the volume and before it tests the entry."""
    real = os.preadv
    state = {"done": False}

    def preadv_then_write(fd, bufs, off):
        n = real(fd, bufs, off)
        if fd == world["vfd"] and not state["done"]:
            state["done"] = True
            live_write(world, offset, b"\x00" * length)  # copy old clusters, publish, overwrite
        return n

    monkeypatch.setattr(snapmod.os, "preadv", preadv_then_write)
    got = snap_read(world, offset, length)
    assert state["done"], "the race was exercised"
    assert got == world["old"][offset : offset + length]
    # The volume itself did change, so the test could have failed.
    assert os.pread(world["vfd"], length, offset) == b"\x00" * length


def test_mixed_reads_stitch_volume_and_store(world):
    old = world["old"]
    for c in (1, 2, 5, 7, 8):
        live_write(world, c * CS + 17, b"\x5a" * 100)
    assert snap_read(world, 0, 12 * CS) == old[: 12 * CS]
    assert snap_read(world, CS + 5, 7 * CS) == old[CS + 5 : 8 * CS + 5]
    src = world["reader"].sendfile_source(7 * CS, 2 * CS)  # clusters 7 and 8 were copied in order
    assert src == (world["bfd"], world["map"].table[7] * CS)
    assert world["reader"].sendfile_source(4 * CS, 2 * CS) is None  # cluster 4 is still on the volume


def test_write_gate_barrier_waits_for_writes_in_flight():
    import threading

    gate = WriteGate()
    gate.enter()
    closed = threading.Event()

    def barrier():
        gate.close()
        closed.set()

    th = threading.Thread(target=barrier)
    th.start()
    assert not closed.wait(0.2), "the barrier must wait for the write in flight"
    gate.leave()
    assert closed.wait(5)
    gate.open()
    th.join()
    gate.enter()  # open again
    gate.leave()


def test_writing_copies_first_and_a_failed_copy_leaves_the_gate(world, monkeypatch):
    """The one write path: `with cow.writing(...)` copies what the snapshot lacks before the
    body runs; if copying raises, the write is not done and the gate is left (a barrier
    afterwards does not wait forever)."""
    cow = CopyOnWrite(world["vfd"], SIZE)
    cow.add(world["target"])
    with cow.writing(3 * CS + 5, 10):
        assert world["map"].table[3], "copied before the body writes the volume"
        os.pwrite(world["vfd"], b"\xee" * 10, 3 * CS + 5)
    assert snap_read(world, 3 * CS, CS) == world["old"][3 * CS : 4 * CS]

    def broken(offset, length):
        raise OSError(5, "short read from the volume image")

    monkeypatch.setattr(cow, "_protect", broken)
    with pytest.raises(OSError):
        with cow.writing(9 * CS, CS):
            raise AssertionError("the body must not run when copying failed")
    import threading

    got = []
    th = threading.Thread(target=lambda: got.append(cow.detach("fss0")), daemon=True)
    th.start()
    th.join(10)
    assert got == [world["target"]], "the barrier must drain: the failed write left the gate"


def test_a_store_that_takes_no_write_is_recorded_invalid_before_the_volume_is_written(tmp_path):
    """The copy fails and so does the invalid flag in the store's own header: the write
    that found it must wait until the supervisor has the reason on disk (record_invalid),
    or a crash right then could bring the snapshot back as if intact."""
    vol = tmp_path / "vol.img"
    old = bytes(range(256)) * (SIZE // 256)
    vol.write_bytes(old)
    bs = tmp_path / "bs"
    bs.write_bytes(bytes(CS))
    name = f"/fssd-test-{uuid.uuid4().hex[:12]}"
    cmap = ClusterMap.create(name, CS, SIZE, bs_limit_clusters=0)
    vfd = os.open(vol, os.O_RDWR)
    bfd = os.open(bs, os.O_RDONLY)  # every write to the store fails (EBADF)
    try:
        cmap.activate()
        from ipc.storeformat import Durability
        from workers.storejournal import StoreJournal

        # A durable snapshot's store (its header can't be read back either: the flag can't be set).
        target = SnapshotTarget("fss0", cmap, bfd, vfd, StoreJournal(bfd, Durability.PROCESS, cmap.table_clusters))
        seen = []

        def record(device, reason):
            seen.append((device, reason, os.pread(vfd, CS, 0) == old[:CS]))
            return True

        target.record_invalid = record
        w = {"target": target, "vfd": vfd}
        live_write(w, 0, b"\xee" * CS)
        assert seen == [("fss0", "write error on backing store", True)], "recorded, and before the volume was written"
        assert not cmap.valid and cmap.error == "write error on backing store"
        assert os.pread(vfd, CS, 0) == b"\xee" * CS, "the live write went on"
        live_write(w, CS, b"\xdd" * CS)
        assert len(seen) == 1, "the first error acts once"
    finally:
        os.close(vfd)
        os.close(bfd)
        cmap.close()
        ClusterMap.unlink(name)


def test_quick_write_says_which_writes_would_wait(world, tmp_path):
    """VolumeBackend.quick_write(): False while a snapshot still lacks a cluster of the
    range, while a "power" change mark still needs its sync, and while a barrier holds the
    gate; True once the write would go straight to the volume (the NBD loop then serves
    it in its selector thread, workers/nbdserve.py)."""
    from ipc import trackmap
    from workers.changemap import ChangeMap
    from workers.volume import VolumeBackend

    backend = VolumeBackend(os.dup(world["vfd"]), SIZE)
    assert backend.quick_write(0, SIZE)  # nothing attached, nothing tracked
    backend.cow.add(world["target"])
    assert not backend.quick_write(CS * 2, 10)
    backend.write(CS * 2, memoryview(b"\x01" * 10), fua=False)  # copies cluster 2
    assert backend.quick_write(CS * 2 + 100, 100) and not backend.quick_write(CS * 2, CS + 1)
    mfd = os.open(tmp_path / "gen-1.map", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(mfd, trackmap.file_len(SIZE))
    backend.cow.track = ChangeMap(mfd, 1, SIZE, sync=True, fresh=True)
    assert not backend.quick_write(CS * 2, 10)  # the coarse region's mark is not durable yet
    backend.write(CS * 2, memoryview(b"\x02" * 10), fua=False)
    assert backend.quick_write(CS * 2 + 20, 10)
    token, _ = backend.cow.hold()
    try:
        assert not backend.quick_write(CS * 2 + 20, 10)
    finally:
        backend.cow.release(token)
    assert backend.quick_write(CS * 2 + 20, 10)
    backend.cow.track.close()
    os.close(backend.fd)


def test_write_quick_writes_only_what_needs_nothing_first(world):
    """VolumeBackend.write_quick(): a write whose cluster a snapshot still lacks is refused
    untouched (no copy, no write, the gate left); one already copied goes straight in."""
    from workers.volume import VolumeBackend

    backend = VolumeBackend(os.dup(world["vfd"]), SIZE)
    backend.cow.add(world["target"])
    m = world["map"]
    assert not backend.write_quick(CS * 5, memoryview(b"\x07" * 10))
    assert m.copies == 0 and os.pread(world["vfd"], 10, CS * 5) == world["old"][CS * 5 : CS * 5 + 10]
    backend.write(CS * 5, memoryview(b"\x08" * 10), fua=False)
    assert backend.write_quick(CS * 5 + 10, memoryview(b"\x09" * 10))
    assert os.pread(world["vfd"], 20, CS * 5) == b"\x08" * 10 + b"\x09" * 10 and m.copies == 1
    token, _ = backend.cow.hold()  # a barrier pending: refused, without waiting for it
    try:
        assert not backend.write_quick(CS * 5, memoryview(b"\x0a" * 10))
    finally:
        backend.cow.release(token)
    assert snap_read(world, 0, SIZE) == world["old"]
    os.close(backend.fd)
