"""fss(4) semantics: a plain `fssconfig` of a mounted volume suspends its file system around
the barrier (FIFREEZE, barrier, FITHAW), so the snapshot mounts read-only without recovery.

Real ext4 (and XFS) through nbdfuse + loop mounts, under a writer that appends numbered
records; the suspend process and the supervisor are SIGKILLed inside the window.
"""

import hashlib
import os
import platform
import re
import signal
import subprocess
import threading
import time

import pytest
from fsshelp import BIN, run, wait_for

from daemon.suspend import TEST_HOLD_ENV

RECORD = 64
FILES = 20


def record(name: str, seq: int) -> bytes:
    """Record `seq` of file `name`: its number, then bytes derived from both (so any prefix can be checked)."""
    head = seq.to_bytes(8, "little")
    return head + hashlib.sha256(f"{name}:{seq}".encode()).digest() + hashlib.sha256(f"{seq}:{name}".encode()).digest()[:24]


def expected(name: str, length: int) -> bytes:
    out = bytearray()
    seq = 0
    while len(out) < length:
        out += record(name, seq)
        seq += 1
    return bytes(out[:length])


class Writer:
    """Appends numbered records to FILES files round-robin through 1000-byte buffers (not a multiple
    of the record), so a file can end mid-record between flushes: the bytes are always a prefix."""

    def __init__(self, root):
        self.root = root
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the writer is stuck (a file system left frozen?)"
        if self.error:
            raise self.error

    def _run(self):
        try:
            files = [open(self.root / f"f{i}.rec", "ab", buffering=1000) for i in range(FILES)]
            seq = 0
            while not self.stop.is_set():
                for i, f in enumerate(files):
                    for s in range(seq, seq + 8):
                        f.write(record(f"f{i}.rec", s))
                seq += 8
            for f in files:
                f.close()
        except BaseException as e:  # noqa: BLE001 - reported by __exit__
            self.error = e

    def sizes(self) -> int:
        return sum((self.root / f"f{i}.rec").stat().st_size for i in range(FILES) if (self.root / f"f{i}.rec").exists())


def frozen(mnt) -> bool:
    """FIFREEZE on a frozen file system is EBUSY; on a thawed one it freezes (so undo at once)."""
    r = subprocess.run(["fsfreeze", "-f", str(mnt)], capture_output=True, text=True, timeout=10)
    if r.returncode == 0:
        subprocess.run(["fsfreeze", "-u", str(mnt)], check=True, timeout=10)
        return False
    assert "busy" in r.stderr.lower(), r.stderr
    return True


FSTYPES = ["ext4", "xfs"]  # xfsprogs is in the Makefile's APT_PACKAGES


def mkfs(fstype: str, dev) -> None:
    if fstype == "ext4":
        run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev)
    else:
        run("mkfs.xfs", "-q", "-f", "-K", dev)


def needs_recovery(fstype: str, dev) -> bool:
    """The snapshot's own word on whether its journal / log must be replayed before use."""
    if fstype == "ext4":
        features = run("dumpe2fs", "-h", dev).stdout
        return "needs_recovery" in re.search(r"Filesystem features:(.*)", features).group(1)
    # xfs_logprint -t summarises the log; a clean, unmounted log has its tail on its head.
    return xfs_log_items(dev) - {"SUPER Block Buffer"} != set()


def xfs_log_items(dev) -> set[str]:
    """The kinds of item in the XFS log. A frozen XFS leaves only the records that cover the log
    (superblock buffers): nothing to replay. A busy, unfrozen one leaves inodes, AG headers ..."""
    out = run("xfs_logprint", "-t", dev).stdout
    items = set()
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^(INODE|EFI|EFD|DQUOT|ICR|RUI|RUD|CUI|CUD|BUI|BUD|ATTRI|ATTRD|XMI|XMD):", line):
            items.add(line.split(":")[0])
        elif line.startswith("BUF:"):
            kind = next((ln.strip().rstrip(":") for ln in lines[i + 1 : i + 4] if ln.strip().endswith(":") and "BUF" not in ln), "BUF")
            items.add(kind)
    return items


def fs_check(fstype: str, dev, mounts, where) -> subprocess.CompletedProcess:
    """e2fsck -fn; for XFS (a copy), xfs_repair -n once the log's covering records are applied:
    they carry the lazy superblock counters, which xfs_repair -n would otherwise report."""
    if fstype == "ext4":
        return run("e2fsck", "-fn", dev, check=False)
    where.mkdir(parents=True, exist_ok=True)
    loop = run("losetup", "-f", "--show", dev).stdout.strip()
    mounts._undo.append(("loop", loop))
    run("mount", "-t", "xfs", "-o", "nouuid", loop, where)  # the live file system has the same UUID
    mounts._undo.append(("mount", where))
    mounts.umount(where)
    return run("xfs_repair", "-n", dev, check=False)


def setup(fssd_factory, shmdir, mounts, tmp_path, fstype="ext4", mountpoint=True, vss=None, env=None):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    vol = {"name": "data", "path": str(shmdir / "data.img"), "size": "256M" if fstype == "ext4" else "320M"}  # XFS: > 300 MB
    if mountpoint:
        vol["mountpoint"] = str(mnt)
    f = fssd_factory([vol], vss=vss, env=env)
    dev = mounts.nbdfuse(f.uri("data"), tmp_path / "fuse")
    mkfs(fstype, dev)
    mounts.loop_mount(dev, mnt, fstype=fstype)
    return f, mnt


