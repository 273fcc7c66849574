"""fssd.toml, decoded with msgspec into typed structs: decoding is validation.

A bad file stops fssd with one line that names the file and the key
(`$.volume[0].size`), exit status 2.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

import msgspec

from daemon.units import parse_size
from ipc.listenpolicy import ListenSection, parse_address

DEFAULT_CONFIG = "/etc/fssd/fssd.toml"
MAX_DEVICES = 64
MAX_PROCESSES = 64  # per volume
AUTO_PROCESSES_MAX = 8  # volume_processes = 0: one per CPU fssd may use, at most this many
MIN_NBD_BUFFER = 64 << 20


class ConfigError(Exception):
    """One clear line: '<file>: <what is wrong> - at `$.key`'."""


class DaemonSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    rundir: str = "/run/fssd"
    # fss0 .. fss{devices-1}, as NetBSD's `pseudo-device fss 4`.
    devices: int = 4
    # Members of this group may change things over the control socket; root always may.
    group: str | None = None
    # Restart back-off: a worker that dies more than this often within a minute is given up.
    max_restarts: int = 5
    # -- NBD export bounds, per export (each worker applies them to its own socket) --
    # Connections served at once; more are told "too many connections" and closed.
    nbd_max_connections: int = 64
    # Of those, from one peer uid (SO_PEERCRED on the Unix socket); root is not capped per uid.
    nbd_max_connections_per_uid: int = 32
    # Seconds from connect to the end of the option phase (qemu-nbd: 10).
    nbd_handshake_timeout: float = 10.0
    # Seconds a connection may sit idle between requests; 0 = for ever.
    nbd_idle_timeout: float = 0.0
    # Seconds a half-received request or an unread reply may stall before the connection is dropped.
    nbd_request_timeout: float = 30.0
    # Per worker: buffer memory beyond each connection's first 1 MiB (large WRITEs, read buffers).
    nbd_buffer_limit: int | str = "256M"
    # -- Snapshots that survive restarts (docs/architecture.md "Durability") --
    # Where the snapshot table lives (one small record per configured snapshot).
    statedir: str = "/var/lib/fssd"
    # "power": a first-touch write waits until the old cluster's copy is durable (group commit);
    # "process": no syncs, survives process crashes and clean restarts, invalid after a host crash;
    # "none": in memory only, as before (lost when fssd stops).
    durability: Literal["power", "process", "none"] = "power"
    # Change tracking: how many generation maps each tracked volume keeps (a snapshot can say
    # what changed since any of the last track_generations - 1 snapshots of its volume).
    track_generations: int = 64
    # Processes serving each volume (all accept on its socket and share the copy-on-write
    # locks and allocation); a volume's own `processes` overrides it.
    volume_processes: int = 0  # 0: one per CPU fssd may run on (at most AUTO_PROCESSES_MAX)

    def __post_init__(self):
        if not 1 <= self.devices <= MAX_DEVICES:
            raise ValueError(f"devices must be between 1 and {MAX_DEVICES}")
        if not os.path.isabs(self.rundir):
            raise ValueError("rundir must be an absolute path")
        if self.max_restarts < 1:
            raise ValueError("max_restarts must be at least 1")
        # -- NBD export bounds --
        if not 1 <= self.nbd_max_connections <= 1_000_000:
            raise ValueError("nbd_max_connections must be between 1 and 1000000")
        if not 1 <= self.nbd_max_connections_per_uid <= 1_000_000:
            raise ValueError("nbd_max_connections_per_uid must be between 1 and 1000000")
        if not 0 < self.nbd_handshake_timeout <= 3600:
            raise ValueError("nbd_handshake_timeout must be between 0 and 3600 seconds")
        if not 0 <= self.nbd_idle_timeout <= 86400 * 365:
            raise ValueError("nbd_idle_timeout must be 0 (none) or a positive number of seconds")
        if not 0 < self.nbd_request_timeout <= 3600:
            raise ValueError("nbd_request_timeout must be between 0 and 3600 seconds")
        if parse_size(self.nbd_buffer_limit) < MIN_NBD_BUFFER:
            raise ValueError("nbd_buffer_limit must be at least 64M (one 32 MiB WRITE and room to read ahead)")
        if not 0 <= self.volume_processes <= MAX_PROCESSES:
            raise ValueError(f"volume_processes must be between 1 and {MAX_PROCESSES}, or 0 for one per CPU")
        # -- durability --
        if not os.path.isabs(self.statedir):
            raise ValueError("statedir must be an absolute path")
        if isinstance(self.track_generations, bool) or not 2 <= self.track_generations <= 100_000:
            raise ValueError("track_generations must be between 2 and 100000")

    @property
    def nbd_buffer_bytes(self) -> int:
        return parse_size(self.nbd_buffer_limit)


class VolumeSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: str
    path: str
    # Create a sparse image of this size when `path` is missing.
    size: int | str | None = None
    # Where the administrator mounts the volume's file system (for fssconfig and VSS).
    mountpoint: str | None = None
    # Changed-block tracking: every snapshot can say which clusters changed since an earlier one.
    track: bool = True
    # Processes serving this volume; default [daemon] volume_processes.
    processes: int | None = None

    def __post_init__(self):
        if self.processes is not None and not 1 <= self.processes <= MAX_PROCESSES:
            raise ValueError(f"processes must be between 1 and {MAX_PROCESSES}")
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name) or self.name.startswith("fss"):
            raise ValueError("name must be letters, digits, '-', '_' or '.', and must not start with 'fss'")
        if not os.path.isabs(self.path):
            raise ValueError("path must be an absolute path")
        if self.size is not None:
            parse_size(self.size)
        if self.mountpoint is not None and not os.path.isabs(self.mountpoint):
            raise ValueError("mountpoint must be an absolute path")

    @property
    def size_bytes(self) -> int | None:
        return None if self.size is None else parse_size(self.size)


class VssSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    enabled: bool = True
    # Seconds each phase (CHECK, FREEZE, THAW) may take, as hv_vss.
    timeout: float = 15.0
    # A freeze no THAW ends within this many seconds is thawed by the broker.
    freeze_max: float = 10.0
    # Mounts to FIFREEZE; None = the configured mountpoints of the volumes.
    freeze: list[str] | None = None
    # qemu-ga fsfreeze-hook.d compatible directory of executables; None = no hooks.
    hooks_dir: str | None = None
    # Serve the Hyper-V VSS channel (e.g. /dev/vmbus/hv_vss); None = off.
    hyperv_device: str | None = None
    # Registered applications at most, in all and per uid (root is not capped per uid);
    # each costs two of the system's message queues (fs.mqueue.queues_max, 256 by default).
    max_apps: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 64
    max_apps_per_uid: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 8

    def __post_init__(self):
        if not 0 < self.timeout <= 3600:
            raise ValueError("timeout must be between 0 and 3600 seconds")
        if not 0 < self.freeze_max <= 3600:
            raise ValueError("freeze_max must be between 0 and 3600 seconds")
        for m in self.freeze or []:
            if not os.path.isabs(m):
                raise ValueError(f"freeze entry {m!r} must be an absolute path")
            if os.path.realpath(m) == "/":
                raise ValueError("fssd never freezes /")


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    daemon: DaemonSection = DaemonSection()
    volume: list[VolumeSection] = []
    vss: VssSection = VssSection()
    # NBD over TCP (ipc.listenpolicy documents the keys); none by default.
    listen: list[ListenSection] = []

    def freeze_mounts(self) -> list[str]:
        """What the broker may freeze: [vss] freeze, else every volume's mountpoint (never /)."""
        mounts = self.vss.freeze if self.vss.freeze is not None else [v.mountpoint for v in self.volume if v.mountpoint]
        return [m for m in mounts if os.path.realpath(m) != "/"]

    def processes_for(self, vol: VolumeSection) -> int:
        """How many processes serve this volume."""
        if vol.processes is not None:
            return vol.processes
        return self.daemon.volume_processes or auto_processes()


