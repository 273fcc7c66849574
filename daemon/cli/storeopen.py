"""fssconfig's half of a backing store: open or create it with the caller's own rights.

fssd runs as root; if it opened the path it would do so on the caller's behalf
(symlinks, other users' files, devices the caller may not write). So fssconfig,
running as the caller, opens the store here and hands fssd the descriptor:

* `path/` (trailing slash): an existing directory; the store is a nameless file
  in it (O_TMPFILE, else created and unlinked at once).
* an existing directory: the same.
* a path under /dev: an existing block device, opened O_EXCL (EBUSY if
  mounted or held). Nothing is ever created under /dev.
* an existing block device elsewhere: the same.
* an existing regular file: only if the caller owns it (it is clobbered).
* a new name: a regular file created O_EXCL, mode 0600.

The final component is never followed if it is a symlink, except one only
root could have placed (udev's /dev/disk/by-*, /dev/mapper/*) naming a block
device. Files are opened relative to their directory's descriptor, so the
name checked is the name opened.
"""

from __future__ import annotations

import errno
import os
import stat


class StoreError(Exception):
    pass


class OpenedStore:
    """A plain class, not a NamedTuple: fssconfig's configure path does not import typing."""

    __slots__ = ("fd", "dirfd", "name", "created", "nameless")

    def __init__(self, fd: int, dirfd: int, name: str, created: bool, nameless: bool):
        self.fd = fd
        self.dirfd = dirfd  # the created file's directory (O_PATH), else -1
        self.name = name  # the created file's name in dirfd, else ""
        self.created = created
        self.nameless = nameless  # made in a directory: has no name at all


_DEV_DIRS = ("/dev",)
_NOT_DEV = ("/dev/shm", "/dev/mqueue")  # world-writable file systems mounted under /dev


def _under_dev(abspath: str) -> bool:
    p = os.path.normpath(abspath)
    if any(p == d or p.startswith(d + "/") for d in _NOT_DEV):
        return False
    return any(p == d or p.startswith(d + "/") for d in _DEV_DIRS)


def _only_root_could_place(path: str) -> bool:
    """The symlink and every directory above it are root's and writable by nobody else."""
    try:
        st = os.lstat(path)
        if st.st_uid != 0:
            return False
        d = os.path.dirname(path)
        while True:
            ds = os.stat(d)
            if ds.st_uid != 0 or ds.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                return False
            if d == "/":
                return True
            d = os.path.dirname(d)
    except OSError:
        return False


def open_store(typed: str) -> OpenedStore:
    """Open the store `typed` as the caller; raises StoreError with the one line to print."""
    want_dir = typed.endswith("/") and typed.rstrip("/") != ""
    path = os.path.abspath(typed)
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        lst = None
    except OSError as e:
        raise StoreError(f"{typed}: {e.strerror}") from None

    if lst is not None and stat.S_ISLNK(lst.st_mode):
        try:
            target = os.stat(path)
        except OSError:
            target = None
        if target is not None and stat.S_ISBLK(target.st_mode) and _only_root_could_place(path):
            path = os.path.realpath(path)
            lst = os.lstat(path)
        else:
            raise StoreError(f"{typed}: is a symbolic link; give the backing store's own path")

    if want_dir:
        if lst is None:
            raise StoreError(f"{typed}: no such directory (a trailing slash names a directory that must exist)")
        if not stat.S_ISDIR(lst.st_mode):
            raise StoreError(f"{typed}: not a directory")
    # Where it really is: /tmp/d/sda with /tmp/d -> /dev is under /dev too.
    real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    if (_under_dev(path) or _under_dev(real)) and (lst is None or not stat.S_ISBLK(lst.st_mode)):
        what = "no such block device" if lst is None else "not a block device"
        raise StoreError(f"{typed}: {what} (a backing store under /dev must be an existing block device)")

    try:
        if lst is not None and stat.S_ISDIR(lst.st_mode):
            return _in_directory(typed, path)
        if lst is not None and stat.S_ISBLK(lst.st_mode):
            fd = os.open(path, os.O_RDWR | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC)
            _same_as_checked(fd, lst, typed)
            return OpenedStore(fd, -1, "", False, False)
        if lst is not None and not stat.S_ISREG(lst.st_mode):
            raise StoreError(f"{typed}: not a regular file, directory or block device")
        return _regular(typed, path, lst)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise StoreError(f"{typed}: device is in use (mounted or held): {e.strerror}") from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise StoreError(f"{typed}: backing store not writable: {e.strerror}") from None
        if e.errno == errno.ELOOP:
            raise StoreError(f"{typed}: is a symbolic link; give the backing store's own path") from None
        if e.errno == errno.EEXIST:
            raise StoreError(f"{typed}: appeared while being created; not touched") from None
        raise StoreError(f"{typed}: {e.strerror}") from None


def _same_as_checked(fd: int, lst: os.stat_result, typed: str) -> None:
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (lst.st_dev, lst.st_ino):
        os.close(fd)
        raise StoreError(f"{typed}: changed while being opened; not touched")


def _regular(typed: str, path: str, lst: os.stat_result | None) -> OpenedStore:
    parent, name = os.path.split(path)
    dirfd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if lst is None:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
            return OpenedStore(fd, dirfd, name, True, False)
        if lst.st_uid != os.geteuid():
            raise StoreError(f"{typed}: owned by uid {lst.st_uid}, not by you; refusing to overwrite another user's file")
        fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        _same_as_checked(fd, lst, typed)
        os.close(dirfd)
        return OpenedStore(fd, -1, "", False, False)
    except BaseException:
        os.close(dirfd)
        raise


def _in_directory(typed: str, path: str) -> OpenedStore:
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            return OpenedStore(fd, -1, "", True, True)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
        for i in range(100):  # a file system without O_TMPFILE: create, then unlink at once
            name = f".fssbs.{os.getpid()}.{i}"
            try:
                fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            except FileExistsError:
                continue
            os.unlink(name, dir_fd=dfd)
            return OpenedStore(fd, -1, "", True, True)
        raise StoreError(f"{typed}: could not make a file in it")
    finally:
        os.close(dfd)


def remove_created(store: OpenedStore) -> None:
    """Undo a file this fssconfig created (the configure failed): only if the name is still that file."""
    if not store.created or store.nameless or store.dirfd < 0:
        return
    try:
        st = os.stat(store.name, dir_fd=store.dirfd, follow_symlinks=False)
        mine = os.fstat(store.fd)
        if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
            os.unlink(store.name, dir_fd=store.dirfd)
    except OSError:
        pass


def unlink_name(store: OpenedStore, typed: str) -> None:
    """-x after a successful configure: the store keeps no name."""
    if store.dirfd >= 0:
        remove_created(store)
        return
    path = os.path.abspath(typed)
    parent, name = os.path.split(path)
    try:
        st = os.lstat(path)
        mine = os.fstat(store.fd)
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
            os.unlink(path)
    except OSError:
        pass


def close(store: OpenedStore) -> None:
    for fd in (store.fd, store.dirfd):
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
