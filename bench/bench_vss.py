"""VSS benchmark: freeze window with 0, 1, 8 applications, and queue round-trip latency.

    python bench/bench_vss.py [--rounds N] [--mount MOUNTPOINT]

Freeze window = FREEZE sent to THAW answered, as `fssconfig -C` sees it
(the snapshot itself is not taken here). Applications are appvss processes
with -w 0 (they answer at once). The round trip is one Request/Answer over two
POSIX queues between two processes, msgspec-encoded, as the broker and an
application exchange them. --mount adds a real FIFREEZE/FITHAW of that mount
(only one you made yourself; never /).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import msgspec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ipc import mqueue, vssproto  # noqa: E402
from ipc.channel import Channel  # noqa: E402
from ipc.names import instance_prefix  # noqa: E402
from ipc.vss_client import Requestor  # noqa: E402
from ipc.workermsg import FromWorker, Ready  # noqa: E402
from workers.broker import BrokerSettings  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=ROOT)


def start_broker(rundir: str, mounts: list[str]):
    prefix = instance_prefix(rundir)
    s = BrokerSettings(prefix=prefix, rundir=rundir, timeout=5.0, freeze_max=10.0, freeze_mounts=mounts, debug=bool(os.environ.get("VSS_DEBUG")))
    mine, theirs = socket.socketpair()
    p = subprocess.Popen([sys.executable, "-m", "workers.broker", "--channel-fd", str(theirs.fileno()),
                          msgspec.json.encode(s).decode()], pass_fds=(theirs.fileno(),), cwd=ROOT, env=ENV,
                         stderr=None if os.environ.get("VSS_DEBUG") else subprocess.DEVNULL)
    theirs.close()
    chan = Channel(mine, FromWorker)
    while not isinstance(chan.recv(timeout=10)[0], Ready):
        pass
    # Play the supervisor: keep reading the broker's state reports.
    threading.Thread(target=lambda: [None for _ in iter(lambda: chan.recv(), None)], daemon=True).start()
    return p, chan, prefix


def start_apps(rundir: str, n: int) -> list[subprocess.Popen]:
    procs = []
    for i in range(n):
        p = subprocess.Popen([sys.executable, "-m", "daemon.cli.appvss", "-n", "-w", "0", "--name", f"bench{i}",
                              "-r", rundir], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert p.stdout.readline().startswith("appvss: registered")
        procs.append(p)
    return procs


def freeze_window(rundir: str, rounds: int) -> list[float]:
    req = Requestor(rundir)
    out = []
    for _ in range(rounds):
        assert req.request("check").ok
        t0 = time.perf_counter()
        r = req.request("freeze")
        assert r.ok, r.reason
        # <- fssconfig -C takes the snapshot here
        assert req.request("thaw").ok
        out.append((time.perf_counter() - t0) * 1000)
    return out


def queue_rtt(n: int = 5000) -> list[float]:
    """Request -> echo process -> Answer, over two queues, msgspec both ways (microseconds)."""
    tag = f"/fssd.bench{os.getpid()}"
    a = mqueue.create(tag + ".a", 0o600, 10, vssproto.MAX_MESSAGE)
    b = mqueue.create(tag + ".b", 0o600, 10, vssproto.MAX_MESSAGE)
    pid = os.fork()
    if pid == 0:
        try:
            for _ in range(n + 200):
                req = vssproto.decode_request(mqueue.receive(a, None))
                mqueue.send(b, vssproto.encode(vssproto.Answer(req.msgid, True)), None)
        finally:
            os._exit(0)
    out = []
    try:
        for i in range(n + 200):
            t = time.perf_counter_ns()
            mqueue.send(a, vssproto.encode(vssproto.Request(i, "freeze")), None)
            ans = vssproto.decode_answer(mqueue.receive(b, None))
            assert ans.msgid == i
            if i >= 200:
                out.append((time.perf_counter_ns() - t) / 1000)
    finally:
        os.waitpid(pid, 0)
        mqueue.close(a, True)
        mqueue.close(b, True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--mount", action="append", default=[])
    args = ap.parse_args()
    rundir = tempfile.mkdtemp(prefix="fssd-bench-")
    broker, chan, prefix = start_broker(rundir, args.mount)
    apps: list[subprocess.Popen] = []
    try:
        print(f"freeze window (FREEZE sent -> THAW answered), {args.rounds} rounds, mounts: {args.mount or 'none'}")
        for n in (0, 1, 8):
            apps += start_apps(rundir, n - len(apps))
            w = freeze_window(rundir, args.rounds)
            print(f"  {n} apps: median {statistics.median(w):7.2f} ms  max {max(w):7.2f} ms")
        r = queue_rtt()
        r.sort()
        print(f"queue round trip (Request -> Answer, 2 processes, msgspec), {len(r)} samples: "
              f"median {statistics.median(r):.1f} us  p99 {r[int(len(r) * 0.99)]:.1f} us  min {r[0]:.1f} us")
        t = []
        req = Requestor(rundir)
        for _ in range(200):
            t0 = time.perf_counter()
            req.request("status")
            t.append((time.perf_counter() - t0) * 1e6)
        print(f"vssadm-style status request (a socket connection per call): median {statistics.median(t):.0f} us")
    finally:
        for p in apps:
            p.terminate()
        for p in apps:
            p.wait()
        broker.terminate()
        broker.wait()
        chan.sock.close()
        os.rmdir(rundir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
