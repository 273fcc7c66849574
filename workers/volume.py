"""Volume worker: serves one live volume read-write over NBD, doing copy-on-write.

`python -m workers.volume SETTINGS_JSON` (spawned by the supervisor). The
listening socket, the channel to the supervisor and every backing store arrive
as inherited descriptors, so a restarted worker picks up exactly where the
dead one stopped: the maps are in shared memory, the copies on disk.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import socket
import sys
import threading
import time

import msgspec
import posix_ipc
import setproctitle

from ipc import logfmt, names, nbd, workermsg
from ipc.clustermap import ClusterMap
from workers import fileio
from workers.cow import SnapshotTarget, WriteGate
from workers import spawned
from workers.nbdserve import Server
from workers.spawned import refuse_if_orphaned

log = logging.getLogger("volume")

# Copy-on-write locks: STRIPES locks, each covering runs of 2^STRIPE_CLUSTERS_SHIFT clusters.
STRIPES = 1021  # prime: regions a power of two apart (one per nbdcopy thread) never share a lock
STRIPE_CLUSTERS_SHIFT = 4
# Old clusters read once for several snapshots, up to this much per write (else copied per snapshot).
SHARED_READ_MAX = 64 << 20
# Copy-on-write for one request is done this much at a time (a multiple of every cluster size
# below it; larger clusters simply span pieces, each copied whole by the first piece touching it).
PROTECT_CHUNK = 64 << 20


class AttachedSnapshot(msgspec.Struct, frozen=True):
    device: str
    map_name: str
    bs_fd: int


class VolumeSettings(msgspec.Struct, frozen=True):
    name: str
    path: str
    size: int
    listen_fd: int
    snapshots: list[AttachedSnapshot] = []
    debug: bool = False
    use_syslog: bool = False


class VolumeBackend:
    """The live volume: every write copies what the snapshots still need first."""

    read_only = False

    def __init__(self, fd: int, size: int):
        self.fd = fd
        self.size = size
        self.gate = WriteGate()
        # Can this volume zero fast (punch holes)? Asked once, past the end, where nothing is touched.
        try:
            self.can_punch = fileio.punch_hole(fd, max(size, 1 << 30), 4096)
        except OSError:
            self.can_punch = False
        # Writers racing on one cluster are serialised by the stripe that covers it;
        # copies of clusters in other stripes (other connections) go on in parallel.
        self._stripes = [threading.Lock() for _ in range(STRIPES)]
        self._local = threading.local()
        # Replaced (never mutated) at a barrier, so the hot path iterates without a lock.
        self.targets: tuple[SnapshotTarget, ...] = ()

    # -- copy-on-write ---------------------------------------------------------------

    def _protect(self, offset: int, length: int) -> None:
        # A TRIM or WRITE_ZEROES may span gigabytes: copy in pieces, so other writers
        # (and their stripes) are held up for one piece at a time, not the whole range.
        end = offset + length
        while end - offset > PROTECT_CHUNK:
            self._protect_piece(offset, PROTECT_CHUNK)
            offset += PROTECT_CHUNK
        self._protect_piece(offset, end - offset)

    def _protect_piece(self, offset: int, length: int) -> None:
        needing = [t for t in self.targets if t.needs_copy(offset, length)]
        if not needing:
            return
        shift = needing[0].map.cluster_shift
        if len(needing) > 1 and all(t.map.cluster_shift == shift for t in needing):
            # Several snapshots lack the same old clusters: read them once, write them to each.
            lo = (offset >> shift) << shift
            hi = min((((offset + length - 1) >> shift) + 1) << shift, self.size)
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

    @contextlib.contextmanager
    def _stripe_locks(self, cluster_shift: int, offset: int, length: int):
        """The locks covering these clusters, taken in index order so writers can't deadlock."""
        shift = cluster_shift + STRIPE_CLUSTERS_SHIFT
        first, last = offset >> shift, (offset + length - 1) >> shift
        if first == last:  # the common case: one stripe
            with self._stripes[first % STRIPES]:
                yield
            return
        locks = [self._stripes[i] for i in sorted({s % STRIPES for s in range(first, min(last, first + STRIPES - 1) + 1)})]
        for lock in locks:
            lock.acquire()
        try:
            yield
        finally:
            for lock in locks:
                lock.release()

    def _scratch(self, n: int) -> memoryview:
        """This thread's buffer for old clusters (anonymous memory, kept for the next write)."""
        mm = getattr(self._local, "scratch", None)
        if mm is None or len(mm) < n:
            mm = self._local.scratch = mmap.mmap(-1, max(n, 1 << 20))
        return memoryview(mm)[:n]

    def attach(self, target: SnapshotTarget) -> int:
        """The snapshot barrier: drain writes, attach, stamp the time, resume. Returns µs held."""
        t0 = time.perf_counter_ns()
        self.gate.close()
        try:
            target.map.activate()
            target.active = target.map.usable
            self.targets = self.targets + (target,)
        finally:
            self.gate.open()
        return (time.perf_counter_ns() - t0) // 1000

    def detach(self, device: str) -> SnapshotTarget | None:
        self.gate.close()
        try:
            found = [t for t in self.targets if t.device == device]
            self.targets = tuple(t for t in self.targets if t.device != device)
        finally:
            self.gate.open()
        return found[0] if found else None

    # -- Backend -------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        refuse_if_orphaned()
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise OSError(errno.EIO, "short read from the volume image")
        return data

    def read_into(self, view: memoryview, offset: int) -> None:
        refuse_if_orphaned()
        if os.preadv(self.fd, [view], offset) != len(view):
            raise OSError(errno.EIO, "short read from the volume image")

    def sendfile_source(self, offset: int, length: int) -> tuple[int, int] | None:
        refuse_if_orphaned()
        return self.fd, offset

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        refuse_if_orphaned()  # a write queued before the supervisor died must never land
        self.gate.enter()
        try:
            if self.targets:
                self._protect(offset, len(data))
            if fua:
                n = os.pwritev(self.fd, [data], offset, os.RWF_DSYNC)
                if n != len(data):  # short (nearly full file system): finish, then make it durable
                    fileio.pwrite_all(self.fd, memoryview(data)[n:], offset + n)
                    os.fdatasync(self.fd)
            else:
                n = os.pwrite(self.fd, data, offset)
                if n != len(data):
                    fileio.pwrite_all(self.fd, memoryview(data)[n:], offset + n)
        finally:
            self.gate.leave()

    def flush(self) -> None:
        refuse_if_orphaned()
        os.fdatasync(self.fd)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        refuse_if_orphaned()
        self.gate.enter()
        try:
            if self.targets:
                self._protect(offset, length)
            fileio.punch_hole(self.fd, offset, length)  # a hint: a device that can't is fine
            if fua:
                os.fdatasync(self.fd)
        finally:
            self.gate.leave()

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        if fast and not self.can_punch:
            # Say so before copying anything for the snapshots: the client will write zeroes itself.
            raise OSError(errno.ENOTSUP, "no fast way to zero this range")
        refuse_if_orphaned()
        self.gate.enter()
        try:
            if self.targets:
                self._protect(offset, length)
            if not (may_trim and fileio.punch_hole(self.fd, offset, length)):
                if fast:
                    raise OSError(errno.ENOTSUP, "no fast way to zero this range")
                fileio.write_zeroes(self.fd, offset, length)
            if fua:
                os.fdatasync(self.fd)
        finally:
            self.gate.leave()

    def cache(self, offset: int, length: int) -> None:
        refuse_if_orphaned()
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        refuse_if_orphaned()
        hz = nbd.STATE_HOLE | nbd.STATE_ZERO
        return [(n, hz if hole else 0) for n, hole in fileio.extents(self.fd, offset, length)]


