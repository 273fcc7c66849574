"""Copy-on-write into the snapshots' backing stores: the volume's one write path (docs/architecture.md "Write path").

Every live write, trim and write-zeroes runs as

    with cow.writing(offset, length):
        <pwrite / punch / zero the volume>

(the 4 KiB write path spells the same out as begin() / try / finally end()).

Lock contract, all taken here and nowhere else, always in this order:
1. the write gate (WriteGate): every write holds it while in flight; a snapshot
   barrier (attach/detach) closes it and waits for the writes to drain, so a
   write lands entirely before or entirely after the snapshot's instant;
2. the stripe locks covering the touched clusters, in index order, only when a
   snapshot still needs a cluster copied (writers of one cluster queue here):
   a thread lock, then, when other processes serve the volume too, the same
   stripe's byte lock in the volume's shared segment (ipc/cowshare.py);
3. a target's allocation lock (SnapshotTarget._alloc, then the map's
   lock_alloc() across processes), held only to hand out backing-store
   clusters and count copies, never across I/O;
4. the map's error lock (ClusterMap.set_error), innermost.
With no snapshot attached a write costs the gate's counter and, on a tracked volume, one byte
read of the change map (workers/changemap.py; a granule's first write in a generation marks it,
before the volume is written).

For each cluster a live write touches whose entry is clear: copy the old
cluster from the volume to the backing store (appended at the next free
backing-store cluster), *then* publish the entry, *then* the caller writes the
volume. Trouble with the backing store makes the snapshot invalid and never
fails the live write (fss_error: only the first error acts, logged once).

A volume worker killed between reserving store clusters and publishing them
leaves those clusters reserved but unused: a restarted worker reconciles the
allocation with the entries actually published and the reservations the
volume's other live processes have in flight (reconcile()) and reuses them,
so kills never make a snapshot with room for every cluster run out of room.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import threading
import time
import weakref
from typing import Callable

from ipc import storeformat
from ipc.clustermap import ClusterMap, span
from ipc.trackmap import GRANULE_SHIFT as TRACK_SHIFT
from ipc.cowshare import RUNS_MAX, CowShare, device_number
from workers import fileio, spawned
from workers.changemap import ChangeMap
from workers.storejournal import StoreJournal

log = logging.getLogger("cow")

# Errors that mean "no room": the snapshot overflowed, as dm-snapshot's "full".
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

# Copy-on-write locks: STRIPES locks, each covering runs of 2^STRIPE_CLUSTERS_SHIFT clusters.
STRIPES = 1021  # prime: regions a power of two apart (one per nbdcopy thread) never share a lock
STRIPE_CLUSTERS_SHIFT = 4
# Old clusters read once for several snapshots, up to this much per write (else copied per snapshot).
SHARED_READ_MAX = 64 << 20
# Copy-on-write for one request is done this much at a time (a multiple of every cluster size
# below it; larger clusters simply span pieces, each copied whole by the first piece touching it).
PROTECT_CHUNK = 64 << 20
# The longest a held write gate stays closed without a release (a snapshot set's barrier
# takes milliseconds; this bounds what a stuck or dead supervisor can cost the volume).
HOLD_MAX = 5.0


class HoldError(OSError):
    """The two-phase barrier refused: already held, not held any more, writes did not drain."""


class SnapshotTarget:
    """One attached snapshot as the volume worker sees it."""

    def __init__(self, device: str, cmap: ClusterMap, bs_fd: int, volume_fd: int, journal: StoreJournal | None = None,
                 share: CowShare | None = None):
        self.device = device
        self.map = cmap
        self.bs_fd = bs_fd
        self.volume_fd = volume_fd
        # The table entries in the store and, under "power", their group commit.
        self.journal = journal if journal is not None else StoreJournal.for_store(bs_fd, cmap.table_clusters)
        # Local mirror of "usable", so the hot path reads no header.
        self.active = cmap.usable
        # Backing-store slots are handed out under this lock (and, when other processes serve
        # the volume too, the map's allocation lock); the copies run outside it.
        self._alloc = threading.Lock()
        # The volume's other processes: their in-flight reservations, and where ours are recorded.
        self.share = share
        self._devno = device_number(device) if share is not None else -1
        self._xproc = share is not None and share.processes > 1
        if share is not None and self.journal.power:
            # The commit record's watermark must cover every process's open reservations.
            self.journal.watermark.on_change = lambda low: share.set_low(self._devno, low)
            if self.journal.group is not None:
                self.journal.group._before = self._shared_low
        # (device, reason) -> True once the supervisor has the reason on disk; set by the
        # volume worker. Used only when the store's own header can't be flagged.
        self.record_invalid: Callable[[str, str], bool] | None = None

    @contextlib.contextmanager
    def _allocating(self):
        with self._alloc:
            if not self._xproc:
                yield
                return
            self.map.lock_alloc()
            try:
                yield
            finally:
                self.map.unlock_alloc()

    def _shared_low(self) -> int:
        """"power", just before a sync: every store cluster below this, in any process, is either
        not handed out or written (bs_next read under the allocation lock, so no reservation is
        half made; free runs count as not written: they are handed out again)."""
        with self._allocating():
            m = self.map
            return min(m.bs_next, self.share.lowest(self._devno), *(f for f, _n in m.free_runs()))

    def reconcile(self, dead: list[tuple[int, int, int]] = (), locked: Callable[[int], object] | None = None) -> tuple[int, float]:
        """A restarted volume worker, before serving: make the allocation what is published.

        `dead`: what the killed process this one succeeds had reserved and not published
        (first store cluster, count, first volume cluster: its slot in the shared segment);
        `locked(c)`: a context holding volume cluster c's stripe lock.

        Store entries the dead process wrote for those clusters (never published) are
        cleared first, under the stripe lock (a live writer of the cluster may be writing
        its own entry), and under "power" synced, so no entry ever names a cluster that is
        handed out again. Then the copy count becomes the number of entries set (less
        those another live process published and has yet to count), and the clusters no
        entry publishes and no live process has in flight are handed out again first: under
        "process"/"none" every such gap below the last cluster in use (the next free
        cluster follows it), under "power" only the dead process's own reservations (other
        gaps may lie below the commit record's watermark on disk, where recovery trusts a
        copy without re-reading it; the next free cluster stays). Returns (clusters
        reclaimed, seconds)."""
        t0 = time.monotonic()
        m = self.map
        t = m.table
        tc = m.table_clusters
        power = self.journal.power
        cleared = 0
        for first, n, c0 in dead:
            for i in range(n):
                with locked(c0 + i) if locked is not None else contextlib.nullcontext():
                    if not t[c0 + i] and self.journal.clear_stale(c0 + i, first + i):
                        cleared += 1
        if cleared and power:
            os.fdatasync(self.bs_fd)  # before any of them can be handed out again
        with self._allocating():
            before = m.bs_next
            free = m.free_runs()
            free_before = sum(n for _s, n in free)
            # The others' reservations first, then the table: a reservation published and
            # dropped meanwhile is then seen in the table.
            others = self.share.in_flight(self._devno) if self.share is not None else []
            used = m.published()
            uncounted = sum(1 for first, n, c0 in others for i in range(n) if t[c0 + i] == first + i)
            top = max([*used, *(first + n - 1 for first, n, _c in others)], default=tc - 1) + 1
            if used and (min(used) < tc or (m.bs_limit and top > m.bs_limit)):
                raise ValueError("cluster map names backing-store clusters outside the store")
            holes: list[list[int]] = []
            if power:
                top = before
                if dead:
                    taken = set(used)
                    for first, n, _c in others:
                        taken.update(range(first, first + n))
                    for f, n in free:
                        taken.update(range(f, f + n))
                    back = sorted(k for first, n, _c in dead for k in range(first, first + n) if tc <= k < before and k not in taken)
                    holes = [list(r) for r in free]
                    for k in back:
                        if holes and holes[-1][0] + holes[-1][1] == k:
                            holes[-1][1] += 1
                        else:
                            holes.append([k, 1])
                else:
                    holes = free
            elif len(used) != top - tc:  # gaps below the last copy: find them
                taken_b = bytearray(top - tc)
                for k in used:
                    taken_b[k - tc] = 1
                for first, n, _c in others:
                    taken_b[first - tc : first - tc + n] = b"\1" * n
                pos = taken_b.find(0)
                while pos >= 0:
                    end = taken_b.find(1, pos)
                    holes.append([tc + pos, end - pos])
                    pos = taken_b.find(0, end)
            lost = m.set_free_runs(holes)
            if lost:
                log.warning("%s: %d reclaimed backing-store clusters in too many runs stay unused", self.device, lost)
            m.bs_next = top
            m.copies = len(used) - uncounted
        reclaimed = before - top + sum(n for _s, n in holes) - free_before
        return reclaimed, time.monotonic() - t0

    def _reserve(self, n: int) -> list[tuple[int, int]] | None:
        """n store clusters as runs (start, count), reclaimed ones first; None when full.
        The caller is _allocating()."""
        m = self.map
        runs: list[tuple[int, int]] = []
        holes = m.free_runs() if n else []
        if holes:
            while n and holes and len(runs) < RUNS_MAX - 1:  # the end takes the rest: at most RUNS_MAX
                start, count = holes[-1]
                take = min(count, n)
                runs.append((start, take))
                if take == count:
                    holes.pop()
                else:
                    holes[-1] = [start + take, count - take]
                n -= take
            m.set_free_runs(holes)
        if n:
            dest = m.bs_next
            if m.bs_limit and dest + n > m.bs_limit:
                if runs:  # not enough: give back what was taken
                    m.set_free_runs(m.free_runs() + [list(r) for r in runs])
                return None
            m.bs_next = dest + n
            runs.append((dest, n))
        return runs

    def needs_copy(self, offset: int, length: int) -> bool:
        """Lock-free fast path: False when every touched cluster is already copied."""
        return self.active and not self.map.all_copied(offset, length)

    def copy(self, offset: int, length: int, old: memoryview | None = None, old_base: int = 0) -> None:
        """Copy every still-clear cluster of the range. The caller holds the volume's
        stripe locks for these clusters, so no one else copies them meanwhile.

        `old`, if given, already holds the volume's bytes from `old_base` on (read
        once for several snapshots); otherwise the kernel copies from the volume."""
        if not self.active or not self.map.usable:  # also invalidated by the supervisor
            self.active = False
            return
        m = self.map
        t = m.table
        journal = self.journal
        c, last = m.span(offset, length)
        while c <= last:
            if t[c]:
                c += 1
                continue
            start = c
            while c <= last and not t[c]:
                c += 1
            n = c - start
            held: list[int] = []
            claimed = self.share.claim(RUNS_MAX) if self.share is not None else []
            with self._allocating():
                runs = self._reserve(n)
                if runs is not None:
                    first = start
                    for dest, k in runs:
                        journal.reserved(dest, k)
                        if claimed:  # recorded before anyone else can look
                            held.append(self.share.add(claimed.pop(), self._devno, dest, k, first))
                        first += k
                for e in claimed:  # not needed
                    self.share.remove(e)
            if runs is None:
                self.invalidate("backing store full")
                return
            try:
                try:
                    self._copy_runs(start, runs, old, old_base)
                except OSError as e:
                    self.invalidate("backing store full" if e.errno in _FULL else "write error on backing store", e)
                    return
                finally:
                    for dest, _k in runs:
                        journal.written(dest)
                try:
                    journal.commit()  # "power": durable before anyone may write these clusters
                except OSError as e:
                    self.invalidate("sync of the backing store failed", e)
                    return
                # Publish only now: a reader that sees the entry finds the copy complete, and
                # (under "power") a writer that sees it may overwrite the volume at once.
                first = start
                for dest, k in runs:
                    for i in range(k):
                        t[first + i] = dest + i
                    first += k
                with self._allocating():
                    m.copies = m.copies + n
                    for h in held:  # counted: no longer in flight (reconcile() relies on this order)
                        self.share.remove(h)
                    held = []
            finally:
                if held:  # failed: the snapshot is invalid, the reservation is void
                    with self._allocating():
                        for h in held:
                            self.share.remove(h)

    def _copy_runs(self, start: int, runs: list[tuple[int, int]], old: memoryview | None, old_base: int) -> None:
        """Copy volume clusters start.. into the reserved store runs, then write their table
        entries (with each copy's crc32 under "power", which recovery checks after a power loss)."""
        m = self.map
        shift = m.cluster_shift
        cs = m.cluster_size
        journal = self.journal
        first = start
        for dest, k in runs:  # one run unless reclaimed clusters are being reused
            src = first << shift
            nbytes = min((first + k) << shift, m.volume_size) - src
            crcs = [0] * k
            if journal.power:
                if old is None:
                    data = memoryview(bytearray(nbytes))
                    got = os.preadv(self.volume_fd, [data], src)
                    if got != nbytes:  # past the image's end reads as zeros
                        data[got:] = bytes(nbytes - got)
                else:
                    data = old[src - old_base : src - old_base + nbytes]
                crcs = [storeformat.crc(data[i * cs : (i + 1) * cs]) for i in range(k)]
                fileio.pwrite_all(self.bs_fd, data, dest * cs)
            elif old is None:
                fileio.copy_range(self.volume_fd, src, self.bs_fd, dest * cs, nbytes)
            else:
                fileio.pwrite_all(self.bs_fd, old[src - old_base : src - old_base + nbytes], dest * cs)
            journal.record(first, dest, crcs)
            first += k

    def invalidate(self, reason: str, exc: OSError | None = None) -> None:
        self.active = False
        if self.map.set_error(reason):  # only the first error acts, across threads and processes
            log.error("%s: snapshot invalid: %s%s", self.device, reason, f" ({exc.strerror})" if exc else "")
            # Before the caller writes the volume without copying: on disk too, so a restart
            # after any crash finds it invalid rather than missing the copies from here on.
            if not self.journal.invalid():
                # The store won't say so: the state directory must, before the caller writes
                # the volume uncopied, or a crash right now could bring it back "intact".
                log.error("%s: could not mark the backing store invalid; waiting for the state directory to record it", self.device)
                if self.record_invalid is None or not self.record_invalid(self.device, reason):
                    log.critical("%s: the invalid state is recorded nowhere on disk; the volume is written on regardless", self.device)

    def sync(self) -> None:
        """At a clean stop: every copy and table entry on disk, before the state directory
        records the stop as clean (docs/architecture.md "Durability")."""
        try:
            os.fsync(self.bs_fd)
        except OSError as e:
            log.warning("%s: could not sync the backing store: %s", self.device, e)


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

    def close(self, timeout: float | None = None) -> None:
        """Hold new writes and wait until none is in flight. With `timeout`: if the writes
        in flight have not drained by then, open again and raise TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._closed = True
            while any(s.n for s in list(self._slots)):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self._closed = False
                    self._cond.notify_all()
                    raise TimeoutError(f"writes in flight did not drain within {timeout:g} s")
                self._cond.wait(left)

    def open(self) -> None:
        with self._cond:
            self._closed = False
            self._cond.notify_all()


class CopyOnWrite:
    """The volume's write path: the gate, the stripe locks and the attached snapshots.

    `with cow.writing(offset, length): ...` refuses if the supervisor is gone
    (spawned.refuse_if_orphaned), enters the gate and copies, for every
    attached snapshot, the clusters of the range it still lacks; the body then
    writes the volume; leaving the block leaves the gate. writing() returns this
    object itself (no allocation per request), so it must be used in a `with`."""

    def __init__(self, volume_fd: int, volume_size: int, share: CowShare | None = None):
        self.fd = volume_fd
        self.size = volume_size
        # The volume's shared segment: the stripe locks across processes, when there are others.
        self.share = share
        self._xproc = share is not None and share.processes > 1
        self._gate = WriteGate()
        # Writers racing on one cluster are serialised by the stripe that covers it;
        # copies of clusters in other stripes (other connections) go on in parallel.
        self._stripes = [threading.Lock() for _ in range(STRIPES)]
        self._local = threading.local()
        # Replaced (never mutated) at a barrier, so the hot path iterates without a lock.
        self.targets: tuple[SnapshotTarget, ...] = ()
        # The current generation's change map (None: volume not tracked); swapped at a barrier.
        self.track: ChangeMap | None = None
        # The two-phase barrier: (token, perf_counter_ns at close, expiry timer) while held.
        self._hold_lock = threading.Lock()
        self._hold: tuple[int, int, threading.Timer] | None = None
        self._hold_seq = 0
        self._expired = 0  # the last token whose hold opened by itself

    def writing(self, offset: int, length: int) -> "CopyOnWrite":
        """Refuse if orphaned, enter the gate, copy for the snapshots; use in a `with`."""
        self.begin(offset, length)
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, _type, _value, _tb) -> None:
        self.end()

    def begin(self, offset: int, length: int) -> None:
        """writing() without the `with`, for the 4 KiB write path: a Python-level `with`
        costs ~150 ns a request on CPython 3.11. Pair with end() in try/finally."""
        if spawned.orphaned:  # a write queued before the supervisor died must never land
            spawned.refuse_if_orphaned()
        # WriteGate.enter() inlined (this runs for every write): count in, then look for a barrier.
        gate = self._gate
        slot = getattr(gate._local, "slot", None) or gate._slot()
        slot.n += 1
        if gate._closed:  # a barrier is pending: step back and wait for it (the slow path)
            gate._step_back(slot)
            gate.enter()
        try:
            track = self.track  # read inside the gate: the map of the generation this write belongs to
            if track is not None:
                g = offset >> TRACK_SHIFT
                if g != (offset + length - 1) >> TRACK_SHIFT or not track.seen[g]:  # ChangeMap.mark's fast check, inlined
                    track.mark(offset, length)
            if self.targets:
                self._protect(offset, length)
        except BaseException:
            gate.leave()
            raise

    def would_wait(self, offset: int, length: int) -> bool:
        """Would a write of this range wait before reaching the volume: a barrier pending, a
        cluster a snapshot still lacks, a change mark still to be made durable?"""
        if self._gate._closed:
            return True
        for t in self.targets:
            if t.active and not t.map.all_copied(offset, length):  # needs_copy(), inlined
                return True
        track = self.track
        if track is not None:
            g = offset >> TRACK_SHIFT
            if (g != (offset + length - 1) >> TRACK_SHIFT or not track.seen[g]) and track.would_wait(offset, length):
                return True
        return False

    def begin_quick(self, offset: int, length: int) -> bool:
        """begin() for a caller that must not wait (the NBD selector thread): True, inside the
        gate, when the write may go straight to the volume; False, having done nothing, when
        it would wait first (orphaned, or would_wait()). Pair True with end()."""
        if spawned.orphaned:
            return False
        gate = self._gate
        slot = getattr(gate._local, "slot", None) or gate._slot()
        slot.n += 1
        if self.would_wait(offset, length):  # asked inside the gate: no barrier slips past
            gate._step_back(slot)
            return False
        track = self.track
        if track is not None:
            g = offset >> TRACK_SHIFT
            if g != (offset + length - 1) >> TRACK_SHIFT or not track.seen[g]:
                track.mark(offset, length)  # nothing to wait for: would_wait() said so
        return True

    def end(self) -> None:
        """Leave the gate (WriteGate.leave() inlined)."""
        gate = self._gate
        slot = gate._local.slot
        slot.n -= 1
        if gate._closed:
            with gate._cond:
                gate._cond.notify_all()

    # -- snapshots come and go at a barrier --------------------------------------

    def add(self, target: SnapshotTarget) -> None:
        """A target re-attached at start-up, before any write is served (no barrier needed)."""
        self.targets = self.targets + (target,)

    # The barrier in two phases (a snapshot set: every volume drained before any resumes):
    # hold() closes the gate and drains, attach() while held adds a snapshot without closing
    # it again, release() opens it. A held gate never stays held: it opens by itself after
    # HOLD_MAX seconds (the supervisor then learns from release() that the hold expired),
    # and a supervisor that dies ends this process (EOF on its channel).

    def hold(self, sync: bool = False, hold_max: float = HOLD_MAX) -> tuple[int, int]:
        """Close the gate and drain every write in flight. Returns (token, µs to drain); the
        token names this hold in attach() and release(). `sync`: fdatasync the volume first
        (under "power" the instant must be on disk: most of it now, the rest in attach())."""
        if sync:
            os.fdatasync(self.fd)
        with self._hold_lock:
            if self._hold:
                raise HoldError(errno.EBUSY, "the write gate is held already")
            token = self._hold_seq + 1
            # Started before the gate closes: starting a thread can take milliseconds on a busy
            # machine, and writes are not held meanwhile. It counts from here, so the gate is
            # never closed longer than hold_max, the drain included.
            timer = threading.Timer(hold_max, self._expire, (token,))
            timer.daemon = True
            timer.start()
            t0 = time.perf_counter_ns()
            try:
                self._gate.close(hold_max)
            except TimeoutError as e:
                timer.cancel()
                raise HoldError(errno.ETIMEDOUT, str(e)) from None
            self._hold_seq = token
            self._hold = (token, t0, timer)
        return token, (time.perf_counter_ns() - t0) // 1000

    def held(self) -> bool:
        return self._hold is not None

    def _expire(self, token: int) -> None:
        with self._hold_lock:
            if self._hold is None or self._hold[0] != token:
                return  # released in time
            t0 = self._hold[1]
            self._hold = None
            self._expired = token
            self._gate.open()
        log.warning("write gate held %.1f s without a release: opened by itself", (time.perf_counter_ns() - t0) / 1e9)

    def release(self, token: int) -> tuple[int, bool]:
        """Open the gate held under `token`. Returns (µs it was held, expired): expired when it
        had opened by itself before this (the supervisor must not count the snapshots taken)."""
        with self._hold_lock:
            if self._hold is None or self._hold[0] != token:
                return 0, True
            _tok, t0, timer = self._hold
            self._hold = None
            timer.cancel()
            self._gate.open()
        return (time.perf_counter_ns() - t0) // 1000, False

    def attach(self, target: SnapshotTarget, token: int = 0, when_ns: int | None = None, track: "ChangeMap | None" = None) -> int:
        """Attach a snapshot at the barrier, stamped `when_ns` (default now), [swapping in the
        next generation's change map `track`: the replaced one is the caller's]. With `token`:
        inside that hold (HoldError if it has ended); returns 0. Without: the whole barrier
        here (hold, attach, release); returns the µs writes were held."""
        if token:
            with self._hold_lock:
                if self._hold is None or self._hold[0] != token:
                    raise HoldError(errno.ETIMEDOUT, "the write gate is no longer held (it opened by itself after "
                                                     f"{HOLD_MAX:g} s)" if self._expired == token else "the write gate is not held")
                self._activate(target, when_ns, track)
            return 0
        # The whole barrier in this call: nothing to wait for in between, so no bound to keep.
        power = target.journal.power
        if power:  # the instant must be on disk: most of it now, the rest inside the gate
            os.fdatasync(self.fd)
        with self._hold_lock:
            if self._hold:
                raise HoldError(errno.EBUSY, "the write gate is held already")
            t0 = time.perf_counter_ns()
            self._gate.close()
            try:
                self._activate(target, when_ns, track)
            finally:
                self._gate.open()
        return (time.perf_counter_ns() - t0) // 1000

    def _activate(self, target: SnapshotTarget, when_ns: int | None, track: "ChangeMap | None") -> None:
        """Inside the closed gate: no write is in flight."""
        if target.journal.power:
            os.fdatasync(self.fd)
        target.map.activate(when_ns)
        target.active = target.map.usable
        self.targets = self.targets + (target,)
        if track is not None:
            self.track = track  # O(1): writes from here on belong to the next generation

    def detach(self, device: str) -> SnapshotTarget | None:
        """Inside a hold (a set rolled back), without closing the gate again; else a barrier of its own."""
        with self._hold_lock:
            if self._hold is not None:
                return self._remove(device)
        self._gate.close()
        try:
            return self._remove(device)
        finally:
            self._gate.open()

    def _remove(self, device: str) -> SnapshotTarget | None:
        found = [t for t in self.targets if t.device == device]
        self.targets = tuple(t for t in self.targets if t.device != device)
        return found[0] if found else None

    # -- copying -----------------------------------------------------------------

    def _protect(self, offset: int, length: int) -> None:
        # A TRIM or WRITE_ZEROES may span gigabytes: copy in pieces, so other writers
        # (and their stripes) are held up for one piece at a time, not the whole range.
        end = offset + length
        while end - offset > PROTECT_CHUNK:
            self._protect_piece(offset, PROTECT_CHUNK)
            offset += PROTECT_CHUNK
        self._protect_piece(offset, end - offset)

    def _protect_piece(self, offset: int, length: int) -> None:
        needing = [t for t in self.targets if t.active and not t.map.all_copied(offset, length)]  # needs_copy(), inlined
        if not needing:
            return
        shift = needing[0].map.cluster_shift
        if len(needing) > 1 and all(t.map.cluster_shift == shift for t in needing):
            # Several snapshots lack the same old clusters: read them once, write them to each.
            c0, c1 = span(shift, offset, length)
            lo = c0 << shift
            hi = min((c1 + 1) << shift, self.size)
            if hi - lo <= SHARED_READ_MAX:
                with self._stripe_locks(shift, offset, length):
                    old = self._scratch(hi - lo)
                    if os.preadv(self.fd, [old], lo) != hi - lo:
                        raise OSError(errno.EIO, "short read from the volume image")
                    for t in needing:
                        t.copy(offset, length, old, lo)
                return
        for t in needing:
            with self._stripe_locks(t.map.cluster_shift, offset, length):
                t.copy(offset, length)

    def cluster_locked(self, cluster_shift: int) -> Callable[[int], object]:
        """c -> a context holding volume cluster c's stripe lock (for reconcile())."""
        return lambda c: self._stripe_locks(cluster_shift, c << cluster_shift, 1 << cluster_shift)

    @contextlib.contextmanager
    def _stripe_locks(self, cluster_shift: int, offset: int, length: int):
        """The locks covering these clusters, taken in index order so writers can't deadlock
        (thread locks, then the same stripes' locks across processes)."""
        first, last = span(cluster_shift + STRIPE_CLUSTERS_SHIFT, offset, length)
        if first == last:  # the common case: one stripe
            s = first % STRIPES
            with self._stripes[s]:
                if not self._xproc:
                    yield
                    return
                self.share.lock_stripes(s, 1)
                try:
                    yield
                finally:
                    self.share.unlock_stripes(s, 1)
            return
        order = sorted({s % STRIPES for s in range(first, min(last, first + STRIPES - 1) + 1)})
        locks = [self._stripes[i] for i in order]
        for lock in locks:
            lock.acquire()
        runs: list[tuple[int, int]] = []
        try:
            if self._xproc:
                for i in order:  # contiguous stripes in one call
                    if runs and runs[-1][0] + runs[-1][1] == i:
                        runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                    else:
                        runs.append((i, 1))
                taken = []
                try:
                    for r in runs:
                        self.share.lock_stripes(*r)
                        taken.append(r)
                except BaseException:
                    runs = taken
                    raise
            yield
        finally:
            if self._xproc:
                for r in runs:
                    self.share.unlock_stripes(*r)
            for lock in locks:
                lock.release()

    def _scratch(self, n: int) -> memoryview:
        """This thread's buffer for old clusters (anonymous memory, kept for the next write)."""
        mm = getattr(self._local, "scratch", None)
        if mm is None or len(mm) < n:
            mm = self._local.scratch = mmap.mmap(-1, max(n, 1 << 20))
        return memoryview(mm)[:n]
