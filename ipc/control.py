"""Control socket messages: fssconfig / vssadm / `fssd --status` <-> supervisor.

Framed by ipc.framing (u32 length + msgpack, requests at most MAX_REQUEST bytes).
Every request gets exactly one reply: the matching result, or `Error(errno, message)`.
"""

from __future__ import annotations

from typing import Annotated

import msgspec


class _Msg(msgspec.Struct, tag_field="t", frozen=True, omit_defaults=True):
    pass


# -- requests --------------------------------------------------------------------


class ListSnapshots(_Msg, tag="list"):
    device: str | None = None


class ListVolumes(_Msg, tag="volumes"):
    pass


class Configure(_Msg, tag="configure"):
    """The store travels as a descriptor fssconfig opened with the caller's own rights
    (SCM_RIGHTS on this frame): fssd never opens the backing path itself.

    Descriptors: [store] or, for a file fssconfig created that fssd removes at
    unconfigure, [store, its directory (O_PATH)] with `name` the file's name in it.
    """

    device: str
    path: str  # volume name, its mountpoint or its image path
    backup: str  # the store's path as given (shown by fssconfig -l; never opened by fssd)
    cluster: int = 0  # 0 = default (64 KiB), rounded up as fss does
    size: int | None = None  # backing-store limit in bytes; None = room for every cluster
    unconfig_on_close: bool = False
    unlink: bool = False  # the store has no name once configured (-x, or made in a directory)
    consistent: bool = False  # -C: CHECK, FREEZE, barrier, THAW
    # -C -t: per-phase VSS timeout for this request; None = [vss] timeout.
    timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] | None = None
    # --no-suspend: crash-consistent on purpose (fss always suspends the file system).
    no_suspend: bool = False
    name: str = ""  # with 2 descriptors: the created file's name in the directory passed
    nfds: int = 1


class SetMember(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One snapshot of a ConfigureSet: as Configure's per-snapshot fields."""

    device: str
    path: str
    backup: str
    cluster: int = 0
    size: int | None = None
    unlink: bool = False
    name: str = ""
    nfds: int = 1


SET_MAX = 32  # members of one snapshot set at most


class ConfigureSet(_Msg, tag="configure-set"):
    """A snapshot set: every member's snapshot of one instant (one VSS freeze or one suspend
    for all their volumes, one barrier across their volume workers), all configured or none.
    Descriptors: each member's, as for Configure, in member order."""

    members: Annotated[list[SetMember], msgspec.Meta(max_length=SET_MAX)]
    unconfig_on_close: bool = False
    consistent: bool = False
    timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] | None = None
    no_suspend: bool = False


class Unconfigure(_Msg, tag="unconfigure"):
    device: str


class Status(_Msg, tag="status"):
    pass


# Extents in one ChangedExtents reply: the rest is asked for from `start` on (a frame is at most 1 MiB).
CHANGES_PAGE = 32768


class Changes(_Msg, tag="changes"):
    """fssconfig --changes: what was written between snapshot `since`'s barrier and `device`'s."""

    device: str
    since: Annotated[str, msgspec.Meta(max_length=128)]
    start: Annotated[int, msgspec.Meta(ge=0)] = 0  # index of the first extent wanted (paging)


def declared_fds(req) -> int:
    """How many descriptors a request says it carries (the control server claims that many)."""
    if isinstance(req, Configure):
        return req.nfds
    if isinstance(req, ConfigureSet):
        return sum(m.nfds for m in req.members[:SET_MAX])
    return 0


Request = ListSnapshots | ListVolumes | Configure | ConfigureSet | Unconfigure | Status | Changes


# -- replies -----------------------------------------------------------------------


class Error(_Msg, tag="error"):
    errno: int
    message: str


