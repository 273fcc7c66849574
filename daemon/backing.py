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


def check_location(backup: str, volume_path: str, volume_mount: str | None, frozen_mounts: list[str]) -> None:
    """Refuse a backing store that would deadlock the copy-on-write."""
    if os.path.exists(backup) and os.path.realpath(backup) == os.path.realpath(volume_path):
        raise BackingError(errno.EINVAL, f"{backup}: is the snapshotted volume's own image")
    dev = _dev_of(backup)
    if volume_mount:
        if _inside(backup, volume_mount) or (os.path.ismount(volume_mount) and dev is not None and dev == os.stat(volume_mount).st_dev):
            raise BackingError(errno.EINVAL, f"{backup}: backing store on the snapshotted volume ({volume_mount}) would deadlock")
    for m in frozen_mounts:
        if _inside(backup, m) or (os.path.ismount(m) and dev is not None and dev == os.stat(m).st_dev):
            raise BackingError(errno.EINVAL, f"{backup}: backing store on {m}, which the VSS broker freezes, would deadlock")


def open_store(backup: str, device: str, unlink: bool) -> BackingStore:
    try:
        st = os.stat(backup)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise BackingError(e.errno or errno.EIO, f"{backup}: {e.strerror}") from None
    try:
        if st is not None and stat.S_ISBLK(st.st_mode):
            fd = os.open(backup, os.O_RDWR | os.O_CLOEXEC)
            size = os.lseek(fd, 0, os.SEEK_END)
            return BackingStore(fd, backup, False, False, True, size, 512)
        if st is not None and stat.S_ISDIR(st.st_mode):
            fd, path = tempfile.mkstemp(prefix=f"{device}.", suffix=".fssbs", dir=backup)
            os.set_inheritable(fd, False)
            return BackingStore(fd, path, True, True, False, 0, _block_size(fd))
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise BackingError(errno.EINVAL, f"{backup}: not a regular file, directory or block device")
        fd = os.open(backup, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        return BackingStore(fd, backup, st is None, unlink, False, 0, _block_size(fd))
    except BackingError:
        raise
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise BackingError(e.errno, f"{backup}: backing store not writable: {e.strerror}") from None
        raise BackingError(e.errno or errno.EIO, f"create: {backup}: {e.strerror}") from None


def _block_size(fd: int) -> int:
    """fss uses the backing file system's I/O size; never below 512."""
    try:
        bs = os.fstatvfs(fd).f_bsize
    except OSError:
        return 512
    return bs if bs >= 512 and bs & (bs - 1) == 0 else 512


def discard(store: BackingStore) -> None:
    """Close, and remove the file if fssd made it and it is still there."""
    try:
        os.close(store.fd)
    except OSError:
        pass
    if store.created and not store.unlink_now:
        try:
            os.unlink(store.path)
        except FileNotFoundError:
            pass