def auto_processes() -> int:
    """One volume process per CPU this daemon may run on (its affinity), at most AUTO_PROCESSES_MAX."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except OSError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, AUTO_PROCESSES_MAX))


def _check_volumes(cfg: Config) -> None:
    seen: set[str] = set()
    for i, vol in enumerate(cfg.volume):
        where = f"`$.volume[{i}]`"
        if vol.name in seen:
            raise ConfigError(f"duplicate volume name {vol.name!r} - at {where}.name")
        seen.add(vol.name)
        if os.path.exists(vol.path):
            if not os.access(vol.path, os.R_OK | os.W_OK):
                raise ConfigError(f"volume image {vol.path} is not readable and writable - at {where}.path")
        elif vol.size is None:
            raise ConfigError(f"volume image {vol.path} does not exist and no size is given to create it - at {where}.path")
        elif not os.path.isdir(os.path.dirname(vol.path)):
            raise ConfigError(f"directory of volume image {vol.path} does not exist - at {where}.path")


def _check_freeze(cfg: Config) -> None:
    """Freezing the file system that holds a volume image would stall the volume's own writes
    (and with them the FIFREEZE of the file system on the volume): refuse it."""
    for m in cfg.vss.freeze or []:
        real = os.path.realpath(m).rstrip("/") + "/"
        for i, vol in enumerate(cfg.volume):
            if os.path.realpath(vol.path).startswith(real):
                raise ConfigError(f"[vss] freeze {m} holds the image of volume {vol.name!r}: freezing it would stall the volume - at `$.vss.freeze`")


def _check_tls_files(sec: ListenSection, where: str) -> None:
    """Load them as the front will, so a bad file is a config error, not a front that won't start."""
    import ssl

    d = sec.tls_dir
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(os.path.join(d, "server-cert.pem"), os.path.join(d, "server-key.pem"))
        if sec.verify_peer:
            ctx.load_verify_locations(os.path.join(d, "ca-cert.pem"))
        if os.path.exists(os.path.join(d, "ca-crl.pem")):
            ctx.load_verify_locations(os.path.join(d, "ca-crl.pem"))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the TLS files in {d}: {getattr(e, 'reason', None) or e} - at `{where}.tls_dir`") from None


