"""The cluster map shared between processes: one span helper, and "first error only" across processes."""

import fcntl
import multiprocessing
import os
import subprocess
import sys
import threading
import uuid

import pytest

from ipc import clustermap
from ipc.clustermap import ClusterMap, span

CS = 4096


@pytest.fixture
def map_name():
    name = f"/fssd-test-{uuid.uuid4().hex[:12]}"
    m = ClusterMap.create(name, CS, CS * 64, bs_limit_clusters=0)
    m.activate()
    m.close()
    yield name
    ClusterMap.unlink(name)


def test_span_is_first_and_last_cluster_touched(map_name):
    m = ClusterMap.attach(map_name)
    try:
        assert m.span(0, 1) == (0, 0)
        assert m.span(0, CS) == (0, 0)
        assert m.span(0, CS + 1) == (0, 1)
        assert m.span(CS - 1, 2) == (0, 1)
        assert m.span(5 * CS + 7, 3 * CS) == (5, 8)
        assert span(m.cluster_shift + 4, 17 * CS, CS) == (1, 1)  # the stripe locks' unit
        assert m.cluster_start(5) == 5 * CS
        assert list(m.pieces(CS - 1, CS + 2)) == [(0, CS - 1, CS), (1, CS, 2 * CS), (2, 2 * CS, 2 * CS + 1)]
        assert list(m.pieces(3 * CS, CS)) == [(3, 3 * CS, 4 * CS)]
        m.table[6] = 40
        assert m.any_copied(5 * CS, 2 * CS) and not m.all_copied(5 * CS, 2 * CS)
        assert not m.any_copied(0, 5 * CS) and m.all_copied(6 * CS + 1, 10)
    finally:
        m.close()


class _RacingMap(ClusterMap):
    """Holds each process at its first look at the flags (no error yet) until the other
    has looked too (or 2 s pass), so both decide "no error yet" together: without a
    cross-process lock around check-then-set both then set theirs."""

    barrier = None

    @property
    def flags(self) -> int:
        value = super().flags
        if self.barrier is not None and not value & clustermap.FLAG_ERROR:
            b, self.barrier = self.barrier, None
            try:
                b.wait(timeout=2)
            except threading.BrokenBarrierError:
                pass  # the other process is waiting for our lock: expected with the fix
        return value


def _racer(name, reason, start, barrier, out):
    m = _RacingMap.attach(name)
    m.barrier = barrier
    start.wait(timeout=10)
    won = m.set_error(reason)
    out.put((reason, won, m.error))
    m.close()


def test_first_error_wins_across_processes(map_name):
    ctx = multiprocessing.get_context("spawn")  # no fork of a threaded pytest
    start, barrier, out = ctx.Barrier(2), ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(map_name, r, start, barrier, out)) for r in ("backing store full", "worker failed repeatedly")]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=20) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    winners = [r for r, won, _seen in results if won]
    assert len(winners) == 1, results
    assert {seen for _r, _won, seen in results} == {winners[0]}, results  # both see the winner's reason
    m = ClusterMap.attach(map_name, writable=False)
    try:
        assert not m.valid and m.error == winners[0]
    finally:
        m.close()


def test_a_killed_holder_does_not_wedge_the_error_lock(map_name):
    """The kernel drops an OFD lock with its holder, so a SIGKILLed process never blocks set_error."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, fcntl\nfrom ipc.clustermap import ClusterMap\n"
         f"m = ClusterMap.attach({map_name!r})\nm._ofd_lock(fcntl.F_WRLCK)\nprint('locked', flush=True)\nsys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        m = ClusterMap.attach(map_name)
        try:
            # While it lives, the lock is really held: a non-waiting attempt is refused.
            with pytest.raises(BlockingIOError):
                fcntl.fcntl(m._fd, getattr(fcntl, "F_OFD_SETLK", 37),
                            clustermap._FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, clustermap.ERROR_OFFSET, clustermap.ERROR_MAX, 0))
            holder.kill()
            holder.wait(timeout=10)
            assert m.set_error("write error on backing store") is True
        finally:
            m.close()
    finally:
        holder.kill()
        holder.wait(timeout=10)
        holder.stdin.close()
        holder.stdout.close()


def test_a_read_only_mapping_cannot_set_an_error(map_name):
    m = ClusterMap.attach(map_name, writable=False)
    try:
        with pytest.raises(ValueError):
            m.set_error("nope")
    finally:
        m.close()
