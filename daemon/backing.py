"""Opening a snapshot's backing store as fssconfig(8) does, with fssd's refusals.

A regular file (created, or clobbered as NetBSD does), a directory (a file is
made in it and unlinked once the snapshot is configured), or a raw block
device (its size is its limit). Refused: the volume's own image, anything on
the snapshotted volume's file system or on a file system the VSS broker
freezes (a copy-on-write into a frozen or self-snapshotted file system would
deadlock).
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from typing import NamedTuple


class BackingError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.errno = code


class BackingStore(NamedTuple):
    fd: int
    path: str
    created: bool  # fssd made this file, so fssd removes it on unconfigure
    unlink_now: bool  # -x, or a file made in a directory
    is_device: bool
    device_size: int  # raw device: its size (the limit); files: 0
    block_size: int  # fss's bs block: the file system's block size, 512 for devices


def _dev_of(path: str) -> int | None:
    """st_dev of the file system `path` lives on (or would live on, for a new file)."""
    p = os.path.abspath(path)
    while p:
        try:
            return os.stat(p).st_dev
        except FileNotFoundError:
            parent = os.path.dirname(p)
            if parent == p:
                return None
            p = parent
    return None


def _inside(path: str, mount: str) -> bool:
    real, m = os.path.realpath(path), os.path.realpath(mount)
    return real == m or real.startswith(m.rstrip("/") + "/")


def check_location(backup: str, volume_mount: str | None, frozen_mounts: list[str]) -> None:
    """Refuse a backing store that would deadlock the copy-on-write (its identity is checked on open)."""
    dev = _dev_of(backup)
    if volume_mount:
        if _inside(backup, volume_mount) or (os.path.ismount(volume_mount) and dev is not None and dev == os.stat(volume_mount).st_dev):
            raise BackingError(errno.EINVAL, f"{backup}: backing store on the snapshotted volume ({volume_mount}) would deadlock")
    for m in frozen_mounts:
        if _inside(backup, m) or (os.path.ismount(m) and dev is not None and dev == os.stat(m).st_dev):
            raise BackingError(errno.EINVAL, f"{backup}: backing store on {m}, which the VSS broker freezes, would deadlock")


def identity(st: os.stat_result) -> tuple:
    """What makes two paths the same storage: the device for block devices, else (dev, inode)."""
    return ("blk", st.st_rdev) if stat.S_ISBLK(st.st_mode) else ("file", st.st_dev, st.st_ino)


def open_store(backup: str, device: str, unlink: bool, taken: dict[tuple, str]) -> BackingStore:
    """Open (or create) the store; `taken` maps identities that must never be a store
    (every volume image, every other snapshot's store) to what they are.

    The identity is checked on the opened descriptor, before anything is truncated:
    a hard link, a bind mount or a symlink to a live image is refused like the image itself.
    """
    try:
        st = os.stat(backup)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise BackingError(e.errno or errno.EIO, f"{backup}: {e.strerror}") from None
    fd = -1
    try:
        if st is not None and stat.S_ISBLK(st.st_mode):
            # O_EXCL on a block device: EBUSY if it (or a partition of it) is mounted or held.
            fd = os.open(backup, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
            _refuse_taken(fd, backup, taken)
            size = os.lseek(fd, 0, os.SEEK_END)
            return BackingStore(fd, backup, False, False, True, size, 512)
        if st is not None and stat.S_ISDIR(st.st_mode):
            fd, path = tempfile.mkstemp(prefix=f"{device}.", suffix=".fssbs", dir=backup)
            os.set_inheritable(fd, False)
            return BackingStore(fd, path, True, True, False, 0, _block_size(fd))
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise BackingError(errno.EINVAL, f"{backup}: not a regular file, directory or block device")
        # No O_TRUNC: the file is truncated by the caller, once it is known not to be in use.
        fd = os.open(backup, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        _refuse_taken(fd, backup, taken)
        return BackingStore(fd, backup, st is None, unlink, False, 0, _block_size(fd))
    except BackingError:
        if fd >= 0:
            os.close(fd)
        raise
    except OSError as e:
        if fd >= 0:
            os.close(fd)
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise BackingError(e.errno, f"{backup}: backing store not writable: {e.strerror}") from None
        if e.errno == errno.EBUSY:
            raise BackingError(e.errno, f"{backup}: device is in use (mounted or held): {e.strerror}") from None
        raise BackingError(e.errno or errno.EIO, f"create: {backup}: {e.strerror}") from None


def _refuse_taken(fd: int, backup: str, taken: dict[tuple, str]) -> None:
    what = taken.get(identity(os.fstat(fd)))
    if what:
        raise BackingError(errno.EBUSY, f"{backup}: is {what}; refusing to use it as a backing store")


def _block_size(fd: int) -> int:
    """fss uses the backing file system's I/O size; never below 512."""
    try:
        bs = os.fstatvfs(fd).f_bsize
    except OSError:
        return 512
    return bs if bs >= 512 and bs & (bs - 1) == 0 else 512


def discard(store: BackingStore, unlinked: bool) -> None:
    """Close, and remove the file if fssd made it and has not unlinked it already."""
    try:
        os.close(store.fd)
    except OSError:
        pass
    if store.created and not unlinked:
        try:
            os.unlink(store.path)
        except FileNotFoundError:
            pass
