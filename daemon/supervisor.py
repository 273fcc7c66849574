"""fssd: the supervisor. Holds the config, the control socket, the shared-memory
maps, the listening sockets and the backing-store descriptors; spawns and
restarts the workers; never does data I/O itself.

    fssd [-c CONFIG] [-r RUNDIR] [-d] [-s]      run in the foreground
    fssd [-r RUNDIR] --status                    print the running daemon's status as JSON
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
import time

import msgspec
import setproctitle

from daemon.cli import clitool
from daemon import config as configmod
from daemon import leftovers
from daemon import statedir as statedirmod
from daemon import tracking
from daemon import portability
from daemon import rundir as rundirmod
from daemon.control_server import ControlServer
from daemon.notify import Notifier, child_env
from daemon.procs import RestartPolicy, Worker, WorkerGone
from daemon.service import Service
from daemon.snaphost import SnapshotHost, WorkerFlags
from daemon.version import version
from daemon.snapshots import SnapshotManager
from daemon.spares import NO_SPARE_ENV, SparePool
from daemon.vssgate import ChannelVssGate
from ipc import control, cowshare, names, workermsg
from workers import logfmt
from ipc.control import VolumeInfo, VssInfo, WorkerInfo
from ipc.listenpolicy import ListenSection
from workers import nbdserve
from workers.settings import AttachedSnapshot, SpareSettings, VolumeSettings

log = logging.getLogger("supervisor")

STOP_TIMEOUT = 15.0
# How often store usage is compared with the 80 % / 95 % steps (a few header reads).
USAGE_INTERVAL = 0.5
# A new instance waits this long for the processes of a killed one to be gone.
LOCK_WAIT = 10.0


class VolumeState:
    def __init__(self, section: configmod.VolumeSection, size: int, listener: socket.socket, processes: int = 1):
        self.section = section
        self.size = size
        self.listener = listener
        self.processes = processes
        # The processes serving it, all accepting on `listener` (index i is `[i+1/N]`).
        self.workers: list[Worker] = []
        # Their shared copy-on-write segment (ipc/cowshare.py): stripe locks, in-flight reservations.
        self.cow_fd = -1
        self.failed = False  # gave up restarting

    @property
    def worker(self) -> Worker | None:
        """The first process (its pid stands for the volume where one number is shown)."""
        return self.workers[0] if self.workers else None


class FrontState:
    """A [[listen]] table: the TCP listening socket (kept here across restarts) and its front worker."""

    def __init__(self, section: ListenSection, listener: socket.socket):
        self.section = section
        self.listener = listener
        self.worker: Worker | None = None


def nbd_limits(d: configmod.DaemonSection) -> nbdserve.Limits:
    """[daemon] nbd_* for the workers (they read it from their environment)."""
    return nbdserve.Limits(
        max_connections=d.nbd_max_connections,
        max_connections_per_uid=d.nbd_max_connections_per_uid,
        handshake_timeout=d.nbd_handshake_timeout,
        idle_timeout=d.nbd_idle_timeout,
        request_timeout=d.nbd_request_timeout,
        buffer_limit=d.nbd_buffer_bytes,
    )


class Supervisor:
    def __init__(self, cfg: configmod.Config, config_path: str, debug: bool, use_syslog: bool,
                 state: statedirmod.StateDir | None = None, records: list[statedirmod.SnapshotRecord] | None = None):
        self.cfg = cfg
        self.state = state
        self.records = records or []
        self.boot_id = statedirmod.current_boot_id()
        self.config_path = config_path
        self.debug = debug
        self.use_syslog = use_syslog
        self.rundir = cfg.daemon.rundir
        self.prefix = names.instance_prefix(self.rundir)
        self.started = time.monotonic()
        self.volumes: dict[str, VolumeState] = {}
        self.tracks: dict[str, tracking.VolumeTrack] = {}  # change tracking, by volume (tracked ones)
        self.broker: Worker | None = None
        self.fronts: dict[str, FrontState] = {}  # [[listen]] by address
        self.broker_mounts: list[str] = []
        self.vss_state = workermsg.VssState("stopped")
        self.notifier = Notifier.from_env()
        self.env = child_env(dict(os.environ))
        self.env[names.INSTANCE_ENV] = os.path.abspath(self.rundir)
        self.env[nbdserve.LIMITS_ENV] = msgspec.json.encode(nbd_limits(cfg.daemon)).decode()
        self.spares = SparePool(self._spare_worker, enabled=cfg.daemon.devices > 0 and not os.environ.get(NO_SPARE_ENV))
        self.snaps = SnapshotManager(self._snapshot_host())
        self.service = Service.of(self)
        # A configure that took the spare snapshot worker has answered: start the next one.
        self.control = ControlServer(names.control_socket(self.rundir), cfg.daemon.group, self.service.handle,
                                     after_reply=self.spares.start)
        self.stop_event = asyncio.Event()
        self.shutting_down = False
        self._watchdog: asyncio.Task | None = None
        self._usage: asyncio.Task | None = None
        self._sockets: set[str] = set()

    def _snapshot_host(self) -> SnapshotHost:
        """The snapshot manager's whole view of the supervisor."""
        return SnapshotHost(
            rundir=self.rundir,
            prefix=self.prefix,
            devices=[f"fss{i}" for i in range(self.cfg.daemon.devices)],  # [daemon]: fixed until a restart
            volumes=lambda: self.volumes,
            find_volume=self.find_volume,
            freeze_mounts=lambda: self.cfg.freeze_mounts(),
            freeze_max=lambda: self.cfg.vss.freeze_max,
            vss=self._vss_gate,
            listen=lambda device: self._listen(device, group_access=True),
            spawn=lambda kind, key, args: self._worker(kind, key, args, RestartPolicy(self.cfg.daemon.max_restarts, None, self._may_restart, self._restarted, self.snaps.worker_gave_up)),
            record_made=self.record_made,
            changed=self.update_status,
            stopping=lambda: self.shutting_down,
            flags=WorkerFlags(self.env, self.debug, self.use_syslog),
            take_spare=self.spares.take,
            durability=lambda: self.cfg.daemon.durability,  # [daemon]: fixed until a restart
            state=self.state,
            boot_id=self.boot_id,
            tracks=lambda: self.tracks,
        )

    def _vss_gate(self) -> ChannelVssGate | None:
        if not self.cfg.vss.enabled or self.broker is None or not self.broker.alive:
            return None
        return ChannelVssGate(self.broker, self.broker_mounts, self.cfg.vss.timeout)

    # -- workers -------------------------------------------------------------------

    def _worker(self, kind: str, key: str, spawn_args, policy: RestartPolicy | None = None) -> Worker:
        if policy is None:  # the live volume and the broker matter too much to give up on
            policy = RestartPolicy(self.cfg.daemon.max_restarts, 30.0, self._may_restart, self._restarted)
        return Worker(kind, key, spawn_args, self.on_worker_message, self.on_worker_exit, self.env, policy)

    def _spare_worker(self) -> Worker:
        """A spare snapshot worker (daemon/spares.py), restarted like the volume workers."""

        def spawn_args(chan_fd: int) -> tuple[str, str, list[int]]:
            return "workers.spare", msgspec.json.encode(SpareSettings(self.debug, self.use_syslog)).decode(), []

        return self._worker("spare", "snapshot", spawn_args)

    def _may_restart(self) -> bool:
        return not self.shutting_down

    def _restarted(self, worker: Worker) -> None:
        if worker.kind == "broker":
            self.vss_state = workermsg.VssState("idle")
        self.update_status()

    # -- volumes --------------------------------------------------------------------

    def _listen(self, export: str, group_access: bool = False) -> socket.socket:
        """A volume export is root's alone; a snapshot export (group_access) is readable by the group."""
        path = names.export_socket(self.rundir, export)
        s = rundirmod.bind_unix(path, group_access, rundirmod.group_gid(self.cfg.daemon.group))
        s.listen(128)
        s.set_inheritable(False)
        self._sockets.add(path)
        self.record_made()
        return s

    def record_made(self, configuring=()) -> None:
        """Write down the sockets and store files fssd made, for a successor to clean up after
        a kill; `configuring`: the stores of the snapshots being configured (not yet listed)."""
        made = [(p, "socket") for p in sorted(self._sockets)] + [(names.control_socket(self.rundir), "socket")]
        stores = [s.store for s in self.snaps.snaps.values()] + list(configuring)
        # A file fssconfig made for us (it has its directory's descriptor): recorded by the
        # identity of our descriptor, never of whatever the path resolves to now.
        made += [(st.path, "store", st.fd) for st in stores if st.dirfd >= 0 and st.name and not st.unlink_now]
        leftovers.save(self.rundir, made)

    async def start_volume(self, section: configmod.VolumeSection) -> None:
        size = os.stat(section.path).st_size
        if size == 0 and os.path.exists(section.path):
            fd = os.open(section.path, os.O_RDONLY)
            try:
                size = os.lseek(fd, 0, os.SEEK_END)  # block devices report st_size 0
            finally:
                os.close(fd)
        await self._open_track(section, size)
        n = self.cfg.processes_for(section)
        st = VolumeState(section, size, self._listen(section.name), n)
        self.volumes[section.name] = st
        st.cow_fd = cowshare.create(n)

        def spawner(index: int):
            def spawn_args(chan_fd: int) -> tuple[str, str, list[int]]:
                attached = self.snaps.attached_for(section.name)
                tr = self.tracks.get(section.name)  # its current map, read when the worker (re)starts
                settings = VolumeSettings(
                    name=section.name,
                    path=section.path,
                    size=st.size,
                    listen_fd=st.listener.fileno(),
                    snapshots=[AttachedSnapshot(d, m, fd) for d, m, fd in attached],
                    track_fd=tr.cur_fd if tr else -1,
                    track_gen=tr.state.current if tr else 0,
                    track_sync=self.cfg.daemon.durability == "power",
                    index=index,
                    processes=n,
                    cow_fd=st.cow_fd,
                    debug=self.debug,
                    use_syslog=self.use_syslog,
                )
                fds = [st.listener.fileno(), st.cow_fd, *(a[2] for a in attached)] + ([tr.cur_fd] if tr else [])
                return "workers.volume", msgspec.json.encode(settings).decode(), fds
            return spawn_args

        for i in range(n):
            key = section.name if n == 1 else f"{section.name} [{i + 1}/{n}]"
            st.workers.append(self._worker("volume", key, spawner(i)))
        # All at once: each re-attaches the recovered snapshots before it serves a write.
        await asyncio.gather(*(w.start() for w in st.workers))
        log.info("volume %s: serving %s (%d bytes) at %s (%s)", section.name, section.path, size, names.nbd_uri(self.rundir, section.name),
                 ", ".join(f"pid {w.pid}" for w in st.workers))

    async def _open_track(self, section: configmod.VolumeSection, size: int) -> None:
        """The volume's change history, before its worker serves a write (restart rules applied).
        Trouble here leaves the volume served untracked, loudly: never a volume down for it."""
        if not section.track or self.state is None:
            return
        d = self.cfg.daemon
        try:
            self.tracks[section.name] = await asyncio.to_thread(
                tracking.open_track, self.state.path, section.name, section.path, size, d.durability, self.boot_id, d.track_generations)
        except OSError as e:
            log.error("volume %s: change tracking unavailable (%s); served untracked", section.name, e)

    def _track_failed(self, volume: str, reason: str) -> None:
        tr = self.tracks.get(volume)
        if tr is None:
            return
        tr.retire_now(reason)  # in memory at once: no base from before is answered from here on
        asyncio.ensure_future(asyncio.to_thread(tr.persist))

    async def stop_volume(self, name: str) -> None:
        st = self.volumes.pop(name)
        await asyncio.gather(*(w.stop(STOP_TIMEOUT) for w in st.workers))
        if st.cow_fd >= 0:
            os.close(st.cow_fd)
            st.cow_fd = -1
        tr = self.tracks.pop(name, None)
        if tr is not None:
            try:  # every map and the volume on disk, then lineage.json says the stop was clean
                await asyncio.to_thread(tr.stop_clean, st.section.path)
            except OSError as e:
                log.error("volume %s: could not record a clean stop for change tracking (%s): checked as after a crash", name, e)
            tr.close()
        st.listener.close()
        try:
            os.unlink(names.export_socket(self.rundir, name))
        except FileNotFoundError:
            pass
        log.info("volume %s: stopped", name)

    def find_volume(self, path: str) -> VolumeState | None:
        """By name, configured mountpoint, or image path (fssconfig's `path`)."""
        if path in self.volumes:
            return self.volumes[path]
        real = os.path.realpath(path)
        for st in self.volumes.values():
            if os.path.realpath(st.section.path) == real:
                return st
            if st.section.mountpoint and os.path.realpath(st.section.mountpoint) == real:
                return st
        return None

    # -- NBD over TCP: one front worker per [[listen]] table ----------------------------

    @staticmethod
    def _tcp_listener(section: ListenSection) -> socket.socket:
        host, port = section.host_port()
        family, stype, proto, _c, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        s = socket.socket(family, stype, proto)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(addr)
            s.listen(128)
        except OSError:
            s.close()
            raise
        s.set_inheritable(False)
        return s

    def _volume_names(self) -> list[str]:
        return [v.name for v in self.cfg.volume]

    async def start_front(self, section: ListenSection) -> None:
        from workers.tcpfront import FrontSettings

        st = FrontState(section, self._tcp_listener(section))
        self.fronts[section.address] = st

        def spawn_args(chan_fd: int) -> tuple[str, str, list[int]]:
            settings = FrontSettings(st.section, st.listener.fileno(), self.rundir, self._volume_names(), self.debug, self.use_syslog)
            return "workers.tcpfront", msgspec.json.encode(settings).decode(), [st.listener.fileno()]

        st.worker = self._worker("listen", section.address, spawn_args)  # restarted as the volumes are
        await st.worker.start()
        log.info("listen %s: NBD over TCP, tls %s (pid %d)", section.address, section.tls, st.worker.pid)

    async def stop_front(self, address: str) -> None:
        st = self.fronts.pop(address)
        if st.worker:
            await st.worker.stop(STOP_TIMEOUT)
        st.listener.close()

    async def reload_fronts(self) -> None:
        """SIGHUP: new addresses start, removed ones stop, the others reload their
        certificates and rules (for new connections; open ones are kept)."""
        wanted = {sec.address: sec for sec in self.cfg.listen}
        for address in [a for a in self.fronts if a not in wanted]:
            await self.stop_front(address)
        for address, sec in wanted.items():
            st = self.fronts.get(address)
            try:
                if st is None:
                    await self.start_front(sec)
                    continue
                st.section = sec
                if st.worker and st.worker.alive:
                    st.worker.send(workermsg.ListenUpdate(sec, self._volume_names()))
            except (WorkerGone, OSError) as e:
                log.error("reload: listen %s: %s", address, e)

    def front_workers(self) -> list[Worker]:
        return [st.worker for st in self.fronts.values() if st.worker]

    # -- the broker -----------------------------------------------------------------

    async def start_broker(self) -> None:
        if not self.cfg.vss.enabled:
            return
        from workers.settings import BrokerSettings

        vss = self.cfg.vss

        def spawn_args(chan_fd: int) -> tuple[str, str, list[int]]:
            settings = BrokerSettings(
                prefix=self.prefix,
                rundir=self.rundir,
                timeout=vss.timeout,
                freeze_max=vss.freeze_max,
                freeze_mounts=self.cfg.freeze_mounts(),
                hooks_dir=vss.hooks_dir,
                hyperv_device=vss.hyperv_device,
                debug=self.debug,
                group=self.cfg.daemon.group, max_apps=vss.max_apps, max_apps_per_uid=vss.max_apps_per_uid,
                use_syslog=self.use_syslog,
            )
            return "workers.broker", msgspec.json.encode(settings).decode(), []

        # What this broker may freeze, kept apart from the config: a reload that can't restart a
        # busy broker must not change what the supervisor thaws if the broker dies.
        self.broker_mounts = self.cfg.freeze_mounts()
        self.broker = self._worker("broker", "vss", spawn_args)
        await self.broker.start()
        self.vss_state = workermsg.VssState("idle")
        log.info("vss broker: ready (pid %d), freezes %s", self.broker.pid, ", ".join(self.cfg.freeze_mounts()) or "nothing")

    def thaw_everything(self, why: str) -> None:
        """FIFREEZE outlives its holder: whoever dies frozen, the supervisor thaws."""
        from workers.freeze import thaw_all

        mounts = self.broker_mounts
        if not mounts:
            return
        t0 = time.monotonic()
        thaw_all(mounts)
        log.warning("%s: thawed %s in %.0f ms", why, ", ".join(mounts), (time.monotonic() - t0) * 1000)

    # -- worker events ----------------------------------------------------------------

    def on_worker_message(self, worker: Worker, msg, fds: list[int]) -> None:
        """What a worker says unasked (replies to requests are settled by the Worker)."""
        for fd in fds:  # workers never hand descriptors up
            os.close(fd)
        if isinstance(msg, workermsg.Refused):
            self.snaps.lost(msg.device, msg.reason)
        elif isinstance(msg, workermsg.Invalidated):
            asyncio.ensure_future(self._record_invalid(worker, msg))
        elif isinstance(msg, workermsg.TrackFailed) and worker.kind == "volume":
            self._track_failed(worker.key, msg.reason)
        elif isinstance(msg, workermsg.ClientsChanged):
            self.snaps.clients_changed(msg.device, msg.count)
        elif isinstance(msg, workermsg.VssState):
            changed = msg.state != self.vss_state.state
            self.vss_state = msg
            if changed:
                self.update_status()
        else:
            log.warning("%s %s: unexpected %s dropped", worker.kind, worker.key, type(msg).__name__)

    async def _record_invalid(self, worker: Worker, msg: workermsg.Invalidated) -> None:
        """A live write waits on this answer: given whatever happens, as soon as possible."""
        ok = False
        try:
            ok = await self.snaps.record_lost(msg.device, msg.reason)
        finally:
            try:
                worker.send(workermsg.InvalidRecorded(msg.ticket, ok))
            except WorkerGone:
                pass

    def on_worker_exit(self, worker: Worker, status: int) -> None:
        if worker.kind == "broker":
            # Before anything else: a broker that died holding a freeze must not leave it.
            self.thaw_everything(f"vss broker (pid {worker.pid}) {worker.last_error or 'exited'}")
            self.vss_state = workermsg.VssState("restarting" if not worker.stopping else "stopped")
        # The Worker restarts itself (its RestartPolicy); snapshots that give up are made invalid.

    # -- status --------------------------------------------------------------------------

    def volume_info(self, st: VolumeState) -> VolumeInfo:
        w = next((x for x in st.workers if x.alive), st.worker)
        return VolumeInfo(
            name=st.section.name,
            path=st.section.path,
            size=st.size,
            uri=names.nbd_uri(self.rundir, st.section.name),
            mountpoint=st.section.mountpoint,
            pid=w.pid if w and w.alive else 0,
            uptime=time.monotonic() - w.started if w and w.alive else 0.0,
            restarts=sum(x.restarts for x in st.workers),
            last_error=next((x.last_error for x in st.workers if x.last_error), ""),
            snapshots=self.snaps.devices_of(st.section.name),
            processes=st.processes,
            pids=[x.pid if x.alive else 0 for x in st.workers],
        )

    def worker_infos(self) -> list[WorkerInfo]:
        ws = [w for st in self.volumes.values() for w in st.workers]
        ws += self.snaps.workers()
        ws += self.spares.workers()
        ws += self.front_workers()
        if self.broker:
            ws.append(self.broker)
        now = time.monotonic()
        return [WorkerInfo(w.title(), w.kind, w.pid, w.alive, now - w.started if w.alive else 0.0, w.restarts, w.last_error) for w in ws]

    def vss_info(self) -> VssInfo:
        return VssInfo(self.cfg.vss.enabled, self.vss_state.state, self.vss_state.detail, list(self.vss_state.frozen), self.cfg.freeze_mounts())

    def status_reply(self) -> control.StatusReply:
        return control.StatusReply(
            pid=os.getpid(),
            rundir=self.rundir,
            config=self.config_path,
            uptime=time.monotonic() - self.started,
            volumes=[self.volume_info(v) for v in self.volumes.values()],
            snapshots=[self.snaps.info(d) for d in self.snaps.devices()],
            workers=self.worker_infos(),
            vss=self.vss_info(),
        )

    def update_status(self) -> None:
        self.record_made()  # called after every configure and unconfigure
        active = self.snaps.summary()
        self.notifier.status(f"{len(self.volumes)} volume(s); {active}; vss {self.vss_state.state}")

    async def _usage_loop(self) -> None:
        while True:
            await asyncio.sleep(USAGE_INTERVAL)
            self.snaps.check_usage()

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval / 2)

    # -- life ------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        try:
            configmod.create_missing_images(self.cfg)
            # Snapshots from the state directory first: each volume worker re-attaches them
            # before it serves a single write.
            await self.snaps.recover(self.records, {v.name: v.path for v in self.cfg.volume})
            for section in self.cfg.volume:
                await self.start_volume(section)
            await self.snaps.start_recovered()
            await self.start_broker()
            for section in self.cfg.listen:
                await self.start_front(section)
            await self.control.start()
        except (WorkerGone, OSError, ImportError) as e:
            log.critical("start-up failed: %s", e)
            await self.shutdown()
            return 1
        self.notifier.ready()
        self.update_status()
        self.spares.start()  # in the background: the first configure may find none ready yet
        interval = self.notifier.watchdog_interval()
        if interval:
            self._watchdog = asyncio.ensure_future(self._watchdog_loop(interval))
        self._usage = asyncio.ensure_future(self._usage_loop())
        log.info("ready: %d volume(s), control socket %s", len(self.volumes), names.control_socket(self.rundir))
        await self.stop_event.wait()
        await self.shutdown()
        return 0

    async def shutdown(self) -> None:
        self.shutting_down = True
        self.notifier.stopping()
        log.info("stopping")
        if self._watchdog:
            self._watchdog.cancel()
        if self._usage:
            self._usage.cancel()
        await self.control.stop()
        for address in list(self.fronts):
            await self.stop_front(address)
        # Snapshots in the state directory stay configured; the volume workers stop after
        # them (syncing every store), then the records say the stop was clean.
        await self.spares.stop()
        await self.snaps.stop_for_restart()
        if self.broker:
            await self.broker.stop(STOP_TIMEOUT)
        paths = {name: st.section.path for name, st in self.volumes.items()}
        for name in list(self.volumes):
            await self.stop_volume(name)
        await self.snaps.mark_clean(paths)
        self.snaps.close_all()
        cleanup_names(self.prefix)
        leftovers.forget(self.rundir)
        log.info("stopped")

    async def reload(self) -> None:
        """SIGHUP: re-read the config; a bad one is logged and the old one kept."""
        self.notifier.reloading()
        try:
            async with self.snaps.lock:  # never in the middle of a configure or unconfigure
                await self._reload()
        except Exception:  # a bug in reload must not take the daemon (or systemd's view of it) down
            log.exception("reload failed; running on with what is in place")
        finally:
            self.notifier.ready()
            self.update_status()

    async def _reload(self) -> None:
        try:
            new = configmod.load(self.config_path, rundir_override=self.rundir)
            await asyncio.to_thread(configmod.create_missing_images, new)  # may size a new image: off the loop
        except (configmod.ConfigError, OSError) as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            return
        if new.daemon != self.cfg.daemon:
            log.warning("reload: [daemon] changes need a restart; kept the running values")
            new = msgspec.structs.replace(new, daemon=self.cfg.daemon)
        old_vols = {v.name: v for v in self.cfg.volume}
        new_vols = {v.name: v for v in new.volume}
        kept = []
        for name, old in old_vols.items():
            if name not in new_vols or new_vols[name] != old:
                if self.snaps.devices_of(name):
                    log.error("reload: volume %s has snapshots (%s); not removed or changed", name, ", ".join(self.snaps.devices_of(name)))
                    kept.append(old)
                    continue
                await self.stop_volume(name)
        merged = [old_vols[v.name] if v.name in {k.name for k in kept} else v for v in new.volume]
        merged += [k for k in kept if k.name not in new_vols]
        new = msgspec.structs.replace(new, volume=merged)
        old_vss, old_mounts = self.cfg.vss, self.cfg.freeze_mounts()
        self.cfg = new
        for v in new.volume:
            if v.name not in self.volumes:
                try:
                    await self.start_volume(v)
                except (WorkerGone, OSError) as e:
                    log.error("reload: volume %s failed to start: %s", v.name, e)
        if new.vss != old_vss or new.freeze_mounts() != old_mounts:
            if self.vss_state.state not in ("idle", "stopped", "restarting"):
                log.warning("reload: VSS settings change waits: the broker is %s", self.vss_state.state)
            else:
                if self.broker:
                    await self.broker.stop(STOP_TIMEOUT)
                    self.broker = None
                    self.vss_state = workermsg.VssState("stopped")
                try:
                    await self.start_broker()
                except (WorkerGone, OSError) as e:
                    log.error("reload: vss broker failed to start: %s", e)
                log.info("reload: VSS settings applied")
        await self.reload_fronts()
        log.info("reloaded %s: %d volume(s)", self.config_path, len(self.volumes))


