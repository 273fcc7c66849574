"""Volume worker: serves one live volume read-write over NBD, doing copy-on-write.

`python -m workers.volume SETTINGS_JSON` (spawned by the supervisor). The
listening socket, the channel to the supervisor and every backing store arrive
as inherited descriptors, so a restarted worker picks up exactly where the
dead one stopped: the maps are in shared memory, the copies on disk.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import threading

import posix_ipc

from ipc import nbd, workermsg
from ipc.channel import Channel
from ipc.clustermap import ClusterMap
from ipc.cowshare import CowShare
from workers import fileio
from workers.changemap import ChangeMap
from workers.cow import CopyOnWrite, HoldError, SnapshotTarget
from workers.storejournal import mark_invalid
from workers import spawned
from workers.nbdserve import Server
from workers.settings import AttachedSnapshot, VolumeSettings  # noqa: F401 (AttachedSnapshot: re-exported)
from workers.spawned import refuse_if_orphaned

log = logging.getLogger("volume")

class VolumeBackend:
    """The live volume: every write copies what the snapshots still need first."""

    read_only = False

    def __init__(self, fd: int, size: int, share: CowShare | None = None):
        self.fd = fd
        self.size = size
        # Can this volume zero fast (punch holes)? Asked once, past the end, where nothing is touched.
        try:
            self.can_punch = fileio.punch_hole(fd, max(size, 1 << 30), 4096)
        except OSError:
            self.can_punch = False
        # Every change to the volume goes through here (gate, stripe locks, snapshots).
        self.share = share
        self.cow = CopyOnWrite(fd, size, share)

    @property
    def targets(self) -> tuple[SnapshotTarget, ...]:
        return self.cow.targets

    def attach(self, target: SnapshotTarget, track: ChangeMap | None = None) -> int:
        return self.cow.attach(target, track=track)

    def detach(self, device: str) -> SnapshotTarget | None:
        return self.cow.detach(device)

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
        cow = self.cow
        cow.begin(offset, len(data))  # `with cow.writing(...)`, spelled out: the hot path (see CopyOnWrite.begin)
        try:
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
            cow.end()

    def write_quick(self, offset: int, data: memoryview) -> bool:
        """write() if it can go straight to the volume (no FUA), else False and nothing done:
        the NBD selector thread's path, which must not wait (cow.begin_quick)."""
        cow = self.cow
        if not cow.begin_quick(offset, len(data)):
            return False
        try:
            n = os.pwrite(self.fd, data, offset)
            if n != len(data):
                fileio.pwrite_all(self.fd, memoryview(data)[n:], offset + n)
        finally:
            cow.end()
        return True

    def quick_write(self, offset: int, length: int) -> bool:
        """Would a write of this range go straight to the volume (cow.would_wait)? The NBD
        loop's guess whether a client is quick again; a wrong one only costs time."""
        return not self.cow.would_wait(offset, length)

    def flush(self) -> None:
        refuse_if_orphaned()
        os.fdatasync(self.fd)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        with self.cow.writing(offset, length):
            fileio.punch_hole(self.fd, offset, length)  # a hint: a device that can't is fine
            if fua:
                os.fdatasync(self.fd)

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        if fast and not self.can_punch:
            # Say so before copying anything for the snapshots: the client will write zeroes itself.
            raise OSError(errno.ENOTSUP, "no fast way to zero this range")
        with self.cow.writing(offset, length):
            if not (may_trim and fileio.punch_hole(self.fd, offset, length)):
                if fast:
                    raise OSError(errno.ENOTSUP, "no fast way to zero this range")
                fileio.write_zeroes(self.fd, offset, length)
            if fua:
                os.fdatasync(self.fd)

    def cache(self, offset: int, length: int) -> None:
        refuse_if_orphaned()
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        refuse_if_orphaned()
        hz = nbd.STATE_HOLE | nbd.STATE_ZERO
        return [(n, hz if hole else 0) for n, hole in fileio.extents(self.fd, offset, length)]


