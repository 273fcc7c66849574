"""FIFREEZE / FITHAW on the configured mounts, never anything else, never /.

FIFREEZE is not released when the process holding it dies (the kernel keeps
the freeze; docs/architecture.md), so every path that freezes has a path
that thaws: freeze_all thaws what it froze when a later mount fails, and
thaw_all is what the supervisor calls when the broker dies while frozen.
"""

from __future__ import annotations

import errno
import fcntl
import os

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


def _refuse_root(mount: str) -> None:
    if os.path.realpath(mount) == "/":
        raise FreezeError(mount, "refusing to freeze / (nothing could thaw it)")


def _ioctl(mount: str, request: int) -> None:
    fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, request, 0)
    finally:
        os.close(fd)


def freeze_one(mount: str) -> None:
    _refuse_root(mount)
    try:
        _ioctl(mount, FIFREEZE)
    except OSError as e:
        # EBUSY: frozen already, by someone else; not ours to hold or thaw.
        what = "already frozen" if e.errno == errno.EBUSY else os.strerror(e.errno or 0)
        raise FreezeError(mount, f"FIFREEZE failed: {what}") from None


def thaw_one(mount: str) -> bool:
    """FITHAW; True if it was frozen, False if not (EINVAL). Raises FreezeError otherwise."""
    try:
        _ioctl(mount, FITHAW)
        return True
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise FreezeError(mount, f"FITHAW failed: {os.strerror(e.errno or 0)}") from None


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


def mountinfo(path: str = "/proc/self/mountinfo") -> dict[str, tuple[str, set[str]]]:
    """mount point -> (fs type, mount options); the last entry for a point wins (it is on top)."""
    table: dict[str, tuple[str, set[str]]] = {}
    with open(path) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(fields) < 6 or len(rfields) < 1:
                continue
            opts = set(fields[5].split(","))
            if len(rfields) >= 3:
                opts |= set(rfields[2].split(","))
            table[_unescape(fields[4])] = (rfields[0], opts)
    return table


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
