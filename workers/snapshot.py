"""Snapshot worker `fssN`: serves one snapshot read-only over NBD (docs/architecture.md "Read path").

Entry set: read the backing store. Entry clear: read the live volume, then
test the entry again; if it was set meanwhile the volume may already hold new
data, so read the backing store instead. The entry is published only after
the copy is complete and before the volume is overwritten, so no lock is
needed across processes.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import threading

from ipc import nbd, workermsg
from ipc.channel import Channel
from ipc.clustermap import ClusterMap
from workers import fileio
from workers.dirtybitmaps import DirtyBitmaps
from workers import spawned
from workers.nbdserve import Server
from workers.settings import SnapshotSettings
from workers.spawned import refuse_if_orphaned

log = logging.getLogger("snapshot")


def _invalid(cmap: ClusterMap) -> OSError:
    return OSError(errno.EIO, f"snapshot invalid: {cmap.error or 'not active'}")


class SnapshotBackend:
    """Reads the snapshot's image: volume where untouched, backing store where copied."""

    read_only = True

    def __init__(self, volume_fd: int, bs_fd: int, cmap: ClusterMap, bitmaps: DirtyBitmaps | None = None):
        self.volume_fd = volume_fd
        self.bs_fd = bs_fd
        self.map = cmap
        self.size = cmap.volume_size
        self.bitmaps = bitmaps

    def read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        self.read_into(memoryview(buf), offset)
        return buf

    def read_into(self, view: memoryview, offset: int) -> None:
        # An orphan must not serve: a new instance may write the volume without copying for us.
        refuse_if_orphaned()
        m = self.map
        if not m.usable:
            raise _invalid(m)
        length = len(view)
        if not m.any_copied(offset, length):
            got = os.preadv(self.volume_fd, [view], offset)
            # Test after read: still clear means the volume was not yet overwritten when we read it.
            if not m.any_copied(offset, length):
                if not m.usable:  # invalidated meanwhile: the volume no longer waits for copies
                    raise _invalid(m)
                if got != length:
                    raise OSError(errno.EIO, "short read from the volume image")
                return
        self._read_mixed(view, offset)
        if not m.usable:
            raise _invalid(m)

    def _read_mixed(self, view: memoryview, offset: int) -> None:
        """Runs of clusters from one place, one read each: the backing store where copied
        (consecutive store clusters), else the volume, each cluster tested again after."""
        m = self.map
        t = m.table
        shift = m.cluster_shift
        cs = m.cluster_size
        pos = offset
        end = offset + len(view)
        while pos < end:
            c = pos >> shift
            k = t[c]
            nc = c + 1
            stop = min(nc << shift, end)
            if k:
                while stop < end and t[nc] == k + (nc - c):
                    nc += 1
                    stop = min(nc << shift, end)
                self._read_exact(self.bs_fd, view[pos - offset : stop - offset], k * cs + (pos - (c << shift)))
            else:
                while stop < end and not t[nc]:
                    nc += 1
                    stop = min(nc << shift, end)
                self._read_exact(self.volume_fd, view[pos - offset : stop - offset], pos)
                for cc, a, b in m.pieces(pos, stop - pos):  # test after read, cluster by cluster
                    kk = t[cc]
                    if kk:
                        self._read_exact(self.bs_fd, view[a - offset : b - offset], kk * cs + (a - m.cluster_start(cc)))
            pos = stop

    @staticmethod
    def _read_exact(fd: int, view: memoryview, off: int) -> None:
        if os.preadv(fd, [view], off) != len(view):
            raise OSError(errno.EIO, f"short read at {off}")

    def sendfile_source(self, offset: int, length: int) -> tuple[int, int] | list[tuple[int, int, int]] | None:
        """A copied cluster never changes, so a range whose clusters are all copied goes out
        by sendfile from the backing store: one piece per run of consecutive store clusters.
        A cluster still on the volume needs the test after read, which only a copy out of
        the volume allows (the socket would hold the volume's pages themselves, and a live
        write after the test would change what the client receives): read_into."""
        refuse_if_orphaned()
        m = self.map
        if not m.usable:
            return None
        c0, c1 = m.span(offset, length)
        t = m.table
        k0 = t[c0]
        if not k0:
            return None
        c = c0 + 1
        while c <= c1 and t[c] == k0 + (c - c0):
            c += 1
        cs = m.cluster_size
        first = k0 * cs + (offset - m.cluster_start(c0))
        if c > c1:
            return self.bs_fd, first  # the usual case: one run
        # Several runs (clusters copied out of order): all must be copied already.
        end = offset + length
        pieces = []
        pos, start, k = offset, c0, k0
        while True:
            stop = min(c << m.cluster_shift, end)
            pieces.append((self.bs_fd, k * cs + (pos - (start << m.cluster_shift)), stop - pos))
            if c > c1:
                return pieces
            k = t[c]
            if not k:
                return None
            pos, start = stop, c
            c += 1
            while c <= c1 and t[c] == k + (c - start):
                c += 1

    # The protocol refuses writes to a read-only export first; these are the backstop.
    def write(self, offset: int, data: bytes, fua: bool) -> None:
        raise OSError(errno.EPERM, "snapshot is read-only")

    def trim(self, offset: int, length: int, fua: bool) -> None:
        raise OSError(errno.EPERM, "snapshot is read-only")

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        raise OSError(errno.EPERM, "snapshot is read-only")

    def flush(self) -> None:
        pass

    def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.volume_fd, offset, length, os.POSIX_FADV_WILLNEED)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The volume's holes, less every cluster copied by the time we look (those are data)."""
        refuse_if_orphaned()
        m = self.map
        if not m.usable:
            raise _invalid(m)
        hz = nbd.STATE_HOLE | nbd.STATE_ZERO
        t = m.table
        out: list[tuple[int, int]] = []

        def add(n: int, flags: int) -> None:
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + n, flags)
            else:
                out.append((n, flags))

        pos = offset
        for n, hole in fileio.extents(self.volume_fd, offset, length):
            end = pos + n
            if not hole:
                add(n, 0)
            elif not m.any_copied(pos, n):
                add(n, hz)  # nothing copied in this hole (the usual case): one extent
            else:
                # A live write into a hole copies the (zero) cluster first: such clusters are data now.
                for c, a, b in m.pieces(pos, n):
                    add(b - a, 0 if t[c] else hz)
            pos = end
        return out

    # The qemu:dirty-bitmap contexts (workers/dirtybitmaps.py): changes since earlier snapshots.
    def dirty_bitmaps(self) -> list[str]:
        return self.bitmaps.names() if self.bitmaps is not None else []

    def dirty_extents(self, name: str, offset: int, length: int) -> list[tuple[int, int]]:
        refuse_if_orphaned()
        if not self.map.usable:
            raise _invalid(self.map)
        if self.bitmaps is None:
            raise OSError(errno.EINVAL, "this snapshot has no change tracking")
        return self.bitmaps.extents(name, offset, length)


