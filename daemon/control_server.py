"""The control socket RUNDIR/control.sock: framed msgspec requests, one reply each.

Anyone who can connect may look; only root, or members of [daemon] group, may
change anything (checked with SO_PEERCRED on every connection).
"""

from __future__ import annotations

import asyncio
import errno
import grp
import logging
import os
import socket
import struct
import time
from typing import TYPE_CHECKING

import msgspec

from daemon.snapshots import ControlError
from ipc import control, names
from ipc.framing import MAX_FRAME, FrameCodec, FrameError

if TYPE_CHECKING:
    from daemon.supervisor import Supervisor

log = logging.getLogger("control")

_MUTATING = (control.Configure, control.Unconfigure)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


def _peer_groups(pid: int, gid: int) -> set[int]:
    groups = {gid}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return groups


class ControlServer:
    def __init__(self, sup: "Supervisor"):
        self.sup = sup
        self.server: asyncio.AbstractServer | None = None
        self.path = names.control_socket(sup.rundir)
        self.codec = FrameCodec(control.Request)

    async def start(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.server = await asyncio.start_unix_server(self._client, self.path)
        mode, gid = 0o600, -1
        if self.sup.cfg.daemon.group:
            try:
                gid = grp.getgrnam(self.sup.cfg.daemon.group).gr_gid
                mode = 0o660
            except KeyError:
                log.warning("group %s does not exist; control socket is root-only", self.sup.cfg.daemon.group)
        os.chown(self.path, -1, gid)
        os.chmod(self.path, mode if gid != -1 else 0o666)

    async def stop(self) -> None:
        if self.server:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _allowed(self, pid: int, uid: int, gid: int) -> bool:
        if uid == 0:
            return True
        group = self.sup.cfg.daemon.group
        if not group:
            return False
        try:
            return grp.getgrnam(group).gr_gid in _peer_groups(pid, gid)
        except KeyError:
            return False

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        pid, uid, gid = peer_credentials(sock)
        dec = msgspec.msgpack.Decoder(control.Request)
        try:
            while True:
                try:
                    head = await reader.readexactly(4)
                except asyncio.IncompleteReadError:
                    return
                (n,) = struct.unpack(">I", head)
                if n > MAX_FRAME:
                    writer.write(self.codec.encode(control.Error(errno.EMSGSIZE, f"request of {n} bytes is over the limit")))
                    await writer.drain()
                    return
                body = await reader.readexactly(n)
                try:
                    req = dec.decode(body)
                except msgspec.DecodeError as e:
                    log.warning("refused a malformed control request from pid %d: %s", pid, e)
                    reply = control.Error(errno.EINVAL, f"malformed request: {e}")
                else:
                    reply = await self._dispatch(req, pid, uid, gid)
                writer.write(self.codec.encode(reply))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, FrameError) as e:
            log.debug("control client pid %d went away: %s", pid, e)
        finally:
            writer.close()

    async def _dispatch(self, req, pid: int, uid: int, gid: int):
        sup = self.sup
        if isinstance(req, _MUTATING) and sup.shutting_down:
            return control.Error(errno.ESHUTDOWN, "fssd is shutting down")
        if isinstance(req, _MUTATING) and not self._allowed(pid, uid, gid):
            log.warning("refused %s from uid %d (pid %d): not root or in the fssd group", type(req).__name__, uid, pid)
            return control.Error(errno.EPERM, "Operation not permitted")
        try:
            if isinstance(req, control.ListSnapshots):
                devs = sup.snaps.devices()
                if req.device is not None:
                    if req.device not in devs:
                        return control.Error(errno.ENXIO, f"{req.device}: Device not configured")
                    devs = [req.device]
                return control.Snapshots([sup.snaps.info(d) for d in devs])
            if isinstance(req, control.ListVolumes):
                return control.Volumes([sup.volume_info(v) for v in sup.volumes.values()])
            if isinstance(req, control.Configure):
                return await sup.snaps.configure(req)
            if isinstance(req, control.Unconfigure):
                await sup.snaps.unconfigure(req.device)
                return control.Unconfigured(req.device)
            if isinstance(req, control.Status):
                return control.StatusReply(
                    pid=os.getpid(),
                    rundir=sup.rundir,
                    config=sup.config_path,
                    uptime=time.monotonic() - sup.started,
                    volumes=[sup.volume_info(v) for v in sup.volumes.values()],
                    snapshots=[sup.snaps.info(d) for d in sup.snaps.devices()],
                    workers=sup.worker_infos(),
                    vss=sup.vss_info(),
                )
        except ControlError as e:
            log.warning("refused %s: %s", type(req).__name__, e)
            return control.Error(e.errno, str(e))
        except Exception as e:  # a bug answers with an error; it never drops the client silently
            log.exception("internal error handling %s", type(req).__name__)
            return control.Error(errno.EIO, f"internal error in fssd: {e}")
        return control.Error(errno.EINVAL, f"unsupported request {type(req).__name__}")
