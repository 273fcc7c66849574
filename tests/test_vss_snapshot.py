"""Application-consistent snapshots through fssd's own VSS broker, on a real ext4."""

import os
import signal
import subprocess
import sys
import time

from fsshelp import BIN, run, wait_for

from examples.recordwriter import verify


def frozen(mnt) -> bool:
    """FIFREEZE on a frozen file system is EBUSY; on a thawed one it freezes (so undo at once)."""
    r = subprocess.run(["fsfreeze", "-f", str(mnt)], capture_output=True, text=True, timeout=10)
    if r.returncode == 0:
        subprocess.run(["fsfreeze", "-u", str(mnt)], check=True, timeout=10)
        return False
    assert "busy" in r.stderr.lower(), r.stderr
    return True


def setup_ext4(fssd_factory, shmdir, mounts, tmp_path, **vss):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    f = fssd_factory(
        [{"name": "data", "path": str(shmdir / "data.img"), "size": "128M", "mountpoint": str(mnt)}],
        vss={"enabled": True, "timeout": 3, "freeze_max": 3, **vss},
    )
    dev = mounts.nbdfuse(f.uri("data"), tmp_path / "fuse")
    run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev)
    mounts.loop_mount(dev, mnt)
    return f, mnt


def test_consistent_snapshot_ends_on_a_whole_record(fssd_factory, shmdir, mounts, tmp_path):
    f, mnt = setup_ext4(fssd_factory, shmdir, mounts, tmp_path)
    records = mnt / "records.bin"
    writer = subprocess.Popen([sys.executable, "-m", "examples.recordwriter", "-r", str(f.rundir), str(records)], stdout=subprocess.PIPE, text=True)
    try:
        assert "registered" in writer.stdout.readline()
        wait_for(lambda: records.exists() and records.stat().st_size > 256 * 1024, 30, "the writer to write")
        out = f.fssconfig("-C", "-v", "fss0", "data", shmdir / "bs0").stdout
        assert "application-consistent snapshot, freeze window" in out
        window = float(out.split("freeze window ")[1].split(" ms")[0])
        assert window < 3000  # inside the phase timeout, i.e. not a timed-out freeze
        size_at_snapshot = records.stat().st_size
        wait_for(lambda: records.stat().st_size > size_at_snapshot + 64 * 1024, 30, "writes to go on after THAW")
    finally:
        writer.send_signal(signal.SIGTERM)
        writer.wait(30)
    assert not frozen(mnt)
    snapdev = mounts.nbdfuse(f.uri("fss0"), tmp_path / "fuse-snap", readonly=True)
    run("e2fsck", "-fn", snapdev)
    smnt = mounts.loop_mount(snapdev, tmp_path / "snap", readonly=True)
    count, problem = verify(smnt / "records.bin")
    assert problem == "" and count > 0
    assert count * 64 < records.stat().st_size, "the live file went on growing after the snapshot"


def test_broker_killed_while_frozen_is_thawed_by_the_supervisor(fssd_factory, shmdir, mounts, tmp_path):
    f, mnt = setup_ext4(fssd_factory, shmdir, mounts, tmp_path, freeze_max=60)
    r = run(BIN / "vssadm", "-r", f.rundir, "freeze")
    assert frozen(mnt)
    broker = f.worker_pid("broker", "vss")
    t0 = time.monotonic()
    os.kill(broker, signal.SIGKILL)
    wait_for(lambda: not frozen(mnt), 5, "the supervisor to thaw", interval=0.05)
    assert time.monotonic() - t0 < 1.5
    wait_for(lambda: f.alive_pid("broker", "vss") not in (None, broker), 20, "broker restart")
    assert "thawed " + str(mnt) in f.log.read_text()
    assert r.returncode == 0
    st = run(BIN / "vssadm", "-r", f.rundir, "status").stdout
    assert "broker: pid " in st and "1 restart(s), last error: killed by SIGKILL" in st, st
    vols = f.fssconfig("--volumes", "-v").stdout
    assert "0 restart(s); snapshots: none" in vols


def test_requestor_that_never_thaws_is_thawed_by_the_broker(fssd_factory, shmdir, mounts, tmp_path):
    f, mnt = setup_ext4(fssd_factory, shmdir, mounts, tmp_path, freeze_max=1)
    run(BIN / "vssadm", "-r", f.rundir, "freeze")
    assert frozen(mnt)
    wait_for(lambda: not frozen(mnt), 5, "the broker's own thaw after freeze_max", interval=0.1)


def test_thaw_after_broker_death_is_not_held_up_by_a_table_write(fssd_factory, shmdir, mounts, tmp_path):
    """A configure writing a slow table (the hook holds each table write 3 s, as a large table on a
    slow disk does) while the broker dies frozen: the supervisor thaws at once all the same."""
    from daemon.snapshots import SLOW_TABLE_ENV

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    f = fssd_factory(
        [
            {"name": "data", "path": str(shmdir / "data.img"), "size": "128M", "mountpoint": str(mnt)},
            {"name": "other", "path": str(shmdir / "other.img"), "size": "64M"},
        ],
        vss={"enabled": True, "timeout": 3, "freeze_max": 60},
        env={SLOW_TABLE_ENV: "3"},
    )
    dev = mounts.nbdfuse(f.uri("data"), tmp_path / "fuse")
    run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev)
    mounts.loop_mount(dev, mnt)
    broker = f.worker_pid("broker", "vss")
    run(BIN / "vssadm", "-r", f.rundir, "freeze")
    assert frozen(mnt)
    conf = subprocess.Popen([str(BIN / "fssconfig"), "-r", str(f.rundir), "fss0", "other", str(shmdir / "bs0")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: "fss0: writing the table" in f.log.read_text(), 20, "the table write to begin", interval=0.02)
        t0 = time.monotonic()
        os.kill(broker, signal.SIGKILL)
        wait_for(lambda: not frozen(mnt), 10, "the supervisor to thaw", interval=0.05)
        thawed = time.monotonic() - t0
        out, err = conf.communicate(timeout=60)
    finally:
        if conf.poll() is None:
            conf.kill()
            conf.wait()
    print(f"thawed {thawed * 1000:.0f} ms after the broker's SIGKILL, table write still held")
    assert thawed < 1.5, f"thawed {thawed:.2f} s after the kill: the table write held the event loop"
    assert conf.returncode == 0, err
    snap = {s["device"]: s for s in f.status()["snapshots"]}["fss0"]
    assert snap["in_use"] and snap["volume"] == "other" and snap["state"] == "active"