def _check_listen(cfg: Config) -> None:
    """[[listen]]: one table per address; the TLS files it names must be there."""
    seen: set[tuple[str, int]] = set()
    for i, sec in enumerate(cfg.listen):
        where = f"$.listen[{i}]"
        hp = parse_address(sec.address)
        if hp in seen:
            raise ConfigError(f"address {sec.address} is listed twice - at `{where}.address`")
        seen.add(hp)
        if sec.tls == "off" or not sec.verify_peer:
            for j, rule in enumerate(sec.allow):
                if "=" in rule.client:
                    raise ConfigError(f"client {rule.client!r} can never match: without verified client certificates (tls = \"off\" or verify_peer = false) clients are known by address only - at `{where}.allow[{j}]`")
        if sec.tls == "off":
            continue
        wanted = ["server-cert.pem", "server-key.pem"] + (["ca-cert.pem"] if sec.verify_peer else [])
        for f in wanted:
            if not os.path.isfile(os.path.join(sec.tls_dir, f)):
                raise ConfigError(f"{os.path.join(sec.tls_dir, f)} is missing (tls = \"require\" needs {', '.join(wanted)}) - at `{where}.tls_dir`")
        _check_tls_files(sec, where)


def load(path: str, rundir_override: str | None = None) -> Config:
    """Read and validate; raises ConfigError with the file name and the key."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        cfg = msgspec.toml.decode(raw, type=Config)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{path}: {e}") from None
    except msgspec.DecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        _check_volumes(cfg)
        _check_freeze(cfg)
        _check_listen(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if rundir_override:
        cfg = msgspec.structs.replace(cfg, daemon=msgspec.structs.replace(cfg.daemon, rundir=rundir_override))
    return cfg


def create_missing_images(cfg: Config) -> None:
    """Sparse image files for volumes whose path is missing and a size is given."""
    for vol in cfg.volume:
        if not os.path.exists(vol.path) and vol.size_bytes is not None:
            fd = os.open(vol.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, vol.size_bytes)
            finally:
                os.close(fd)
