"""What fssd made on disk, recorded in the run directory, so that a new instance
removes what a killed one left behind: export sockets and backing-store files
fssd created itself for snapshots that died with it.

RUNDIR/fssd.made lists each such path with its device and inode when it was
made. A new instance removes a path only if it is still that very file (same
kind, device and inode): a file a user put there since is never touched, and
nothing that is not in the record is removed. A store given by the user (an
existing file, a block device) is never recorded.
"""

from __future__ import annotations

import logging
import os
import stat

import msgspec

log = logging.getLogger("supervisor")

RECORD = "fssd.made"


class Made(msgspec.Struct, frozen=True):
    path: str
    kind: str  # "socket" | "store"
    dev: int
    ino: int


def _is_kind(st: os.stat_result, kind: str) -> bool:
    return stat.S_ISSOCK(st.st_mode) if kind == "socket" else stat.S_ISREG(st.st_mode)


def _identify(path: str, kind: str, fd: int = -1) -> Made | None:
    """By `fd` when given (the file we hold), else by what `path` names now."""
    try:
        st = os.fstat(fd) if fd >= 0 else os.lstat(path)
    except OSError:
        return None
    return Made(path, kind, st.st_dev, st.st_ino) if _is_kind(st, kind) else None


def save(rundir: str, paths: list[tuple]) -> None:
    """Record (path, kind[, fd]) for what exists now; written whole and renamed into place."""
    made = [m for m in (_identify(*p) for p in paths) if m is not None]
    final = os.path.join(rundir, RECORD)
    tmp = final + ".new"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, msgspec.json.encode(made))
        finally:
            os.close(fd)
        os.rename(tmp, final)
    except OSError as e:
        log.warning("could not record what fssd made in %s: %s", final, e)


def forget(rundir: str) -> None:
    for name in (RECORD, RECORD + ".new"):
        try:
            os.unlink(os.path.join(rundir, name))
        except FileNotFoundError:
            pass


def remove(rundir: str) -> list[str]:
    """A new instance, holding the run directory's lock: remove what the last one left."""
    final = os.path.join(rundir, RECORD)
    try:
        with open(final, "rb") as f:
            made = msgspec.json.decode(f.read(), type=list[Made])
    except FileNotFoundError:
        return []
    except (OSError, msgspec.DecodeError) as e:
        log.warning("ignoring %s: %s", final, e)
        made = []
    removed = []
    for m in made:
        try:
            # Checked and removed through one directory descriptor: a directory swapped
            # between the two steps can't redirect the unlink to another file.
            dfd = os.open(os.path.dirname(m.path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            name = os.path.basename(m.path)
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if not _is_kind(st, m.kind) or (st.st_dev, st.st_ino) != (m.dev, m.ino):
                continue
            os.unlink(name, dir_fd=dfd)
        except FileNotFoundError:
            continue
        except OSError as e:
            log.warning("could not remove %s %s left by a previous instance: %s", m.kind, m.path, e)
            continue
        finally:
            os.close(dfd)
            removed.append(m.path)
            log.warning("removed %s %s left by a previous instance", "backing store" if m.kind == "store" else "socket", m.path)
    forget(rundir)
    return removed
