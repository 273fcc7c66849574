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
from ipc import names

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
    """FIFREEZE on a frozen file system is EBUSY at once; on a thawed one it freezes (so undo at
    once), or fails with EIO when the volume's export is gone (fssd killed), or with EROFS once
    the kernel has remounted it read-only after that EIO: a frozen one answers EBUSY before either."""
    r = subprocess.run(["fsfreeze", "-f", str(mnt)], capture_output=True, text=True, timeout=10)
    if r.returncode == 0:
        subprocess.run(["fsfreeze", "-u", str(mnt)], check=True, timeout=10)
        return False
    if "input/output error" in r.stderr.lower() or "read-only file system" in r.stderr.lower():
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


def test_mount_found_without_a_mountpoint_is_suspended(fssd_factory, shmdir, mounts, tmp_path):
    """No mountpoint configured: the loop mount over nbdfuse of this export is found in mountinfo."""
    f, mnt = setup(fssd_factory, shmdir, mounts, tmp_path, mountpoint=False)
    with Writer(mnt) as w:
        wait_for(lambda: w.sizes() > 1 << 20, 60, "the writer to write 1 MiB")
        out = f.fssconfig("-v", "fss0", "data", shmdir / "bs0").stdout
        # A store on that file system would deadlock the copy-on-write: refused, and the file it made removed.
        r = f.fssconfig("fss1", "data", mnt / "bs1", check=False)
    assert f"fss0: file-system-consistent snapshot, suspended {mnt} for" in out, out
    assert "crash-consistent" not in out
    assert r.returncode == 1 and f"fssconfig: fss1: {mnt} holds a backing store: suspending it would deadlock" in r.stderr, r.stderr
    assert not (mnt / "bs1").exists()
    assert "fss1: not in use" in f.fssconfig("-l").stdout
    snapdev = snapshot_device(f, mounts, tmp_path)
    assert not needs_recovery("ext4", snapdev)
    run("e2fsck", "-fn", snapdev)
    assert mount_snapshot_plain_ro(mounts, snapdev, tmp_path / "snap", "ext4").returncode == 0
    assert check_prefixes(tmp_path / "snap", mnt) > 1 << 20


def test_nothing_mounted_says_crash_consistent_in_one_line(fssd_factory, shmdir, tmp_path):
    mp = tmp_path / "not-mounted"
    mp.mkdir()
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "64M"},
                      {"name": "web", "path": str(shmdir / "web.img"), "size": "64M", "mountpoint": str(mp)}])
    out = f.fssconfig("-v", "fss0", "data", shmdir / "bs0").stdout
    line = "fss0: data has no mountpoint configured: snapshot is crash-consistent"
    assert out.splitlines()[0] == line, out
    assert "data has no mountpoint configured: snapshot is crash-consistent" in f.fssconfig("-l", "-v", "fss0").stdout
    out = f.fssconfig("-v", "fss1", "web", shmdir / "bs1").stdout
    assert f"fss1: web is not mounted at its mountpoint {mp}: snapshot is crash-consistent" in out, out
    assert f.fssconfig("fss2", "data", shmdir / "bs2").stdout == ""  # without -v, fssconfig stays quiet as NetBSD's
    log = f.log.read_text()
    assert line in log and f"fss1: web is not mounted at its mountpoint {mp}" in log
    listing = f.fssconfig("-l", "--json").stdout
    assert '"consistency": "crash"' in listing


def test_a_file_system_frozen_already_is_left_frozen(fssd_factory, shmdir, mounts, tmp_path):
    """fsfreeze -f, fssconfig, fsfreeze -u (the classic sequence) works, and fssd never thaws a freeze it did not make."""
    f, mnt = setup(fssd_factory, shmdir, mounts, tmp_path)
    (mnt / "a").write_bytes(b"x" * 100_000)
    run("fsfreeze", "-f", mnt)
    try:
        out = f.fssconfig("-v", "fss0", "data", shmdir / "bs0").stdout
        assert frozen(mnt), "fssd thawed a freeze it did not make"
    finally:
        run("fsfreeze", "-u", mnt)
    assert f"fss0: {mnt} was frozen already (not by fssd): snapshot taken inside that freeze" in out, out
    snapdev = snapshot_device(f, mounts, tmp_path)
    assert not needs_recovery("ext4", snapdev)


# -- the thaw is guaranteed -------------------------------------------------------------


