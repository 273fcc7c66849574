"""Copy-on-write by several processes serving one volume (ipc/cowshare.py, workers/cow.py).

Real processes over one volume image, one shared-memory map and one backing
store, as the volume's worker processes are: writers of one cluster in two
processes copy it once and before it changes; store clusters are handed out
once; a process SIGKILLed mid-copy leaks nothing, and its successor reclaims
exactly what it had in flight, never a live process's reservation.
"""

import os
import random
import signal
import subprocess
import sys
import uuid

import pytest

from ipc import cowshare
from ipc.clustermap import ClusterMap, table_clusters

CS = 4096
COUNT = 256
TESTS = os.path.dirname(os.path.abspath(__file__))


def _old(c: int) -> bytes:
    return bytes([(c % 251) + 1]) * CS


def child(vol: str, map_name: str, store: str, cow_fd: int, index: int, mode: str, seed: int) -> None:
    """One volume process: attach the map like workers/volume.py, then act on `mode`."""
    import threading

    from ipc.storeformat import Durability
    from workers import cow as cowmod
    from workers.storejournal import StoreJournal

    share = cowshare.CowShare(cow_fd, index)
    vfd = os.open(vol, os.O_RDWR)
    bfd = os.open(store, os.O_RDWR)
    m = ClusterMap.attach(map_name)
    cw = cowmod.CopyOnWrite(vfd, COUNT * CS, share)
    power = mode.endswith("-power")
    mode = mode.removesuffix("-power")
    journal = StoreJournal(bfd, Durability.POWER if power else Durability.NONE, m.table_clusters)
    t = cowmod.SnapshotTarget("fss0", m, bfd, vfd, journal=journal, share=share)
    reclaimed, _took = t.reconcile(share.predecessor.get(0, []), cw.cluster_locked(m.cluster_shift))
    share.reset()
    cw.add(t)
    print(f"ready {reclaimed}", flush=True)
    if mode == "storm":
        # Both processes sweep the volume in the same order from the same moment, so their
        # first touches of each cluster meet; the threads of one process spread over it.
        sys.stdin.readline()

        def writer(k: int) -> None:
            rng = random.Random(seed * 100 + k)
            for c in range(k * COUNT // 4, COUNT - 3):
                n = rng.randrange(1, 4) * CS
                with cw.writing(c * CS, n):
                    os.pwrite(vfd, os.urandom(n), c * CS)
        ths = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
    elif mode == "pause":
        # Stop between reserving store clusters and copying them, until told to go on.
        real = cowmod.SnapshotTarget._copy_runs

        def paused(self, start, runs, old, base):
            print("reserved " + " ".join(f"{d}:{k}" for d, k in runs), flush=True)
            sys.stdin.readline()
            real(self, start, runs, old, base)

        cowmod.SnapshotTarget._copy_runs = paused
        c = seed
        with cw.writing(c * CS, 2 * CS):
            os.pwrite(vfd, b"N" * 2 * CS, c * CS)
    elif mode == "all":
        for c in range(COUNT):
            with cw.writing(c * CS, CS):
                os.pwrite(vfd, b"A" * CS, c * CS)
    print("done", flush=True)


@pytest.fixture
def volume(tmp_path):
    vol = tmp_path / "vol.img"
    vol.write_bytes(b"".join(_old(c) for c in range(COUNT)))
    store = tmp_path / "bs"
    store.touch()
    name = f"/fssd-test-{uuid.uuid4().hex[:12]}"
    tc = table_clusters(COUNT, CS)
    m = ClusterMap.create(name, CS, CS * COUNT, bs_limit_clusters=tc + COUNT)  # room for every cluster
    m.activate()
    fd = cowshare.create(2)
    procs: list[subprocess.Popen] = []

    def spawn(index: int, mode: str, seed: int = 0) -> subprocess.Popen:
        code = (f"import sys; sys.path.insert(0, {TESTS!r}); from test_cow_processes import child; "
                "a = sys.argv; child(a[1], a[2], a[3], int(a[4]), int(a[5]), a[6], int(a[7]))")
        p = subprocess.Popen([sys.executable, "-c", code, str(vol), name, str(store), str(fd), str(index), mode, str(seed)],
                             pass_fds=[fd], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(p)
        line = p.stdout.readline()
        assert line.startswith("ready"), line
        p.reclaimed = int(line.split()[1])
        return p

    try:
        yield m, tc, store, spawn
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
            p.stdin.close()
            p.stdout.close()
        os.close(fd)
        m.close()
        ClusterMap.unlink(name)


def _check_snapshot(m: ClusterMap, tc: int, store) -> list[int]:
    """Every published copy holds the cluster's content at the instant; store clusters used once."""
    slots = [k for k in m.table if k]
    assert len(set(slots)) == len(slots), "a store cluster handed out twice"
    data = store.read_bytes()
    for c in range(COUNT):
        k = m.table[c]
        if k:
            assert data[k * CS : (k + 1) * CS] == _old(c), f"cluster {c}: the copy is not the snapshot's content"
    assert m.copies == len(slots), (m.copies, len(slots))
    return slots


def test_two_processes_writing_the_same_clusters_copy_each_once_and_before_it_changes(volume):
    m, tc, store, spawn = volume
    a, b = spawn(0, "storm", 1), spawn(1, "storm", 2)
    for p in (a, b):
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in (a, b):
        assert p.stdout.readline().strip() == "done"
        assert p.wait(60) == 0
    assert m.valid, m.error
    slots = _check_snapshot(m, tc, store)
    assert slots and m.bs_next == tc + len(slots)  # nothing reserved and left unused


@pytest.mark.parametrize("durability", ["none", "power"])
def test_a_process_killed_mid_copy_leaks_nothing_and_a_live_ones_reservation_is_never_reused(volume, durability):
    """Also under "power", where the dead one's reservation lies below the live one's: it is
    handed out again (its store entry cleared first), not left unused."""
    m, tc, store, spawn = volume
    sfx = "-power" if durability == "power" else ""
    # Process 1 (stays alive) and process 0 (killed) each stop with a reservation in flight;
    # under "power" the dead one's is the lower (not the tail of the allocation).
    if durability == "power":
        doomed = spawn(0, "pause" + sfx, 20)
        doomed_runs = doomed.stdout.readline().split()[1:]
        live = spawn(1, "pause" + sfx, 10)
        live_runs = live.stdout.readline().split()[1:]
        assert live.reclaimed == 0  # its start-up reconcile left the other's reservation alone
    else:
        live = spawn(1, "pause" + sfx, 10)
        live_runs = live.stdout.readline().split()[1:]
        doomed = spawn(0, "pause" + sfx, 20)
        doomed_runs = doomed.stdout.readline().split()[1:]
        assert doomed.reclaimed == 0
    assert live_runs and doomed_runs and live_runs != doomed_runs
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait(10)
    # Its successor takes slot 0: it reclaims the dead one's two clusters, not the live one's.
    succ = spawn(0, "all" + sfx)
    assert succ.reclaimed == 2, succ.reclaimed
    # The live one finishes its copy while the successor overwrites the whole volume.
    live.stdin.write("go\n")
    live.stdin.flush()
    assert live.stdout.readline().strip() == "done"
    assert succ.stdout.readline().strip() == "done"
    assert live.wait(30) == 0 and succ.wait(30) == 0
    assert m.valid, m.error
    slots = _check_snapshot(m, tc, store)
    # Every cluster copied, each into its own store cluster, none left over: nothing leaked.
    assert len(slots) == COUNT and m.bs_next == tc + COUNT, (len(slots), m.bs_next)
    assert m.free_runs() == []


def test_a_fresh_segment_holds_no_reservation_and_no_watermark():
    """Slots of processes not started yet name nothing and hold no watermark down."""
    fd = cowshare.create(3)
    try:
        share = cowshare.CowShare(fd, 1)
        try:
            assert share.predecessor == {}
            assert share.lowest(0) == cowshare.NONE and share.in_flight(0) == []
            share.reset()
            e = share.claim(1)[0]
            share.add(e, 0, 40, 2, 7)
            share.set_low(0, 40)
            other = cowshare.CowShare(fd, 2)
            try:
                assert other.in_flight(0) == [(40, 2, 7)] and other.lowest(0) == 40
                assert other.in_flight(1) == [] and other.lowest(1) == cowshare.NONE
            finally:
                other.close()
            share.remove(e)
            share.set_low(0, None)
            assert share.in_flight(0, others_only=False) == [] and share.lowest(0) == cowshare.NONE
        finally:
            share.close()
        again = cowshare.CowShare(fd, 1)  # a successor finds nothing left over
        try:
            assert again.predecessor == {}
        finally:
            again.close()
    finally:
        os.close(fd)
