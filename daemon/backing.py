"""fssd's half of a backing store: check the descriptor fssconfig opened, never a path.

fssconfig opens or creates the store with the caller's own rights
(daemon/cli/storeopen.py) and passes the descriptor over the control socket. Here
the supervisor checks what it got: a regular file (the caller's own, unless
the caller is root) or a block device, open read-write and not O_APPEND, not
on the snapshotted volume, on a file system the VSS broker freezes, or on a
FUSE file system (its server may be this volume's own export through nbdfuse,
which nothing in the mount table reveals: the copy-on-write would deadlock or
write into itself), and not any volume's data or another
snapshot's store by identity, including second paths to it: a loop device
over an image (LOOP_GET_STATUS64), partitions, and device-mapper/md stacks
whose /sys/block slaves lead to one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from typing import NamedTuple

from daemon.errors import ControlError
from daemon.units import humanize


class BackingError(ControlError):
    """A store refused: answered to the client as it is."""


class BackingStore(NamedTuple):
    fd: int
    path: str  # as the user gave it: shown, never opened
    unlink_now: bool  # has no name (made in a directory, or -x)
    is_device: bool
    device_size: int  # raw device: its size (the limit); files: 0
    block_size: int  # fss's bs block: the file system's block size, 512 for devices
    dirfd: int = -1  # a file fssconfig created: its directory, to remove it at unconfigure
    name: str = ""
    owner: int = -1  # the uid that asked for it


# -- identity ---------------------------------------------------------------------------


def identity(st: os.stat_result) -> tuple:
    """What makes two paths the same storage: the device for block devices, else (dev, inode)."""
    return ("blk", st.st_rdev) if stat.S_ISBLK(st.st_mode) else ("file", st.st_dev, st.st_ino)


_LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32sQQ")  # struct loop_info64


SYSFS = "/sys"  # a tree shaped like it in unit tests


def _sysdir(rdev: int) -> str:
    return os.path.realpath(f"{SYSFS}/dev/block/{os.major(rdev)}:{os.minor(rdev)}")


def _dev_of_sysdir(d: str) -> int | None:
    try:
        with open(os.path.join(d, "dev")) as f:
            maj, mnr = f.read().strip().split(":")
        return os.makedev(int(maj), int(mnr))
    except (OSError, ValueError):
        return None


def _loop_backing(rdev: int, fd: int | None) -> set[tuple]:
    """What a loop device's data is: the backing file's (dev, inode), or the backing block device."""
    own = -1
    if fd is None:
        fd = _open_node(rdev)
        own = fd if fd is not None else -1
    out: set[tuple] = set()
    try:
        if fd is not None:
            buf = fcntl.ioctl(fd, _LOOP_GET_STATUS64, bytes(_LOOP_INFO64.size))
            lo_device, lo_inode, lo_rdevice = _LOOP_INFO64.unpack(buf)[:3]
            out.add(("file", lo_device, lo_inode))
            if lo_rdevice and lo_rdevice != lo_device:  # a backing block device: its rdev (0 for a file)
                out.add(("blk", lo_rdevice))
            return out
    except OSError:
        pass  # not bound (ENXIO), or not a loop device after all
    finally:
        if own >= 0:
            os.close(own)
    try:  # no descriptor: the sysfs name of the backing file
        with open(os.path.join(_sysdir(rdev), "loop", "backing_file")) as f:
            name = f.read().rstrip("\n")
        out.add(identity(os.stat(name)))
    except OSError:
        pass
    return out


def _open_node(rdev: int) -> int | None:
    """A stack member's node, read-only, to ask it: udev's /dev/block/M:m, else /dev/<kernel name>,
    each only if it is that very device (root's own /dev, never a path from a client)."""
    for node in (f"/dev/block/{os.major(rdev)}:{os.minor(rdev)}", "/dev/" + os.path.basename(_sysdir(rdev))):
        try:
            fd = os.open(node, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
            return fd
        os.close(fd)
    return None


def _below(rdev: int, fd: int | None = None, with_parent: bool = True) -> set[tuple]:
    """Everything this block device's data lies on: itself, its slaves (dm, md), the disk a
    partition is on, a loop device's backing file or device; transitively."""
    seen: set[tuple] = set()
    todo: list[tuple[int, int | None]] = [(rdev, fd)]
    while todo:
        dev, dfd = todo.pop()
        if ("blk", dev) in seen or len(seen) > 256:
            continue
        seen.add(("blk", dev))
        d = _sysdir(dev)
        if os.path.isdir(os.path.join(d, "loop")) or os.path.basename(d).startswith("loop"):
            for ident in _loop_backing(dev, dfd):
                if ident[0] == "blk":
                    todo.append((ident[1], None))
                else:
                    seen.add(ident)
        try:
            slaves = os.listdir(os.path.join(d, "slaves"))
        except OSError:
            slaves = []
        for s in slaves:
            sdev = _dev_of_sysdir(os.path.join(d, "slaves", s))
            if sdev is not None:
                todo.append((sdev, None))
        if with_parent and os.path.exists(os.path.join(d, "partition")):
            pdev = _dev_of_sysdir(os.path.dirname(d))
            if pdev is not None:
                todo.append((pdev, None))
    return seen


def _above(rdev: int) -> set[tuple]:
    """Everything whose data lies inside this block device: its partitions and holders (dm, md)."""
    seen: set[tuple] = set()
    todo = [rdev]
    while todo:
        dev = todo.pop()
        if ("blk", dev) in seen or len(seen) > 256:
            continue
        seen.add(("blk", dev))
        d = _sysdir(dev)
        try:
            entries = os.listdir(d)
        except OSError:
            entries = []
        for e in entries:
            if os.path.exists(os.path.join(d, e, "partition")):
                pdev = _dev_of_sysdir(os.path.join(d, e))
                if pdev is not None:
                    todo.append(pdev)
        try:
            holders = os.listdir(os.path.join(d, "holders"))
        except OSError:
            holders = []
        for h in holders:
            hdev = _dev_of_sysdir(os.path.join(d, "holders", h))
            if hdev is not None:
                todo.append(hdev)
    return seen


def volume_identities(st: os.stat_result) -> set[tuple]:
    """A volume's data: its image, or its block device and what that device lies on
    (not the whole disk a partition is on: a sibling partition is a fine store)."""
    if stat.S_ISBLK(st.st_mode):
        return _below(st.st_rdev, with_parent=False)
    return {identity(st)}


def store_identities(fd: int | None, st: os.stat_result) -> set[tuple]:
    """Every storage a store's writes would land in or over."""
    if stat.S_ISBLK(st.st_mode):
        return _below(st.st_rdev, fd) | _above(st.st_rdev)
    return {identity(st)}


# -- the descriptor ------------------------------------------------------------------------


def _mounts() -> list[tuple[int, str, str]]:
    """(st_dev, mountpoint, fstype) of every mount."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                sep = parts.index("-")
                maj, mnr = parts[2].split(":")
                out.append((os.makedev(int(maj), int(mnr)), parts[4].replace("\\040", " "), parts[sep + 1]))
    except (OSError, ValueError):
        pass
    return out


def _mount_dev(mount: str) -> int | None:
    try:
        return os.stat(mount).st_dev if os.path.ismount(mount) else None
    except OSError:
        return None


def _inside(path: str, mount: str) -> bool:
    p, m = os.path.normpath(path), os.path.realpath(mount)
    return p == m or p.startswith(m.rstrip("/") + "/")


def check_store(
    fd: int,
    shown: str,
    uid: int,
    volume_mount: str | None,
    frozen_mounts: list[str],
    taken: dict[tuple, str],
) -> BackingStore:
    """Check a store descriptor received from `uid`; the caller keeps and closes `fd`.

    `taken` maps identities that must never be a store (every volume's data, every other
    snapshot's store) to what they are. Nothing is written here.
    """
    st = os.fstat(fd)
    is_dev = stat.S_ISBLK(st.st_mode)
    if not is_dev and not stat.S_ISREG(st.st_mode):
        raise BackingError(errno.EINVAL, f"{shown}: not a regular file, directory or block device")
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & os.O_ACCMODE != os.O_RDWR:
        raise BackingError(errno.EBADF, f"{shown}: backing store descriptor is not open for reading and writing")
    if flags & (os.O_APPEND | os.O_DIRECT):  # O_APPEND would put the table and every copy at the end
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~(os.O_APPEND | os.O_DIRECT))
        except OSError:
            pass
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
            raise BackingError(errno.EINVAL, f"{shown}: backing store is append-only")
    if not is_dev and uid != 0 and st.st_uid != uid:
        raise BackingError(errno.EPERM, f"{shown}: owned by uid {st.st_uid}, not by the caller (uid {uid}); refusing to overwrite another user's file")

    idents = store_identities(fd, st)
    for ident in sorted(idents, key=repr):
        what = taken.get(ident)
        if what:
            via = "" if ident == identity(st) else " (through the devices it is made of)"
            raise BackingError(errno.EBUSY, f"{shown}: is {what}{via}; refusing to use it as a backing store")

    # Where its writes land: never the snapshotted volume, a frozen file system or an nbdfuse mount.
    mounts = _mounts()
    lands_on = {st.st_dev} if not is_dev else {i[1] for i in idents if i[0] == "file"}
    if is_dev:
        mounted = [m for dev, m, _t in mounts if ("blk", dev) in idents]
        if mounted:
            raise BackingError(errno.EBUSY, f"{shown}: device is in use (mounted at {mounted[0]})")
    if volume_mount:
        vdev = _mount_dev(volume_mount)
        if (not is_dev and _inside(shown, volume_mount)) or (vdev is not None and vdev in lands_on):
            raise BackingError(errno.EINVAL, f"{shown}: backing store on the snapshotted volume ({volume_mount}) would deadlock")
    for m in frozen_mounts:
        mdev = _mount_dev(m)
        if (not is_dev and _inside(shown, m)) or (mdev is not None and mdev in lands_on):
            raise BackingError(errno.EINVAL, f"{shown}: backing store on {m}, which the VSS broker freezes, would deadlock")
    for dev, m, fstype in mounts:
        # A FUSE server is a process: it may be one of our own exports seen through nbdfuse (the
        # mount says only "fuse /dev/fuse", not whom it serves), and any copy-on-write would wait on it.
        if dev in lands_on and (fstype in ("fuse", "fuseblk") or fstype.startswith(("fuse.", "fuseblk."))):
            raise BackingError(
                errno.EINVAL,
                f"{shown}: backing store on a FUSE file system ({m}): it may be fssd's own export through nbdfuse, and the copy-on-write would wait on it",
            )

    size = os.lseek(fd, 0, os.SEEK_END) if is_dev else 0
    return BackingStore(fd, shown, False, is_dev, size, 512 if is_dev else _block_size(fd), owner=uid)


def _block_size(fd: int) -> int:
    """fss uses the backing file system's I/O size; never below 512."""
    try:
        bs = os.fstatvfs(fd).f_bsize
    except OSError:
        return 512
    return bs if bs >= 512 and bs & (bs - 1) == 0 else 512


# -- sizes -----------------------------------------------------------------------------


def check_cluster(requested: int, csize: int, volume_size: int) -> None:
    """A cluster larger than the volume can't be what was meant (fss would map one partial cluster)."""
    if requested > volume_size:
        raise BackingError(errno.EINVAL, f"cluster size {requested} ({humanize(requested)}) is larger than the volume ({volume_size} bytes, {humanize(volume_size)})")


def limit_clusters(store: BackingStore, size: int | None, csize: int, count: int, tclusters: int) -> int:
    """The store's limit in clusters, refusing one that can't even hold the table, in the user's terms."""
    if store.is_device:
        limit, given = store.device_size // csize, f"block device of {store.device_size} bytes ({humanize(store.device_size)})"
    elif size is not None:
        limit, given = size // csize, f"backing store size {size} ({humanize(size)})"
    else:
        return tclusters + count  # room for every cluster: never full
    if limit <= tclusters:
        need = (tclusters + 1) * csize
        raise BackingError(
            errno.ENOSPC,
            f"{store.path}: {given} is too small: the table alone takes {tclusters} cluster(s) of {humanize(csize)}; give at least {need} bytes ({humanize(need)})",
        )
    return limit


# -- removal -----------------------------------------------------------------------------


def discard(store: BackingStore, unlinked: bool) -> None:
    """Close; remove the file fssconfig created for it, through the directory descriptor it
    passed, and only while that name is still this file and the asker's."""
    try:
        if store.dirfd >= 0 and store.name and not unlinked:
            st = os.stat(store.name, dir_fd=store.dirfd, follow_symlinks=False)
            mine = os.fstat(store.fd)
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino) and (store.owner == 0 or st.st_uid == store.owner):
                os.unlink(store.name, dir_fd=store.dirfd)
    except OSError:
        pass
    for fd in (store.fd, store.dirfd):
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
