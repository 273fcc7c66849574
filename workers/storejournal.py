"""One snapshot's table entries in its backing store, and under "power" their group commit.

The volume worker's copy-on-write calls, for each run of clusters it copies:

    reserved(first, n)          under the allocation lock, when store clusters are handed out
    <write the copies>
    record(c0, first, crcs)     the run's table entries, one pwrite (8 bytes each)
    written(first)              the run's writes are issued (also after a failed copy)
    commit()                    "power": returns once one fdatasync covered them (group commit)
    <publish the entries in the shared-memory map; the caller writes the volume>

Publishing waits for commit(): a second writer of the same cluster sees the entry
and writes the volume at once, so the entry must not be visible before it is durable.

"process" writes the entries (no syncs): after any process crash the page cache
holds them, in order with the copies. "none" writes nothing.
"""

from __future__ import annotations

import os

import msgspec

from ipc import storeformat as sf
from ipc.storeformat import Durability
from workers.groupcommit import GroupCommit, Watermark


class StoreJournal:
    def __init__(self, bs_fd: int, durability: Durability, first_copy_cluster: int):
        self.fd = bs_fd
        self.durability = Durability(durability)
        self.keeps = self.durability != Durability.NONE
        self.power = self.durability == Durability.POWER
        self._seq = 0
        self.watermark = Watermark(first_copy_cluster)
        self.group = GroupCommit(self._sync, before=self.watermark.low, after=self._commit_record) if self.power else None

    @classmethod
    def for_store(cls, bs_fd: int, first_copy_cluster: int) -> "StoreJournal":
        """The durability the store's header says (written at configure); none without one."""
        try:
            h = sf.decode_header(os.pread(bs_fd, sf.SECTOR, sf.HEADER_OFFSET))
        except (OSError, sf.StoreFormatError):
            return cls(bs_fd, Durability.NONE, first_copy_cluster)
        return cls(bs_fd, Durability(h.durability), first_copy_cluster)

    def _sync(self) -> None:
        os.fdatasync(self.fd)

    def _commit_record(self, low: object) -> None:
        """After a sync: store clusters below `low` (taken when it began) are durable with
        their entries. Not synced itself: the next sync carries it, and an older one is
        only more cautious (recovery re-reads more)."""
        self._seq += 1
        os.pwrite(self.fd, sf.encode_commit(sf.CommitRecord(self._seq, int(low))), sf.COMMIT_OFFSET)

    def reserved(self, first: int, n: int) -> None:
        if self.power:
            self.watermark.opened(first, n)

    def record(self, c0: int, first: int, crcs: list[int]) -> None:
        """Entries for volume clusters c0.. -> store clusters first.. (consecutive)."""
        if not self.keeps:
            return
        raw = b"".join(sf.encode_entry(first + i, crc) for i, crc in enumerate(crcs))
        off = sf.entry_offset(c0)
        view = memoryview(raw)
        while view:
            n = os.pwrite(self.fd, view, off)
            view, off = view[n:], off + n

    def clear_stale(self, c: int, store_cluster: int) -> bool:
        """A killed process's reservation is reclaimed: if the store's entry for volume cluster c
        still names that store cluster (written before the kill, never published), clear it, so
        no entry names the cluster when it is handed out again. The caller holds c's stripe lock."""
        if not self.keeps:
            return False
        off = sf.entry_offset(c)
        raw = os.pread(self.fd, sf.ENTRY_SIZE, off)
        if len(raw) != sf.ENTRY_SIZE or int.from_bytes(raw[:4], "little") != store_cluster:
            return False
        os.pwrite(self.fd, bytes(sf.ENTRY_SIZE), off)
        return True

    def written(self, first: int) -> None:
        if self.power:
            self.watermark.closed(first)

    def invalid(self) -> bool:
        """The snapshot just became invalid: copies stop, the volume is written without them.
        Say so in the store's header before that happens (synced under "power"), so no restart
        can bring it back as if intact. False if the store would not take it."""
        if not self.keeps:
            return True
        return mark_invalid(self.fd, self.power)

    def commit(self) -> None:
        if self.group is not None:
            self.group.commit()


def mark_invalid(bs_fd: int, sync: bool) -> bool:
    """Set FLAG_INVALID in the store's header (one sector, rewritten whole)."""
    try:
        h = sf.decode_header(os.pread(bs_fd, sf.SECTOR, sf.HEADER_OFFSET))
        if not h.flags & sf.FLAG_INVALID:
            raw = sf.encode_header(msgspec.structs.replace(h, flags=h.flags | sf.FLAG_INVALID))
            if os.pwrite(bs_fd, raw, sf.HEADER_OFFSET) != len(raw):
                return False
            if sync:
                os.fdatasync(bs_fd)
        return True
    except (OSError, sf.StoreFormatError):
        return False
