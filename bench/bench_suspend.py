"""Suspend window of a plain `fssconfig` on a real mount: median and worst over N snapshots.

    python bench/bench_suspend.py [--rounds 20] [--fstype ext4|xfs]

A fresh fssd with one volume in /dev/shm (ext4 256 MiB, XFS 320 MiB), its file
system made and mounted through nbdfuse + loop at the volume's `mountpoint`,
then N rounds of `fssconfig fss0 data STORE` + `fssconfig -u fss0`, first with
the file system idle, then under a writer appending 64-byte records to 20 files
(buffered, as an application does; the suspend's syncfs and FIFREEZE write
them out). The window is what fssconfig prints: first FIFREEZE to last FITHAW,
as measured by the suspend process. Everything it makes is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from fsshelp import Fssd, Mounts, run  # noqa: E402


def writer(root: Path, stop: threading.Event) -> None:
    files = [open(root / f"w{i}.rec", "ab", buffering=1000) for i in range(20)]
    rec = bytes(range(64))
    while not stop.is_set():
        for f in files:
            for _ in range(8):
                f.write(rec)
            if f.tell() > 4 << 20:  # stay within the volume: start the file over
                f.flush()
                f.truncate(0)
                f.seek(0)
        time.sleep(0)  # let fssconfig's threads run on a 2-CPU box
    for f in files:
        f.close()


def rounds(f: Fssd, store: Path, n: int) -> tuple[list[float], list[float]]:
    windows, totals = [], []
    for _ in range(n):
        t0 = time.monotonic()
        out = f.fssconfig("fss0", "data", store).stdout
        totals.append((time.monotonic() - t0) * 1000)
        m = re.search(r"suspended .* for ([\d.]+) ms", out)
        if not m:
            raise SystemExit(f"no suspend window in: {out!r}")
        windows.append(float(m.group(1)))
        f.fssconfig("-u", "fss0")
    return windows, totals


def floor(mnt: Path, n: int, pause: float = 0.0) -> list[float]:
    """FIFREEZE + FITHAW of the same mount straight from here: what the kernel and the I/O stack cost."""
    from workers import freeze

    out = []
    fd = freeze.open_mount(str(mnt))
    try:
        for _ in range(n):
            time.sleep(pause)
            t0 = time.monotonic()
            freeze.freeze_fd(fd, str(mnt))
            freeze.thaw_fd(fd, str(mnt))
            out.append((time.monotonic() - t0) * 1000)
    finally:
        os.close(fd)
    return out


def commit_cost(mnt: Path, n: int) -> list[float]:
    """A 4 KiB write + fsync: one journal commit with its cache flushes through loop, FUSE, nbdfuse, NBD."""
    out = []
    fd = os.open(mnt / "commit.probe", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for i in range(n):
            time.sleep(0.1)
            os.pwrite(fd, b"c" * 4096, i * 4096)
            t0 = time.monotonic()
            os.fsync(fd)
            out.append((time.monotonic() - t0) * 1000)
    finally:
        os.close(fd)
        os.unlink(mnt / "commit.probe")
    return out


def show(what: str, windows: list[float], totals: list[float]) -> None:
    print(f"{what:<28} suspend window median {statistics.median(windows):6.1f} ms, worst {max(windows):6.1f} ms; "
          f"fssconfig end to end median {statistics.median(totals):5.0f} ms  ({len(windows)} snapshots)")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--fstype", choices=("ext4", "xfs"), default="ext4")
    ap.add_argument("--breakdown", action="store_true", help="print fssd's per-phase debug line for each window")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fssd-bench-suspend-"))
    shm = Path(tempfile.mkdtemp(prefix="fssd-bench-suspend-", dir="/dev/shm"))
    mnt = tmp / "mnt"
    mnt.mkdir()
    size = "256M" if a.fstype == "ext4" else "320M"
    f = Fssd(tmp / "i", [{"name": "data", "path": str(shm / "data.img"), "size": size, "mountpoint": str(mnt)}])
    mounts = Mounts()
    try:
        f.start()
        dev = mounts.nbdfuse(f.uri("data"), tmp / "fuse")
        if a.fstype == "ext4":
            run("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", dev)  # idle means idle: no ext4lazyinit
        else:
            run("mkfs.xfs", "-q", "-f", "-K", dev)
        mounts.loop_mount(dev, mnt, fstype=a.fstype)
        print(f"{a.fstype} {size} through nbdfuse + loop, store in /dev/shm, {os.cpu_count()} CPUs")
        cc = commit_cost(mnt, a.rounds)
        print(f"{'4 KiB write + fsync':<28} median {statistics.median(cc):6.1f} ms, worst {max(cc):6.1f} ms (a journal commit and its flushes)")
        for pause in (0.0, 0.5):
            fl = floor(mnt, a.rounds, pause)
            print(f"{'bare FIFREEZE + FITHAW':<28} median {statistics.median(fl):6.1f} ms, worst {max(fl):6.1f} ms "
                  f"(no fssconfig, {pause:g} s apart)")
        show("idle file system", *rounds(f, shm / "bs", a.rounds))
        stop = threading.Event()
        t = threading.Thread(target=writer, args=(mnt, stop), daemon=True)
        t.start()
        try:
            show("under a record writer", *rounds(f, shm / "bs", a.rounds))
        finally:
            stop.set()
            t.join(60)
    finally:
        mounts.cleanup()
        f.stop()
        if a.breakdown and f.log.exists():
            for line in f.log.read_text().splitlines():
                if "suspend window" in line:
                    print(line.split("supervisor: DEBUG: ")[-1])
        f.kill_everything()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