class InvalidRecorder:
    """The failure path only: a snapshot turned invalid and its store's header could not be
    flagged, so the supervisor writes the reason into the state directory before the write
    that found it goes on without copying. Called from serving threads; the main thread's
    message loop hands the answers back (answered())."""

    TIMEOUT = 10.0

    def __init__(self, chan: Channel):
        self.chan = chan
        self._lock = threading.Lock()
        self._ticket = 0
        self._waiting: dict[int, list] = {}

    def __call__(self, device: str, reason: str) -> bool:
        done = threading.Event()
        with self._lock:
            self._ticket += 1
            ticket = self._ticket
            self._waiting[ticket] = [done, False]
        try:
            self.chan.send(workermsg.Invalidated(device, reason, ticket))
            if not done.wait(self.TIMEOUT):
                log.error("%s: the supervisor did not confirm the invalid state within %.0f s", device, self.TIMEOUT)
                return False
            return self._waiting[ticket][1]
        except OSError as e:
            log.error("%s: cannot tell the supervisor it is invalid: %s", device, e)
            return False
        finally:
            with self._lock:
                self._waiting.pop(ticket, None)

    def answered(self, msg: workermsg.InvalidRecorded) -> None:
        with self._lock:
            w = self._waiting.get(msg.ticket)
            if w is not None:
                w[1] = msg.ok
                w[0].set()


def _attach_target(backend: VolumeBackend, device: str, map_name: str, bs_fd: int, recorder: InvalidRecorder) -> SnapshotTarget:
    cmap = ClusterMap.attach(map_name, writable=True)
    t = SnapshotTarget(device, cmap, bs_fd, backend.fd, share=backend.share)
    t.record_invalid = recorder
    return t


def _recorded_before_serving(chan: Channel, device: str, reason: str) -> bool:
    """A snapshot that can't be re-attached, and whose store won't take the invalid flag:
    the supervisor records it before this worker serves (and so writes) anything."""
    chan.send(workermsg.Invalidated(device, reason, 0))
    try:
        while True:
            got = chan.recv(InvalidRecorder.TIMEOUT)
            if got is None:
                return False
            msg, fds = got
            for extra in fds:
                os.close(extra)
            if isinstance(msg, workermsg.InvalidRecorded) and msg.ticket == 0:
                return msg.ok
    except (OSError, ValueError):
        return False