def _attach_target(backend: VolumeBackend, device: str, map_name: str, bs_fd: int) -> SnapshotTarget:
    cmap = ClusterMap.attach(map_name, writable=True)
    return SnapshotTarget(device, cmap, bs_fd, backend.fd)


def run(settings: VolumeSettings, channel_fd: int) -> int:
    setproctitle.setproctitle(names.proc_title(f"volume {settings.name}"))
    logfmt.setup(f"volume {settings.name}", settings.debug, settings.use_syslog)
    chan = spawned.channel(channel_fd)
    fd = os.open(settings.path, os.O_RDWR | os.O_CLOEXEC)
    backend = VolumeBackend(fd, settings.size)
    # A restart: the snapshots that were active stay active, with their maps as they are.
    lost: list[workermsg.Refused] = []
    for s in settings.snapshots:
        try:
            t = _attach_target(backend, s.device, s.map_name, s.bs_fd)
        except (OSError, ValueError, posix_ipc.Error) as e:
            # One snapshot's trouble never keeps the live volume down; the supervisor marks it invalid.
            log.error("%s: cannot re-attach (%s)", s.device, e)
            lost.append(workermsg.Refused(s.device, getattr(e, "errno", None) or errno.EIO, f"volume worker could not re-attach: {e}"))
            continue
        reclaimed, took = t.reconcile()  # what a killed predecessor reserved but never published
        backend.targets = backend.targets + (t,)
        log.info("%s: re-attached (%d clusters copied so far, %d reserved but unused reclaimed, %.0f ms)", s.device, t.map.copies, reclaimed, took * 1000)
    listener = socket.socket(fileno=settings.listen_fd)
    server = Server(listener, nbd.Export(settings.name, settings.size, False, f"fssd volume {settings.name}"), backend)
    acceptor = threading.Thread(target=server.serve_forever, name="accept", daemon=True)
    acceptor.start()
    chan.send(workermsg.Ready(kind="volume", pid=os.getpid()))
    for refusal in lost:  # req 0: not an answer, a report
        chan.send(refusal)
    log.info("serving %s (%d bytes)", settings.path, settings.size)

    for msg, fds in spawned.supervisor_messages(chan):
        if isinstance(msg, workermsg.AttachSnapshot):
            if not fds:
                chan.send(workermsg.Refused(msg.device, errno.EBADF, "no backing-store descriptor came with the request", msg.req))
                continue
            try:
                target = _attach_target(backend, msg.device, msg.map_name, fds[0])
            except (OSError, ValueError, posix_ipc.Error) as e:
                os.close(fds[0])
                chan.send(workermsg.Refused(msg.device, getattr(e, "errno", None) or errno.EINVAL, str(e), msg.req))
                continue
            held = backend.attach(target)
            log.info("%s: snapshot barrier held writes for %d us", msg.device, held)
            chan.send(workermsg.Attached(msg.device, held, msg.req))
        elif isinstance(msg, workermsg.DetachSnapshot):
            target = backend.detach(msg.device)
            if target is not None:
                target.write_table()
                os.close(target.bs_fd)
                target.map.close()
            chan.send(workermsg.Detached(msg.device, msg.req))
        else:
            for extra in fds:
                os.close(extra)
            log.warning("ignoring unexpected message %r", msg)

    server.stop()
    for t in backend.targets:
        t.write_table()
    os.fsync(fd)
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(*spawned.command_line("workers.volume", VolumeSettings, argv))


if __name__ == "__main__":
    sys.exit(main())
