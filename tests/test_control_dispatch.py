"""The control API and the control socket on their own: fakes behind them, no fssd."""

import asyncio
import errno
import os

import pytest

from daemon.cli.client import ControlClient
from daemon.control_server import ControlServer
from daemon.errors import ControlError
from daemon.service import Peer, Service
from ipc import control, names

ROOT = Peer(pid=1, uid=0, privileged=True)
USER = Peer(pid=2, uid=1000, privileged=False)


class FakeSnaps:
    def __init__(self):
        self.configured: dict[str, list[int]] = {}
        self.fail: Exception | None = None

    def devices(self):
        return ["fss0", "fss1"]

    def info(self, device):
        return control.SnapshotInfo(device=device, in_use=device in self.configured)

    async def configure(self, req, fds, uid):
        if self.fail:
            raise self.fail
        self.configured[req.device] = fds
        return control.Configured(self.info(req.device), 5)

    async def unconfigure(self, device):
        if device not in self.configured:
            raise ControlError(errno.ENXIO, f"{device}: Device not configured")
        del self.configured[device]


def service(stopping=False):
    snaps = FakeSnaps()
    status = control.StatusReply(pid=1, rundir="/x", config="/c", uptime=1.0, volumes=[], snapshots=[], workers=[], vss=control.VssInfo(False, "stopped", "", [], []))
    return Service(snaps, lambda: [], lambda: status, lambda: stopping), snaps


def handle(svc, req, fds=(), peer=ROOT):
    return asyncio.run(svc.handle(req, list(fds), peer))


def a_descriptor():
    r, w = os.pipe()
    os.close(w)
    return r


def closed(fd):
    try:
        os.fstat(fd)
        return False
    except OSError:
        return True


def test_configure_list_unconfigure():
    svc, snaps = service()
    fd = a_descriptor()
    r = handle(svc, control.Configure("fss0", "data", "/bs"), [fd])
    assert isinstance(r, control.Configured) and snaps.configured["fss0"] == [fd]
    assert not closed(fd)  # the manager's now
    r = handle(svc, control.ListSnapshots())
    assert [s.in_use for s in r.snapshots] == [True, False]
    assert handle(svc, control.ListSnapshots("fss0")).snapshots[0].device == "fss0"
    assert handle(svc, control.Unconfigure("fss0")) == control.Unconfigured("fss0")
    os.close(fd)


def test_errors_are_answered():
    svc, snaps = service()
    assert handle(svc, control.ListSnapshots("fss5")) == control.Error(errno.ENXIO, "fss5: Device not configured")
    assert handle(svc, control.Unconfigure("fss1")) == control.Error(errno.ENXIO, "fss1: Device not configured")
    snaps.fail = ControlError(errno.EBUSY, "fss0: Device busy")
    assert handle(svc, control.Configure("fss0", "data", "/bs"), [a_descriptor()]) == control.Error(errno.EBUSY, "fss0: Device busy")
    snaps.fail = KeyError("bug")
    r = handle(svc, control.Configure("fss0", "data", "/bs"), [a_descriptor()])
    assert r.errno == errno.EIO and r.message.startswith("internal error in fssd")


def test_unprivileged_may_look_but_not_change():
    svc, snaps = service()
    fd = a_descriptor()
    assert handle(svc, control.Configure("fss0", "data", "/bs"), [fd], USER) == control.Error(errno.EPERM, "Operation not permitted")
    assert closed(fd) and snaps.configured == {}
    assert handle(svc, control.Unconfigure("fss0"), peer=USER).errno == errno.EPERM
    assert isinstance(handle(svc, control.ListSnapshots(), peer=USER), control.Snapshots)
    assert isinstance(handle(svc, control.Status(), peer=USER), control.StatusReply)


def test_shutting_down_refuses_changes():
    svc, snaps = service(stopping=True)
    fd = a_descriptor()
    assert handle(svc, control.Configure("fss0", "data", "/bs"), [fd]).errno == errno.ESHUTDOWN
    assert closed(fd) and snaps.configured == {}
    assert isinstance(handle(svc, control.ListVolumes()), control.Volumes)