def cleanup_names(prefix: str, devices: int = 64) -> None:
    """Remove every shared-memory and queue name of this instance (also a killed one's).

    Names we can derive are unlinked directly (/dev/mqueue need not be mounted);
    the listing then catches the rest (applications' queues).
    """
    import posix_ipc

    for i in range(devices):
        with contextlib.suppress(posix_ipc.ExistentialError, OSError):
            posix_ipc.unlink_shared_memory(names.map_name(prefix, f"fss{i}"))
    with contextlib.suppress(posix_ipc.ExistentialError, OSError):
        posix_ipc.unlink_message_queue(names.broker_queue(prefix))
    for d in ("/dev/shm", "/dev/mqueue"):
        try:
            entries = os.listdir(d)
        except OSError:
            continue
        for e in entries:
            if names.owned_by(prefix, e):
                try:
                    os.unlink(os.path.join(d, e))
                except OSError:
                    pass


def _holders(fd: int) -> list[int]:
    """Every process with this open file (any descriptor on its inode), from /proc."""
    st = os.fstat(fd)
    me = os.getpid()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for n in fds:
            try:
                o = os.stat(f"/proc/{pid}/fd/{n}")
            except OSError:
                continue
            if (o.st_dev, o.st_ino) == (st.st_dev, st.st_ino):
                found.append(int(pid))
                break
    return sorted(found)