def suspend_pid(f) -> int | None:
    """This instance's `fssd[RUNDIR]: suspend fss0` process (a child of its supervisor), if there is one."""
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as st:
                ppid = int(st.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{p}/cmdline", "rb") as c:
                title = c.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == f.proc.pid and title.split(b"\0")[0].endswith(b": suspend fss0"):
            return int(p)
    return None


POLL_SYSCALLS = {"x86_64": {"7", "271"}, "aarch64": {"73"}}[platform.machine()]  # poll / ppoll


def holding_freeze(pid: int) -> bool:
    """The suspend process waits in poll() only once it has frozen and said so."""
    try:
        with open(f"/proc/{pid}/syscall") as s:
            return s.read().split()[0] in POLL_SYSCALLS
    except (OSError, IndexError):
        return False


def start_held(fssd_factory, shmdir, mounts, tmp_path, freeze_max):
    """A configure whose suspend window is held open (test only: FSSD_TEST_HOLD_SUSPEND)."""
    f, mnt = setup(fssd_factory, shmdir, mounts, tmp_path, vss={"enabled": False, "freeze_max": freeze_max}, env={TEST_HOLD_ENV: "120"})
    p = subprocess.Popen([str(BIN / "fssconfig"), "-r", str(f.rundir), "fss0", "data", str(shmdir / "bs0")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid = wait_for(lambda: suspend_pid(f), 20, "the suspend process")
    wait_for(lambda: holding_freeze(pid), 20, "the suspend process to hold the freeze")
    with open(f"/proc/{pid}/cmdline", "rb") as c:
        assert c.read().split(b"\0")[0].decode() == names.proc_title("suspend fss0", str(f.rundir))
    assert frozen(mnt)
    return f, mnt, p, pid


def test_sigkill_of_the_suspend_process_thaws_at_once(fssd_factory, shmdir, mounts, tmp_path):
    f, mnt, p, pid = start_held(fssd_factory, shmdir, mounts, tmp_path, freeze_max=20)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not frozen(mnt), 20, "the supervisor to thaw", interval=0.05)
    assert time.monotonic() - t0 < 5, "thawed by the supervisor, not by waiting for freeze_max"
    _, err = p.communicate(timeout=30)
    assert p.returncode == 1
    assert f"fssconfig: fss0: suspend process (pid {pid}) killed by SIGKILL while {mnt} was suspended; thawed, snapshot not taken" in err, err
    assert "fss0: not in use" in f.fssconfig("-l").stdout
    assert not (shmdir / "bs0").exists()


def test_sigterm_to_the_suspend_process_thaws_and_takes_nothing(fssd_factory, shmdir, mounts, tmp_path):
    """systemd's stop signals every process of the unit: the suspend process thaws first."""
    f, mnt, p, pid = start_held(fssd_factory, shmdir, mounts, tmp_path, freeze_max=20)
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not frozen(mnt), 5, "the suspend process to thaw on SIGTERM", interval=0.05)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 1 and f"fssconfig: fss0: {mnt} thawed early (signal); snapshot not taken" in err, err
    assert "fss0: not in use" in f.fssconfig("-l").stdout


def test_sigkill_of_the_supervisor_thaws_at_once(fssd_factory, shmdir, mounts, tmp_path):
    f, mnt, p, pid = start_held(fssd_factory, shmdir, mounts, tmp_path, freeze_max=20)
    t0 = time.monotonic()
    os.kill(f.proc.pid, signal.SIGKILL)
    wait_for(lambda: not frozen(mnt), 20, "the suspend process to thaw", interval=0.05)
    assert time.monotonic() - t0 < 5, "thawed on the supervisor's death, not by waiting for freeze_max"
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10, "the suspend process to exit")
    p.communicate(timeout=30)
    assert p.returncode == 1


def test_a_window_longer_than_freeze_max_is_thawed_and_takes_nothing(fssd_factory, shmdir, mounts, tmp_path):
    f, mnt, p, pid = start_held(fssd_factory, shmdir, mounts, tmp_path, freeze_max=2)
    t0 = time.monotonic()
    wait_for(lambda: not frozen(mnt), 20, "the thaw at freeze_max", interval=0.05)
    assert time.monotonic() - t0 < 3.5, "not thawed at freeze_max (2 s) but by the end of the test hold (120 s)"
    _, err = p.communicate(timeout=30)
    assert p.returncode == 1
    assert f"fssconfig: fss0: {mnt} thawed after freeze_max 2 s, before the snapshot was taken; try again" in err, err
    assert "fss0: not in use" in f.fssconfig("-l").stdout
    assert f"fss0: thawed {mnt} after" in f.log.read_text()  # logged by the suspend process, after the thaw