def run(settings: VolumeSettings, chan: Channel) -> int:
    fd = os.open(settings.path, os.O_RDWR | os.O_CLOEXEC)
    share = None
    if settings.cow_fd >= 0:
        # This process's slot still holds what a killed predecessor had in flight: reconcile() below.
        share = CowShare(settings.cow_fd, settings.index)
        os.close(settings.cow_fd)
    backend = VolumeBackend(fd, settings.size, share)
    # A restart: the snapshots that were active stay active, with their maps as they are.
    lost: list[workermsg.Refused] = []
    recorder = InvalidRecorder(chan)
    for s in settings.snapshots:
        try:
            t = _attach_target(backend, s.device, s.map_name, s.bs_fd, recorder)
        except (OSError, ValueError, posix_ipc.Error) as e:
            # One snapshot's trouble never keeps the live volume down; the supervisor marks it invalid.
            log.error("%s: cannot re-attach (%s)", s.device, e)
            why = f"volume worker could not re-attach: {e}"
            # This worker will write the volume without copying for it: on disk first.
            if not mark_invalid(s.bs_fd, True) and not _recorded_before_serving(chan, s.device, why):
                log.critical("%s: the invalid state is recorded nowhere on disk; the volume is served regardless", s.device)
            lost.append(workermsg.Refused(s.device, getattr(e, "errno", None) or errno.EIO, why))
            continue
        # What a killed predecessor reserved but never published (its records in our slot).
        dead = share.predecessor.get(t._devno, []) if share is not None else []
        reclaimed, took = t.reconcile(dead, backend.cow.cluster_locked(t.map.cluster_shift))
        backend.cow.add(t)
        log.info("%s: re-attached (%d clusters copied so far, %d reserved but unused reclaimed, %.0f ms)", s.device, t.map.copies, reclaimed, took * 1000)

    def track_failed(reason: str) -> None:
        chan.send(workermsg.TrackFailed(reason))

    if settings.track_fd >= 0:
        # Before the first request: every write is marked in the current generation's map.
        backend.cow.track = ChangeMap(settings.track_fd, settings.track_gen, settings.size, settings.track_sync)
        backend.cow.track.on_failure = track_failed
    if share is not None:
        share.reset()  # the predecessor's reservations are reclaimed: the slot is ours now
    listener = socket.socket(fileno=settings.listen_fd)
    server = Server(listener, nbd.Export(settings.name, settings.size, False, f"fssd volume {settings.name}"), backend,
                    on_clients=share.set_clients if share is not None and settings.processes > 1 else None)
    if settings.processes > 1:
        server.accept_batch = 1
        if share is not None:
            share.set_clients(0)
            server.defer_accept = share.busier
    acceptor = threading.Thread(target=server.serve_forever, name="accept", daemon=True)
    acceptor.start()
    chan.send(workermsg.Ready(kind="volume", pid=os.getpid()))
    for refusal in lost:  # req 0: not an answer, a report
        chan.send(refusal)
    log.info("serving %s (%d bytes)", settings.path, settings.size)

    for msg, fds in spawned.supervisor_messages(chan):
        if isinstance(msg, workermsg.AttachSnapshot):
            if not fds or len(fds) != msg.nfds:
                for extra in fds:
                    os.close(extra)
                chan.send(workermsg.Refused(msg.device, errno.EBADF, "no backing-store descriptor came with the request", msg.req))
                continue
            # The next generation's change map, made ready before the barrier (which only swaps it in).
            nxt: ChangeMap | None = None
            try:
                if len(fds) > 1:
                    nxt = ChangeMap(fds[1], msg.track_gen, settings.size, settings.track_sync, fresh=True)
                    nxt.on_failure = track_failed
                target = _attach_target(backend, msg.device, msg.map_name, fds[0], recorder)
            except (OSError, ValueError, posix_ipc.Error) as e:
                for extra in fds if nxt is None else fds[:1]:
                    os.close(extra)
                if nxt is not None:
                    nxt.close()
                chan.send(workermsg.Refused(msg.device, getattr(e, "errno", None) or errno.EINVAL, str(e), msg.req))
                continue
            before = backend.cow.track
            try:
                held = backend.cow.attach(target, msg.hold, msg.when_ns or None, nxt)
            except HoldError as e:  # the hold this attach belonged to has ended
                target.map.close()
                os.close(fds[0])
                if nxt is not None:
                    nxt.close()
                chan.send(workermsg.Refused(msg.device, e.errno, e.strerror, msg.req))
                continue
            except OSError as e:  # "power": the instant could not be synced to the volume
                target.map.close()
                os.close(fds[0])
                if nxt is not None:
                    nxt.close()
                chan.send(workermsg.Refused(msg.device, e.errno or errno.EIO, f"could not sync the volume for the snapshot: {e.strerror or e}", msg.req))
                continue
            if nxt is not None and before is not None:
                before.retire()  # no write uses it any more (the gate drained): synced, sealed, closed; the supervisor keeps the file
            if not msg.hold:  # inside a hold the supervisor reports the held time (Released)
                log.info("%s: snapshot barrier held writes for %d us", msg.device, held)
            chan.send(workermsg.Attached(msg.device, held, msg.req))
        elif isinstance(msg, workermsg.Hold):
            try:
                token, drain_us = backend.cow.hold(msg.sync)
            except OSError as e:  # HoldError, or the volume's sync failed
                chan.send(workermsg.Refused("", e.errno or errno.EIO, f"cannot hold the write gate: {e.strerror or e}", msg.req))
                continue
            chan.send(workermsg.Held(token, drain_us, msg.req))
        elif isinstance(msg, workermsg.Release):
            held_us, expired = backend.cow.release(msg.token)
            if not expired:
                log.info("write gate held for %d us (two-phase barrier)", held_us)
            chan.send(workermsg.Released(msg.token, held_us, expired, msg.req))
        elif isinstance(msg, workermsg.InvalidRecorded):
            recorder.answered(msg)
        elif isinstance(msg, workermsg.DetachSnapshot):
            target = backend.detach(msg.device)
            if target is not None:
                os.close(target.bs_fd)
                target.map.close()
            chan.send(workermsg.Detached(msg.device, msg.req))
        else:
            for extra in fds:
                os.close(extra)
            log.warning("ignoring unexpected message %r", msg)

    server.stop()
    for t in backend.targets:  # copies and table entries on disk before the stop counts as clean
        t.sync()
    if backend.cow.track is not None:
        backend.cow.track.sync()
    os.fsync(fd)
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(*spawned.bootstrap("workers.volume", VolumeSettings, argv, title=volume_title, log_name=volume_title))


def volume_title(s: VolumeSettings) -> str:
    """`volume data`, or `volume data [2/4]` when several processes serve it."""
    return f"volume {s.name}" if s.processes <= 1 else f"volume {s.name} [{s.index + 1}/{s.processes}]"


if __name__ == "__main__":
    sys.exit(main())
