"""Blocking I/O for framed messages on a Unix socket, with file descriptors.

The bytes are framed by ipc.framing; this module only moves them (and
SCM_RIGHTS descriptors, for backing stores the supervisor hands to workers).
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

from ipc.framing import FrameCodec, FrameError

__all__ = ["Channel", "FrameError", "send_frame"]


def send_frame(sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    """All of an encoded frame; descriptors ride on its first bytes (SCM_RIGHTS)."""
    if fds:
        n = socket.send_fds(sock, [data], list(fds))
        if n < len(data):
            sock.sendall(data[n:])
    else:
        sock.sendall(data)


class Channel:
    """One end of a socketpair or a connected stream socket. send() is thread-safe."""

    def __init__(self, sock: socket.socket, decode_type: Any):
        self.sock = sock
        self._codec = FrameCodec(decode_type)
        self._pending: list[tuple[Any, list[int]]] = []
        self._fds: list[int] = []
        self._send_lock = threading.Lock()

    def send(self, msg: Any, fds: list[int] | tuple[int, ...] = ()) -> None:
        data = self._codec.encode(msg)
        with self._send_lock:
            send_frame(self.sock, data, fds)

    def recv(self, timeout: float | None = None) -> tuple[Any, list[int]] | None:
        """Next message and the descriptors it declares (its type's `nfds`); None on EOF.

        Descriptors arrive with the first bytes of the frame that carries them and wait
        in order until that message is decoded, however the stream was split."""
        if self._pending:
            return self._pending.pop(0)
        self.sock.settimeout(timeout)
        while True:
            data, newfds, _flags, _addr = socket.recv_fds(self.sock, 65536, 16)
            self._fds.extend(newfds)
            if not data:
                while self._fds:
                    os.close(self._fds.pop(0))
                return None
            for m in self._codec.feed(data):
                n = getattr(m, "nfds", 0)
                claimed, self._fds = self._fds[:n], self._fds[n:]
                self._pending.append((m, claimed))
            if self._pending:
                return self._pending.pop(0)
