"""A snapshot's cluster map in POSIX shared memory: header + one u32 per volume cluster.

Entry 0: the cluster is still only on the volume. Entry k: its old content is
backing-store cluster k (NetBSD's indirect table: clusters [0, table_clusters)
of the backing store hold its header and the on-disk table, ipc/storeformat.py,
so k >= 1 always).
An aligned 4-byte store is atomic, so the entry is its own "copied" flag: the
volume worker publishes it after the copy is complete and before it
overwrites the volume; the snapshot worker reads without a lock.

Who writes what (everyone else only reads):

  field               written by
  ------------------  ----------------------------------------------------------
  magic ... bs_limit  the supervisor, once, in create() (fixed from then on)
  table entries       the volume worker (copy-on-write), each entry once
  bs_next, copies,    the volume worker processes (allocation; reconcile() after a
  free runs           restart), under the allocation lock (lock_alloc())
  created_ns, state   the volume worker at the barrier (activate(): ACTIVE);
                      the supervisor sets DESTROYING when it unconfigures
  flags ERROR, error  the volume worker (backing store full / write error) and
                      the supervisor (worker failed, lost): first error only,
                      across processes, through set_error()
  (nothing)           the snapshot worker maps the segment read-only

"First error only" is a check-then-set by two processes, so it runs under an
open-file-description lock (fcntl F_OFD_SETLKW) on the segment's descriptor,
plus a thread lock for the threads of one process (they share the descriptor,
hence the lock). Why a lock and not a single writer: the supervisor sets the
error precisely when the volume worker is dead or failing, so it cannot ask
that worker to do it; why OFD and not a futex or flock: Python has neither an
atomic compare-and-set on mmap nor futexes, and the kernel drops an OFD lock
when its holder dies (SIGKILL included), so a killed writer never wedges it.

A volume served by several processes hands out backing-store clusters from
the same header: the allocation (bs_next, copies and the free runs a killed
process left, at FREE_OFFSET) changes only under the allocation lock, an OFD
lock on another byte range of the segment, held only to hand out clusters.
"""

from __future__ import annotations

import enum
import fcntl
import mmap
import os
import struct
import sys
import threading
import time
from typing import Iterator

import posix_ipc

from ipc import storeformat

MAGIC = b"FSSDMAP1"
VERSION = 1
HEADER_SIZE = 4096  # a page, so the table is page aligned
ERROR_OFFSET = 256
ERROR_MAX = 256
# Free runs below bs_next (reserved by a killed process, never published): u32 count, then
# (first, count) u32 pairs; handed out again first (workers/cow.py reconcile()).
FREE_OFFSET = 1024
FREE_MAX = (HEADER_SIZE - FREE_OFFSET - 8) // 8
ALLOC_LOCK_OFFSET = 8  # the lock byte of the allocation lock (a lock range only: the magic is not written)
# fss(4)'s FSS_CLUSTER_MAX: the cluster size grows so a map never exceeds 64 MiB.
CLUSTER_MAX = 1 << 24
DEFAULT_CLUSTER = 64 * 1024  # fss: MAXPHYS on amd64

if sys.byteorder != "little":  # the table is little-endian u32 on disk and in memory
    raise ImportError("fssd's cluster map needs a little-endian host")


class MapState(enum.IntEnum):
    """fss.c's snapshot life (FSS_IDLE ... FSS_DESTROYING); errors are a separate flag."""

    IDLE = 0
    CREATING = 1
    ACTIVE = 2
    DESTROYING = 3


FLAG_ERROR = 1
FLAG_UNCONFIG_ON_CLOSE = 2

# magic, version, state, flags, (pad), cluster_size, cluster_count, volume_size,
# table_clusters, bs_next, bs_limit, created_ns, copies
_HDR = struct.Struct("<8sIIIIQQQQQQQQ")
_OFF_STATE = 12
_OFF_FLAGS = 16
_OFF_BS_NEXT = struct.calcsize("<8sIIIIQQQQ")
_OFF_CREATED = _OFF_BS_NEXT + 16
_OFF_COPIES = _OFF_CREATED + 8
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# struct flock (x86-64 / aarch64 layout): l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = struct.Struct("hhqqi4x")
_F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)


def span(shift: int, offset: int, length: int) -> tuple[int, int]:
    """First and last unit (of 2^shift bytes) touched by [offset, offset+length); length > 0."""
    return offset >> shift, (offset + length - 1) >> shift


