"""The volume worker's side of changed-block tracking: marking one generation's change map.

The supervisor creates each generation's map (`<statedir>/track/<volume>/gen-<g>.map`, one
byte per 64 KiB granule, ipc/trackmap.py) and hands the worker its descriptor: the current
one at spawn, the next one with each snapshot's AttachSnapshot, swapped in at the barrier.
Every write, trim and write-zeroes marks its granules here inside the write gate, before the
volume is written (workers/cow.py), so a write lands in the map of the generation whose
barrier it precedes.

Marking an already-marked granule costs one byte read; a new mark is one pwrite of the map.
Under durability "power" two levels (ipc/trackmap.py): the exact byte is written without a
sync, and the granule's 16 MiB coarse region, if not yet durably marked in this generation, is
marked in the file's coarse section and made durable by one group-commit fdatasync (shared by
concurrent writers, workers/groupcommit.py) before the volume write is issued: one sync per
coarse region per generation. Only then is the granule recorded in `seen`, the in-memory copy
the fast check reads, so a second writer never goes straight to the volume before the mark
covering its granule is durable. A host crash may lose unsynced exact bytes: the supervisor
then expands the coarse marks of every unsealed map (daemon/tracking.py). When a barrier has
swapped a map out, `retire()` hands it to a background thread that syncs it and seals it (its
exact bytes are then authoritative). Under "process" and "none" `seen` is the file's own
mapping: no syncs.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import queue
import threading
from typing import Callable

from ipc import trackmap
from workers.groupcommit import GroupCommit

log = logging.getLogger("track")

SHIFT = trackmap.GRANULE_SHIFT
CSHIFT = trackmap.COARSE_SHIFT


class ChangeMap:
    def __init__(self, fd: int, gen: int, volume_size: int, sync: bool, fresh: bool = False):
        """`fd`: the map, read-write (this object owns it). `fresh`: just created, all clear
        (a barrier's next map), so nothing is read from it."""
        n = trackmap.map_len(volume_size)
        if os.fstat(fd).st_size < n:
            raise ValueError(f"change map of generation {gen} is shorter than the volume needs ({n} bytes)")
        self.fd = fd
        self.gen = gen
        self.size = volume_size
        self.file = mmap.mmap(fd, n, mmap.MAP_SHARED, mmap.PROT_READ)  # read only: marks are pwrite()s
        self.group: GroupCommit | None = None
        self.coarse_at = n  # the coarse section's offset in the file
        self.cseen: bytearray | None = None  # "power": coarse regions durably marked
        if sync:
            self.seen = mmap.mmap(-1, n)  # zero pages until touched: O(1) whatever the volume size
            self.cseen = bytearray(trackmap.coarse_len(volume_size))
            if not fresh:
                # A restarted worker: a killed predecessor may have written marks it never
                # synced. Synced now, before `seen` and `cseen` trust them (a writer finding a
                # granule marked there goes straight to the volume).
                try:
                    os.fdatasync(fd)
                    self.seen[:] = self.file[:]
                    coarse = os.pread(fd, len(self.cseen), n)
                    self.cseen[: len(coarse)] = coarse
                except OSError as e:  # then nothing is trusted: each granule is marked (and synced) anew
                    log.warning("could not sync the change map of generation %d: %s", gen, e)
                    self.seen[:] = bytes(n)
                    self.cseen[:] = bytes(len(self.cseen))
            self.group = GroupCommit(self._sync)
        else:
            self.seen = self.file
        # Called once if a mark could not be made durable (the volume worker tells the supervisor).
        self.on_failure: Callable[[str], None] | None = None
        self.failed = False

    def _sync(self) -> None:
        os.fdatasync(self.fd)

    def mark(self, offset: int, length: int) -> None:
        """Mark every granule of [offset, offset+length). Cheap when they all are already."""
        if length <= 0:
            return
        g0 = offset >> SHIFT
        g1 = (offset + length - 1) >> SHIFT
        seen = self.seen
        if g0 == g1:
            if seen[g0]:
                return
        elif seen.find(b"\x00", g0, g1 + 1) < 0:
            return
        ones = b"\x01" * (g1 - g0 + 1)
        # pwrite, not a store into the shared mapping: a sparse file that can't get a block
        # answers ENOSPC here, where a mapping would kill the worker with SIGBUS.
        try:
            if os.pwrite(self.fd, ones, g0) != len(ones):
                raise OSError(errno.ENOSPC, "short write")
            if self.group is not None:
                # "power": the coarse marks covering these granules on disk before the caller
                # writes the volume (the exact bytes need no sync: a crash expands the coarse ones).
                c0 = offset >> CSHIFT
                c1 = (offset + length - 1) >> CSHIFT
                cseen = self.cseen
                if cseen.find(0, c0, c1 + 1) >= 0:
                    cones = b"\x01" * (c1 - c0 + 1)
                    if os.pwrite(self.fd, cones, self.coarse_at + c0) != len(cones):
                        raise OSError(errno.ENOSPC, "short write")
                    self.group.commit()
                    cseen[c0 : c1 + 1] = cones
        except OSError as e:
            self._fail(f"could not record a change in the map of generation {self.gen}: {e.strerror or e}")
        if self.group is not None:
            seen[g0 : g1 + 1] = ones

    def would_wait(self, offset: int, length: int) -> bool:
        """Would mark() wait for a sync: "power", and a coarse region of the range not yet
        durably marked in this generation?"""
        cseen = self.cseen
        if cseen is None or length <= 0:
            return False
        c0 = offset >> CSHIFT
        c1 = (offset + length - 1) >> CSHIFT
        if c0 == c1:
            return not cseen[c0]
        return cseen.find(0, c0, c1 + 1) >= 0

    def _fail(self, reason: str) -> None:
        # The live write goes on regardless; the change history is then not to be trusted.
        if self.failed:
            return
        self.failed = True
        log.critical("%s: change tracking can no longer be trusted", reason)
        if self.on_failure is not None:
            try:
                self.on_failure(reason)
            except OSError as e:
                log.error("cannot tell the supervisor: %s", e)

    def retire(self) -> None:
        """A barrier swapped this map out (no write uses it any more): under "power" it is
        synced and sealed by a background thread, then closed; otherwise closed now."""
        if self.group is None:
            self.close()
        else:
            _sealer().put(self)

    def seal(self) -> None:
        """Every exact mark on disk, then the seal byte, on disk too. Then closed. A failure
        leaves the map unsealed: a host crash would then expand it (over-report, never miss)."""
        try:
            os.fdatasync(self.fd)
            if os.pwrite(self.fd, bytes([trackmap.SEALED]), trackmap.seal_offset(self.size)) != 1:
                raise OSError(errno.ENOSPC, "short write")
            os.fdatasync(self.fd)
        except OSError as e:
            log.warning("could not seal the change map of generation %d: %s", self.gen, e.strerror or e)
        finally:
            self.close()

    def sync(self) -> None:
        """At a clean stop: every mark on disk (and every retired map sealed)."""
        _drain()
        try:
            os.fsync(self.fd)
        except OSError as e:
            log.warning("could not sync the change map of generation %d: %s", self.gen, e)

    def close(self) -> None:
        if self.seen is not self.file:
            self.seen.close()
        self.file.close()
        os.close(self.fd)


# One thread seals the maps the barriers swapped out, off the write path, in order.
_queue: "queue.Queue[ChangeMap] | None" = None
_queue_lock = threading.Lock()


def _sealer() -> "queue.Queue[ChangeMap]":
    global _queue
    with _queue_lock:
        if _queue is None:
            _queue = queue.Queue()
            threading.Thread(target=_seal_forever, args=(_queue,), name="seal maps", daemon=True).start()
        return _queue


def _seal_forever(q: "queue.Queue[ChangeMap]") -> None:
    while True:
        cm = q.get()
        try:
            cm.seal()
        finally:
            q.task_done()


def _drain() -> None:
    """Wait until every map handed to the sealer is sealed."""
    with _queue_lock:
        q = _queue
    if q is not None:
        q.join()
