"""Copy-on-write into one snapshot's backing store (docs/architecture.md "Write path").

For each cluster a live write touches whose entry is clear: copy the old
cluster from the volume to the backing store (appended at the next free
backing-store cluster), *then* publish the entry, *then* the caller writes the
volume. Trouble with the backing store makes the snapshot invalid and never
fails the live write (fss_error: only the first error acts, logged once).

A volume worker killed between reserving store clusters and publishing them
leaves those clusters reserved but unused: a restarted worker reconciles the
allocation with the entries actually published (reconcile()) and reuses them,
so kills never make a snapshot with room for every cluster run out of room.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import weakref

from ipc.clustermap import ClusterMap
from workers import fileio

log = logging.getLogger("cow")

# Errors that mean "no room": the snapshot overflowed, as dm-snapshot's "full".
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class SnapshotTarget:
    """One attached snapshot as the volume worker sees it."""

    def __init__(self, device: str, cmap: ClusterMap, bs_fd: int, volume_fd: int):
        self.device = device
        self.map = cmap
        self.bs_fd = bs_fd
        self.volume_fd = volume_fd
        # Local mirror of "usable", so the hot path reads no header.
        self.active = cmap.usable
        # Backing-store slots are handed out under this lock; the copies run outside it.
        self._alloc = threading.Lock()
        # Free runs [start, count) below bs_next, left by a killed worker (see reconcile()).
        self._holes: list[list[int]] = []

    def reconcile(self) -> tuple[int, float]:
        """A restarted volume worker, before serving: make the allocation what is published.

        The copy count becomes the number of entries set, the next free cluster follows the
        last one in use, and clusters below it that no entry names (reserved by a worker
        killed mid-copy) are handed out again first. Returns (clusters reclaimed, seconds)."""
        t0 = time.monotonic()
        m = self.map
        tc = m.table_clusters
        before = m.bs_next
        used = m.published()
        top = max(used, default=tc - 1) + 1
        if used and (min(used) < tc or (m.bs_limit and top > m.bs_limit)):
            raise ValueError("cluster map names backing-store clusters outside the store")
        holes: list[list[int]] = []
        if len(used) != top - tc:  # gaps below the last copy: find them
            taken = bytearray(top - tc)
            for k in used:
                taken[k - tc] = 1
            pos = taken.find(0)
            while pos >= 0:
                end = taken.find(1, pos)
                holes.append([tc + pos, end - pos])
                pos = taken.find(0, end)
        with self._alloc:
            self._holes = holes
            m.bs_next = top
            m.copies = len(used)
        reclaimed = before - top + sum(n for _s, n in holes)
        return reclaimed, time.monotonic() - t0

    def _reserve(self, n: int) -> list[tuple[int, int]] | None:
        """n store clusters as runs (start, count), reclaimed ones first; None when full.
        The caller holds self._alloc."""
        m = self.map
        runs: list[tuple[int, int]] = []
        holes = self._holes
        while n and holes:
            start, count = holes[-1]
            take = min(count, n)
            runs.append((start, take))
            if take == count:
                holes.pop()
            else:
                holes[-1] = [start + take, count - take]
            n -= take
        if n:
            dest = m.bs_next
            if m.bs_limit and dest + n > m.bs_limit:
                return None
            m.bs_next = dest + n
            runs.append((dest, n))
        return runs

    def needs_copy(self, offset: int, length: int) -> bool:
        """Lock-free fast path: False when every touched cluster is already copied."""
        if not self.active:
            return False
        shift = self.map.cluster_shift
        c0 = offset >> shift
        c1 = (offset + length - 1) >> shift
        t = self.map.table
        if c0 == c1:
            return not t[c0]
        return 0 in t[c0 : c1 + 1]

    def copy(self, offset: int, length: int, old: memoryview | None = None, old_base: int = 0) -> None:
        """Copy every still-clear cluster of the range. The caller holds the volume's
        stripe locks for these clusters, so no one else copies them meanwhile.

        `old`, if given, already holds the volume's bytes from `old_base` on (read
        once for several snapshots); otherwise the kernel copies from the volume."""
        if not self.active or not self.map.usable:  # also invalidated by the supervisor
            self.active = False
            return
        m = self.map
        shift = m.cluster_shift
        cs = m.cluster_size
        t = m.table
        c = offset >> shift
        last = (offset + length - 1) >> shift
        while c <= last:
            if t[c]:
                c += 1
                continue
            start = c
            while c <= last and not t[c]:
                c += 1
            n = c - start
            with self._alloc:
                runs = self._reserve(n)
            if runs is None:
                self.invalidate("backing store full")
                return
            first = start
            for dest, k in runs:  # one run unless reclaimed clusters are being reused
                src = first << shift
                nbytes = min((first + k) << shift, m.volume_size) - src
                try:
                    if old is None:
                        fileio.copy_range(self.volume_fd, src, self.bs_fd, dest * cs, nbytes)
                    else:
                        fileio.pwrite_all(self.bs_fd, old[src - old_base : src - old_base + nbytes], dest * cs)
                except OSError as e:
                    self.invalidate("backing store full" if e.errno in _FULL else "write error on backing store", e)
                    return
                first += k
            # Publish only now: a reader that sees the entry finds the copy complete.
            first = start
            for dest, k in runs:
                for i in range(k):
                    t[first + i] = dest + i
                first += k
            with self._alloc:
                m.copies = m.copies + n

    def invalidate(self, reason: str, exc: OSError | None = None) -> None:
        self.active = False
        with self._alloc:  # two failing copies at once: still only the first error acts
            first = self.map.set_error(reason)
        if first:
            log.error("%s: snapshot invalid: %s%s", self.device, reason, f" ({exc.strerror})" if exc else "")

    def write_table(self) -> None:
        """The on-disk copy of the table at the head of the backing store (NetBSD's layout)."""
        try:
            os.pwrite(self.bs_fd, self.map.table_bytes(), 0)
        except OSError as e:
            log.warning("%s: could not write the table to the backing store: %s", self.device, e)


class _Slot:
    __slots__ = ("n", "__weakref__")

    def __init__(self):
        self.n = 0


class WriteGate:
    """Counts writes in flight so a snapshot barrier can drain them.

    The hot path takes no lock: each writing thread counts in its own slot (only
    it writes there), then checks whether a barrier is pending. The barrier sets
    `closed`, then waits until every slot is zero. Python runs one bytecode at a
    time (the GIL), so either the writer sees `closed` and steps back, or the
    barrier sees the writer's count: no write slips past a barrier.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._closed = False
        self._local = threading.local()
        self._slots: "weakref.WeakSet[_Slot]" = weakref.WeakSet()  # a dead thread's slot goes with it

    def _slot(self) -> _Slot:
        try:
            return self._local.slot
        except AttributeError:
            slot = self._local.slot = _Slot()
            with self._cond:
                self._slots.add(slot)
            return slot

    def enter(self) -> None:
        slot = self._slot()
        while True:
            slot.n += 1
            if not self._closed:
                return
            self._step_back(slot)
            with self._cond:
                while self._closed:
                    self._cond.wait()

    def leave(self) -> None:
        self._step_back(self._local.slot)

    def _step_back(self, slot: _Slot) -> None:
        slot.n -= 1
        if self._closed:
            with self._cond:
                self._cond.notify_all()

    def close(self) -> None:
        """Hold new writes and wait until none is in flight."""
        with self._cond:
            self._closed = True
            while any(s.n for s in list(self._slots)):
                self._cond.wait()

    def open(self) -> None:
        with self._cond:
            self._closed = False
            self._cond.notify_all()
