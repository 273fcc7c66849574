"""Shared bench helpers: start fssd, nbdkit and qemu-storage-daemon; run nbdcopy and fio.

Everything started here is recorded (pid, and the /dev/shm names it owns) in
the registry file named by $FSSD_BENCH_REGISTRY, so bench/run.sh's trap can
clean up by pid even when a bench script dies hard. Every process is stopped by
its own pid (never by name: other fssd instances run on this machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.waiting import wait_for  # noqa: E402
from ipc import names  # noqa: E402

BIN = Path(sys.executable).parent
GiB = 1 << 30
MiB = 1 << 20


# -- bookkeeping -----------------------------------------------------------------------


def _register(line: str) -> None:
    reg = os.environ.get("FSSD_BENCH_REGISTRY")
    if reg:
        with open(reg, "a") as f:
            f.write(line + "\n")


class Scratch:
    """A private directory in /dev/shm (images, backing stores) and one in /tmp (sockets, logs)."""

    def __init__(self, tag: str):
        self.shm = Path(tempfile.mkdtemp(prefix=f"fssd-bench-{tag}-", dir="/dev/shm"))
        self.tmp = Path(tempfile.mkdtemp(prefix=f"fssd-bench-{tag}-", dir="/tmp"))
        _register(f"dir {self.shm}")
        _register(f"dir {self.tmp}")

    def cleanup(self) -> None:
        shutil.rmtree(self.shm, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP become SystemExit, so every `finally` runs (SIGINT already raises)."""

    def bye(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, bye)
    signal.signal(signal.SIGHUP, bye)


