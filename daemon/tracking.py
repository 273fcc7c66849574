"""Changed-block tracking, the supervisor's half: lineages, generation maps, restart rules, queries.

Per tracked volume, `<statedir>/track/<volume>/` (0700, root's) holds `lineage.json` (written
atomically) and one sparse `gen-<g>.map` per generation still kept (ipc/trackmap.py: one byte
per 64 KiB granule). The volume worker marks the current generation's map; each snapshot's
barrier swaps in the next one, which is created here beforehand, so the snapshot gets the
generation whose map was collecting writes and its id is `<lineage>-<gen>`.

Every write made between the barriers of snapshot generations m < n lies in some map with a
generation in m+1..n, whatever crashed in between: the worker only ever writes into a map
whose generation is above every one handed out, and a generation counts as handed out only
once its barrier happened. A barrier whose outcome is unknown (worker killed) still moves the
current generation on: the generation in between is then one no snapshot has, which a union
simply includes. Start-up continues after the highest map on disk, so a barrier that was
never recorded is covered the same way.

Restart rules (docs/architecture.md "Change tracking"): the lineage is kept after a clean stop
(the volume's stat unchanged), after any crash under "power" (each new mark was synced before
its volume write), and after a process crash in the same boot under "process"; otherwise, or
if the volume's identity or size changed, a new lineage starts and the old one is retired
with the reason, so that a base from it is refused saying why.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
import uuid

import msgspec

from daemon.statedir import FileIdentity, VolumeStamp, identity, volume_stamp, write_atomic
from ipc import trackmap

log = logging.getLogger("supervisor")

TRACKDIR = "track"
LINEAGE = "lineage.json"
DEFAULT_GENERATIONS = 64
RETIRED_KEPT = 8
LINEAGE_MAX = 1 << 20
_MAP = re.compile(r"^gen-([1-9][0-9]{0,9})\.map$")


class Handed(msgspec.Struct, frozen=True, array_like=True):
    gen: int
    created_ns: int


class Retired(msgspec.Struct, frozen=True):
    lineage: str
    reason: str
    at_ns: int


class Lineage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """lineage.json: one volume's change history."""

    uuid: str
    granule: int
    volume_size: int
    volume_id: FileIdentity
    durability: str
    boot_id: str
    clean: bool = False
    volume_at_stop: VolumeStamp | None = None
    current: int = 1  # the generation whose map collects writes now
    handed: list[Handed] = []  # generations given to snapshots (their ids), oldest first
    oldest_base: int = 0  # the oldest generation still answerable as a base
    retired: list[Retired] = []  # the last few lineages given up, newest last, and why


class TrackError(Exception):
    """One line for the client, with an errno."""

    def __init__(self, errno_: int, message: str):
        super().__init__(message)
        self.errno = errno_


def _new_lineage() -> str:
    return uuid.uuid4().hex


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


def restart_reason(old: Lineage, size: int, ident: FileIdentity, stamp: VolumeStamp | None, boot_id: str) -> str:
    """Why `old` can't go on after this start ("" = it can). Pure."""
    if old.granule != trackmap.GRANULE:
        return f"the granule changed ({old.granule} -> {trackmap.GRANULE} bytes)"
    if old.volume_id != ident:
        return "the volume image was replaced by another file"
    if old.volume_size != size:
        return f"the volume changed size ({old.volume_size} -> {size} bytes)"
    if old.clean:
        at = old.volume_at_stop
        if ident.kind == "file" and at is not None and stamp is not None and at != stamp:
            return "the volume was modified while fssd was not running"
        return ""
    if old.durability == "power":
        return ""
    if old.durability == "process":
        if old.boot_id == boot_id:
            return ""
        return 'host restarted without a clean stop under durability = "process"'
    return f'fssd did not stop cleanly under durability = "{old.durability}"'


