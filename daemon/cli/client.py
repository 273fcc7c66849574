"""The control-socket client every command-line tool uses."""

from __future__ import annotations

import socket

from daemon.cli import lightclient
from daemon.cli.lightclient import NotRunning
from ipc import control
from ipc.channel import Channel, FrameError

__all__ = ["ControlClient", "NotRunning"]


class ControlClient:
    def __init__(self, rundir: str, timeout: float = 120.0):
        self.rundir = rundir
        self.timeout = timeout

    def connect(self) -> socket.socket:
        """A connection for one or more requests (raises NotRunning with the line to print)."""
        sock = socket.socket(fileno=lightclient.connect(self.rundir).detach())
        sock.settimeout(lightclient.CONNECT_TIMEOUT)  # as before: sends never wait longer
        return sock

    def request(self, req: control.Request, fds: list[int] | tuple[int, ...] = (), sock: socket.socket | None = None) -> control.Reply:
        """One request (with descriptors for SCM_RIGHTS, e.g. a Configure's store) and its reply.
        On `sock` if given (left open), else on a connection of its own."""
        own = sock is None
        if own:
            sock = self.connect()
        try:
            chan = Channel(sock, control.Reply)
            try:
                chan.send(req, fds)
            except (BrokenPipeError, ConnectionResetError):
                # fssd refused the connection (too many) and said why before closing: read that.
                got = chan.recv(timeout=1.0)
                if got is None:
                    raise NotRunning("fssd closed the connection without answering") from None
                return got[0]
            got = chan.recv(timeout=self.timeout)
            if got is None:
                raise NotRunning("fssd closed the connection without answering")
            return got[0]
        except FrameError as e:
            raise NotRunning(f"bad answer from fssd: {e}") from None
        except socket.timeout:
            raise NotRunning("fssd did not answer in time") from None
        except OSError as e:
            raise NotRunning(f"lost the connection to fssd: {e.strerror or e}") from None
        finally:
            if own:
                sock.close()
