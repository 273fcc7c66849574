"""Which mounted file systems live on a volume's export, proven from the kernel's own tables.

A volume's users reach it only through its NBD export, so a file system on it
is mounted from a block device that leads back to the export socket:

* a loop device (or a partition of one) whose backing file is on a FUSE
  mount served by an `nbdfuse` process connected to `nbd+unix:///VOLUME?socket=SOCK`;
* an nbd device whose connecting process (`/sys/block/nbdN/pid`: nbd-client,
  qemu-nbd) names SOCK and export VOLUME on its command line.

The loop's backing file is identified by device number (LOOP_GET_STATUS64),
never by path, and only the kernel's tables and /proc are read: nothing here
touches the FUSE file system, which could hang. Anything that does not lead
back to this volume's socket is not claimed. `depends_on` answers the
reverse question for the deadlock check: which devices a file's storage
passes through (a store on a loop over a file on a frozen file system would
stall the copy-on-write as surely as a store on the frozen one).
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from urllib.parse import parse_qs, unquote, urlsplit

from workers.freeze import Mount

LOOP_MAJOR = 7
NBD_MAJOR = 43
LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")  # struct loop_info64


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _whole_disk(dev: int, sysfs: str) -> int:
    """The disk a partition belongs to (loop0p1 -> loop0); the device itself otherwise."""
    base = f"{sysfs}/dev/block/{os.major(dev)}:{os.minor(dev)}"
    if os.path.exists(f"{base}/partition"):
        parent = _read(os.path.join(os.path.realpath(base), "..", "dev"))
        if parent and ":" in parent:
            ma, mi = parent.split(":")
            return os.makedev(int(ma), int(mi))
    return dev


def _devnode(dev: int, sysfs: str) -> str | None:
    for line in (_read(f"{sysfs}/dev/block/{os.major(dev)}:{os.minor(dev)}/uevent") or "").splitlines():
        if line.startswith("DEVNAME="):
            node = "/dev/" + line[8:]
            try:
                st = os.stat(node)
            except OSError:
                return None
            return node if stat.S_ISBLK(st.st_mode) and st.st_rdev == dev else None
    return None


def loop_backing(dev: int, sysfs: str = "/sys") -> tuple[int, int] | None:
    """(st_dev, st_ino) of a loop device's backing file, from the loop driver itself."""
    if os.major(dev) != LOOP_MAJOR:
        return None
    node = _devnode(dev, sysfs)
    if node is None:
        return None
    try:
        fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        buf = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_LOOP_INFO64.size))
    except OSError:
        return None  # ENXIO: not bound
    finally:
        os.close(fd)
    lo_device, lo_inode = _LOOP_INFO64.unpack(buf)[:2]
    return lo_device, lo_inode


def depends_on(dev: int, sysfs: str = "/sys", depth: int = 8) -> set[int]:
    """The devices storage on `dev` passes through: itself, a partition's disk, a loop's backing file system ..."""
    seen: set[int] = set()
    while dev not in seen and depth > 0:
        seen.add(dev)
        disk = _whole_disk(dev, sysfs)
        seen.add(disk)
        backing = loop_backing(disk, sysfs)
        if backing is None:
            break
        dev, depth = backing[0], depth - 1
    return seen


def _args(pid: int, proc: str) -> tuple[list[str], str] | None:
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="surrogateescape") for a in f.read().split(b"\0") if a]
        cwd = os.readlink(f"{proc}/{pid}/cwd")
    except OSError:
        return None
    return argv, cwd


def _names_export(argv: list[str], volume: str, sock: str) -> bool:
    """An nbd+unix URI for this export and socket, or the socket and `-N/-name VOLUME` as separate arguments."""
    real_sock = os.path.realpath(sock)
    sock_given = name_given = False
    for i, a in enumerate(argv):
        if a.startswith(("nbd+unix://", "nbds+unix://")):
            u = urlsplit(a)
            socks = parse_qs(u.query).get("socket", [])
            if unquote(u.path).lstrip("/") == volume and socks and os.path.realpath(socks[0]) == real_sock:
                return True
        elif os.path.isabs(a) and os.path.realpath(a) == real_sock:
            sock_given = True
        elif a in ("-N", "-name", "--name") and i + 1 < len(argv) and argv[i + 1] == volume:
            name_given = True
    return sock_given and name_given


def _nbdfuse_serving(fuse_point: str, volume: str, sock: str, proc: str) -> int | None:
    """The pid of an nbdfuse process mounted at `fuse_point` on this export, if there is one."""
    try:
        pids = [int(p) for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            if os.path.basename(os.readlink(f"{proc}/{pid}/exe")) != "nbdfuse":
                continue
        except OSError:
            continue
        got = _args(pid, proc)
        if got is None:
            continue
        argv, cwd = got
        # nbdfuse [-r] MOUNTPOINT[/FILENAME] URI: the mount point (or a file in it) is an argument.
        paths = [os.path.normpath(os.path.join(cwd, a)) for a in argv[1:] if not a.startswith("-") and "://" not in a]
        at_point = any(p == fuse_point or os.path.dirname(p) == fuse_point for p in paths)
        if at_point and _names_export(argv[1:], volume, sock):
            return pid
    return None


def claim(m: Mount, table: list[Mount], volume: str, sock: str, proc: str = "/proc", sysfs: str = "/sys") -> str | None:
    """How `m`'s device is proven to be this volume's export, or None."""
    disk = _whole_disk(m.dev, sysfs)
    if os.major(disk) == LOOP_MAJOR:
        backing = loop_backing(disk, sysfs)
        if backing is None:
            return None
        fuse = [f for f in table if f.dev == backing[0] and f.fstype in ("fuse", "fuse.nbdfuse")]
        for f in fuse:
            pid = _nbdfuse_serving(f.point, volume, sock, proc)
            if pid is not None:
                return f"{m.source} is a loop over nbdfuse {f.point} (pid {pid}) of export {volume}"
        return None
    if os.major(disk) == NBD_MAJOR:
        pid = _read(f"{sysfs}/dev/block/{os.major(disk)}:{os.minor(disk)}/pid")
        if pid and pid.isdigit():
            got = _args(int(pid), proc)
            if got and _names_export(got[0][1:], volume, sock):
                return f"{m.source} is an nbd device connected to export {volume} (pid {pid})"
    return None


def volume_mounts(table: list[Mount], volume: str, sock: str, proc: str = "/proc", sysfs: str = "/sys") -> list[tuple[Mount, str]]:
    """Every mount whose device is proven to be this volume's export, with the proof."""
    out = []
    for m in table:
        if os.major(m.dev) not in (LOOP_MAJOR, NBD_MAJOR) and not os.path.exists(f"{sysfs}/dev/block/{os.major(m.dev)}:{os.minor(m.dev)}/partition"):
            continue
        how = claim(m, table, volume, sock, proc, sysfs)
        if how:
            out.append((m, how))
    return out
