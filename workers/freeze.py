"""FIFREEZE / FITHAW on the configured mounts, never anything else, never /.

FIFREEZE is not released when the process holding it dies, so every path
that freezes has a path that thaws: freeze_all thaws what it froze when a
later mount fails, thaw_all is what the supervisor calls when the broker dies
while frozen, and workers.suspend (the snapshot suspend) thaws on its own
when its supervisor goes away. The *_fd forms act on a directory already
opened and checked, so nothing is resolved by path again between the check
and the freeze.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import NamedTuple

FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)

# File systems with a freeze_fs / freeze_super operation. Others (tmpfs, vfat,
# nfs, overlay ...) answer FIFREEZE with EOPNOTSUPP; CHECK refuses them up front.
FREEZABLE = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "reiserfs",
                       "gfs2", "nilfs2", "ocfs2", "bcachefs"})


class FreezeError(Exception):
    def __init__(self, mount: str, reason: str):
        super().__init__(f"{mount}: {reason}")
        self.mount = mount
        self.reason = reason


class AlreadyFrozen(FreezeError):
    """FIFREEZE said EBUSY: someone else holds this file system frozen; not ours to hold or thaw."""


def _refuse_root(mount: str) -> None:
    if os.path.realpath(mount) == "/":
        raise FreezeError(mount, "refusing to freeze / (nothing could thaw it)")


def open_mount(mount: str) -> int:
    return os.open(mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def freeze_fd(fd: int, mount: str) -> None:
    """FIFREEZE the file system of an open directory; never the root file system's."""
    if os.fstat(fd).st_dev == os.stat("/").st_dev:
        raise FreezeError(mount, "refusing to freeze / (nothing could thaw it)")
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise AlreadyFrozen(mount, "FIFREEZE failed: already frozen") from None
        raise FreezeError(mount, f"FIFREEZE failed: {os.strerror(e.errno or 0)}") from None


def thaw_fd(fd: int, mount: str) -> bool:
    """FITHAW; True if it was frozen, False if not (EINVAL). Raises FreezeError otherwise."""
    try:
        fcntl.ioctl(fd, FITHAW, 0)
        return True
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise FreezeError(mount, f"FITHAW failed: {os.strerror(e.errno or 0)}") from None


def freeze_one(mount: str) -> None:
    _refuse_root(mount)
    fd = open_mount(mount)
    try:
        freeze_fd(fd, mount)
    finally:
        os.close(fd)


def thaw_one(mount: str) -> bool:
    """FITHAW; True if it was frozen, False if not (EINVAL). Raises FreezeError otherwise."""
    fd = open_mount(mount)
    try:
        return thaw_fd(fd, mount)
    finally:
        os.close(fd)


def freeze_all(mounts: list[str]) -> list[str]:
    """Freeze in order; on a failure thaw what was frozen (reverse order) and raise."""
    for m in mounts:
        _refuse_root(m)
    frozen: list[str] = []
    try:
        for m in mounts:
            freeze_one(m)
            frozen.append(m)
    except BaseException:
        thaw_all(list(reversed(frozen)))
        raise
    return frozen


def thaw_all(mounts: list[str]) -> list[FreezeError]:
    """Best effort: FITHAW every mount, keep going on errors, return them. Never raises."""
    errors: list[FreezeError] = []
    for m in mounts:
        try:
            thaw_one(m)
        except FreezeError as e:
            errors.append(e)
        except OSError as e:  # open failed (mount gone)
            errors.append(FreezeError(m, f"cannot open: {e.strerror}"))
    return errors


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1 : i + 4]) == 3 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


class Mount(NamedTuple):
    point: str
    dev: int  # st_dev of the file system (major:minor of field 3), as os.stat gives it
    fstype: str
    source: str
    mount_opts: frozenset[str]  # this mount's (a bind mount may be ro on a rw file system)
    super_opts: frozenset[str]  # the file system's


def mounts(path: str = "/proc/self/mountinfo") -> list[Mount]:
    """Every mount in mountinfo order (a later entry for the same point is on top)."""
    out: list[Mount] = []
    with open(path) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(fields) < 6 or len(rfields) < 1:
                continue
            major, _, minor = fields[2].partition(":")
            try:
                dev = os.makedev(int(major), int(minor))
            except ValueError:
                continue
            out.append(Mount(
                _unescape(fields[4]), dev, rfields[0], _unescape(rfields[1]) if len(rfields) > 1 else "",
                frozenset(fields[5].split(",")), frozenset(rfields[2].split(",")) if len(rfields) > 2 else frozenset(),
            ))
    return out


def mountinfo(path: str = "/proc/self/mountinfo") -> dict[str, tuple[str, set[str]]]:
    """mount point -> (fs type, mount options); the last entry for a point wins (it is on top)."""
    return {m.point: (m.fstype, set(m.mount_opts | m.super_opts)) for m in mounts(path)}


def check_freezable(mount: str, table: dict[str, tuple[str, set[str]]] | None = None) -> str | None:
    """None if FIFREEZE can work on this mount, else the reason it cannot."""
    if os.path.realpath(mount) == "/":
        return f"{mount}: fssd never freezes /"
    if not os.path.ismount(mount):
        return f"{mount}: not a mount point"
    table = table if table is not None else mountinfo()
    entry = table.get(os.path.realpath(mount))
    if entry is None:
        return f"{mount}: not in /proc/self/mountinfo"
    fstype, opts = entry
    if "ro" in opts:
        return f"{mount}: mounted read-only"
    if fstype not in FREEZABLE:
        return f"{mount}: file system type {fstype} cannot be frozen"
    return None
