"""A real file system end to end: ext4 on the volume through nbdfuse + a loop mount."""

import hashlib
import os

from fsshelp import run

VOL = {"size": "256M"}


def write_files(root, prefix, count, size):
    sums = {}
    for i in range(count):
        data = os.urandom(size + i * 1000)
        p = root / f"{prefix}{i}.bin"
        p.write_bytes(data)
        sums[p.name] = hashlib.sha256(data).hexdigest()
    return sums


def checksums(root, names):
    return {n: hashlib.sha256((root / n).read_bytes()).hexdigest() for n in names}


def make_ext4(mounts, fssd, tmp):
    dev = mounts.nbdfuse(fssd.uri("data"), tmp / "fuse-live")
    run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev)
    return dev


def test_ext4_survives_fssd_restart(fssd_factory, shmdir, mounts, tmp_path):
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), **VOL}])
    dev = make_ext4(mounts, f, tmp_path)
    mnt = mounts.loop_mount(dev, tmp_path / "mnt")
    sums = write_files(mnt, "f", 20, 300_000)
    run("sync")
    mounts.umount(mnt)
    run("e2fsck", "-fn", dev)
    mounts.cleanup()  # nbdfuse off before fssd goes away
    assert f.stop() == 0
    f.start()
    dev = mounts.nbdfuse(f.uri("data"), tmp_path / "fuse-again")
    run("e2fsck", "-fn", dev)
    mnt = mounts.loop_mount(dev, tmp_path / "mnt2", readonly=True)
    assert checksums(mnt, sums) == sums


def test_snapshot_of_a_frozen_ext4_is_clean_and_keeps_old_files(fssd_factory, shmdir, mounts, tmp_path):
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), **VOL}])
    dev = make_ext4(mounts, f, tmp_path)
    mnt = mounts.loop_mount(dev, tmp_path / "mnt")
    old = write_files(mnt, "old", 15, 200_000)
    run("sync")
    run("fsfreeze", "-f", mnt)
    try:
        f.fssconfig("fss0", "data", shmdir / "bs0")
    finally:
        run("fsfreeze", "-u", mnt)
    # Life goes on: rewrite old files, delete some, add new ones.
    for i in range(0, 15, 2):
        (mnt / f"old{i}.bin").write_bytes(os.urandom(150_000))
    for i in range(1, 15, 4):
        (mnt / f"old{i}.bin").unlink()
    write_files(mnt, "new", 10, 250_000)
    run("sync")

    snapdev = mounts.nbdfuse(f.uri("fss0"), tmp_path / "fuse-snap", readonly=True)
    run("e2fsck", "-fn", snapdev)
    smnt = mounts.loop_mount(snapdev, tmp_path / "snap", readonly=True)
    assert checksums(smnt, old) == old
    assert not any(p.name.startswith("new") for p in smnt.iterdir())
    # And the live file system is still whole.
    mounts.umount(smnt)
    mounts.umount(mnt)
    run("e2fsck", "-fn", dev)
