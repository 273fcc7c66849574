"""The volume worker's side of changed-block tracking: marking one generation's change map.

The supervisor creates each generation's map (`<statedir>/track/<volume>/gen-<g>.map`, one
byte per 64 KiB granule, ipc/trackmap.py) and hands the worker its descriptor: the current
one at spawn, the next one with each snapshot's AttachSnapshot, swapped in at the barrier.
Every write, trim and write-zeroes marks its granules here inside the write gate, before the
volume is written (workers/cow.py), so a write lands in the map of the generation whose
barrier it precedes.

Marking an already-marked granule costs one byte read; a new mark is one pwrite of the map.
Under durability "power" a newly set byte is on disk before the volume write is issued: the
file's byte is written, one group-commit
fdatasync of the map (shared by concurrent writers, workers/groupcommit.py) covers it, and
only then is it recorded in `seen`, the in-memory copy the fast check reads. So a second
writer of the same granule never sees it marked before it is durable. Under "process" and
"none" `seen` is the file's own mapping: no syncs.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from typing import Callable

from ipc import trackmap
from workers.groupcommit import GroupCommit

log = logging.getLogger("track")

SHIFT = trackmap.GRANULE_SHIFT


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
        if sync:
            self.seen = mmap.mmap(-1, n)  # zero pages until touched: O(1) whatever the volume size
            if not fresh:
                # A restarted worker: a killed predecessor may have written marks it never
                # synced. Synced now, before `seen` trusts them (a writer finding a granule
                # marked there goes straight to the volume).
                try:
                    os.fdatasync(fd)
                    self.seen[:] = self.file[:]
                except OSError as e:  # then nothing is trusted: each granule is marked (and synced) anew
                    log.warning("could not sync the change map of generation %d: %s", gen, e)
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
                self.group.commit()  # "power": on disk before the caller writes the volume
        except OSError as e:
            self._fail(f"could not record a change in the map of generation {self.gen}: {e.strerror or e}")
        if self.group is not None:
            seen[g0 : g1 + 1] = ones

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

    def sync(self) -> None:
        """At a clean stop: every mark on disk."""
        try:
            os.fsync(self.fd)
        except OSError as e:
            log.warning("could not sync the change map of generation %d: %s", self.gen, e)

    def close(self) -> None:
        if self.seen is not self.file:
            self.seen.close()
        self.file.close()
        os.close(self.fd)
