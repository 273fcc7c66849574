"""The state directory (`[daemon] statedir`, default /var/lib/fssd): what brings snapshots back.

One small file per configured snapshot device, `snapshots/fssN.json`, written
atomically (write a new file, fsync it, rename it over the old one, fsync the
directory), so after any crash it is the old record or the new one, never a
mix. The record says which volume and which store (by path and by identity),
the geometry, the durability level, the boot it was last running in and
whether fssd stopped cleanly since (with the volume's stat at that stop, to
notice a volume written while fssd was not running).
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat

import msgspec

log = logging.getLogger("supervisor")

DEFAULT_STATEDIR = "/var/lib/fssd"
SNAPDIR = "snapshots"
BOOT_ID = "/proc/sys/kernel/random/boot_id"
RECORD_MAX = 64 << 10  # a record is a few hundred bytes: anything larger is not ours


class FileIdentity(msgspec.Struct, frozen=True):
    """What names one file for good: device and inode, and the kind of file."""

    dev: int
    ino: int
    kind: str  # "file" | "block" | "other" (never a volume or store: a stand-in)


class VolumeStamp(msgspec.Struct, frozen=True):
    """The volume image as fssd left it at a clean stop (fsynced first)."""

    size: int
    mtime_ns: int
    ctime_ns: int


class SnapshotRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    device: str
    volume: str
    volume_path: str
    volume_id: FileIdentity
    volume_size: int
    store_path: str  # "" when unlinked (-x)
    store_id: FileIdentity
    cluster_size: int
    limit_clusters: int
    flags: int  # ipc.storeformat FLAG_*
    created_ns: int
    snapshot_id: str
    durability: str  # "process" | "power"
    boot_id: str
    clean: bool = False  # fssd stopped cleanly after this boot's last run
    volume_at_stop: VolumeStamp | None = None
    unconfig_on_close: bool = False
    consistency: str = "crash"
    invalid: str = ""  # why, once it became invalid: it never comes back valid
    made: bool = False  # fssconfig created the store file: unconfiguring removes it
    owner: int = -1  # the uid that asked for it (the removal checks the file is still theirs)
    # A snapshot set (several snapshots of one instant): its id and devices. Its records are
    # written with set_done false, then rewritten true once every member's is on disk.
    set_id: str = ""
    set_members: list[str] = []
    set_done: bool = True


def unfinished_sets(records: list[SnapshotRecord]) -> tuple[list[SnapshotRecord], list[SnapshotRecord]]:
    """(kept, dropped): the records of a snapshot set none of whose records says done belong to
    a configure that fssd stopped in the middle of (fssconfig was never answered), so they are
    dropped, as a single snapshot's store without a record is. One done record is enough: done
    is written only once every member's record is on disk."""
    done = {r.set_id for r in records if r.set_id and r.set_done}
    kept = [r for r in records if not r.set_id or r.set_id in done]
    return kept, [r for r in records if r.set_id and r.set_id not in done]


class StateDirError(Exception):
    """One line: the state directory cannot be used."""


def current_boot_id(path: str = BOOT_ID) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def identity(st: os.stat_result) -> FileIdentity:
    kind = "file" if stat.S_ISREG(st.st_mode) else "block" if stat.S_ISBLK(st.st_mode) else "other"
    return FileIdentity(st.st_dev, st.st_ino, kind)


def volume_stamp(st: os.stat_result) -> VolumeStamp:
    return VolumeStamp(st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def write_atomic(dirpath: str, name: str, data: bytes) -> None:
    """write, fsync, rename, fsync the directory: the old content or the new, never a mix."""
    dfd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        tmp = name + ".new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600, dir_fd=dfd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)
    finally:
        os.close(dfd)


def remove_synced(dirpath: str, name: str) -> None:
    dfd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.unlink(name, dir_fd=dfd)
        except FileNotFoundError:
            return
        os.fsync(dfd)
    finally:
        os.close(dfd)


class StateDir:
    """The snapshot table under one state directory, owned by root, mode 0700."""

    def __init__(self, path: str):
        self.path = path
        self.snapdir = os.path.join(path, SNAPDIR)

    def open(self) -> None:
        """Create (0700) or check: a real directory owned by us and writable by nobody else."""
        for p in (self.path, self.snapdir):
            try:
                os.mkdir(p, 0o700)
            except FileExistsError:
                pass
            except OSError as e:
                raise StateDirError(f"state directory {p}: {e.strerror}") from None
            st = os.lstat(p)
            if not stat.S_ISDIR(st.st_mode):
                raise StateDirError(f"state directory {p} is not a directory")
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                raise StateDirError(f"state directory {p} must be owned by uid {os.geteuid()} and writable by it alone")

    def lock(self, rundir: str) -> int:
        """One instance per state directory: an flock on STATEDIR/lock, held for fssd's life
        (close-on-exec: workers never hold it). Raises StateDirError naming the holder."""
        path = os.path.join(self.path, "lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            raise StateDirError(f"state directory {self.path} is in use by another fssd ({other or 'unknown'}); "
                                "give each instance its own [daemon] statedir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, run directory {rundir}\n".encode(), 0)
        return fd

    def save(self, rec: SnapshotRecord) -> None:
        write_atomic(self.snapdir, rec.device + ".json", msgspec.json.encode(rec))

    def remove(self, device: str) -> None:
        remove_synced(self.snapdir, device + ".json")

    def load(self) -> tuple[list[SnapshotRecord], list[str]]:
        """Every record, and one line for each file that is not a valid record (left alone)."""
        recs: list[SnapshotRecord] = []
        bad: list[str] = []
        try:
            names = sorted(os.listdir(self.snapdir))
        except FileNotFoundError:
            return [], []
        for name in names:
            if name.endswith(".new"):  # a write that never reached its rename
                try:
                    os.unlink(os.path.join(self.snapdir, name))
                except OSError:
                    pass
                continue
            if not name.endswith(".json"):
                continue
            p = os.path.join(self.snapdir, name)
            try:
                fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                try:
                    raw = os.read(fd, RECORD_MAX + 1)
                finally:
                    os.close(fd)
                if len(raw) > RECORD_MAX:
                    raise ValueError("too large")
                rec = msgspec.json.decode(raw, type=SnapshotRecord)
                if rec.device + ".json" != name:
                    raise ValueError(f"names device {rec.device}")
            except (OSError, ValueError, msgspec.DecodeError) as e:
                bad.append(f"{p}: not a snapshot record ({e})")
                continue
            recs.append(rec)
        return recs, bad
