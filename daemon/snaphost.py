"""What the snapshot manager needs from the service around it, and nothing more.

The supervisor fills a SnapshotHost; unit tests fill one with fakes
(tests/test_snapshot_manager.py), so the manager runs without a running fssd.
Values that a reload may change are callables, read when used.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

if TYPE_CHECKING:
    from daemon.backing import BackingStore
    from daemon.procs import Worker
    from daemon.statedir import StateDir
    from daemon.tracking import VolumeTrack

# (channel fd) -> (module, settings json, descriptors to pass): what a worker is started with.
SpawnArgs = Callable[[int], tuple[str, str, list[int]]]


class VolumeSection(Protocol):
    name: str
    path: str
    mountpoint: str | None


class Volume(Protocol):
    """A served volume as the manager sees it: its config, size and (live) worker; a volume
    served by several processes also has `workers` (every one of them; `worker` is the first)."""

    section: VolumeSection
    size: int
    worker: "Worker | None"


class VssGate(Protocol):
    """The VSS broker, to ask for CHECK / FREEZE / THAW around an application-consistent snapshot."""

    mounts: list[str]  # what the broker may hold frozen (the supervisor thaws these if it dies)
    timeout: float  # [vss] timeout: a phase's default

    async def request(self, op: str, timeout: float) -> tuple[bool, str, bool]:
        """(ok, reason, unknown): unknown = no answer came, the broker may have acted."""
        ...


@dataclass
class WorkerFlags:
    """Passed on to every worker and helper process the manager starts."""

    env: dict[str, str]
    debug: bool = False
    use_syslog: bool = False


@dataclass
class SnapshotHost:
    rundir: str
    prefix: str  # this instance's shared-memory name prefix
    devices: list[str]  # fss0..fssN-1
    volumes: Callable[[], Mapping[str, Volume]]
    find_volume: Callable[[str], Volume | None]  # by name, mountpoint or image path
    freeze_mounts: Callable[[], list[str]]
    freeze_max: Callable[[], float]  # [vss] freeze_max: the longest a suspend may hold
    vss: Callable[[], VssGate | None]  # None: no broker running (-C is refused)
    listen: Callable[[str], socket.socket]  # a group-readable export socket for a device
    spawn: Callable[[str, str, SpawnArgs], "Worker"]  # (kind, key, args): not yet started
    record_made: Callable[[list["BackingStore"]], None]  # write down what a kill would leave (stores being configured)
    changed: Callable[[], None]  # a snapshot came, went or turned invalid
    stopping: Callable[[], bool]  # the service is shutting down
    flags: WorkerFlags = field(default_factory=lambda: WorkerFlags({}))
    # A started, idle snapshot worker to assign instead of spawning one (daemon/spares.py), or None.
    take_spare: Callable[[], "Worker | None"] = lambda: None
    # Runs blocking work (table writes, fsyncs, closing a large store) off the event loop.
    offload: Callable[..., Any] = asyncio.to_thread
    # Durable snapshots (docs/architecture.md "Durability"): the level new snapshots get,
    # the state directory (None: nothing is recorded) and this boot's id.
    durability: Callable[[], str] = lambda: "none"
    state: "StateDir | None" = None
    boot_id: str = ""
    # Changed-block tracking (daemon/tracking.py): the tracked volumes' change histories, by name.
    tracks: Callable[[], Mapping[str, "VolumeTrack"]] = lambda: {}
