"""The control-socket client every command-line tool uses."""

from __future__ import annotations

import socket

from ipc import control, names
from ipc.channel import Channel, FrameError


class NotRunning(Exception):
    pass


class ControlClient:
    def __init__(self, rundir: str, timeout: float = 120.0):
        self.rundir = rundir
        self.timeout = timeout

    def request(self, req: control.Request) -> control.Reply:
        path = names.control_socket(self.rundir)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(5.0)
            try:
                sock.connect(path)
            except (FileNotFoundError, ConnectionRefusedError):
                raise NotRunning(f"fssd is not running (no control socket at {path})") from None
            except PermissionError:
                raise NotRunning(f"{path}: Permission denied") from None
            chan = Channel(sock, control.Reply)
            chan.send(req)
            got = chan.recv(timeout=self.timeout)
            if got is None:
                raise NotRunning("fssd closed the connection without answering")
            return got[0]
        except FrameError as e:
            raise NotRunning(f"bad answer from fssd: {e}") from None
        except socket.timeout:
            raise NotRunning("fssd did not answer in time") from None
        finally:
            sock.close()
