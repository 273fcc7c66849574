"""daemon.notify against a real datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
import struct
import time
import uuid

import pytest

from daemon.notify import Notifier, child_env


def _receiver(address: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    s.bind(address)
    s.setblocking(False)
    return s


def _recv(s: socket.socket) -> tuple[bytes, int]:
    """The next datagram (already queued: sendto() on AF_UNIX is synchronous) and the sender's pid."""
    data, anc, _flags, _addr = s.recvmsg(4096, socket.CMSG_SPACE(12))
    pid = None
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid, _uid, _gid = struct.unpack("iII", payload[:12])
    return data, pid


@pytest.fixture
def path_socket(tmp_path):
    path = str(tmp_path / "notify")
    s = _receiver(path)
    yield s, path
    s.close()


@pytest.fixture
def abstract_socket():
    name = f"fssd-test/notify/{uuid.uuid4().hex}"
    s = _receiver("\0" + name)
    yield s, "@" + name
    s.close()


@pytest.mark.parametrize("kind", ["path_socket", "abstract_socket"])
def test_messages_arrive(kind, request):
    sock, env_value = request.getfixturevalue(kind)
    n = Notifier.from_env({"NOTIFY_SOCKET": env_value})
    assert n.enabled
    assert n.ready()
    assert n.status("2 volumes, 1 snapshot (fss0 active), vss idle")
    assert n.stopping()
    assert n.watchdog()
    got = [_recv(sock) for _ in range(4)]
    assert [d for d, _ in got] == [
        b"READY=1",
        b"STATUS=2 volumes, 1 snapshot (fss0 active), vss idle",
        b"STOPPING=1",
        b"WATCHDOG=1",
    ]
    # systemd attributes datagrams by the sender's pid (NotifyAccess=main).
    assert {pid for _, pid in got} == {os.getpid()}
    with pytest.raises(BlockingIOError):
        sock.recv(4096)
    n.close()


def test_several_fields_in_one_datagram_and_newlines_flattened(path_socket):
    sock, path = path_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.ready(status="ready:\nfss0 active")
    assert n.send(STATUS="ünïcode", X_FSSD_SNAPSHOTS=2)
    assert _recv(sock)[0] == b"READY=1\nSTATUS=ready: fss0 active"
    assert _recv(sock)[0] == "STATUS=ünïcode\nX_FSSD_SNAPSHOTS=2".encode()


def test_reloading_carries_monotonic_usec(path_socket):
    sock, path = path_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = _recv(sock)[0].decode().split("\n")
    assert lines[0] == "RELOADING=1"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_noop_without_notify_socket():
    n = Notifier.from_env({})
    assert not n.enabled
    assert n.ready() is False
    assert n.status("x") is False
    assert n.watchdog() is False
    assert n._sock is None  # not even a socket was made


@pytest.mark.parametrize("value", ["relative/path", "vsock:2:1234", "@"])
def test_unsupported_address_is_a_noop(value):
    n = Notifier.from_env({"NOTIFY_SOCKET": value})
    assert not n.enabled
    assert n.ready() is False


def test_send_failure_does_not_raise(tmp_path):
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert n.enabled
    assert n.ready() is False
    assert n.status("still fine") is False


def test_forked_child_stays_silent(path_socket):
    sock, path = path_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    pid = os.fork()
    if pid == 0:  # a worker that inherited the supervisor's notifier
        sent = n.ready()
        os._exit(3 if sent else 0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The child has exited; the first datagram queued is the parent's.
    assert n.status("parent")
    assert _recv(sock) == (b"STATUS=parent", os.getpid())
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env, expected):
    assert Notifier.from_env(env).watchdog_interval() == expected


def test_unset_environment_removes_variables():
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1", "PATH": "/bin"}
    n = Notifier.from_env(env, unset_environment=True)
    assert n.enabled and n.watchdog_interval() is None  # pid 1 is not us
    assert env == {"PATH": "/bin"}


def test_child_env_drops_notify_variables_only():
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "2", "PATH": "/bin", "LANG": "C.UTF-8"}
    assert child_env(env) == {"PATH": "/bin", "LANG": "C.UTF-8"}
    assert "NOTIFY_SOCKET" in env  # the caller's mapping is not changed