def test_server_carries_requests_to_the_one_handler(tmp_path):
    """Over a real socket: the handler gets the request, the descriptors and who sent it."""
    os.chmod(tmp_path, 0o755)
    seen = []

    async def handler(req, fds, peer):
        seen.append((req, len(fds), peer))
        for fd in fds:
            os.close(fd)
        return control.Unconfigured("fss3")

    async def main():
        srv = ControlServer(names.control_socket(str(tmp_path)), "", handler)
        await srv.start()
        try:
            client = ControlClient(str(tmp_path), timeout=10)
            fd = a_descriptor()
            try:
                r1 = await asyncio.to_thread(client.request, control.Configure("fss3", "data", "/bs"), [fd])
            finally:
                os.close(fd)
            r2 = await asyncio.to_thread(client.request, control.ListSnapshots())
            # Garbage is answered with an error, and never reaches the handler.
            r3 = await asyncio.to_thread(raw, names.control_socket(str(tmp_path)), b"\x00\x00\x00\x03abc")
            return r1, r2, r3
        finally:
            await srv.stop()

    r1, r2, r3 = asyncio.run(main())
    assert r1 == r2 == control.Unconfigured("fss3")
    assert [(type(q).__name__, n, p.uid, p.pid == os.getpid(), p.privileged) for q, n, p in seen] == [
        ("Configure", 1, 0, True, True),
        ("ListSnapshots", 0, 0, True, True),
    ]
    assert r3.errno == errno.EINVAL and "malformed request" in r3.message
    assert not os.path.exists(names.control_socket(str(tmp_path)))


def test_after_reply_runs_once_the_answer_is_sent(tmp_path):
    """The hook (the supervisor starts the next spare snapshot worker there) runs after each
    answer is on its way: the client's socket already holds it when the hook runs."""
    import socket

    from ipc.framing import FrameCodec

    os.chmod(tmp_path, 0o755)
    seen = []
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ran = asyncio.Event()

    async def handler(req, fds, peer):
        seen.append("handled")
        return control.Unconfigured("fss3")

    def after():
        try:
            waiting = len(client.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            waiting = 0
        seen.append(f"after, {waiting} bytes waiting")
        ran.set()

    async def main():
        path = names.control_socket(str(tmp_path))
        srv = ControlServer(path, "", handler, after_reply=after)
        await srv.start()
        try:
            await asyncio.get_running_loop().sock_connect(client, path)
            codec = FrameCodec(control.Reply)
            for _ in range(2):
                ran.clear()
                client.sendall(codec.encode(control.ListSnapshots()))
                await asyncio.wait_for(ran.wait(), 10)  # the answer is read only after the hook ran
                got = []
                while not got:
                    got = codec.feed(await asyncio.get_running_loop().sock_recv(client, 65536))
                assert got == [control.Unconfigured("fss3")]
        finally:
            client.close()
            await srv.stop()

    client.setblocking(False)
    asyncio.run(main())
    n = len(FrameCodec(control.Reply).encode(control.Unconfigured("fss3")))
    assert seen == ["handled", f"after, {n} bytes waiting"] * 2


def raw(path, data):
    import socket

    from ipc.channel import Channel

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    try:
        s.sendall(data)
        return Channel(s, control.Reply).recv(timeout=10)[0]
    finally:
        s.close()


@pytest.mark.parametrize("limit", [1])
def test_server_limits_come_from_its_caller(tmp_path, limit):
    """The connection cap is the caller's: with one allowed, a second is refused with EUSERS."""
    import socket

    from daemon.control_server import Limits

    os.chmod(tmp_path, 0o755)

    async def handler(req, fds, peer):
        return control.Unconfigured("x")

    async def main():
        path = names.control_socket(str(tmp_path))
        srv = ControlServer(path, "", handler, Limits(max_connections=limit, reserved=0))
        await srv.start()
        first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await asyncio.get_running_loop().sock_connect(first, path)
            for _ in range(100):  # until the server has admitted it (it counts it then)
                if srv.conns:
                    break
                await asyncio.sleep(0.01)
            r = await asyncio.to_thread(ControlClient(str(tmp_path), timeout=10).request, control.ListSnapshots())
            return r
        finally:
            first.close()
            await srv.stop()

    r = asyncio.run(main())
    assert r.errno == errno.EUSERS and "too many connections" in r.message
