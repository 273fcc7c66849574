"""The VSS broker as a process of its own, and the one mount a VSS test may freeze.

Shared by test_vss_integration.py and test_vss_security.py (conftest's `ext4` fixture
uses ext4_mount).
"""

import contextlib
import os
import socket
import subprocess
import sys
import time

import msgspec

from ipc.channel import Channel
from ipc.names import instance_prefix
from ipc.vss_client import Requestor
from ipc.workermsg import FromWorker, Ready, VssState
from workers import freeze
from workers.broker import BrokerSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)
PY = sys.executable


def run(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


@contextlib.contextmanager
def ext4_mount(tmp_path):
    """A 32 MiB ext4 loop-mounted at tmp_path/mnt, the only thing a VSS test may freeze;
    thawed (every nesting), unmounted and detached in all cases."""
    img, mnt = tmp_path / "vol.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    run("mkfs.ext4", "-q", "-F", str(img))
    run("mount", "-o", "loop", str(img), str(mnt))
    try:
        yield str(mnt)
    finally:
        for _ in range(4):  # nested freezes need one FITHAW each
            if freeze.thaw_all([str(mnt)]) or not freeze.thaw_one(str(mnt)):
                break
        for p in is_frozen.blocked:  # writers blocked on the freeze keep the mount busy
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        is_frozen.blocked.clear()
        for _ in range(50):
            if run("umount", str(mnt), check=False).returncode == 0 or not os.path.ismount(mnt):
                break
            time.sleep(0.1)  # retry interval while a killed writer lets go of the mount
        for line in run("losetup", "-j", str(img), check=False).stdout.splitlines():
            run("losetup", "-d", line.split(":")[0], check=False)


def is_frozen(mnt) -> bool:
    """A write blocks on a frozen file system; returns the writer for joining after THAW."""
    p = subprocess.Popen(["sh", "-c", f"echo x >> {mnt}/probe"])
    try:
        p.wait(timeout=0.3)
        return False
    except subprocess.TimeoutExpired:
        is_frozen.blocked.append(p)
        return True


is_frozen.blocked = []


class BrokerProc:
    def __init__(self, tmp_path, preexec_fn=None, wrap=(), **kw):
        self.rundir = str(tmp_path / "run")
        os.makedirs(self.rundir, exist_ok=True)
        self.prefix = instance_prefix(self.rundir)
        self.settings = BrokerSettings(prefix=self.prefix, rundir=self.rundir, **kw)
        self.mine, theirs = socket.socketpair()
        self.chan = Channel(self.mine, FromWorker)
        self.log = open(tmp_path / "broker.log", "ab")
        self.proc = subprocess.Popen(
            [*wrap, PY, "-m", "workers.broker", "--channel-fd", str(theirs.fileno()),
             msgspec.json.encode(self.settings).decode()],
            pass_fds=(theirs.fileno(),), cwd=ROOT, env=ENV, stderr=self.log, preexec_fn=preexec_fn)
        theirs.close()
        self.states = []
        msg = self.next_msg(Ready)
        assert msg.kind == "broker" and (msg.pid == self.proc.pid or wrap)
        self.pid = msg.pid

    def next_msg(self, kind, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.chan.recv(timeout=max(0.01, deadline - time.monotonic()))
            assert got is not None, "broker closed its channel"
            if isinstance(got[0], VssState):
                self.states.append(got[0])
            if isinstance(got[0], kind):
                return got[0]
        raise AssertionError(f"no {kind.__name__} from the broker")

    def req(self, op, **kw):
        return Requestor(self.rundir).request(op, **kw)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