# -- fssconfig -C -t ------------------------------------------------------------------


def test_fssconfig_C_timeout_applies_to_the_vss_phases(fssd_factory, shmdir, tmp_path):
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "64M"}], vss={"enabled": True, "timeout": 30})
    app = subprocess.Popen([str(BIN / "appvss"), "-n", "-w", "1", "-r", str(f.rundir)], stdout=subprocess.PIPE, text=True)
    try:
        assert "registered" in app.stdout.readline()
        t0 = time.monotonic()
        r = f.fssconfig("-C", "-t", "0.3", "fss0", "data", shmdir / "bs0", check=False)
        # appvss answers CHECK after 1 s, inside the broker's own 30 s: only the 0.3 s can fail it.
        assert r.returncode == 1 and "VSS CHECK failed" in r.stderr and "within 0.3 s" in r.stderr, r.stderr
        assert time.monotonic() - t0 < 3
        out = f.fssconfig("-C", "-t", "5", "fss0", "data", shmdir / "bs0").stdout
        assert "fss0: application-consistent snapshot, freeze window" in out
        assert "    application-consistent (VSS), freeze window" in f.fssconfig("-l", "-v", "fss0").stdout
    finally:
        app.send_signal(signal.SIGTERM)
        app.wait(30)
    for args, msg in [
        (["-C", "-t", "0"], "-t 0: timeout must be between 0 and 3600 seconds"),
        (["-C", "-t", "soon"], "-t soon: timeout must be between 0 and 3600 seconds"),
        (["-t", "5"], "-t applies to -C (the VSS phases)"),
        (["-C", "--no-suspend"], "-C and --no-suspend exclude each other"),
    ]:
        r = f.fssconfig(*args, "fss1", "data", shmdir / "bs1", check=False)
        assert r.returncode == 1 and r.stderr.startswith(f"fssconfig: {msg}\n"), r.stderr
    assert "fss1: not in use" in f.fssconfig("-l").stdout


# -- proving a mount is the volume's (daemon.volmounts), on a made-up /proc and /sys --------