class VolumeTrack:
    """One tracked volume's change history: owns its track directory and the current map's fd."""

    def __init__(self, volume: str, path: str, dir_fd: int, state: Lineage, keep: int):
        self.volume = volume
        self.path = path  # <statedir>/track/<volume>
        self.dir_fd = dir_fd  # O_RDONLY|O_DIRECTORY, kept open; inherited by snapshot workers
        self.state = state
        self.keep = keep  # [daemon] track_generations
        self.cur_fd = -1  # the current generation's map, read-write (the volume worker's)
        self._lock = threading.Lock()  # one writer of lineage.json at a time (threads of the supervisor)

    # -- files -----------------------------------------------------------------------------

    def _save(self) -> None:
        write_atomic(self.path, LINEAGE, msgspec.json.encode(self.state))

    def _map_gens(self) -> list[int]:
        out = []
        for name in os.listdir(self.dir_fd):
            m = _MAP.match(name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def _create_map(self, gen: int) -> int:
        """gen-<g>.map, sparse, 0600, all clear, durable with its directory entry; read-write fd."""
        name = trackmap.map_name(gen)
        try:
            os.unlink(name, dir_fd=self.dir_fd)
        except FileNotFoundError:
            pass
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.dir_fd)
        try:
            os.ftruncate(fd, trackmap.file_len(self.state.volume_size))
            os.fsync(fd)
            os.fsync(self.dir_fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_map(self, gen: int) -> int:
        return os.open(trackmap.map_name(gen), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)

    def _remove_maps(self, below: int | None = None) -> None:
        for g in self._map_gens():
            if below is None or g < below:
                try:
                    os.unlink(trackmap.map_name(g), dir_fd=self.dir_fd)
                except FileNotFoundError:
                    pass

    # -- start and stop ----------------------------------------------------------------------

    def start(self, size: int, ident: FileIdentity, stamp: VolumeStamp | None, durability: str, boot_id: str,
              reason: str) -> None:
        """Before the volume is served: go on with the lineage, or (reason) retire it and begin anew.
        Then record this run as not (yet) stopped cleanly."""
        st = self.state
        if reason:
            retired = [*st.retired, Retired(st.uuid, reason, time.time_ns())][-RETIRED_KEPT:]
            self._remove_maps()
            st = Lineage(_new_lineage(), trackmap.GRANULE, size, ident, durability, boot_id, retired=retired)
            log.warning("volume %s: change tracking starts a new history %s: %s; the next backup of each snapshot must be full",
                        self.volume, st.uuid, reason)
        gens = self._map_gens()
        # A barrier that happened but was never recorded left a map above the current one:
        # writes may be in it, so go on after it (the generation in between has no snapshot).
        current = max([st.current, *gens])
        if not reason and not st.clean:
            # A host crash under "power" may have lost exact marks never synced: their coarse
            # marks were (before any volume write they cover). After a process crash the page
            # cache kept them all.
            self._recover(gens, current, expand=st.durability == "power" and st.boot_id != boot_id)
        self.state = msgspec.structs.replace(st, durability=durability, boot_id=boot_id, clean=False, volume_at_stop=None,
                                             current=current)
        if current in gens:
            self.cur_fd = self._open_map(current)
            if os.fstat(self.cur_fd).st_size < trackmap.file_len(size):
                os.ftruncate(self.cur_fd, trackmap.file_len(size))
        else:
            self.cur_fd = self._create_map(current)
        self._save()

    def _recover(self, gens: list[int], current: int, expand: bool) -> None:
        """After an unclean stop, before the volume is served: every unsealed map on disk, and
        sealed unless it is the current one (still to be written). `expand`: a host crash
        under "power" left it unsealed, so every granule of each coarse region marked in it
        counts as written (ipc/trackmap.py): reported, never missed."""
        size = self.state.volume_size
        n = trackmap.map_len(size)
        for g in gens:
            try:
                fd = self._open_map(g)
            except FileNotFoundError:
                continue
            try:
                if self._sealed(fd):
                    continue
                if expand:
                    raw = os.pread(fd, trackmap.file_len(size), 0)
                    wide = trackmap.expand(raw, size)
                    added = raw[:n].count(0) - wide.count(0)
                    if added > 0:
                        os.pwrite(fd, wide, 0)
                        log.warning("volume %s: generation %d was open at a host crash under durability = \"power\": "
                                    "its changes are reported per %d MiB region (%d granules added)",
                                    self.volume, g, trackmap.COARSE >> 20, added)
                self._seal(fd, g != current)
            finally:
                os.close(fd)

    def _sealed(self, fd: int) -> bool:
        off = trackmap.seal_offset(self.state.volume_size)
        return os.pread(fd, 1, off) == bytes([trackmap.SEALED])

    def _seal(self, fd: int, seal: bool) -> None:
        """The map's exact marks on disk, then (seal) its seal byte too."""
        os.fsync(fd)
        if seal:
            os.pwrite(fd, bytes([trackmap.SEALED]), trackmap.seal_offset(self.state.volume_size))
            os.fsync(fd)

    def stop_clean(self, volume_path: str) -> None:
        """After the volume worker stopped: every map on disk (sealed but the current one) and
        the volume, then "clean"."""
        for g in self._map_gens():
            try:
                fd = self._open_map(g)
            except FileNotFoundError:
                continue
            try:
                self._seal(fd, g != self.state.current and not self._sealed(fd))
            finally:
                os.close(fd)
        fd = os.open(volume_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            os.fsync(fd)
            st = os.fstat(fd)
            stamp = volume_stamp(st)
            if stat.S_ISBLK(st.st_mode):
                stamp = msgspec.structs.replace(stamp, size=os.lseek(fd, 0, os.SEEK_END))
        finally:
            os.close(fd)
        self.state = msgspec.structs.replace(self.state, clean=True, volume_at_stop=stamp)
        with self._lock:
            self._save()

    def close(self) -> None:
        for fd in (self.cur_fd, self.dir_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.cur_fd = self.dir_fd = -1

    # -- the barrier ---------------------------------------------------------------------------

    def prepare(self) -> tuple[int, int]:
        """Before a barrier: the next generation's map, created. (generation, read-write fd)."""
        gen = max([self.state.current, *self._map_gens()]) + 1
        return gen, self._create_map(gen)

    def advanced(self, gen: int, fd: int, created_ns: int) -> str:
        """The barrier swapped the worker to `gen`: the snapshot gets the generation before it.
        Returns the snapshot's id. In memory only, at once (a worker restarted from now on gets
        the new map); persist() then writes it down, before the snapshot's own record."""
        st = self.state
        taken = st.current
        old_fd, self.cur_fd = self.cur_fd, fd
        if old_fd >= 0:
            os.close(old_fd)
        oldest_base = max(st.oldest_base, self._oldest_map(gen) - 1)
        handed = [h for h in st.handed if h.gen >= oldest_base] + [Handed(taken, created_ns)]
        self.state = msgspec.structs.replace(st, current=gen, handed=handed, oldest_base=oldest_base)
        return trackmap.format_id(st.uuid, taken)

    def _oldest_map(self, current: int) -> int:
        return max(1, current - self.keep + 1)

    def abandoned(self, gen: int, fd: int) -> None:
        """The worker refused the barrier before swapping (or it was never asked): the prepared map goes."""
        os.close(fd)
        try:
            os.unlink(trackmap.map_name(gen), dir_fd=self.dir_fd)
        except FileNotFoundError:
            pass

    def unknown(self, gen: int, fd: int) -> None:
        """No answer to the barrier (the worker was killed): it may have swapped. The restarted
        worker writes into `gen`; the generation before it is handed to no snapshot. In memory;
        persist() writes it down."""
        old_fd, self.cur_fd = self.cur_fd, fd
        if old_fd >= 0:
            os.close(old_fd)
        self.state = msgspec.structs.replace(self.state, current=gen)

    def persist(self) -> None:
        """lineage.json as the state is now, then the maps retention no longer keeps. Blocking."""
        with self._lock:
            st = self.state
            self._save()
            # Maps no answerable base needs (never the current one: the worker marks it).
            self._remove_maps(below=min(st.current, max(self._oldest_map(st.current), st.oldest_base + 1)))

    def retire_now(self, reason: str) -> None:
        """At run time (a mark could not be made durable): every base so far is refused. The
        generations go on; the new history's first snapshot is the next one taken (no base can
        reach past it, so what the worker's current map lost does not matter). In memory;
        persist() writes it down."""
        st = self.state
        retired = [*st.retired, Retired(st.uuid, reason, time.time_ns())][-RETIRED_KEPT:]
        self.state = msgspec.structs.replace(st, uuid=_new_lineage(), retired=retired, handed=[], oldest_base=st.current)
        log.error("volume %s: change tracking starts a new history %s: %s; the next backup of each snapshot must be full",
                  self.volume, self.state.uuid, reason)

    # -- questions --------------------------------------------------------------------------------

    def bases(self, lineage: str, gen: int) -> list[int]:
        """The handed-out generations m < gen whose maps m+1..gen all still exist."""
        st = self.state
        if lineage != st.uuid:
            return []
        return [h.gen for h in st.handed if st.oldest_base <= h.gen < gen]

    def check_base(self, since: str, lineage: str, gen: int, other_volume) -> tuple[int, int]:
        """(m, n) to union m+1..n for the target (lineage, gen) and the base id `since`, or
        TrackError saying why not. `other_volume(lineage)` names another volume's lineage."""
        import errno

        st = self.state
        parsed = trackmap.parse_id(since)
        if parsed is None:
            if re.fullmatch(r"[0-9a-f]{32}", since):
                raise TrackError(errno.EINVAL, f"{since} is the id of a snapshot of an untracked volume: it has no change history")
            raise TrackError(errno.EINVAL, f"{since!r} is not a snapshot id (<lineage>-<generation>, as fssconfig -l -v shows)")
        m_lin, m = parsed
        if lineage != st.uuid:
            raise TrackError(errno.ESTALE, self._retired_text(lineage, "this snapshot's change history"))
        if m_lin != st.uuid:
            if any(r.lineage == m_lin for r in st.retired):
                raise TrackError(errno.ESTALE, self._retired_text(m_lin, since))
            other = other_volume(m_lin)
            if other:
                raise TrackError(errno.EXDEV, f"{since} is a snapshot of volume {other}, not of {self.volume}")
            raise TrackError(errno.ENOENT, f"{since} is not a snapshot of volume {self.volume} (unknown change history)")
        if m >= gen:
            raise TrackError(errno.EINVAL, f"{since} is not earlier than the snapshot (generation {gen})")
        if m < st.oldest_base:
            raise TrackError(errno.ESTALE, f"{since} is older than the change history kept ([daemon] track_generations = {self.keep}); "
                             "the next backup must be full")
        if not any(h.gen == m for h in st.handed):
            raise TrackError(errno.ENOENT, f"no snapshot {since} was taken of volume {self.volume}")
        return m, gen

    def _retired_text(self, lineage: str, what: str) -> str:
        for r in reversed(self.state.retired):
            if r.lineage == lineage:
                return f"{what} was discarded on {_when(r.at_ns)}: {r.reason}; the next backup must be full"
        return f"{what} belongs to a change history of volume {self.volume} no longer kept; the next backup must be full"

    def changed(self, m: int, n: int) -> list[tuple[int, int]]:
        """(offset, length) in bytes of every granule written between m's and n's barriers.
        Reads maps m+1..n (blocking: run it off the event loop)."""
        import errno

        maps = []
        size = self.state.volume_size
        for g in range(m + 1, n + 1):
            try:
                fd = os.open(trackmap.map_name(g), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
            except FileNotFoundError:
                raise TrackError(errno.ESTALE, f"the change map of generation {g} is no longer kept; the next backup must be full") from None
            try:
                raw = os.pread(fd, trackmap.map_len(size), 0)
            finally:
                os.close(fd)
            if len(raw) != trackmap.map_len(size) or raw.translate(None, b"\x00\x01"):
                # Never read as "nothing changed": only 0s and 1s, the whole length.
                raise TrackError(errno.EIO, f"the change map of generation {g} is damaged; the next backup must be full")
            maps.append(raw)
        return trackmap.changed_ranges(trackmap.union(maps), size)


def open_track(statedir: str, volume: str, volume_path: str, size: int, durability: str, boot_id: str,
               keep: int = DEFAULT_GENERATIONS) -> VolumeTrack:
    """Start-up (or a volume added by a reload): the volume's change history, the restart rules
    applied, ready to hand the volume worker its current map. Blocking (small files, fsyncs)."""
    top = os.path.join(statedir, TRACKDIR)
    path = os.path.join(top, volume)
    for p in (top, path):
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(p)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise OSError(f"{p} must be a directory owned by uid {os.geteuid()} with mode 0700")
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        vst = os.stat(volume_path)
        ident = identity(vst)
        stamp = msgspec.structs.replace(volume_stamp(vst), size=size)
        old, why = _load(dir_fd, path)
        if old is None:
            state = Lineage(_new_lineage(), trackmap.GRANULE, size, ident, durability, boot_id)
            reason = ""
            if why:
                log.warning("volume %s: %s; change tracking starts a new history", volume, why)
                state = msgspec.structs.replace(state, retired=[Retired("", why, time.time_ns())])
            # Maps of a history whose record is gone can't be trusted.
            tr = VolumeTrack(volume, path, dir_fd, state, keep)
            tr._remove_maps()
        else:
            reason = restart_reason(old, size, ident, stamp, boot_id)
            tr = VolumeTrack(volume, path, dir_fd, old, keep)
        tr.start(size, ident, stamp, durability, boot_id, reason)
        return tr
    except BaseException:
        os.close(dir_fd)
        raise


def _load(dir_fd: int, path: str) -> tuple[Lineage | None, str]:
    try:
        fd = os.open(LINEAGE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None, ""
    try:
        raw = os.read(fd, LINEAGE_MAX + 1)
    finally:
        os.close(fd)
    try:
        if len(raw) > LINEAGE_MAX:
            raise ValueError("too large")
        return msgspec.json.decode(raw, type=Lineage), ""
    except (ValueError, msgspec.DecodeError) as e:
        return None, f"{os.path.join(path, LINEAGE)} is not readable ({e})"