def _stop_pid(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def children(pid: int) -> list[int]:
    """Direct children of pid (by parent pid, from /proc; never by name)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(d))
    return out


def run(*argv, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    p = subprocess.run([str(a) for a in argv], timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def make_random_image(path: Path, size: int, seed_bytes: int = 16 * MiB) -> None:
    """A fully allocated image of incompressible bytes (so nbdcopy's block status finds no
    hole to skip): 16 MiB of urandom repeated, which is seconds faster than 1 GiB of it."""
    block = os.urandom(seed_bytes)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(len(block), left)
            f.write(block[:n])
            left -= n


# -- servers -----------------------------------------------------------------------------


class Fssd:
    """fssd on a generated config; volumes = [(name, path, size_or_None)]."""

    def __init__(self, scratch: Scratch, volumes: list[tuple[str, str, str | None]], devices: int = 4, tag: str = "fssd",
                 env: dict | None = None, daemon_extra: str = ""):
        self.env = {**os.environ, **(env or {})}  # e.g. PYTHONPATH of a patched tree, for A/B experiments
        self.dir = scratch.tmp / tag
        self.dir.mkdir()
        self.rundir = self.dir / "run"
        self.config = self.dir / "fssd.toml"
        self.log = self.dir / "fssd.log"
        lines = ["[daemon]", f'rundir = "{self.rundir}"', f'statedir = "{self.dir / "state"}"', f"devices = {devices}", daemon_extra, ""]
        for name, path, size in volumes:
            lines += ["[[volume]]", f'name = "{name}"', f'path = "{path}"']
            if size:
                lines.append(f'size = "{size}"')
            lines.append("")
        lines += ["[vss]", "enabled = false", ""]
        self.config.write_text("\n".join(lines))
        self.proc: subprocess.Popen | None = None
        self.prefix = names.instance_prefix(str(self.rundir))

    def start(self) -> "Fssd":
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen([str(BIN / "fssd"), "-c", str(self.config), "-d"], stdout=self._logf,
                                     stderr=subprocess.STDOUT, env=self.env)
        _register(f"pid {self.proc.pid} fssd")
        _register(f"shm /dev/shm/{self.prefix}.")

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"fssd exited {self.proc.returncode}:\n{self.log.read_text()}")
            return self.fssconfig("-l", check=False).returncode == 0

        wait_for(ready, 30, "fssd to answer")
        return self

    def uri(self, export: str) -> str:
        return names.nbd_uri(str(self.rundir), export)

    def fssconfig(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        return run(BIN / "fssconfig", "-r", self.rundir, *args, check=check)

    def status(self) -> dict:
        return json.loads(run(BIN / "fssd", "-r", self.rundir, "--status").stdout)

    def worker_pid(self, key: str) -> int:
        for w in self.status()["workers"]:
            if key in w["name"] and w["alive"]:
                return w["pid"]
        raise RuntimeError(f"no live worker {key}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is None:
            return
        kids = children(self.proc.pid)
        _stop_pid(self.proc, signal.SIGTERM, 30)
        for pid in kids:  # a worker a clean stop left behind (should not happen)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._logf.close()
        self.proc = None
        for e in os.listdir("/dev/shm"):
            if names.owned_by(self.prefix, e):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join("/dev/shm", e))


class Nbdkit:
    def __init__(self, scratch: Scratch, image: Path, tag: str = "nbdkit"):
        self.sock = scratch.tmp / f"{tag}.sock"
        self.proc = subprocess.Popen(["nbdkit", "-f", "-U", str(self.sock), "file", str(image)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _register(f"pid {self.proc.pid} nbdkit")
        wait_for(lambda: self.sock.exists() or self.proc.poll() is not None, 10, "nbdkit socket")
        if self.proc.poll() is not None:
            raise RuntimeError("nbdkit failed to start")
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> None:
        _stop_pid(self.proc)


class Qmp:
    """Minimal QMP client (the reference's helper, as a class)."""

    def __init__(self, path: Path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(str(path))
        self.f = self.s.makefile("rw")
        self._recv()
        self.cmd("qmp_capabilities")

    def _recv(self) -> dict:
        while True:
            m = json.loads(self.f.readline())
            if "event" not in m:
                return m

    def cmd(self, execute: str, **arguments) -> dict:
        msg = {"execute": execute}
        if arguments:
            msg["arguments"] = arguments
        self.f.write(json.dumps(msg) + "\n")
        self.f.flush()
        r = self._recv()
        if "error" in r:
            raise RuntimeError(f"QMP {execute}: {r['error']}")
        return r.get("return")

    def close(self) -> None:
        self.f.close()
        self.s.close()


class Qsd:
    """qemu-storage-daemon with a live export and recipe-A snapshots (copy-before-write + snapshot-access)."""

    def __init__(self, scratch: Scratch, image: Path, size: int):
        self.scratch = scratch
        self.size = size
        self.nbd_sock = scratch.tmp / "qsd-nbd.sock"
        self.qmp_sock = scratch.tmp / "qsd-qmp.sock"
        self.proc = subprocess.Popen(
            [
                "qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=base-file,filename={image}",
                "--blockdev", "driver=raw,node-name=base,file=base-file",
                "--nbd-server", f"addr.type=unix,addr.path={self.nbd_sock}",
                "--export", "type=nbd,id=live,node-name=base,name=live,writable=on",
                "--chardev", f"socket,id=qmp0,path={self.qmp_sock},server=on,wait=off",
                "--monitor", "chardev=qmp0",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _register(f"pid {self.proc.pid} qemu-storage-daemon")
        wait_for(lambda: (self.nbd_sock.exists() and self.qmp_sock.exists()) or self.proc.poll() is not None, 10, "qsd sockets")
        if self.proc.poll() is not None:
            raise RuntimeError("qemu-storage-daemon failed to start")
        self.qmp = Qmp(self.qmp_sock)
        self.snaps: list[int] = []
        self.live_uri = f"nbd+unix:///live?socket={self.nbd_sock}"

    def snap_uri(self, n: int) -> str:
        return f"nbd+unix:///snap{n}?socket={self.nbd_sock}"

    def take(self) -> int:
        n = len(self.snaps) + 1
        below = f"cbw{n - 1}" if n > 1 else "base-file"
        tgt = self.scratch.shm / f"qsd-tgt{n}.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", tgt, str(self.size))
        q = self.qmp
        q.cmd("blockdev-add", driver="qcow2", **{"node-name": f"tgt{n}"}, file={"driver": "file", "filename": str(tgt)})
        q.cmd("blockdev-add", driver="copy-before-write", **{"node-name": f"cbw{n}"}, file=below, target=f"tgt{n}")
        q.cmd("blockdev-reopen", options=[{"driver": "raw", "node-name": "base", "file": f"cbw{n}"}])
        q.cmd("blockdev-add", driver="snapshot-access", **{"node-name": f"acc{n}"}, file=f"cbw{n}")
        q.cmd("block-export-add", type="nbd", id=f"snap{n}", **{"node-name": f"acc{n}"}, name=f"snap{n}", writable=False)
        self.snaps.append(n)
        return n

    def drop(self) -> None:
        """Drop the newest snapshot (qemu 7.2's are a stack)."""
        n = self.snaps.pop()
        below = f"cbw{n - 1}" if n > 1 else "base-file"
        q = self.qmp
        q.cmd("block-export-del", id=f"snap{n}")
        # The export goes away asynchronously; blockdev-del of its node fails until it has.
        for _ in range(200):
            try:
                q.cmd("blockdev-del", **{"node-name": f"acc{n}"})
                break
            except RuntimeError:
                time.sleep(0.02)
        q.cmd("blockdev-reopen", options=[{"driver": "raw", "node-name": "base", "file": below}])
        q.cmd("blockdev-del", **{"node-name": f"cbw{n}"})
        q.cmd("blockdev-del", **{"node-name": f"tgt{n}"})
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.scratch.shm / f"qsd-tgt{n}.qcow2")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.qmp.close()
        _stop_pid(self.proc)


# -- clients -----------------------------------------------------------------------------


def nbdcopy(src: str, dst: str, size: int, conns: int = 4) -> float:
    """MiB/s of one nbdcopy (wall time of the whole command, handshake included)."""
    t0 = time.perf_counter()
    run("nbdcopy", "-C", conns, "-T", conns, src, dst)
    return size / MiB / (time.perf_counter() - t0)


def fio_nbd(uri: str, rw: str, *, iodepth: int = 32, size: str = "1G", runtime: float | None = 5,
            ramp: float | None = 1, extra: list[str] = ()) -> float:
    """IOPS of one fio run through its nbd engine (JSON after the 'connected' line)."""
    argv = ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
            f"--iodepth={iodepth}", f"--size={size}", "--output-format=json"]
    if runtime:
        argv += ["--time_based", f"--runtime={runtime}"]
    if ramp:
        argv += [f"--ramp_time={ramp}"]
    argv += list(extra)
    p = run(*argv)
    out = p.stdout
    js = json.loads(out[out.index("{"):])
    job = js["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio error {job['error']}: {p.stderr}")
    side = job["write"] if "write" in rw else job["read"]
    return side["iops"]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt_runs(xs: list[float]) -> str:
    return " ".join(f"{x:.0f}" for x in xs)


def emit(result_file: str | None, rows: list[dict]) -> None:
    """Append result rows (JSON lines) for run.sh's summary table."""
    if result_file:
        with open(result_file, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


# The barrier as the supervisor reports it: with several processes serving the volume (the
# default: one per CPU) the longest any of them held its writes; with one, its own figure.
CREATED_RE = re.compile(r"(fss\d+): snapshot of \S+ created \(barrier (\d+) us")


# -- summary table -------------------------------------------------------------------------


def summary(result_file: str) -> int:
    """Print every row the bench scripts appended; exit 1 if any target was missed."""
    rows = [json.loads(l) for l in open(result_file) if l.strip()]
    head = ("figure", "fssd", "peer", "peer figure", "ratio", "target", "")
    table = [head]
    missed = 0
    for r in rows:
        ok = r.get("pass")
        if ok is False:
            missed += 1
        table.append((
            r["figure"],
            _num(r["value"], r.get("unit", "")),
            r.get("peer_name", ""),
            _num(r.get("peer"), r.get("unit", "")),
            f"{r['ratio']:.2f}x" if r.get("ratio") is not None else "",
            r.get("target", ""),
            "" if ok is None else ("PASS" if ok else "MISS"),
        ))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    for i, row in enumerate(table):
        print("  ".join(str(c).ljust(w) if j == 0 or j == 2 or j == 6 else str(c).rjust(w)
                        for j, (c, w) in enumerate(zip(row, widths))).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\n{len(rows)} figures, {sum(1 for r in rows if r.get('pass') is True)} PASS, {missed} MISS")
    return 1 if missed else 0


def _num(v, unit: str) -> str:
    if v is None:
        return ""
    if unit in ("us", "ms") or v < 10:  # small figures (CPU seconds per GiB) keep their decimals
        return f"{v:.0f} {unit}" if v >= 100 else f"{v:.2f} {unit}"
    return f"{v:.0f} {unit}"


def row(figure: str, value: float, unit: str, runs: list[float], peer_name: str = "", peer: float | None = None,
        peer_runs: list[float] | None = None, ratio: float | None = None, target: str = "", ok: bool | None = None) -> dict:
    return {"figure": figure, "value": value, "unit": unit, "runs": runs, "peer_name": peer_name, "peer": peer,
            "peer_runs": peer_runs, "ratio": ratio, "target": target, "pass": ok}


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "summary":
    sys.exit(summary(sys.argv[2]))