def run(settings: SnapshotSettings, chan: Channel) -> int:
    vol_fd = os.open(settings.volume_path, os.O_RDONLY | os.O_CLOEXEC)
    try:  # a snapshot is mostly read front to back (backups): this descriptor's readahead doubles
        os.posix_fadvise(vol_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except OSError:
        pass
    cmap = ClusterMap.attach(settings.map_name, writable=False)
    bitmaps = None
    if settings.track_lineage and settings.track_dir_fd >= 0:
        bitmaps = DirtyBitmaps(settings.track_dir_fd, settings.track_lineage, settings.track_gen, settings.track_bases, cmap.volume_size)
    backend = SnapshotBackend(vol_fd, settings.bs_fd, cmap, bitmaps)

    def clients_changed(count: int) -> None:
        try:
            chan.send(workermsg.ClientsChanged(settings.device, count))
        except OSError:
            pass

    listener = socket.socket(fileno=settings.listen_fd)
    export = nbd.Export(settings.device, backend.size, True, f"fssd snapshot {settings.device} of {settings.volume} at {settings.taken}")
    server = Server(listener, export, backend, on_clients=clients_changed)
    threading.Thread(target=server.serve_forever, name="accept", daemon=True).start()
    chan.send(workermsg.Ready(kind="snapshot", pid=os.getpid()))
    log.info("serving snapshot of %s taken %s", settings.volume, settings.taken)
    for _msg, fds in spawned.supervisor_messages(chan):
        for fd in fds:  # nothing is expected here; never leak what arrives
            os.close(fd)
    server.stop()
    log.info("stopped")
    return 0


def title(s: SnapshotSettings) -> str:
    return f"{s.device} {s.volume}@{s.taken}"


def log_name(s: SnapshotSettings) -> str:
    return s.device


def main(argv: list[str] | None = None) -> int:
    return run(*spawned.bootstrap("workers.snapshot", SnapshotSettings, argv, title=title, log_name=log_name))


if __name__ == "__main__":
    sys.exit(main())
