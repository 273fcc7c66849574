"""Snapshot devices fss0..fssN-1: configure, unconfigure, status (the supervisor's half).

Configuring is serialised (as NetBSD's fss_creating): open the backing store,
create the all-clear map in shared memory, suspend the volume's file systems
(daemon.suspend: FIFREEZE, as fss suspends; with -C, CHECK + FREEZE through
the VSS broker instead), ask the volume worker for the barrier, thaw, then
start the `fssN` worker that serves the snapshot.

A snapshot set (several volumes, one instant) is the same with several
members: each store checked and its table and map made, then one freeze or
suspend for all their volumes and one barrier across their volume workers
(daemon.barrier), all configured or none. A single snapshot is a set of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
from datetime import datetime, timezone
from typing import Any, NamedTuple
import msgspec

from daemon import backing, barrier, durable, recovery, statedir, suspend, tracking
from daemon.errors import ControlError
from daemon.procs import Worker, WorkerGone
from daemon.snaphost import SnapshotHost
from ipc import control, names, trackmap, workermsg
from ipc import storeformat as sf
from ipc.clustermap import FLAG_UNCONFIG_ON_CLOSE, ClusterMap, MapState, choose_cluster_size, table_clusters
from workers.settings import SnapshotSettings

log = logging.getLogger("supervisor")

ATTACH_TIMEOUT = 30.0


def _devices(mounts: list[str]) -> frozenset[int]:
    """The file systems mounted at these points (what the broker froze)."""
    devs = set()
    for m in mounts:
        try:
            if os.path.ismount(m):
                devs.add(os.stat(m).st_dev)
        except OSError:
            pass
    return frozenset(devs)


# Test hook: seconds to hold each table write, standing in for a slow device (tests only).
SLOW_TABLE_ENV = "FSSD_TEST_SLOW_TABLE_WRITE"


def write_table(store: backing.BackingStore, header: sf.StoreHeader) -> None:
    """The store's header and the all-clear table head the store, copies are appended after
    it; writing them also proves the store takes writes (a "file" on /proc truncates without
    error). Over 100 MiB and an fsync at 1 TiB: runs off the event loop."""
    durable.write_layout(store.fd, store.is_device, header)
    delay = os.environ.get(SLOW_TABLE_ENV)
    if delay:
        time.sleep(float(delay))


class Snapshot:
    def __init__(self, device: str, volume: str, store: backing.BackingStore, cmap: ClusterMap, unconfig_on_close: bool):
        self.device = device
        self.volume = volume
        self.store = store
        self.map = cmap
        self.unconfig_on_close = unconfig_on_close
        self.listener: socket.socket | None = None
        self.worker: Worker | None = None
        self.had_clients = False
        self.clients = 0
        self.backup_shown = "(unlinked)" if store.unlink_now else store.path
        self.consistency = "crash"  # file-system | application | crash
        self.suspended: list[str] = []
        self.window_ms = 0.0
        self.note = ""
        self.durability = "none"
        self.record: statedir.SnapshotRecord | None = None  # in the state directory
        self.recovered = 0.0  # when a start-up brought it back (epoch seconds)
        # `<lineage>-<gen>` on a tracked volume (ipc/trackmap.py), else the store's snapshot uuid.
        self.id = ""
        # Before its barrier: the next generation's change map, (generation, fd), for the worker.
        self.track_next: tuple[int, int] | None = None
        self.set_id = ""  # a snapshot set's id: these devices share one instant
        self.set_members: list[str] = []

    @property
    def taken_utc(self) -> str:
        return datetime.fromtimestamp(self.map.created_ns / 1e9, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Member(NamedTuple):
    """One snapshot of a configure under way (a set has several)."""

    req: control.Configure
    vol: Any
    snap: Snapshot
    header: sf.StoreHeader
    vst: os.stat_result


class _Outcome(NamedTuple):
    snaps: list[Snapshot]
    held_us: int
    window_ms: float | None  # -C: the freeze window


class SnapshotManager:
    def __init__(self, host: SnapshotHost):
        self.host = host
        self.snaps: dict[str, Snapshot] = {}
        self.lock = asyncio.Lock()
        self.usage = durable.UsageWatch()
        self._changes: tuple[tuple, list[tuple[int, int]]] | None = None  # the last answer, for paging

    # -- queries -------------------------------------------------------------------

    def devices(self) -> list[str]:
        return list(self.host.devices)

    def devices_of(self, volume: str) -> list[str]:
        return sorted(d for d, s in self.snaps.items() if s.volume == volume)

    def attached_for(self, volume: str) -> list[tuple[str, str, int]]:
        """What a (re)started volume worker must protect: (device, map name, backing fd)."""
        return [(s.device, s.map.name, s.store.fd) for s in self.snaps.values()
                if s.volume == volume and s.map.state == MapState.ACTIVE and s.map.valid and s.store.fd >= 0]

    def workers(self) -> list[Worker]:
        return [s.worker for s in self.snaps.values() if s.worker]

    def summary(self) -> str:
        n = len(self.snaps)
        bad = sum(1 for s in self.snaps.values() if not s.map.valid)
        return f"{n} snapshot(s)" + (f", {bad} invalid" if bad else "")

    def info(self, device: str) -> control.SnapshotInfo:
        s = self.snaps.get(device)
        if s is None:
            return control.SnapshotInfo(device=device, in_use=False)
        m = s.map
        vol = self.host.volumes().get(s.volume)
        w = s.worker
        state = "invalid" if not m.valid else {MapState.CREATING: "creating", MapState.ACTIVE: "active"}.get(m.state, m.state.name.lower())
        return control.SnapshotInfo(
            device=device,
            in_use=True,
            volume=s.volume,
            volume_path=vol.section.path if vol else "",
            mountpoint=vol.section.mountpoint if vol else None,
            state=state,
            error=m.error,
            taken=m.created_ns / 1e9,
            unconfig_on_close=s.unconfig_on_close,
            cluster_size=m.cluster_size,
            cluster_count=m.cluster_count,
            bs_clusters=m.bs_next,
            bs_limit_clusters=m.bs_limit,
            copies=m.copies,
            backup=s.backup_shown,
            uri=names.nbd_uri(self.host.rundir, device),
            pid=w.pid if w and w.alive else 0,
            uptime=time.monotonic() - w.started if w and w.alive else 0.0,
            restarts=w.restarts if w else 0,
            last_error=w.last_error if w else "",
            clients=s.clients,
            consistency=s.consistency,
            suspended=s.suspended,
            window_ms=s.window_ms,
            note=s.note,
            durability=s.durability,
            recovered=s.recovered,
            id=s.id,
            store_usage=self.usage.percent(m.bs_next, m.table_clusters, m.bs_limit),
            usage_warning=self.usage.reached.get(device, 0),
            set_id=s.set_id,
            set_members=s.set_members,
        )

    # -- configure -------------------------------------------------------------------

    async def configure(self, req: control.Configure, fds: list[int], uid: int) -> control.Configured:
        """`fds`: the store descriptor fssconfig opened with the caller's rights (and, for a file
        it made, that file's directory): fssd never opens the backing path itself."""
        try:
            if len(fds) != req.nfds or req.nfds not in (1, 2) or (req.nfds == 2) != bool(req.name) or "/" in req.name:
                raise ControlError(errno.EINVAL, "a configure request carries the backing store's descriptor (fssconfig opens it)")
            claimed, fds = fds, []
            out = await self._configure_many([req], [claimed], uid, "")
        finally:
            for fd in fds:
                os.close(fd)
        snap = out.snaps[0]
        return control.Configured(self.info(req.device), out.held_us, out.window_ms,
                                  snap.window_ms if snap.consistency == "file-system" and snap.suspended else None)

    async def configure_set(self, req: control.ConfigureSet, fds: list[int], uid: int) -> control.ConfiguredSet:
        """Several snapshots of one instant (a snapshot set): one VSS freeze or one suspend for
        all their volumes, one barrier across their volume workers; all configured, or none."""
        try:
            members = req.members
            if not 2 <= len(members) <= min(len(self.devices()), control.SET_MAX) or any(
                    m.nfds not in (1, 2) or (m.nfds == 2) != bool(m.name) or "/" in m.name for m in members) \
                    or len(fds) != sum(m.nfds for m in members):
                raise ControlError(errno.EINVAL, "a snapshot set is 2 or more members, each with its backing store's descriptor "
                                                 f"(fssconfig opens them; devices are {self._device_range()})")
            fdsets, at = [], 0
            for m in members:
                fdsets.append(fds[at:at + m.nfds])
                at += m.nfds
            fds = []
            reqs = [control.Configure(device=m.device, path=m.path, backup=m.backup, cluster=m.cluster, size=m.size,
                                      unconfig_on_close=req.unconfig_on_close, unlink=m.unlink, consistent=req.consistent,
                                      timeout=req.timeout, no_suspend=req.no_suspend, name=m.name, nfds=m.nfds) for m in members]
            out = await self._configure_many(reqs, fdsets, uid, sf.new_id()[:12])
        finally:
            for fd in fds:
                os.close(fd)
        s0 = out.snaps[0]
        suspended = next((s.window_ms for s in out.snaps if s.consistency == "file-system" and s.suspended), None)
        return control.ConfiguredSet([self.info(s.device) for s in out.snaps], s0.set_id, out.held_us, out.window_ms, suspended)

    async def _configure_many(self, reqs: list[control.Configure], fdsets: list[list[int]], uid: int, set_id: str) -> "_Outcome":
        """Check every member, then configure them all (or none). Consumes every fd in `fdsets`."""
        try:
            for r in reqs:
                if r.device not in self.devices():
                    raise ControlError(errno.ENXIO, f"{r.device}: Device not configured (devices are {self._device_range()})")
            if len({r.device for r in reqs}) != len(reqs):
                raise ControlError(errno.EINVAL, "a snapshot set names the same device twice")
            async with self.lock:
                vols = []
                for r in reqs:
                    if r.device in self.snaps:
                        raise ControlError(errno.EBUSY, f"{r.device}: Device busy")
                    vol = self.host.find_volume(r.path)
                    if vol is None:
                        raise ControlError(errno.ENOENT, f"{r.path}: no such volume (give a volume name, its mountpoint or its image path)")
                    if any(v is vol for v in vols):
                        raise ControlError(errno.EINVAL, f"{r.path}: volume {vol.section.name} twice in one snapshot set")
                    if not _processes(vol) or not all(w.alive for w in _processes(vol)):
                        raise ControlError(errno.EAGAIN, f"{vol.section.name}: volume worker is not running; try again")
                    vols.append(vol)
                stores: list[backing.BackingStore] = []
                try:
                    for i, (r, vol) in enumerate(zip(reqs, vols)):
                        fds = fdsets[i]
                        store = backing.check_store(fds[0], r.backup, uid, vol.section.mountpoint, self.host.freeze_mounts(),
                                                    self._taken(stores))
                        store = store._replace(unlink_now=r.unlink, dirfd=fds[1] if r.nfds == 2 else -1, name=r.name)
                        fdsets[i] = []  # the store's now
                        stores.append(store)
                        self.host.record_made(stores)  # from now on a kill must not leave the file behind
                    return await self._configure(reqs, vols, stores, set_id)
                except BaseException:
                    # fssconfig removes a file it made for a failed configure
                    for store in stores:
                        await self.host.offload(backing.discard, store, True)
                    self.host.record_made([])
                    raise
        finally:
            for fds in fdsets:
                for fd in fds:
                    os.close(fd)

    def _device_range(self) -> str:
        d = self.host.devices
        return f"{d[0]}..{d[-1]}" if d else "none"

    def _taken(self, configuring: list[backing.BackingStore] = ()) -> dict[tuple, str]:
        """Storage that must never become a backing store: every volume's data, every store in
        use, and the stores of the set being configured."""
        taken: dict[tuple, str] = {}
        for v in self.host.volumes().values():
            try:
                for ident in backing.volume_identities(os.stat(v.section.path)):
                    taken[ident] = f"the image of volume {v.section.name}"
            except OSError:
                pass
        stores = [(d, snap.store) for d, snap in self.snaps.items()] + [("another member of this set", s) for s in configuring]
        for d, store in stores:
            if store.fd < 0:  # came back invalid without its store
                continue
            for ident in backing.store_identities(store.fd, os.fstat(store.fd)):
                taken.setdefault(ident, d if d.startswith("another") else f"the backing store of {d}")
        return taken

    async def _prepare(self, req: control.Configure, vol, store: backing.BackingStore, durability: str) -> "_Member":
        """The member's table in its store and its all-clear map: everything before the barrier."""
        try:
            csize = choose_cluster_size(req.cluster, vol.size, store.block_size)
            backing.check_cluster(req.cluster, csize, vol.size)
        except ValueError as e:
            raise ControlError(errno.EINVAL, f"cluster size: {e}") from None
        count = (vol.size + csize - 1) // csize
        tclusters = table_clusters(count, csize)
        limit = backing.limit_clusters(store, req.size, csize, count, tclusters)
        tr = self.host.tracks().get(vol.section.name)
        # A tracked volume's next change map (created and fsynced in the state directory) is
        # made while the table is laid out in the store; before any suspend or freeze, so the
        # barrier only swaps it in.
        track = asyncio.ensure_future(self._next_change_map(tr, req.device)) if tr is not None else None
        try:
            return await self._prepare_store(req, vol, store, durability, csize, count, tclusters, limit, track)
        except BaseException:
            nxt = await track if track is not None else None
            if nxt is not None:
                tr.abandoned(*nxt)
            raise

    async def _next_change_map(self, tr, device: str) -> tuple[int, int] | None:
        try:
            return await self.host.offload(tr.prepare)
        except OSError as e:
            log.error("%s: cannot create the next change map (%s): this snapshot has no change history", device, e)
            return None

    async def _prepare_store(self, req: control.Configure, vol, store: backing.BackingStore, durability: str, csize: int, count: int,
                             tclusters: int, limit: int, track: asyncio.Future | None) -> "_Member":
        try:
            vst = os.stat(vol.section.path)
            header = sf.StoreHeader(
                sf.new_id(), vst.st_dev, vst.st_ino, vol.size, csize, count, tclusters, limit, time.time_ns(),
                sf.DURABILITY_NAMES[durability], sf.FLAG_UNLINKED if store.unlink_now else 0,
            )
            log.debug("%s: writing the table (with the store header, %d bytes) to the backing store", req.device, tclusters * csize)
            await self.host.offload(write_table, store, header)
        except OSError as e:
            raise ControlError(e.errno or errno.EIO, f"{req.backup}: backing store not writable: {e.strerror or e}") from None
        map_name = names.map_name(self.host.prefix, req.device)
        ClusterMap.unlink(map_name)
        flags = FLAG_UNCONFIG_ON_CLOSE if req.unconfig_on_close else 0
        try:
            cmap = ClusterMap.create(map_name, csize, vol.size, limit, flags)
        except ValueError as e:
            raise ControlError(errno.EINVAL, f"{req.device}: {e}") from None
        snap = Snapshot(req.device, vol.section.name, store, cmap, req.unconfig_on_close)
        snap.id = header.snapshot_id  # replaced by <lineage>-<gen> at the barrier if the volume is tracked
        if track is not None:
            try:
                snap.track_next = await track
            except BaseException:
                cmap.close()
                ClusterMap.unlink(map_name)
                raise
        return _Member(req, vol, snap, header, vst)

    async def _configure(self, reqs: list[control.Configure], vols: list, stores: list[backing.BackingStore], set_id: str) -> "_Outcome":
        req = reqs[0]  # the options common to every member
        durability = self.host.durability()
        members: list[_Member] = []
        window_ms = None
        try:
            for r, vol, store in zip(reqs, vols, stores):
                members.append(await self._prepare(r, vol, store, durability))
            if set_id:
                for m in members:
                    m.snap.set_id, m.snap.set_members = set_id, [x.snap.device for x in members]
            if req.consistent:
                held, window_ms = await self._consistent_barrier(members, req.timeout)
                for m in members:
                    m.snap.consistency, m.snap.window_ms = "application", window_ms
            elif req.no_suspend:
                held = await self._barrier(members)
                for m in members:
                    m.snap.note = f"{m.snap.volume} taken with --no-suspend: snapshot is crash-consistent"
            else:
                held = await self._suspended_barrier(members)
            for m in members:
                self.snaps[m.snap.device] = m.snap
                m.snap.durability = durability
            # The workers start (a spare is assigned) while the records go to disk, in their
            # own order; the answer waits for both.
            await _all(self._start_workers(members), self._persist(members, durability))
        except BaseException:
            for m in members:
                await self._undo(m)
            raise
        for m in members:
            snap = m.snap
            if window_ms is not None:
                how = f", freeze window {window_ms:.1f} ms"
            elif snap.suspended:
                how = f", suspended {', '.join(snap.suspended)} for {snap.window_ms:.1f} ms"
            else:
                how = ""
            log.info(
                "%s: snapshot of %s created (barrier %d us%s)%s, %d clusters of %d, backing store %s",
                snap.device, snap.volume, held, how, f", set {set_id} with {', '.join(snap.set_members)}" if set_id else "",
                snap.map.cluster_count, snap.map.cluster_size, snap.backup_shown,
            )
            if snap.note:
                log.info("%s: %s", snap.device, snap.note)
        self.host.changed()
        return _Outcome([m.snap for m in members], held, window_ms)

    async def _start_workers(self, members: list["_Member"]) -> None:
        for m in members:
            await self._start_worker(m.snap)

    async def _persist(self, members: list["_Member"], durability: str) -> None:
        """Change tracking's new generations, then the snapshots' records (fsynced, in this order)."""
        for m in members:
            await self._track_persist(m.snap)
        if durability != "none" and self.host.state is not None:
            await self._save_records(members)

    async def _save_records(self, members: list["_Member"]) -> None:
        """Only now, after the barrier: a crash before this leaves a store no record names
        (removed at the next start), never a record of a snapshot that was not taken. A set's
        records are written "not done" first, then rewritten "done": a start-up that finds a
        set none of whose records is done removes them all (daemon.statedir.unfinished_sets),
        so no snapshot ever claims to belong to a set that was not completely configured."""
        state = self.host.state
        for m in members:
            snap = m.snap
            snap.record = self._record(snap, m.vol, m.header, m.vst)
            if snap.set_id:
                snap.record = msgspec.structs.replace(snap.record, set_id=snap.set_id, set_members=snap.set_members, set_done=False)
            try:
                await self.host.offload(state.save, snap.record)
            except OSError as e:
                snap.record = None
                raise ControlError(e.errno or errno.EIO, f"{snap.device}: cannot record the snapshot in {state.path}: {e.strerror or e}") from None
        if members[0].snap.set_id:
            for m in members:
                done = msgspec.structs.replace(m.snap.record, set_done=True)
                try:
                    await self.host.offload(state.save, done)
                except OSError as e:
                    raise ControlError(e.errno or errno.EIO, f"{m.snap.device}: cannot record the snapshot set in {state.path}: "
                                                             f"{e.strerror or e}") from None
                m.snap.record = done

    async def _undo(self, m: "_Member") -> None:
        """A member of a configure that failed: as if it had never been asked for (its store is
        discarded by the caller)."""
        snap = m.snap
        if snap.track_next is not None:  # the barrier was refused or never asked for
            tr = self.host.tracks().get(snap.volume)
            if tr is not None:
                tr.abandoned(*snap.track_next)
            snap.track_next = None
        if snap.record is not None and self.host.state is not None:
            try:
                await self.host.offload(self.host.state.remove, snap.device)
            except OSError as e:
                log.error("%s: could not remove its record: %s", snap.device, e)
            snap.record = None
        if self.snaps.get(snap.device) is snap:
            self.snaps.pop(snap.device)
        if snap.worker is not None and snap.worker.alive:
            await snap.worker.stop()
        await self._detach(m.vol, snap.device)
        name = snap.map.name
        snap.map.close()
        ClusterMap.unlink(name)
        self._close_listener(snap)

    def _record(self, snap: Snapshot, vol, header: sf.StoreHeader, vst: os.stat_result) -> statedir.SnapshotRecord:
        store = snap.store
        path = "" if store.unlink_now else durable.opened_path(store.fd)
        return statedir.SnapshotRecord(
            device=snap.device, volume=snap.volume, volume_path=os.path.abspath(vol.section.path),
            volume_id=statedir.identity(vst), volume_size=vol.size,
            store_path=path, store_id=statedir.identity(os.fstat(store.fd)),
            cluster_size=header.cluster_size, limit_clusters=header.limit_clusters,
            flags=header.flags | (0 if path else sf.FLAG_UNLINKED), created_ns=snap.map.created_ns,
            snapshot_id=header.snapshot_id, durability=snap.durability, boot_id=self.host.boot_id,
            unconfig_on_close=snap.unconfig_on_close, consistency=snap.consistency,
            made=store.dirfd >= 0 and bool(store.name), owner=store.owner, id=snap.id,
        )

    async def _barrier(self, members: list["_Member"]) -> int:
        """One barrier across the members' volume workers (daemon.barrier), every process serving
        each volume: all drained before any resumes. A tracked volume's next change map rides
        along with each process's attach and is swapped in at the barrier."""
        got = await barrier.run([b for m in members for b in self._barrier_members(m)],
                                sync=self.host.durability() == "power", timeout=ATTACH_TIMEOUT)
        return got.held_us

    def _barrier_members(self, m: "_Member") -> list[barrier.Member]:
        """One barrier member per process serving the snapshot's volume."""
        snap = m.snap
        nxt = snap.track_next
        fds = [snap.store.fd] + ([nxt[1]] if nxt else [])
        msg = workermsg.AttachSnapshot(snap.device, snap.map.name, track_gen=nxt[0] if nxt else 0, nfds=len(fds))
        procs = _processes(m.vol)
        outcomes: list = []

        def settle() -> None:
            """The change history follows what the processes did with the map, whatever then
            happens to the set. Every one Attached: each swapped it in, the generation moved on
            (even if the set is rolled back). Every one Refused: none did (the map goes at undo).
            Anything else (no answer, or some swapped and some not): the generation moves on
            without an id, and a process that refused is restarted, so that every process
            marks the new map (the old one may be sealed by those that swapped)."""
            if snap.track_next is None:
                return
            if all(isinstance(r, workermsg.Attached) for _w, r in outcomes):
                g, fd = snap.track_next
                snap.track_next = None
                snap.id = self.host.tracks()[snap.volume].advanced(g, fd, snap.map.created_ns)
            elif not all(isinstance(r, workermsg.Refused) for _w, r in outcomes):
                self._track_unknown(snap)
                for w, r in outcomes:
                    if isinstance(r, workermsg.Refused) and w.alive:
                        log.error("%s: volume worker %s kept the old change map while others swapped; restarting it", snap.device, w.key)
                        w.kill()

        def told_by(w: Worker):
            def told(reply) -> None:
                outcomes.append((w, reply))
                if len(outcomes) == len(procs):
                    settle()
            return told

        return [barrier.Member(w, msg, fds, told_by(w)) for w in procs]

    def _track_unknown(self, snap: Snapshot) -> None:
        """The worker may or may not have swapped maps: its successor writes the new one."""
        nxt, snap.track_next = snap.track_next, None
        tr = self.host.tracks().get(snap.volume)
        if nxt is not None and tr is not None:
            tr.unknown(*nxt)
            asyncio.ensure_future(self.host.offload(tr.persist))

    async def _track_persist(self, snap: Snapshot) -> None:
        """The generation handed out is on disk before the snapshot's record is."""
        tr = self.host.tracks().get(snap.volume)
        if tr is None or not trackmap.parse_id(snap.id):
            return
        try:
            await self.host.offload(tr.persist)
        except OSError as e:
            log.error("%s: cannot record change tracking's new generation (%s): a base of %s will be refused after a restart",
                      snap.device, e, snap.id)

    async def _suspended_barrier(self, members: list["_Member"], exclude: frozenset[int] | None = None) -> int:
        """FIFREEZE the volumes' file systems (all in one suspend), barrier, FITHAW (fss's
        suspend); the barrier alone when nothing is mounted from the volumes. `exclude` (with
        -C): file systems the broker holds frozen already; then this runs inside the broker's
        window and logs nothing."""
        under_vss = exclude is not None
        host = self.host
        stores = [*(m.snap.store.fd for m in members), *(s.store.fd for s in self.snaps.values())]
        images = {v.section.path: f"the image of volume {v.section.name}" for v in host.volumes().values()}
        label = ", ".join(m.snap.device for m in members)
        plans = []
        try:
            guarded = await asyncio.to_thread(suspend.guarded_devices, stores, images)
            for m in members:
                name = m.vol.section.name
                plans.append(await asyncio.to_thread(suspend.plan, name, m.vol.section.mountpoint, names.export_socket(host.rundir, name),
                                                     guarded, exclude or frozenset()))
        except suspend.SuspendError as e:
            raise ControlError(e.errno, f"{label}: {e}") from None
        targets = list({t.dev: t for p in plans for t in p.targets}.values())
        if not under_vss:
            for m, p in zip(members, plans):
                if not p.targets:
                    m.snap.note = p.note
                    if not p.crash:
                        m.snap.consistency = "file-system"  # mounted read-only: nothing can change under it
        if not targets:
            return await self._barrier(members)
        try:
            r = await suspend.around(label, targets, host.freeze_max(), lambda: self._barrier(members),
                                     host.flags.env, host.flags.debug, host.flags.use_syslog)
        except suspend.SuspendError as e:
            raise ControlError(e.errno, str(e)) from None
        for m, p in zip(members, plans):
            snap = m.snap
            snap.suspended = [t.point for t in p.targets if t.point not in r.already]
            mine = [t.point for t in p.targets if t.point in r.already]
            if mine and not under_vss:
                snap.note = f"{', '.join(mine)} was frozen already (not by fssd): snapshot taken inside that freeze"
            if p.targets and not under_vss:
                snap.consistency, snap.window_ms = "file-system", r.window_ms
        if not under_vss:
            log.debug("%s: synced %s in %.1f ms before the suspend", label, ", ".join(t.point for t in targets), r.sync_ms)
        return r.held_us

    async def _consistent_barrier(self, members: list["_Member"], timeout: float | None = None) -> tuple[int, float]:
        """CHECK, FREEZE, barrier, THAW, once for every member: the freeze window is the
        snapshots' instant. File systems on the volumes that the broker does not freeze are
        suspended inside its window."""
        gate = self.host.vss()
        if gate is None:
            raise ControlError(errno.EOPNOTSUPP, "application-consistent snapshot needs the VSS broker ([vss] enabled)")
        timeout = timeout or gate.timeout
        label = ", ".join(m.snap.device for m in members)

        def ask(op: str):
            return gate.request(op, timeout)

        ok, reason, _ = await ask("check")
        if not ok:
            raise ControlError(errno.EAGAIN, f"VSS CHECK failed: {reason}")
        t0 = time.perf_counter()
        ok, reason, unknown = await ask("freeze")
        if not ok:
            # A failed FREEZE was already rolled back by the broker; a lost answer may not have been.
            if unknown:
                await ask("thaw")
            raise ControlError(errno.EAGAIN, f"VSS FREEZE failed: {reason}")
        try:
            held = await self._suspended_barrier(members, exclude=_devices(gate.mounts))
        finally:
            ok, reason, _ = await ask("thaw")
            window = (time.perf_counter() - t0) * 1000
            if not ok:
                log.error("%s: VSS THAW reported failure: %s", label, reason)
        return held, window

    async def _detach(self, vol, device: str) -> None:
        """Every process of the volume stops copying for `device` (before its store closes)."""
        if vol is not None:
            await asyncio.gather(*(self._detach_one(w, device) for w in _processes(vol)))

    async def _detach_one(self, worker: Worker | None, device: str) -> None:
        if worker is None or not worker.alive:
            return
        try:
            await worker.call(workermsg.DetachSnapshot(device, worker.next_req()), timeout=ATTACH_TIMEOUT)
        except asyncio.TimeoutError:
            log.error("%s: volume worker %s did not confirm the detach; restarting it", device, worker.key)
            worker.kill()  # it must not go on copying into a store that is about to close
        except WorkerGone as e:
            log.warning("%s: volume worker did not confirm the detach: %s", device, e)

    def _close_listener(self, snap: Snapshot) -> None:
        if snap.listener is not None:
            snap.listener.close()
            snap.listener = None
            try:
                os.unlink(names.export_socket(self.host.rundir, snap.device))
            except FileNotFoundError:
                pass

    async def _start_worker(self, snap: Snapshot) -> None:
        snap.listener = self.host.listen(snap.device)
        vol = self.host.volumes()[snap.volume]

        def spawn_args(chan_fd: int) -> tuple[str, str, list[int]]:
            settings = SnapshotSettings(
                device=snap.device,
                volume=snap.volume,
                volume_path=vol.section.path,
                map_name=snap.map.name,
                bs_fd=snap.store.fd,
                listen_fd=snap.listener.fileno(),
                taken=snap.taken_utc,
                **self._track_settings(snap),
                debug=self.host.flags.debug,
                use_syslog=self.host.flags.use_syslog,
            )
            fds = [snap.store.fd, snap.listener.fileno()] + ([settings.track_dir_fd] if settings.track_dir_fd >= 0 else [])
            return "workers.snapshot", msgspec.json.encode(settings).decode(), fds

        snap.worker = self.host.spawn("snapshot", snap.device, spawn_args)
        try:
            await snap.worker.start(spare=self.host.take_spare())
        except WorkerGone as e:
            # It never served: no restart for a snapshot that is not configured (or lost).
            snap.worker.stopping = True
            if snap.worker.restart_handle:
                snap.worker.restart_handle.cancel()
            snap.worker.kill()
            raise ControlError(errno.EIO, f"{snap.device}: snapshot worker failed to start: {e}") from None

    def _track_settings(self, snap: Snapshot) -> dict:
        """SnapshotSettings' track_* for this snapshot (read at each (re)start of its worker)."""
        parsed = trackmap.parse_id(snap.id)
        tr = self.host.tracks().get(snap.volume)
        if parsed is None:
            return {}
        lineage, gen = parsed
        if tr is None or lineage != tr.state.uuid:  # its history was discarded: no bases
            return {"track_lineage": lineage, "track_gen": gen}
        return {"track_lineage": lineage, "track_gen": gen, "track_bases": tr.bases(lineage, gen), "track_dir_fd": tr.dir_fd}

    # -- what changed (fssconfig --changes) --------------------------------------------

    async def changes(self, req: control.Changes) -> control.ChangedExtents:
        """The extents written between snapshot `req.since`'s barrier and `req.device`'s."""
        snap = self.snaps.get(req.device)
        if snap is None:
            raise ControlError(errno.ENXIO, f"{req.device}: Device not configured")
        tracks = self.host.tracks()
        tr = tracks.get(snap.volume)
        parsed = trackmap.parse_id(snap.id)
        if tr is None or parsed is None:
            why = "is not tracked ([[volume]] track = false)" if tr is None else "was not tracked when the snapshot was taken"
            raise ControlError(errno.EOPNOTSUPP, f"{req.device}: volume {snap.volume} {why}: no change history")
        if not snap.map.valid:
            raise ControlError(errno.EIO, f"{req.device}: snapshot is invalid: {snap.map.error}")

        def other_volume(lineage: str) -> str:
            return next((n for n, t in tracks.items() if t is not tr and (t.state.uuid == lineage or any(r.lineage == lineage for r in t.state.retired))), "")

        try:
            m, n = tr.check_base(req.since, parsed[0], parsed[1], other_volume)
            key = (req.device, snap.id, req.since, tr.state.uuid)
            if self._changes is not None and self._changes[0] == key and req.start:
                extents = self._changes[1]
            else:
                extents = await self.host.offload(tr.changed, m, n)  # reads maps m+1..n: off the event loop
                self._changes = (key, extents)
        except tracking.TrackError as e:
            raise ControlError(e.errno, f"{req.device}: {e}") from None
        page = extents[req.start : req.start + control.CHANGES_PAGE]
        nxt = req.start + len(page)
        return control.ChangedExtents(req.device, req.since, snap.id, start=req.start, extents=page, total=len(extents),
                               changed_bytes=sum(n for _o, n in extents), volume_size=tr.state.volume_size,
                               more=nxt < len(extents))

    # -- unconfigure -----------------------------------------------------------------

    async def unconfigure(self, device: str) -> None:
        if device not in self.devices():
            raise ControlError(errno.ENXIO, f"{device}: Device not configured")
        async with self.lock:
            snap = self.snaps.get(device)
            if snap is None:
                raise ControlError(errno.ENXIO, f"{device}: Device not configured")
            await self._remove(snap)

    async def _remove(self, snap: Snapshot) -> None:
        if snap.record is not None and self.host.state is not None:
            # The record goes first: a crash from here on never brings back a half-removed snapshot.
            await self.host.offload(self.host.state.remove, snap.device)
            snap.record = None
        self.usage.forget(snap.device)
        snap.map.state = MapState.DESTROYING
        if snap.worker:
            await snap.worker.stop()
        vol = self.host.volumes().get(snap.volume)
        await self._detach(vol, snap.device)
        self._close_listener(snap)
        self.snaps.pop(snap.device, None)
        name = snap.map.name
        snap.map.close()
        ClusterMap.unlink(name)
        await self.host.offload(backing.discard, snap.store, snap.store.unlink_now)  # may free a large file
        log.info("%s: snapshot of %s removed", snap.device, snap.volume)
        self.host.changed()

    async def unconfigure_all(self) -> None:
        async with self.lock:
            for snap in list(self.snaps.values()):
                await self._remove(snap)

    # -- durable snapshots across fssd's life (docs/architecture.md "Durability") -----

    async def stop_for_restart(self) -> None:
        """fssd stops: snapshots in the state directory stay configured (their fssN workers
        stop); the others ("none") are unconfigured as before."""
        async with self.lock:
            for snap in list(self.snaps.values()):
                if snap.record is None:
                    await self._remove(snap)
                elif snap.worker:
                    await snap.worker.stop()
                    self._close_listener(snap)

    async def mark_clean(self, volume_paths: dict[str, str]) -> None:
        """After the volume workers stopped: every store and volume synced (whatever the
        workers managed), then each record says "stopped cleanly" with the volume's stat."""
        state = self.host.state
        for snap in list(self.snaps.values()):
            rec = snap.record
            if rec is None or state is None:
                continue
            if not snap.map.valid or snap.map.state != MapState.ACTIVE:
                await self._persist_invalid(snap)  # invalid once, invalid for good
                continue
            try:
                await self.host.offload(_sync_and_stamp, snap.store.fd, volume_paths.get(snap.volume, rec.volume_path), state,
                                        msgspec.structs.replace(rec, boot_id=self.host.boot_id))
            except OSError as e:
                log.error("%s: could not record a clean stop (%s): it will be checked as after a crash", snap.device, e)

    def close_all(self) -> None:
        for snap in list(self.snaps.values()):
            self._close_listener(snap)
            snap.map.close()
            for fd in (snap.store.fd, snap.store.dirfd):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        self.snaps.clear()

    async def recover(self, records: list[statedir.SnapshotRecord], volume_paths: dict[str, str]) -> None:
        """Start-up, before any volume worker: bring back every snapshot of the state directory,
        intact (map rebuilt from its on-disk table) or invalid with the reason. Never writes a volume."""
        boot = self.host.boot_id
        for rec in records:
            if rec.device not in self.devices():
                log.error("%s: in the state directory but [daemon] devices has no such device; left as it is", rec.device)
                continue
            t0 = time.monotonic()
            fd = recovery.open_store(rec)
            if rec.volume not in volume_paths:
                res: recovery.Intact | recovery.Invalid = recovery.Invalid(f"volume {rec.volume} is no longer configured")
            elif os.path.abspath(volume_paths[rec.volume]) != rec.volume_path:
                res = recovery.Invalid(f"volume {rec.volume} is now configured at {volume_paths[rec.volume]}, not {rec.volume_path}")
            else:
                try:
                    res = await self.host.offload(recovery.gather, rec, boot, fd)
                except OSError as e:
                    res = recovery.Invalid(f"cannot read the backing store: {e.strerror or e}")
            store = self._recovered_store(rec, fd)
            flags = FLAG_UNCONFIG_ON_CLOSE if rec.unconfig_on_close else 0
            name = names.map_name(self.host.prefix, rec.device)
            if isinstance(res, recovery.Intact):
                cmap = durable.load_map(name, rec, res, rec.limit_clusters, flags)
            else:
                cmap = durable.invalid_map(name, rec, res.reason, flags)
            snap = Snapshot(rec.device, rec.volume, store, cmap, rec.unconfig_on_close)
            snap.backup_shown = rec.store_path or "(unlinked)"
            snap.consistency = rec.consistency
            snap.durability = rec.durability
            snap.recovered = time.time()
            snap.set_id, snap.set_members = rec.set_id, list(rec.set_members)
            if rec.set_id and not rec.set_done:
                # Its set is complete (statedir.unfinished_sets kept it): say so on disk too, so
                # that unconfiguring the member that was marked done never drops this one.
                rec = msgspec.structs.replace(rec, set_done=True)
                try:
                    await self.host.offload(self.host.state.save, rec)
                except OSError as e:
                    log.error("%s: cannot update its record (%s)", rec.device, e)
            snap.record = rec
            snap.id = rec.id or rec.snapshot_id  # a record from before change tracking: the store's uuid
            self.snaps[rec.device] = snap
            if isinstance(res, recovery.Invalid):
                log.error("%s: snapshot of %s taken %s comes back invalid: %s", rec.device, rec.volume, snap.taken_utc, res.reason)
                await self._persist_invalid(snap)  # never valid again, even if the cause goes away
                continue
            # This boot, not (yet) stopped cleanly: what a crash from now on is checked against.
            # (A set member's record is "done" now: its set was complete, see statedir.unfinished_sets.)
            snap.record = msgspec.structs.replace(rec, boot_id=boot, clean=False, volume_at_stop=None, set_done=True)
            try:
                await self.host.offload(self.host.state.save, snap.record)
            except OSError as e:
                log.error("%s: cannot update its record (%s); it stays as it was", rec.device, e)
            log.info("%s: snapshot of %s taken %s recovered (%s): %d cluster(s) copied, %d re-read, %d uncommitted dropped, %.0f ms",
                     rec.device, rec.volume, snap.taken_utc, rec.durability, res.copies, res.verified, res.dropped, (time.monotonic() - t0) * 1000)

    def _recovered_store(self, rec: statedir.SnapshotRecord, fd: int) -> backing.BackingStore:
        is_device = rec.store_id.kind == "block"
        size = 0
        if fd >= 0 and is_device:
            size = os.lseek(fd, 0, os.SEEK_END)
        dirfd, name = -1, ""
        if fd >= 0 and rec.made and rec.store_path:
            # To remove the file fssconfig made at unconfigure, as before a restart: only while
            # the name still is this file and the asker's (backing.discard checks).
            try:
                dirfd = os.open(os.path.dirname(rec.store_path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                name = os.path.basename(rec.store_path)
            except OSError:
                dirfd = -1
        return backing.BackingStore(fd, rec.store_path or "(unlinked)", not rec.store_path, is_device, size, 512, dirfd, name, rec.owner)

    async def start_recovered(self) -> None:
        """After the volume workers re-attached them: the fssN workers and exports."""
        for snap in list(self.snaps.values()):
            if snap.recovered and snap.worker is None and snap.map.usable:
                try:
                    await self._start_worker(snap)
                except ControlError as e:
                    self.lost(snap.device, str(e))

    async def _persist_invalid(self, snap: Snapshot) -> None:
        """Write the reason into the snapshot's record: whatever happens next, a restart brings
        it back invalid with that reason (the volume worker also flagged its store's header)."""
        rec, state = snap.record, self.host.state
        if rec is None or state is None or rec.invalid or snap.map.valid:
            return
        snap.record = msgspec.structs.replace(rec, invalid=snap.map.error or "invalid")
        try:
            await self.host.offload(state.save, snap.record)
        except OSError as e:
            log.error("%s: could not record that it is invalid: %s", snap.device, e)

    def check_usage(self) -> None:
        """Store usage warnings, once each per snapshot (blksnap's low-space event); a snapshot
        that turned invalid gets the reason into its record."""
        for snap in self.snaps.values():
            m = snap.map
            if not m.valid and snap.record is not None and not snap.record.invalid:
                asyncio.ensure_future(self._persist_invalid(snap))
            if not m.usable:
                continue
            for step in self.usage.check(snap.device, m.bs_next, m.table_clusters, m.bs_limit):
                log.warning("%s: backing store %.0f%% full (%d of %d clusters for copies used; warned at %d%%)", snap.device,
                            self.usage.percent(m.bs_next, m.table_clusters, m.bs_limit), m.bs_next - m.table_clusters,
                            m.bs_limit - m.table_clusters, step)
                self.host.changed()

    # -- events from workers ---------------------------------------------------------

    def clients_changed(self, device: str, count: int) -> None:
        snap = self.snaps.get(device)
        if snap is None:
            return
        snap.clients = count
        if count:
            snap.had_clients = True
        elif snap.unconfig_on_close and snap.had_clients and not self.host.stopping():
            log.info("%s: last client closed; unconfiguring (unconfig on close)", device)
            asyncio.ensure_future(self._unconfig_on_close(snap))

    async def _unconfig_on_close(self, snap: Snapshot) -> None:
        async with self.lock:
            # Only this snapshot, if it is still there and still unused (a client may have come back).
            if self.snaps.get(snap.device) is snap and snap.clients == 0:
                await self._remove(snap)

    def lost(self, device: str, reason: str) -> None:
        """The volume worker could not protect this snapshot any more: it is invalid."""
        snap = self.snaps.get(device)
        if snap is not None and snap.map.set_error(reason):
            log.error("%s: snapshot invalid: %s", device, reason)
            self.host.changed()

    async def record_lost(self, device: str, reason: str) -> bool:
        """The volume worker's failure path when it could not flag the store's header: the
        reason goes into the state directory before that worker writes the volume uncopied.
        True once it is on disk (or there is nothing to record it in)."""
        self.lost(device, reason)
        snap = self.snaps.get(device)
        state = self.host.state
        if snap is None or snap.record is None or state is None:
            return True
        if not snap.record.invalid:
            snap.record = msgspec.structs.replace(snap.record, invalid=snap.map.error or reason)
        try:
            # Saved again even if another save is under way: atomic and idempotent, and this
            # answer must not come before the record is on disk.
            await self.host.offload(state.save, snap.record)
            return True
        except OSError as e:
            log.error("%s: could not record that it is invalid: %s", device, e)
            return False

    def worker_gave_up(self, worker: Worker) -> None:
        snap = self.snaps.get(worker.key)
        if snap is None:
            return
        if snap.map.set_error(f"worker failed repeatedly ({worker.last_error})"):
            log.error("%s: snapshot invalid: worker failed repeatedly (%s)", snap.device, worker.last_error)
        self.host.changed()


async def _all(*aws) -> None:
    """Run them together and wait for every one to end (no half-done step is left running
    behind an undo), then raise the first failure."""
    got = await asyncio.gather(*aws, return_exceptions=True)
    for g in got:
        if isinstance(g, BaseException):
            raise g


def _processes(vol) -> list[Worker]:
    """The processes serving a volume (a host's volume may expose only one, as `worker`)."""
    ws = getattr(vol, "workers", None)
    if ws is None:
        ws = [vol.worker] if vol.worker is not None else []
    return list(ws)


def _sync_and_stamp(store_fd: int, volume_path: str, state: statedir.StateDir, rec: statedir.SnapshotRecord) -> None:
    """The clean stop of one snapshot: store and volume on disk, then the record says so."""
    if store_fd >= 0:
        os.fsync(store_fd)
    fd = os.open(volume_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        os.fsync(fd)
        stamp = statedir.volume_stamp(os.fstat(fd))
        if rec.volume_id.kind == "block":
            stamp = msgspec.structs.replace(stamp, size=os.lseek(fd, 0, os.SEEK_END))
    finally:
        os.close(fd)
    state.save(msgspec.structs.replace(rec, clean=True, volume_at_stop=stamp))