def snapshot_device(f, mounts, tmp_path, fstype="ext4", device="fss0"):
    """ext4: the snapshot through nbdfuse -r. XFS tools open read-write, so they get a copy (nbdcopy)."""
    if fstype == "ext4":
        return mounts.nbdfuse(f.uri(device), tmp_path / f"fuse-{device}", readonly=True)
    copy = f.tmp / f"{device}.img"
    run("nbdcopy", f.uri(device), copy)
    return copy


def mount_snapshot_plain_ro(mounts, snapdev, where, fstype):
    """`mount -o ro` as a user would (no noload / norecovery): fails on an image that needs recovery."""
    where.mkdir(parents=True, exist_ok=True)
    loop = run("losetup", "-f", "--show", "-r", snapdev).stdout.strip()
    mounts._undo.append(("loop", loop))
    # XFS keeps its log covering records after a freeze (nothing to replay: xfs_log_items), and
    # refuses a read-only device with a dirty log, so its snapshots mount with norecovery as LVM's do.
    opts = "ro" if fstype == "ext4" else "ro,norecovery,nouuid"
    r = run("mount", "-t", fstype, "-o", opts, loop, where, check=False)
    if r.returncode == 0:
        mounts._undo.append(("mount", where))
    return r


def check_prefixes(root, live_root) -> int:
    """Every file is exactly a prefix of its record stream, no longer than the live file; returns bytes."""
    total = 0
    for i in range(FILES):
        name = f"f{i}.rec"
        data = (root / name).read_bytes()
        assert data == expected(name, len(data)), f"{name}: not a clean prefix of its records"
        assert len(data) <= (live_root / name).stat().st_size
        total += len(data)
    return total


@pytest.mark.parametrize("fstype", FSTYPES)
def test_plain_fssconfig_suspends_the_busy_file_system(fstype, fssd_factory, shmdir, mounts, tmp_path):
    f, mnt = setup(fssd_factory, shmdir, mounts, tmp_path, fstype)
    with Writer(mnt) as w:
        wait_for(lambda: w.sizes() > 2 << 20, 60, "the writer to write 2 MiB")
        out = f.fssconfig("fss0", "data", shmdir / "bs0").stdout
        at_snapshot = w.sizes()
        wait_for(lambda: w.sizes() > at_snapshot + (1 << 20), 60, "writes to go on after the thaw")
    m = re.search(rf"fss0: file-system-consistent snapshot, suspended {re.escape(str(mnt))} for ([\d.]+) ms, barrier \d+ us", out)
    assert m, out
    assert float(m.group(1)) < 10_000  # inside freeze_max
    assert not frozen(mnt)
    snapdev = snapshot_device(f, mounts, tmp_path, fstype)
    assert not needs_recovery(fstype, snapdev)
    r = mount_snapshot_plain_ro(mounts, snapdev, tmp_path / "snap", fstype)
    assert r.returncode == 0, r.stderr
    assert check_prefixes(tmp_path / "snap", mnt) > 2 << 20
    mounts.umount(tmp_path / "snap")
    r = fs_check(fstype, snapdev, mounts, tmp_path / "replay")
    assert r.returncode == 0, r.stdout + r.stderr
    listing = f.fssconfig("-l", "-v", "fss0").stdout
    assert f"file-system-consistent: suspended {mnt} for" in listing, listing
    assert re.search(rf"fss0: snapshot of data created \(barrier \d+ us, suspended {re.escape(str(mnt))} for [\d.]+ ms\)", f.log.read_text())


@pytest.mark.parametrize("fstype", FSTYPES)
def test_no_suspend_is_crash_consistent_and_the_check_shows_it(fstype, fssd_factory, shmdir, mounts, tmp_path):
    f, mnt = setup(fssd_factory, shmdir, mounts, tmp_path, fstype)
    with Writer(mnt) as w:
        wait_for(lambda: w.sizes() > 2 << 20, 60, "the writer to write 2 MiB")
        before = w.sizes()
        out = f.fssconfig("--no-suspend", "-v", "fss0", "data", shmdir / "bs0").stdout
    assert "fss0: data taken with --no-suspend: snapshot is crash-consistent" in out, out
    assert "suspended" not in out
    assert "data taken with --no-suspend: snapshot is crash-consistent" in f.fssconfig("-l", "-v").stdout
    assert "fss0: data taken with --no-suspend: snapshot is crash-consistent" in f.log.read_text()
    snapdev = snapshot_device(f, mounts, tmp_path, fstype)
    if fstype == "ext4":
        # ext4 marks itself needs_recovery whenever it is mounted read-write; only a freeze
        # (or an unmount) clears it. So this holds every time, busy or not.
        assert needs_recovery(fstype, snapdev)
        r = mount_snapshot_plain_ro(mounts, snapdev, tmp_path / "snap", fstype)
        assert r.returncode != 0, "a crash-consistent snapshot of a mounted ext4 mounted without recovery"
        return
    # XFS: either its log holds changes to replay (someone synced meanwhile), or it has not written
    # them yet and the snapshot lacks what the writer had written: crash-consistent either way.
    if needs_recovery(fstype, snapdev):
        return
    r = mount_snapshot_plain_ro(mounts, snapdev, tmp_path / "snap", fstype)
    assert r.returncode == 0, r.stderr
    got = sum(p.stat().st_size for p in (tmp_path / "snap").glob("f*.rec"))
    assert got < before, f"a crash-consistent XFS snapshot with all {before} bytes and nothing in its log"
