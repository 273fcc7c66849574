"""fssd's query and command API: one request in, one reply out.

The control server (daemon/control_server.py) carries the bytes and says who
the peer is; this decides what the request may do and answers it. It needs
the snapshot manager, the volumes' and the whole service's status, and
whether the service is stopping: tests/test_control_dispatch.py runs it with
fakes of those.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from daemon.errors import ControlError
from ipc import control

if TYPE_CHECKING:
    from daemon.supervisor import Supervisor

log = logging.getLogger("control")

_MUTATING = (control.Configure, control.ConfigureSet, control.Unconfigure)


@dataclass(frozen=True)
class Peer:
    """Who sent a request, as the kernel vouches for it (SO_PEERCRED, SO_PEERGROUPS)."""

    pid: int
    uid: int
    privileged: bool  # root, or in [daemon] group: may configure and unconfigure


class Snapshots(Protocol):
    def devices(self) -> list[str]: ...
    def info(self, device: str) -> control.SnapshotInfo: ...
    async def configure(self, req: control.Configure, fds: list[int], uid: int) -> control.Configured: ...
    async def configure_set(self, req: control.ConfigureSet, fds: list[int], uid: int) -> control.ConfiguredSet: ...
    async def unconfigure(self, device: str) -> None: ...


class Service:
    def __init__(
        self,
        snaps: Snapshots,
        volumes: Callable[[], list[control.VolumeInfo]],
        status: Callable[[], control.StatusReply],
        stopping: Callable[[], bool],
    ):
        self.snaps = snaps
        self.volumes = volumes
        self.status = status
        self.stopping = stopping

    @classmethod
    def of(cls, sup: "Supervisor") -> "Service":
        return cls(sup.snaps, lambda: [sup.volume_info(v) for v in sup.volumes.values()], sup.status_reply, lambda: sup.shutting_down)

    async def handle(self, req: control.Request, fds: list[int], peer: Peer) -> control.Reply:
        """Answer one request. `fds` (SCM_RIGHTS) are the handler's: a Configure takes them, any
        other request's are closed. Never raises: errors are answered."""
        try:
            if isinstance(req, _MUTATING) and self.stopping():
                return control.Error(errno.ESHUTDOWN, "fssd is shutting down")
            if isinstance(req, _MUTATING) and not peer.privileged:
                log.warning("refused %s from uid %d (pid %d): not root or in the fssd group", type(req).__name__, peer.uid, peer.pid)
                return control.Error(errno.EPERM, "Operation not permitted")
            if isinstance(req, control.ListSnapshots):
                devs = self.snaps.devices()
                if req.device is not None:
                    if req.device not in devs:
                        return control.Error(errno.ENXIO, f"{req.device}: Device not configured")
                    devs = [req.device]
                return control.Snapshots([self.snaps.info(d) for d in devs])
            if isinstance(req, control.ListVolumes):
                return control.Volumes(self.volumes())
            if isinstance(req, control.Configure):
                claimed, fds = fds, []
                return await self.snaps.configure(req, claimed, peer.uid)
            if isinstance(req, control.ConfigureSet):
                claimed, fds = fds, []
                return await self.snaps.configure_set(req, claimed, peer.uid)
            if isinstance(req, control.Unconfigure):
                await self.snaps.unconfigure(req.device)
                return control.Unconfigured(req.device)
            if isinstance(req, control.Status):
                return self.status()
        except ControlError as e:
            log.warning("refused %s: %s", type(req).__name__, e)
            return control.Error(e.errno, str(e))
        except Exception as e:  # a bug answers with an error; it never drops the client silently
            log.exception("internal error handling %s", type(req).__name__)
            return control.Error(errno.EIO, f"internal error in fssd: {e}")
        finally:
            for fd in fds:
                os.close(fd)
        return control.Error(errno.EINVAL, f"unsupported request {type(req).__name__}")
