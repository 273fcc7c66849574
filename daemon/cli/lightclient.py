"""fssconfig's configure over the control socket, importing next to nothing.

A snapshot's creation is mostly fssconfig starting: the interpreter, then what
it imports. The configure path (the one that is timed: `fssconfig fssN vol
store` to the export answering) loads only this, ipc.minipack, the store
opener and ipc.names: no msgspec (with typing, 25 ms or more here), no
`socket` module (its enums, 10 ms) but the `_socket` it wraps, no getopt
(gettext and re). Every other request goes through daemon.cli.client and
ipc.control, typed; a configure's answer is decoded by msgspec too whenever
more than its summary line is printed (`-v`).

The request is written as msgspec writes control.Configure and decoded by
fssd with msgspec against that Struct, as any other; tests/test_minipack.py
compares the bytes, and the tags here with ipc.control's.
"""

from __future__ import annotations

import _socket
import struct

from ipc import minipack, names

MAX_FRAME = 1 << 20  # ipc.framing.MAX_FRAME: the largest answer read
TIMEOUT = 120.0  # for the answer (a configure may wait out a VSS freeze); as ControlClient
CONNECT_TIMEOUT = 5.0

_LEN = struct.Struct(">I")

# ipc.control.Reply's tags and class names (for "unexpected answer from fssd: NAME").
REPLY_NAMES = {
    "error": "Error", "snapshots": "Snapshots", "volumes": "Volumes", "configured": "Configured",
    "configured-set": "ConfiguredSet", "unconfigured": "Unconfigured", "statusreply": "StatusReply", "changed": "ChangedExtents",
}


class NotRunning(Exception):
    """fssd can't be asked (not running, refused, no answer): the one line to print."""


def connect(rundir: str):
    """A connected control socket (a `_socket.socket`), or NotRunning with the line to print."""
    path = names.control_socket(rundir)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise NotRunning(f"fssd is not running (no control socket at {path})") from None
    except PermissionError:
        sock.close()
        raise NotRunning(f"{path}: Permission denied") from None
    except OSError as e:
        sock.close()
        raise NotRunning(f"{path}: {e.strerror}") from None
    return sock


def configure_request(device: str, path: str, backup: str, cluster: int = 0, size: int | None = None,
                      unconfig_on_close: bool = False, unlink: bool = False, consistent: bool = False,
                      timeout: float | None = None, no_suspend: bool = False, name: str = "", nfds: int = 1) -> dict:
    """control.Configure as msgspec encodes it: the tag, then the fields in their order, those
    at their default left out (omit_defaults)."""
    req = {"t": "configure", "device": device, "path": path, "backup": backup}
    for key, value, default in (
        ("cluster", cluster, 0), ("size", size, None), ("unconfig_on_close", unconfig_on_close, False), ("unlink", unlink, False),
        ("consistent", consistent, False), ("timeout", timeout, None), ("no_suspend", no_suspend, False), ("name", name, ""),
        ("nfds", nfds, 1),
    ):
        if value != default or type(value) is not type(default):
            req[key] = value
    return req


def request(sock, req: dict, fds: list[int]) -> tuple[dict, bytes]:
    """Send one request (its descriptors on its first bytes) and read the answer: the decoded
    map and its bytes. NotRunning if there is none to read, or it is not a control reply."""
    body = minipack.encode(req)
    data = _LEN.pack(len(body)) + body
    try:
        try:
            sent = sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else [])
            if sent < len(data):
                sock.sendall(data[sent:])
        except (BrokenPipeError, ConnectionResetError):
            # fssd refused the connection (too many) and said why before closing: read that.
            sock.settimeout(1.0)
        else:
            sock.settimeout(TIMEOUT)
        raw = _frame(sock)
    except TimeoutError:
        raise NotRunning("fssd did not answer in time") from None
    except OSError as e:
        raise NotRunning(f"lost the connection to fssd: {e.strerror or e}") from None
    try:
        reply = minipack.decode(raw)
        if type(reply) is not dict or reply.get("t") not in REPLY_NAMES:
            raise ValueError("not a control reply")
    except ValueError as e:
        raise NotRunning(f"bad answer from fssd: {e}") from None
    return reply, raw


def _frame(sock) -> bytes:
    head = _exactly(sock, 4)
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise NotRunning(f"bad answer from fssd: frame of {n} bytes exceeds the limit {MAX_FRAME}")
    return _exactly(sock, n)


def _exactly(sock, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            raise NotRunning("fssd closed the connection without answering")
        got += chunk
    return bytes(got)


REQUIRED = object()  # field()'s default for a field every such answer has


def field(reply: dict, key: str, types: tuple, default=None):
    """reply[key] if it has one of `types` (missing: `default`, as msgspec's omit_defaults left
    it out; REQUIRED: a bad answer); anything else is a bad answer."""
    if key not in reply:
        if default is REQUIRED:
            raise NotRunning(f"bad answer from fssd: no {key}")
        return default
    value = reply[key]
    if type(value) in types or (value is None and default is None):
        return value
    raise NotRunning(f"bad answer from fssd: {key} is {type(value).__name__}")
