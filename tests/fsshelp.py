"""Test harness: a real fssd in a private run directory, and mounts that always go away.

Every test gets its own run directory (so its own instance prefix for shared
memory and queue names); everything started is stopped by pid and everything
mounted is unmounted, also when the test fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from daemon.waiting import wait_for  # noqa: F401  (the one shared wait, re-exported for the tests)
from ipc import names

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def sha256_file(path: str | Path, length: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = length
        while True:
            chunk = f.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
                if not remaining:
                    break
    return h.hexdigest()


def run(*argv, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    p = subprocess.run([str(a) for a in argv], timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


class Fssd:
    """One fssd process on a config written for the test."""

    def __init__(self, tmp: Path, volumes: list[dict], vss: dict | None = None, devices: int = 4, extra: str = ""):
        self.tmp = tmp
        self.rundir = tmp / "run"
        self.config = tmp / "fssd.toml"
        self.log = tmp / "fssd.log"
        self.volumes = volumes
        self.vss = vss if vss is not None else {"enabled": False}
        self.devices = devices
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        tmp.mkdir(parents=True, exist_ok=True)
        self.write_config()

    def write_config(self, volumes: list[dict] | None = None, vss: dict | None = None, raw: str | None = None) -> None:
        if raw is not None:
            self.config.write_text(raw)
            return
        vols = self.volumes if volumes is None else volumes
        v = self.vss if vss is None else vss
        # Each instance its own state directory (snapshots that outlive fssd are recorded there).
        lines = ["[daemon]", f'rundir = "{self.rundir}"', f'statedir = "{self.tmp / "state"}"', f"devices = {self.devices}", self.extra, ""]
        for vol in vols:
            lines.append("[[volume]]")
            for k, val in vol.items():
                lines.append(f"{k} = {_toml(val)}")
            lines.append("")
        lines.append("[vss]")
        for k, val in v.items():
            lines.append(f"{k} = {_toml(val)}")
        self.config.write_text("\n".join(lines) + "\n")

    @property
    def prefix(self) -> str:
        return names.instance_prefix(str(self.rundir))

    def uri(self, export: str) -> str:
        return names.nbd_uri(str(self.rundir), export)

    def sock(self, export: str) -> str:
        return names.export_socket(str(self.rundir), export)

    def start(self, env: dict | None = None, wait: bool = True) -> "Fssd":
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [str(BIN / "fssd"), "-c", str(self.config), "-d"],
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"fssd exited with {self.proc.returncode}:\n{self.log.read_text()}")
            return self.fssconfig("-l", check=False).returncode == 0

        wait_for(ready, timeout, "fssd to answer fssconfig -l")

    def fssconfig(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        return run(BIN / "fssconfig", "-r", self.rundir, *args, check=check)

    def status(self) -> dict:
        import json

        return json.loads(run(BIN / "fssd", "-r", self.rundir, "--status").stdout)

    def worker_pid(self, kind: str, key: str) -> int:
        for w in self.status()["workers"]:
            if w["kind"] == kind and (key in w["name"]) and w["alive"]:
                return w["pid"]
        raise AssertionError(f"no live {kind} worker {key}")

    def alive_pid(self, kind: str, key: str) -> int | None:
        """The live worker's pid, or None while it is down (for polling a restart)."""
        try:
            return self.worker_pid(kind, key)
        except AssertionError:
            return None

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def kill_everything(self) -> None:
        """Last-resort cleanup: the supervisor and every worker, by pid; then our IPC names."""
        pids = []
        if self.proc is not None and self.proc.poll() is None:
            pids.append(self.proc.pid)
            with contextlib.suppress(Exception):
                pids += [w["pid"] for w in self.status()["workers"] if w["alive"]]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.proc.wait(5)
            self._logf.close()
            self.proc = None
        for d in ("/dev/shm", "/dev/mqueue"):
            with contextlib.suppress(OSError):
                for e in os.listdir(d):
                    if names.owned_by(self.prefix, e):
                        with contextlib.suppress(OSError):
                            os.unlink(os.path.join(d, e))


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- nbdfuse + loop mounts -------------------------------------------------------------


class Mounts:
    """Tracks everything a test mounts or attaches, and undoes it in reverse order."""

    def __init__(self):
        self._undo: list[tuple[str, object]] = []

    def nbdfuse(self, uri: str, mountdir: Path, readonly: bool = False) -> Path:
        """nbdfuse the export at `mountdir`; returns the file that is the export (mountdir/nbd)."""
        mountdir.mkdir(parents=True, exist_ok=True)
        argv = ["nbdfuse"] + (["-r"] if readonly else []) + [str(mountdir), uri]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._undo.append(("fuse", (mountdir, proc)))
        target = mountdir / "nbd"

        def mounted():
            if proc.poll() is not None:
                raise AssertionError(f"nbdfuse exited {proc.returncode}: {proc.stderr.read().decode()}")
            return os.path.ismount(mountdir) and target.exists()

        wait_for(mounted, 20, f"nbdfuse at {mountdir}")
        return target

    def loop_mount(self, image: Path, mountdir: Path, readonly: bool = False, fstype: str = "ext4") -> Path:
        mountdir.mkdir(parents=True, exist_ok=True)
        loop = run("losetup", "-f", "--show", *(["-r"] if readonly else []), image).stdout.strip()
        self._undo.append(("loop", loop))
        opts = "ro,noload" if readonly else "rw"
        run("mount", "-t", fstype, "-o", opts, loop, mountdir)
        self._undo.append(("mount", mountdir))
        return mountdir

    def umount(self, mountdir: Path) -> None:
        """Unmount one loop mount now (and detach its loop device)."""
        for i in range(len(self._undo) - 1, -1, -1):
            kind, obj = self._undo[i]
            if kind == "mount" and obj == mountdir:
                run("umount", mountdir)
                del self._undo[i]
                if i > 0 and self._undo[i - 1][0] == "loop":
                    run("losetup", "-d", self._undo[i - 1][1], check=False)
                    del self._undo[i - 1]
                return
        raise AssertionError(f"{mountdir} is not mounted by this test")

    def cleanup(self) -> None:
        while self._undo:
            kind, obj = self._undo.pop()
            with contextlib.suppress(Exception):
                if kind == "mount":
                    # A frozen file system must be thawed before it can go (fsfreeze -u on a thawed one fails: fine).
                    subprocess.run(["fsfreeze", "-u", str(obj)], capture_output=True, timeout=10)
                    if subprocess.run(["umount", str(obj)], capture_output=True, timeout=60).returncode != 0:
                        subprocess.run(["umount", "-l", str(obj)], capture_output=True, timeout=60)
                elif kind == "loop":
                    subprocess.run(["losetup", "-d", str(obj)], capture_output=True, timeout=30)
                elif kind == "fuse":
                    mountdir, proc = obj
                    if subprocess.run(["fusermount3", "-u", str(mountdir)], capture_output=True, timeout=60).returncode != 0:
                        subprocess.run(["umount", "-l", str(mountdir)], capture_output=True, timeout=60)
                    try:
                        proc.wait(20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()


@contextlib.contextmanager
def running(f: "Fssd", scratch: Path | None = None):
    """A module's own fssd: started here; stopped, then killed by pid, and its scratch
    directory removed when the block ends, also when a test or the setup fails."""
    try:
        f.start()
        yield f
    finally:
        try:
            f.stop()
        finally:
            f.kill_everything()
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