def choose_cluster_size(requested: int, volume_size: int, bs_block: int = 512) -> int:
    """fss(4): a power of two >= the request and the backing store's block size,
    raised until the volume has at most 2^24 clusters; >= 2^32 is EINVAL."""
    csize = requested if requested > 0 else DEFAULT_CLUSTER
    # Counted as the map counts (a partial last cluster is a cluster), which fss's own
    # floor division misses by one for sizes just over a multiple.
    if -(-volume_size // csize) > CLUSTER_MAX:
        csize = volume_size // CLUSTER_MAX + 1
    shift = max(bs_block, 1).bit_length() - 1
    while shift < 32 and (1 << shift) < csize:
        shift += 1
    if shift >= 32:
        raise ValueError(f"cluster size {csize} is too large")
    return 1 << shift


def table_clusters(cluster_count: int, cluster_size: int) -> int:
    """Backing-store clusters before the first copy: the store's header page and its
    on-disk table (ipc/storeformat.py), as fss keeps its table ahead of the copies."""
    return storeformat.table_clusters(cluster_count, cluster_size)


class ClusterMap:
    """A mapped segment. Use create() or attach(); close() unmaps, unlink() removes the name."""

    def __init__(self, name: str, shm: posix_ipc.SharedMemory, writable: bool):
        self.name = name
        self._mm = mmap.mmap(shm.fd, shm.size, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
        # A writer keeps the descriptor: set_error() locks it against the other processes.
        self._fd = -1
        if writable:
            self._fd = os.dup(shm.fd)
            os.set_inheritable(self._fd, False)
        shm.close_fd()
        self._error_lock = threading.Lock()
        (magic, version, _s, _f, _pad, csize, count, vsize, tclusters, _n, limit, _c, _cp) = _HDR.unpack_from(self._mm, 0)
        if magic != MAGIC or version != VERSION:
            self._mm.close()
            raise ValueError(f"{name}: not an fssd cluster map (magic {magic!r}, version {version})")
        self.cluster_size = csize
        self.cluster_shift = csize.bit_length() - 1
        self.cluster_count = count
        self.volume_size = vsize
        self.table_clusters = tclusters
        self.bs_limit = limit  # clusters; 0 = no limit
        self._mv = memoryview(self._mm)
        # The table: index = volume cluster, value = backing-store cluster.
        self.table = self._mv[HEADER_SIZE : HEADER_SIZE + 4 * count].cast("I")

    @classmethod
    def create(cls, name: str, cluster_size: int, volume_size: int, bs_limit_clusters: int, flags: int = 0, mode: int = 0o600) -> "ClusterMap":
        count = (volume_size + cluster_size - 1) // cluster_size
        if count > CLUSTER_MAX:
            raise ValueError(f"{count} clusters exceed the map limit {CLUSTER_MAX}")
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=mode, size=HEADER_SIZE + 4 * count)
        # A fresh segment reads as zeros: every entry starts "still on the volume".
        mm = mmap.mmap(shm.fd, shm.size)
        tc = table_clusters(count, cluster_size)
        _HDR.pack_into(mm, 0, MAGIC, VERSION, MapState.CREATING, flags, 0, cluster_size, count, volume_size, tc, tc, bs_limit_clusters, 0, 0)
        mm.close()
        return cls(name, shm, writable=True)

    @classmethod
    def attach(cls, name: str, writable: bool = True) -> "ClusterMap":
        shm = posix_ipc.SharedMemory(name, 0, read_only=not writable)
        return cls(name, shm, writable)

    def span(self, offset: int, length: int) -> tuple[int, int]:
        """First and last cluster of [offset, offset+length) (length > 0): every
        cluster-range loop on the map starts here."""
        shift = self.cluster_shift
        return offset >> shift, (offset + length - 1) >> shift

    # any_copied / all_copied run per request (read path, write path with a snapshot):
    # they spell span() out, one Python call less, ~60 ns a request.

    def any_copied(self, offset: int, length: int) -> bool:
        """Is any cluster of the range published (its old content in the backing store)?"""
        shift = self.cluster_shift
        c0, c1 = offset >> shift, (offset + length - 1) >> shift
        t = self.table
        if c0 == c1:
            return t[c0] != 0
        return any(t[c0 : c1 + 1])

    def all_copied(self, offset: int, length: int) -> bool:
        """Is every cluster of the range published?"""
        shift = self.cluster_shift
        c0, c1 = offset >> shift, (offset + length - 1) >> shift
        t = self.table
        if c0 == c1:
            return t[c0] != 0
        return 0 not in t[c0 : c1 + 1]

    def pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(cluster, start, stop) for each cluster of [offset, offset+length), clipped to it."""
        shift = self.cluster_shift
        end = offset + length
        c0, c1 = self.span(offset, length)
        for c in range(c0, c1 + 1):
            yield c, max(c << shift, offset), min((c + 1) << shift, end)

    def cluster_start(self, c: int) -> int:
        """Volume offset of cluster c."""
        return c << self.cluster_shift

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            self.table.release()
            self._mv.release()
            self._mm.close()
        except (BufferError, ValueError):
            pass  # still referenced by a reader thread; the mapping goes with the process

    @staticmethod
    def unlink(name: str) -> None:
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            pass

    # -- header fields ------------------------------------------------------------

    @property
    def state(self) -> MapState:
        return MapState(_U32.unpack_from(self._mm, _OFF_STATE)[0])

    @state.setter
    def state(self, value: MapState) -> None:
        _U32.pack_into(self._mm, _OFF_STATE, int(value))

    @property
    def flags(self) -> int:
        return _U32.unpack_from(self._mm, _OFF_FLAGS)[0]

    @property
    def valid(self) -> bool:
        return not self.flags & FLAG_ERROR

    @property
    def usable(self) -> bool:
        """ACTIVE and no error: reads are served, copy-on-write is done."""
        return _U32.unpack_from(self._mm, _OFF_STATE)[0] == MapState.ACTIVE and not _U32.unpack_from(self._mm, _OFF_FLAGS)[0] & FLAG_ERROR

    @property
    def error(self) -> str:
        raw = bytes(self._mm[ERROR_OFFSET : ERROR_OFFSET + ERROR_MAX])
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")

    def set_error(self, reason: str) -> bool:
        """Mark invalid; only the first error acts (fss_error), whichever process or
        thread sets it. True if this call did it. See the module doc for the lock."""
        if self.flags & FLAG_ERROR:  # already invalid: no lock needed to say so
            return False
        raw = reason.encode()[: ERROR_MAX - 1]
        with self._error_lock:
            self._ofd_lock(fcntl.F_WRLCK)
            try:
                if self.flags & FLAG_ERROR:
                    return False
                # The reason first, then the flag: whoever sees the flag finds the reason.
                self._mm[ERROR_OFFSET : ERROR_OFFSET + ERROR_MAX] = raw + bytes(ERROR_MAX - len(raw))
                _U32.pack_into(self._mm, _OFF_FLAGS, self.flags | FLAG_ERROR)
                return True
            finally:
                self._ofd_lock(fcntl.F_UNLCK)

    def _ofd_lock(self, kind: int) -> None:
        """Lock (waiting) or unlock the error field's bytes for every process mapping this segment."""
        if self._fd < 0:
            raise ValueError(f"{self.name}: mapped read-only (or closed); cannot set an error")
        fcntl.fcntl(self._fd, _F_OFD_SETLKW, _FLOCK.pack(kind, os.SEEK_SET, ERROR_OFFSET, ERROR_MAX, 0))

    def lock_alloc(self) -> None:
        """The allocation lock across processes (threads of one process hold their own lock first)."""
        if self._fd < 0:
            raise ValueError(f"{self.name}: mapped read-only (or closed); cannot allocate")
        fcntl.fcntl(self._fd, _F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, ALLOC_LOCK_OFFSET, 1, 0))

    def unlock_alloc(self) -> None:
        fcntl.fcntl(self._fd, _F_OFD_SETLKW, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, ALLOC_LOCK_OFFSET, 1, 0))

    def free_runs(self) -> list[list[int]]:
        """The free runs [first, count] below bs_next (under the allocation lock)."""
        n = _U32.unpack_from(self._mm, FREE_OFFSET)[0]
        raw = struct.unpack_from(f"<{2 * n}I", self._mm, FREE_OFFSET + 8)
        return [[raw[2 * i], raw[2 * i + 1]] for i in range(n)]

    def set_free_runs(self, runs: list[list[int]]) -> int:
        """Replace the free runs (under the allocation lock); returns how many clusters did not fit."""
        kept = runs[-FREE_MAX:]  # room for FREE_MAX runs; more (never seen) stay unused, and are counted
        lost = sum(c for _f, c in runs[: len(runs) - len(kept)])
        flat = [x for run in kept for x in run]
        struct.pack_into(f"<{len(flat)}I", self._mm, FREE_OFFSET + 8, *flat)
        _U32.pack_into(self._mm, FREE_OFFSET, len(kept))
        return lost

    @property
    def bs_next(self) -> int:
        """Clusters in the backing store (table clusters + copies): fss's sc_clnext."""
        return _U64.unpack_from(self._mm, _OFF_BS_NEXT)[0]

    @bs_next.setter
    def bs_next(self, value: int) -> None:
        _U64.pack_into(self._mm, _OFF_BS_NEXT, value)

    @property
    def copies(self) -> int:
        return _U64.unpack_from(self._mm, _OFF_COPIES)[0]

    @copies.setter
    def copies(self, value: int) -> None:
        _U64.pack_into(self._mm, _OFF_COPIES, value)

    @property
    def created_ns(self) -> int:
        return _U64.unpack_from(self._mm, _OFF_CREATED)[0]

    def activate(self, when_ns: int | None = None) -> None:
        """The barrier: stamp the snapshot's time and start copy-on-write."""
        _U64.pack_into(self._mm, _OFF_CREATED, when_ns if when_ns is not None else time.time_ns())
        self.state = MapState.ACTIVE

    def published(self) -> list[int]:
        """Every non-zero entry: the backing-store clusters holding published copies.
        Runs of zero entries (most of a young snapshot) are skipped a chunk at a time."""
        chunk = 1 << 16
        zero = bytes(chunk)
        end = HEADER_SIZE + 4 * self.cluster_count
        out: list[int] = []
        for off in range(HEADER_SIZE, end, chunk):
            piece = self._mm[off : min(off + chunk, end)]  # bytes: compared with memcmp
            if piece != zero[: len(piece)]:
                out.extend(filter(None, memoryview(piece).cast("I")))
        return out


