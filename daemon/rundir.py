"""The run directory: trusted before use, then given exactly the permission model's modes.

Like sshd's StrictModes: the directory must be root's and writable by nobody
else, and so must every directory above it, except a sticky directory owned
by root (/tmp, /dev/shm). Otherwise fssd refuses to start. Once that holds,
only root can add, remove or swap anything in it, so the names fssd makes
there (the pid file, the control and NBD sockets) cannot be redirected by a
symlink planted between a check and a use: that is what closes the window
between bind() and chown(). The pid file is still opened O_NOFOLLOW.

Modes (README "Permission model"): with [daemon] group the directory is 0750
root:group, the control socket and snapshot exports 0660 root:group; the
volume exports are 0600 root. Without a group everything is root's alone
(0700 / 0600). Modes are set on the directory's own descriptor (fchown,
fchmod); sockets get theirs from the umask in force around bind(), then
lchown for the group.
"""

from __future__ import annotations

import grp
import logging
import os
import socket
import stat
import threading

log = logging.getLogger("supervisor")

_umask_lock = threading.Lock()


class UntrustedRundir(Exception):
    pass


def group_gid(group: str | None) -> int:
    """The [daemon] group's gid, or -1 (no group, or no such group: root only)."""
    if not group:
        return -1
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        log.warning("group %s does not exist; the run directory and sockets are root-only", group)
        return -1


def _trusted_dir(d: str, st: os.stat_result) -> None:
    sticky_root = st.st_mode & stat.S_ISVTX and st.st_uid == 0
    if st.st_uid != 0:
        raise UntrustedRundir(f"{d} is owned by uid {st.st_uid}, not root")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_root:
        raise UntrustedRundir(f"{d} is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'} (mode {stat.S_IMODE(st.st_mode):04o})")


def _check_ancestors(path: str) -> None:
    """Every existing directory above `path`, as written (a symlink among them must be root's:
    it sits in a directory only root can change) and as resolved."""
    for chain in (path, os.path.realpath(path)):
        d = os.path.dirname(chain)
        while True:
            try:
                st = os.lstat(d)
            except FileNotFoundError:
                st = None
            if st is not None:
                if stat.S_ISLNK(st.st_mode):
                    if st.st_uid != 0:
                        raise UntrustedRundir(f"{d} is a symlink owned by uid {st.st_uid}, not root")
                else:
                    _trusted_dir(d, st)
            if d == "/":
                break
            d = os.path.dirname(d)


def _make(real: str) -> None:
    """Create the run directory (0700) and any missing parents (0755, root's), whatever the umask."""
    missing = []
    d = real
    while not os.path.lexists(d):
        missing.append(d)
        d = os.path.dirname(d)
    for m in reversed(missing):
        leaf = m == real
        try:
            os.mkdir(m, 0o700 if leaf else 0o755)
        except FileExistsError:
            continue
        if not leaf:
            os.chmod(m, 0o755)


def trust_rundir(path: str, gid: int = -1) -> None:
    """Check `path` (created if missing), then set its mode and group.

    Raises UntrustedRundir with the reason; fssd prints it and exits."""
    path = os.path.abspath(path)
    try:
        _check_ancestors(path)
        if os.path.islink(path) and os.lstat(path).st_uid != 0:
            raise UntrustedRundir(f"{path} is a symlink owned by uid {os.lstat(path).st_uid}, not root")
        real = os.path.realpath(path)
        _make(real)
        _check_ancestors(real)
        fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except UntrustedRundir:
        raise
    except OSError as e:
        raise UntrustedRundir(f"{path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise UntrustedRundir(f"{real} is owned by uid {st.st_uid}, not root")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UntrustedRundir(f"{real} is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'} (mode {stat.S_IMODE(st.st_mode):04o})")
        os.fchown(fd, -1, gid if gid >= 0 else 0)
        os.fchmod(fd, 0o750 if gid >= 0 else 0o700)
    finally:
        os.close(fd)


def bind_unix(path: str, group_access: bool, gid: int) -> socket.socket:
    """A listening-ready Unix socket at `path` in the trusted run directory: 0660 root:group
    when `group_access` and a group is set, else 0600 root. The mode comes from the umask
    around bind(), so the socket never exists with a wider one."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    shared = group_access and gid >= 0
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _umask_lock:
            old = os.umask(0o117 if shared else 0o177)
            try:
                s.bind(path)
            finally:
                os.umask(old)
        if shared:
            os.chown(path, 0, gid, follow_symlinks=False)
    except BaseException:
        s.close()
        raise
    return s