def _describe(pids: list[int]) -> str:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace").strip()
        except OSError:
            title = "?"
        out.append(f"pid {pid} ({title})")
    return ", ".join(out) or "none"


def _lock_rundir(rundir: str, wait: float = LOCK_WAIT) -> int:
    """Lock RUNDIR/fssd.pid, held by the supervisor and inherited by every worker.

    Held with a live supervisor: refused. Held only by workers of a killed one: wait
    (they die with it, PR_SET_PDEATHSIG) until they are gone, so no old process can
    touch a volume or a snapshot after this instance starts; refused if they linger."""
    os.makedirs(rundir, mode=0o755, exist_ok=True)
    fd = os.open(os.path.join(rundir, "fssd.pid"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    deadline = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            pass
        other = os.pread(fd, 32, 0).decode(errors="replace").strip()
        holders = _holders(fd)
        if other.isdigit() and int(other) in holders:
            os.close(fd)
            raise SystemExit(f"fssd: already running with run directory {rundir} (pid {other})")
        now = time.monotonic()
        if deadline is None:
            deadline = now + wait
            log.warning("waiting up to %.0f s for the processes of a previous fssd to exit: %s", wait, _describe(holders))
        elif now > deadline:
            os.close(fd)
            raise SystemExit(f"fssd: run directory {rundir} is still held by processes of a previous fssd: {_describe(holders)}; not starting")
        time.sleep(0.05)  # polls the lock itself: the condition we wait for
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _print_status(rundir: str) -> int:
    from daemon.cli.client import ControlClient, NotRunning
    from ipc.control import Status

    try:
        reply = ControlClient(rundir).request(Status())
    except NotRunning as e:
        print(f"fssd: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(reply)).decode() + "\n")
    return 0


@clitool.entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fssd", description="copy-on-write snapshots of live volumes, served over NBD")
    p.add_argument("-c", "--config", metavar="FILE", help=f"configuration file (default {configmod.DEFAULT_CONFIG}; with --status: its run directory)")
    p.add_argument("-r", "--rundir", metavar="DIR", help="run directory (overrides [daemon] rundir; with --status: default the -c file's, else $FSSD_RUNDIR, else /run/fssd)")
    p.add_argument("-d", "--debug", action="store_true", help="debug logging")
    p.add_argument("-s", "--syslog", action="store_true", help="log to syslog instead of stderr")
    p.add_argument("--status", action="store_true", help="print the running daemon's status as JSON and exit")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}", help="print the version and exit")
    args = p.parse_args(argv)
    if args.status:
        rundir = args.rundir
        if rundir is None and args.config is not None:  # the instance that config runs
            try:
                rundir = configmod.load(args.config).daemon.rundir
            except configmod.ConfigError as e:
                print(f"fssd: {e}", file=sys.stderr)
                return 2
        return _print_status(names.resolve_rundir(rundir))
    args.config = args.config or configmod.DEFAULT_CONFIG
    logfmt.setup("supervisor", args.debug, args.syslog)
    try:
        cfg = configmod.load(args.config, rundir_override=args.rundir)
    except configmod.ConfigError as e:
        print(f"fssd: {e}", file=sys.stderr)
        return 2
    missing = portability.problems(cfg, portability.facts())
    for line in missing:
        print(f"fssd: {line}", file=sys.stderr)
    if missing:
        return 1
    try:
        rundirmod.trust_rundir(cfg.daemon.rundir, rundirmod.group_gid(cfg.daemon.group))
    except rundirmod.UntrustedRundir as e:
        print(f"fssd: refusing run directory {cfg.daemon.rundir}: {e}", file=sys.stderr)
        return 2
    try:
        lock_fd = _lock_rundir(cfg.daemon.rundir)
    except OSError as e:  # e.g. ELOOP: fssd.pid is a symlink
        print(f"fssd: {os.path.join(cfg.daemon.rundir, 'fssd.pid')}: {e.strerror}", file=sys.stderr)
        return 2
    Worker.hold_fd = lock_fd
    setproctitle.setproctitle(names.proc_title("supervisor", cfg.daemon.rundir))
    cleanup_names(names.instance_prefix(cfg.daemon.rundir))
    state = statedirmod.StateDir(cfg.daemon.statedir)
    try:
        state.open()
        state_fd = state.lock(cfg.daemon.rundir)
    except (statedirmod.StateDirError, OSError) as e:
        print(f"fssd: {e}", file=sys.stderr)
        return 2
    records, bad = state.load()
    for line in bad:
        log.error("%s; left as it is", line)
    records, unfinished = statedirmod.unfinished_sets(records)
    for r in unfinished:  # as if never configured: the record goes, the store fssd made with it
        log.error("%s: member of snapshot set %s, whose configure never finished (%s); removed", r.device, r.set_id, ", ".join(r.set_members))
        try:
            state.remove(r.device)
        except OSError as e:
            log.error("%s: could not remove its record: %s", r.device, e)
    # A store a record names comes back; one whose configure never finished is removed.
    leftovers.remove(cfg.daemon.rundir, frozenset((r.store_id.dev, r.store_id.ino) for r in records))
    sup = Supervisor(cfg, os.path.abspath(args.config), args.debug, args.syslog, state, records)
    rc = asyncio.run(sup.run())
    # Only after a clean stop (every worker gone): otherwise the file stays, and so does
    # its lock for as long as any worker still holds it.
    try:
        os.unlink(os.path.join(cfg.daemon.rundir, "fssd.pid"))
    except FileNotFoundError:
        pass
    os.close(lock_fd)
    os.close(state_fd)
    return rc


if __name__ == "__main__":
    sys.exit(main())
