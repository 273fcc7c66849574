"""What the supervisor tells each worker it spawns: one settings type per worker kind.

The supervisor builds one of these, encodes it as JSON on the worker's command
line (`python -m workers.launch ... workers.<kind> --channel-fd N SETTINGS_JSON`)
and the worker decodes it in spawned.bootstrap(). Every kind ends with `debug`
and `use_syslog` (last, so positional construction keeps working; tested in
tests/test_worker_bootstrap.py), so `fssd -d` / `fssd -s` reach every process alike.
Unknown fields are refused: a supervisor and a worker from different versions
fail loudly at start, not quietly later. A field holding an inherited descriptor
is named `*_fd` (a list of them `*fds`): a spare snapshot worker assigned its
settings over the channel (workers/spare.py) puts its own numbers in exactly
those fields, and refuses a descriptor no such field names.
"""

from __future__ import annotations

import msgspec


class AttachedSnapshot(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A snapshot the volume worker copies for (after a restart: already active)."""

    device: str
    map_name: str
    bs_fd: int


class VolumeSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """workers.volume: serves one live volume read-write, doing copy-on-write."""

    name: str
    path: str
    size: int
    listen_fd: int
    snapshots: list[AttachedSnapshot] = []
    # Changed-block tracking (docs/architecture.md "Change tracking"): the current generation's
    # map (inherited, read-write; -1 = volume not tracked), its generation, and whether a newly
    # set byte must be fdatasync'ed before the volume write (durability "power").
    track_fd: int = -1
    track_gen: int = 0
    track_sync: bool = False
    # Several processes may serve one volume, all accepting on listen_fd: this one's index
    # (0-based), how many, and the volume's shared copy-on-write segment (ipc/cowshare.py).
    index: int = 0
    processes: int = 1
    cow_fd: int = -1
    debug: bool = False
    use_syslog: bool = False


class SnapshotSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """workers.snapshot (`fssN`): serves one snapshot read-only."""

    device: str
    volume: str
    volume_path: str
    map_name: str
    bs_fd: int
    listen_fd: int
    taken: str  # UTC, for the process title
    # Changed-block tracking: this snapshot's lineage ("" = volume not tracked) and generation,
    # the handed-out generations m < track_gen whose maps m+1..track_gen all still exist (the
    # bases it can answer for), and the volume's track directory (inherited O_RDONLY|O_DIRECTORY,
    # -1 = not tracked) where gen-<g>.map lives.
    track_lineage: str = ""
    track_gen: int = 0
    track_bases: list[int] = []
    track_dir_fd: int = -1
    debug: bool = False
    use_syslog: bool = False


class SpareSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """workers.spare: a snapshot worker started ahead, idle until it is assigned a snapshot
    (its SnapshotSettings then arrive over the channel, AssignSnapshot)."""

    debug: bool = False
    use_syslog: bool = False


class SuspendSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """workers.suspend: FIFREEZE a volume's file systems for one barrier, then FITHAW."""

    device: str
    mounts: list[str]  # what each descriptor is, for messages
    fds: list[int]  # open directories on the file systems to freeze, inherited
    freeze_max: float
    debug: bool = False
    use_syslog: bool = False


class BrokerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """workers.broker: the VSS broker."""

    prefix: str
    rundir: str
    timeout: float = 15.0
    freeze_max: float = 10.0
    freeze_mounts: list[str] = []
    hooks_dir: str | None = None
    hyperv_device: str | None = None  # /dev/vmbus/hv_vss, or unix:/path for a stand-in
    group: str | None = None  # [daemon] group: its members may request and register (root always)
    max_apps: int = 64  # [vss] max_apps
    max_apps_per_uid: int = 8  # [vss] max_apps_per_uid (root is not capped)
    debug: bool = False
    use_syslog: bool = False