class SnapshotInfo(msgspec.Struct, frozen=True):
    device: str
    in_use: bool
    volume: str = ""
    volume_path: str = ""
    mountpoint: str | None = None
    state: str = "not in use"  # creating | active | invalid | not in use
    error: str = ""
    taken: float = 0.0  # seconds since the epoch
    unconfig_on_close: bool = False
    cluster_size: int = 0
    cluster_count: int = 0
    bs_clusters: int = 0  # clusters in the backing store: table + copies (fss's fsg_bs_size)
    bs_limit_clusters: int = 0
    copies: int = 0
    backup: str = ""  # path, or "(unlinked)"
    uri: str = ""
    pid: int = 0
    uptime: float = 0.0
    restarts: int = 0
    last_error: str = ""
    clients: int = 0
    # How the instant was taken: "file-system" (suspended, as fss), "application" (-C), "crash".
    consistency: str = ""
    suspended: list[str] = []  # the mounts frozen around the barrier
    window_ms: float = 0.0  # suspend window (or, with -C, freeze window)
    note: str = ""  # one line, e.g. "data has no mountpoint configured: snapshot is crash-consistent"
    # Durability (docs/architecture.md "Durability"): "power" | "process" | "none".
    durability: str = ""
    recovered: float = 0.0  # seconds since the epoch when a start-up brought it back; 0 = never
    store_usage: float = 0.0  # percent of the room the store's limit leaves for copies
    usage_warning: int = 0  # the highest usage warning given: 0, 80 or 95 (percent)
    # The snapshot's id: `<lineage>-<generation>` on a tracked volume (a base for
    # `fssconfig --changes --since` and `qemu:dirty-bitmap:<id>`), else the store's uuid.
    id: str = ""
    set_id: str = ""  # a snapshot set's id ("" = taken alone): its members share one instant
    set_members: list[str] = []  # the set's devices, as configured


class VolumeInfo(msgspec.Struct, frozen=True):
    name: str
    path: str
    size: int
    uri: str
    mountpoint: str | None = None
    pid: int = 0
    uptime: float = 0.0
    restarts: int = 0
    last_error: str = ""
    snapshots: list[str] = []
    processes: int = 1  # how many processes serve it
    pids: list[int] = []  # theirs, in order (0: that one is down)


class WorkerInfo(msgspec.Struct, frozen=True):
    name: str  # process title
    kind: str
    pid: int
    alive: bool
    uptime: float
    restarts: int
    last_error: str = ""


class VssInfo(msgspec.Struct, frozen=True):
    enabled: bool
    state: str = "idle"
    detail: str = ""
    frozen: list[str] = []
    freeze_mounts: list[str] = []


class Snapshots(_Msg, tag="snapshots"):
    snapshots: list[SnapshotInfo]


class Volumes(_Msg, tag="volumes"):
    volumes: list[VolumeInfo]


class Configured(_Msg, tag="configured"):
    snapshot: SnapshotInfo
    barrier_us: int
    freeze_window_ms: float | None = None  # -C
    suspend_window_ms: float | None = None  # the file systems suspended (snapshot.suspended)


class ConfiguredSet(_Msg, tag="configured-set"):
    snapshots: list[SnapshotInfo]
    set_id: str
    barrier_us: int  # the longest any volume worker held its writes
    freeze_window_ms: float | None = None  # -C
    suspend_window_ms: float | None = None


class Unconfigured(_Msg, tag="unconfigured"):
    device: str


class ChangedExtents(_Msg, tag="changed"):
    """The granules written between the barriers, as (offset, length) in bytes, in order;
    extents[0] is extent number `start` of `total`; `more`: ask again from start + len(extents)."""

    device: str
    since: str
    id: str  # the device's snapshot id
    start: int = 0
    extents: list[tuple[int, int]] = []
    total: int = 0
    changed_bytes: int = 0
    volume_size: int = 0
    more: bool = False


class StatusReply(_Msg, tag="statusreply"):
    pid: int
    rundir: str
    config: str
    uptime: float
    volumes: list[VolumeInfo]
    snapshots: list[SnapshotInfo]
    workers: list[WorkerInfo]
    vss: VssInfo


Reply = Error | Snapshots | Volumes | Configured | ConfiguredSet | Unconfigured | StatusReply | ChangedExtents
