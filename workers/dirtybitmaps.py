"""The dirty bitmaps a snapshot worker serves: what changed since each earlier snapshot.

A snapshot of generation n of a tracked volume offers one bitmap per earlier
generation m it was told about (SnapshotSettings.track_bases), named by that
snapshot's id (`<lineage>-<m>`), served as the NBD meta context
`qemu:dirty-bitmap:<id>`. Its content is the union of the generation maps
m+1 .. n (ipc/trackmap.py), read from the volume's track directory through
the descriptor the supervisor opened, each file with O_NOFOLLOW, and computed
once per base (a bounded cache). Maps m+1 .. n are final: the barrier of
snapshot n swapped the volume worker on to map n+1.

A base is offered only while all its maps are there (retention may remove
them); if one goes between the offer and the first question, the question is
answered with an error, never with a guess.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections import OrderedDict

from ipc import nbd, trackmap

# Unions kept in memory at most (one byte per 64 KiB granule: 16 MiB for 1 TiB).
CACHE_BYTES = 64 << 20
# Any nonzero byte counts as written (a map holds 0/1; anything else must not hide a change).
_AS_FLAG = bytes([0] + [1] * 255)


class DirtyBitmaps:
    def __init__(self, dir_fd: int, lineage: str, gen: int, bases: list[int], volume_size: int, cache_bytes: int = CACHE_BYTES):
        self.dir_fd = dir_fd
        self.lineage = lineage
        self.gen = gen
        self.bases = sorted({m for m in bases if 0 < m < gen}) if lineage and dir_fd >= 0 else []
        self.volume_size = volume_size
        self.map_len = trackmap.map_len(volume_size)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """The ids of the bases answerable now (every map m+1 .. n present, or the union cached)."""
        if not self.bases:
            return []
        # Base m needs maps m+1 .. n: all bases at or above the newest missing map are fine.
        # One stat per generation, newest first, down to the oldest base's.
        floor = self.bases[0]
        for g in range(self.gen, self.bases[0], -1):
            if not self._map_present(g):
                floor = g
                break
        with self._lock:
            cached = set(self._cache)
        return [trackmap.format_id(self.lineage, m) for m in self.bases if m >= floor or m in cached]

    def extents(self, name: str, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, NBD_STATE_DIRTY or 0) from offset on, at most to offset+length."""
        changed = self._union(self._base(name))
        return [(n, nbd.STATE_DIRTY if dirty else 0) for n, dirty in trackmap.extents(changed, offset, length, self.volume_size)]

    def changed(self, name: str) -> bytes:
        """The whole union for base `name` (one byte per granule)."""
        return self._union(self._base(name))

    def _base(self, name: str) -> int:
        parsed = trackmap.parse_id(name)
        if parsed is None or parsed[0] != self.lineage or parsed[1] not in self.bases:
            raise OSError(errno.EINVAL, f"{name} is not a base this snapshot can answer")
        return parsed[1]

    def _map_present(self, g: int) -> bool:
        try:
            st = os.stat(trackmap.map_name(g), dir_fd=self.dir_fd, follow_symlinks=False)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size >= self.map_len

    def _union(self, m: int) -> bytes:
        with self._lock:
            got = self._cache.get(m)
            if got is not None:
                self._cache.move_to_end(m)
                return got
            acc = 0
            for g in range(m + 1, self.gen + 1):
                acc |= int.from_bytes(self._read_map(g, m), "little")
            # Byte-wise OR as one big integer (as trackmap.union), folded one map at a time.
            got = acc.to_bytes(self.map_len, "little").translate(_AS_FLAG)
            self._cache[m] = got
            while len(self._cache) > 1 and len(self._cache) * self.map_len > self.cache_bytes:
                self._cache.popitem(last=False)
            return got

    def _read_map(self, g: int, m: int) -> bytes:
        base = trackmap.format_id(self.lineage, m)
        try:
            fd = os.open(trackmap.map_name(g), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=self.dir_fd)
        except OSError as e:
            raise OSError(errno.EIO, f"changes since {base}: {trackmap.map_name(g)} is gone ({e.strerror}); take a full backup") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < self.map_len:
                raise OSError(errno.EIO, f"changes since {base}: {trackmap.map_name(g)} is not a map of this volume ({st.st_size} bytes, at least {self.map_len} expected)")
            data = os.pread(fd, self.map_len, 0)
            if len(data) != self.map_len:
                raise OSError(errno.EIO, f"changes since {base}: short read of {trackmap.map_name(g)}")
            return data
        finally:
            os.close(fd)
