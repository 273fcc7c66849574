"""The supervisor's side of durable snapshots: the store's layout at configure, the map rebuilt
at start-up, and the store-usage warnings (docs/architecture.md "Durability").
"""

from __future__ import annotations

import errno
import os

from daemon.recovery import Intact
from daemon.statedir import SnapshotRecord
from ipc import storeformat as sf
from ipc.clustermap import ClusterMap

# Store usage (copies against the room the limit leaves for them) logged and shown once each.
USAGE_STEPS = (80, 95)


def write_layout(fd: int, is_device: bool, header: sf.StoreHeader) -> None:
    """At configure, before the barrier: the header page and the all-clear table, made durable.
    Writing it also proves the store takes writes (a "file" on /proc truncates without error)."""
    nbytes = header.table_clusters * header.cluster_size
    if is_device:  # whatever the device held before: zeros written
        _write_zeros(fd, nbytes)
    else:
        os.ftruncate(fd, 0)
        try:
            # The table's room reserved (a table write never finds the store full) and reading
            # as zeros, made durable by the fsync below, without writing it: 128 MiB at 1 TiB,
            # 50-100 ms of a configure even on tmpfs, and a full write-out on a disk.
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EIO):
                raise
            _write_zeros(fd, nbytes)  # a file system that allocates no other way
    if os.pwrite(fd, sf.encode_header(header), sf.HEADER_OFFSET) != sf.SECTOR:
        raise OSError(errno.EIO, "short write")
    os.fsync(fd)


def _write_zeros(fd: int, nbytes: int) -> None:
    zero = bytes(min(nbytes, 8 << 20))
    off = 0
    while off < nbytes:
        n = min(len(zero), nbytes - off)
        if os.pwrite(fd, memoryview(zero)[:n], off) != n:
            raise OSError(errno.EIO, "short write")
        off += n


def opened_path(fd: int) -> str:
    """The absolute path of what `fd` is open on, as the kernel names it ("" once unlinked):
    what recovery reopens, and only if it is still the same file (device and inode)."""
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""
    if not path.startswith("/") or path.endswith(" (deleted)"):
        return ""
    return path


def load_map(name: str, rec: SnapshotRecord, intact: Intact, limit_clusters: int, flags: int = 0) -> ClusterMap:
    """The shared-memory map of a recovered snapshot, from its on-disk table: ACTIVE, its instant's time."""
    ClusterMap.unlink(name)
    cmap = ClusterMap.create(name, rec.cluster_size, rec.volume_size, limit_clusters, flags)
    cmap.table[:] = memoryview(intact.table).cast("I")
    cmap.bs_next = intact.bs_next
    cmap.copies = intact.copies
    cmap.activate(rec.created_ns)
    return cmap


def invalid_map(name: str, rec: SnapshotRecord, reason: str, flags: int = 0) -> ClusterMap:
    """A map that only says "invalid, because ...": status shows it, reads answer EIO."""
    ClusterMap.unlink(name)
    cmap = ClusterMap.create(name, rec.cluster_size, rec.volume_size, 0, flags)
    cmap.set_error(reason)
    cmap.activate(rec.created_ns)
    return cmap


class UsageWatch:
    """Warn once at each step of store usage, per snapshot (blksnap's low-space event)."""

    def __init__(self):
        self.reached: dict[str, int] = {}  # device -> highest step reported

    @staticmethod
    def percent(bs_next: int, tclusters: int, limit: int) -> float:
        room = limit - tclusters
        return 100.0 * (bs_next - tclusters) / room if room > 0 else 0.0

    def check(self, device: str, bs_next: int, tclusters: int, limit: int) -> list[int]:
        """The steps newly reached (80, 95), lowest first; each is reported once."""
        pct = self.percent(bs_next, tclusters, limit)
        done = self.reached.get(device, 0)
        new = [s for s in USAGE_STEPS if done < s <= pct]
        if new:
            self.reached[device] = new[-1]
        return new

    def forget(self, device: str) -> None:
        self.reached.pop(device, None)
