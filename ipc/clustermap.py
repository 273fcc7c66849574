"""A snapshot's cluster map in POSIX shared memory: header + one u32 per volume cluster.

Entry 0: the cluster is still only on the volume. Entry k: its old content is
backing-store cluster k (NetBSD's indirect table: clusters [0, table_clusters)
of the backing store hold the on-disk copy of this table, so k >= 1 always).
An aligned 4-byte store is atomic, so the entry is its own "copied" flag: the
volume worker publishes it after the copy is complete and before it
overwrites the volume; the snapshot worker reads without a lock.

Only the volume worker writes entries and the allocation counter; the
supervisor creates the segment and reads the header for status.
"""

from __future__ import annotations

import enum
import mmap
import struct
import sys
import time

import posix_ipc

MAGIC = b"FSSDMAP1"
VERSION = 1
HEADER_SIZE = 4096  # a page, so the table is page aligned
ERROR_OFFSET = 256
ERROR_MAX = 256
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
    """Backing-store clusters holding the on-disk table (fss: FSS_BTOCL(len)+1)."""
    return (cluster_count * 4) // cluster_size + 1


class ClusterMap:
    """A mapped segment. Use create() or attach(); close() unmaps, unlink() removes the name."""

    def __init__(self, name: str, shm: posix_ipc.SharedMemory, writable: bool):
        self.name = name
        self._mm = mmap.mmap(shm.fd, shm.size, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
        shm.close_fd()
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

    def close(self) -> None:
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
        """Mark invalid; only the first error acts (fss_error). True if this call did it."""
        if self.flags & FLAG_ERROR:
            return False
        raw = reason.encode()[: ERROR_MAX - 1]
        self._mm[ERROR_OFFSET : ERROR_OFFSET + ERROR_MAX] = raw + bytes(ERROR_MAX - len(raw))
        _U32.pack_into(self._mm, _OFF_FLAGS, self.flags | FLAG_ERROR)
        return True

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

    def table_bytes(self) -> bytes:
        """The table as stored at the head of the backing store."""
        return self._mm[HEADER_SIZE : HEADER_SIZE + 4 * self.cluster_count]