def fake_host(tmp_path, argv, devname="nbd0", dev=(43, 0)):
    """A /sys with one nbd device whose connecting process has `argv`, and that process in /proc."""
    from workers.freeze import Mount

    sysfs, proc = tmp_path / "sys", tmp_path / "proc"
    blk = sysfs / "dev" / "block" / f"{dev[0]}:{dev[1]}"
    blk.mkdir(parents=True)
    (blk / "pid").write_text("4242\n")
    (blk / "uevent").write_text(f"MAJOR={dev[0]}\nMINOR={dev[1]}\nDEVNAME={devname}\n")
    p = proc / "4242"
    p.mkdir(parents=True)
    (p / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    os.symlink("/", p / "cwd")
    m = Mount("/srv/data", os.makedev(*dev), "ext4", f"/dev/{devname}", frozenset({"rw"}), frozenset({"rw"}))
    return m, str(proc), str(sysfs)


@pytest.mark.parametrize("argv,claimed", [
    (["nbd-client", "-unix", "/run/fssd/data.sock", "/dev/nbd0", "-N", "data"], True),
    (["nbd-client", "-N", "data", "-u", "/run/fssd/../fssd/data.sock", "/dev/nbd0"], True),
    (["qemu-nbd", "-c", "/dev/nbd0", "nbd+unix:///data?socket=/run/fssd/data.sock"], True),
    (["nbd-client", "-unix", "/run/fssd/data.sock", "/dev/nbd0", "-N", "web"], False),  # another export
    (["nbd-client", "-unix", "/run/other/data.sock", "/dev/nbd0", "-N", "data"], False),  # another instance
    (["qemu-nbd", "-c", "/dev/nbd0", "nbd+unix:///data?socket=/run/other/data.sock"], False),
    (["nbd-client", "-unix", "/run/fssd/data.sock", "/dev/nbd0"], False),  # default export: not proven
])
def test_nbd_device_is_claimed_only_by_its_export(tmp_path, argv, claimed):
    from daemon import volmounts

    m, proc, sysfs = fake_host(tmp_path, argv)
    got = volmounts.volume_mounts([m], "data", "/run/fssd/data.sock", proc, sysfs)
    assert bool(got) == claimed, got
    if claimed:
        assert got[0][1] == "/dev/nbd0 is an nbd device connected to export data (pid 4242)"


def test_other_devices_are_never_claimed(tmp_path):
    from daemon import volmounts
    from workers.freeze import Mount

    m, proc, sysfs = fake_host(tmp_path, ["nbd-client", "-unix", "/run/fssd/data.sock", "/dev/nbd0", "-N", "data"])
    disk = Mount("/home", os.makedev(8, 1), "ext4", "/dev/sda1", frozenset({"rw"}), frozenset({"rw"}))
    assert volmounts.volume_mounts([disk], "data", "/run/fssd/data.sock", proc, sysfs) == []
    # A loop device that is not bound (or not there) proves nothing.
    loop = Mount("/mnt/l", os.makedev(7, 200), "ext4", "/dev/loop200", frozenset({"rw"}), frozenset({"rw"}))
    assert volmounts.volume_mounts([loop], "data", "/run/fssd/data.sock", proc, sysfs) == []


def test_root_is_never_suspended(tmp_path):
    from daemon import suspend

    with pytest.raises(suspend.SuspendError, match="/: fssd never freezes /"):
        suspend.plan("data", "/", str(tmp_path / "data.sock"), {})


def test_store_on_a_loop_device_over_the_volume_is_refused(fssd_factory, shmdir, mounts, tmp_path):
    """A raw store that is a loop device whose file lives on the volume's file system: the
    copy-on-write into it would wait on the frozen file system. Found through the loop driver
    (no mountpoint configured: the mount is found in mountinfo, and so is what the store rests on)."""
    f, mnt = setup(fssd_factory, shmdir, mounts, tmp_path, mountpoint=False)
    backing = mnt / "store.img"
    with open(backing, "wb") as fh:
        fh.truncate(64 << 20)
    loop = run("losetup", "-f", "--show", backing).stdout.strip()
    mounts._undo.append(("loop", loop))
    r = f.fssconfig("fss0", "data", loop, check=False)
    assert r.returncode == 1 and f"fssconfig: fss0: {mnt} holds a backing store: suspending it would deadlock" in r.stderr, r.stderr
    assert "fss0: not in use" in f.fssconfig("-l").stdout
    assert not frozen(mnt)


def test_C_suspends_what_the_broker_does_not_freeze(fssd_factory, shmdir, mounts, tmp_path):
    """-C with `[vss] freeze = []`: the broker freezes no mount, so the volume's file system is
    suspended inside the broker's window; the snapshot mounts without recovery."""
    f, mnt = setup(fssd_factory, shmdir, mounts, tmp_path, vss={"enabled": True, "freeze": []})
    with Writer(mnt) as w:
        wait_for(lambda: w.sizes() > 1 << 20, 60, "the writer to write 1 MiB")
        out = f.fssconfig("-C", "fss0", "data", shmdir / "bs0").stdout
    assert "fss0: application-consistent snapshot, freeze window" in out, out
    snapdev = snapshot_device(f, mounts, tmp_path)
    assert not needs_recovery("ext4", snapdev)
    run("e2fsck", "-fn", snapdev)


def test_a_read_only_mount_needs_no_suspend(fssd_factory, shmdir, mounts, tmp_path):
    mnt = tmp_path / "mnt"
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "64M", "mountpoint": str(mnt)}])
    dev = mounts.nbdfuse(f.uri("data"), tmp_path / "fuse")
    mkfs("ext4", dev)
    mounts.loop_mount(dev, mnt, readonly=True)
    out = f.fssconfig("-v", "fss0", "data", shmdir / "bs0").stdout
    assert f"fss0: data is mounted read-only at {mnt}: nothing to suspend" in out, out
    assert "crash-consistent" not in out and "suspended" not in out
    assert '"consistency": "file-system"' in f.fssconfig("-l", "--json", "fss0").stdout


def test_a_bind_mount_is_the_same_file_system_frozen_once(fssd_factory, shmdir, mounts, tmp_path):
    f, mnt = setup(fssd_factory, shmdir, mounts, tmp_path)
    bind = tmp_path / "bind"
    bind.mkdir()
    run("mount", "--bind", mnt, bind)
    mounts._undo.append(("mount", bind))
    out = f.fssconfig("-v", "fss0", "data", shmdir / "bs0").stdout
    assert re.search(rf"fss0: file-system-consistent snapshot, suspended {re.escape(str(mnt))} for [\d.]+ ms", out), out
    assert "frozen already" not in out  # a second FIFREEZE of the same super block would have said EBUSY
