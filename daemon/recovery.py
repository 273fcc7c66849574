"""Start-up recovery: is a snapshot from the state directory provably its instant? (docs/architecture.md "Durability")

`decide()` is the whole decision, a pure function of what is on disk: the
state record, the store's header, commit record and table, the store's and
the volume's identity now, and the boot id. It answers Intact (with the map
content to load into shared memory) or Invalid (with the reason). It never
writes anything; `gather()` is the I/O that collects its inputs, read-only.

Why each answer is right is argued in docs/architecture.md; in short:
* the store and the volume must be the very files recorded (device + inode,
  size), and the header must be the one written for this snapshot id;
* "process": after a host crash (other boot id, no clean stop) nothing says the
  copies reached the disk before the volume was overwritten: invalid;
* "power": a first-touch volume write is issued only after one fdatasync covered
  the copy and its table entry; so an entry whose copy does not match its crc32
  belongs to a sync that never completed, its live write never happened, and the
  entry is dropped (the volume still holds that cluster's instant). Entries
  below the commit record's watermark were synced and are not re-read;
* after a clean stop the volume's size, mtime and ctime must be as fssd left
  them: otherwise the volume was written while fssd was not running. (A block
  device's node does not change when the device is written: for those this
  is not detectable, and neither is a write made between a crash and the restart.)
"""

from __future__ import annotations

import array
import os
from typing import Callable

import msgspec

from daemon.statedir import FileIdentity, SnapshotRecord, VolumeStamp, identity, volume_stamp
from ipc import storeformat as sf


class StoreFacts(msgspec.Struct, frozen=True):
    identity: FileIdentity | None  # None: missing
    size: int = 0


class VolumeFacts(msgspec.Struct, frozen=True):
    identity: FileIdentity | None
    stamp: VolumeStamp | None = None


class Intact(msgspec.Struct, frozen=True):
    table: bytes  # u32 per volume cluster, as the shared-memory map holds it
    copies: int
    bs_next: int
    dropped: int = 0  # entries of a sync that never completed (power loss), dropped
    verified: int = 0  # copies re-read and checked against their crc32


class Invalid(msgspec.Struct, frozen=True):
    reason: str


HOST_CRASHED = "host crashed while the snapshot was active"


def decide(
    rec: SnapshotRecord,
    header_raw: bytes,
    commit_raw: bytes,
    table_raw: bytes,
    store: StoreFacts,
    volume: VolumeFacts,
    boot_id: str,
    read_store: Callable[[int, int], bytes],
) -> Intact | Invalid:
    if rec.invalid:
        return Invalid(rec.invalid)
    if rec.flags & sf.FLAG_UNLINKED:
        return Invalid("backing store was unlinked (-x), so it could not outlive fssd")
    if store.identity is None:
        return Invalid(f"backing store {rec.store_path} is missing")
    if store.identity != rec.store_id:
        return Invalid(f"backing store {rec.store_path} was replaced by another file")
    if volume.identity is None:
        return Invalid(f"volume image {rec.volume_path} is missing")
    if volume.identity != rec.volume_id:
        return Invalid(f"volume image {rec.volume_path} was replaced by another file")
    try:
        h = sf.decode_header(header_raw)
    except sf.StoreFormatError as e:
        return Invalid(f"backing store header: {e}")
    if h.snapshot_id != rec.snapshot_id:
        return Invalid("backing store belongs to another snapshot")
    if h.flags & sf.FLAG_INVALID:
        return Invalid("the snapshot was already invalid before fssd stopped (see its log)")
    if (h.volume_dev, h.volume_ino, h.volume_size, h.cluster_size) != (rec.volume_id.dev, rec.volume_id.ino, rec.volume_size, rec.cluster_size):
        return Invalid("backing store header does not match the recorded volume or cluster size")
    vstamp = volume.stamp
    if vstamp is not None and vstamp.size != rec.volume_size:
        return Invalid(f"volume changed size while fssd was not running ({rec.volume_size} -> {vstamp.size} bytes)")

    verify = False
    if rec.clean:
        at_stop = rec.volume_at_stop
        if rec.volume_id.kind == "file" and at_stop is not None and vstamp is not None and at_stop != vstamp:
            return Invalid("volume image was written while fssd was not running")
    elif rec.boot_id != boot_id:
        if rec.durability != "power":
            return Invalid(HOST_CRASHED + f' (durability "{rec.durability}")')
        verify = True  # power loss: copies of a sync that never completed may be torn
    # else: a process crash in this boot; the page cache holds every write that was made.

    cs = h.cluster_size
    tcl = h.table_clusters
    if store.size < tcl * cs:
        return Invalid(f"backing store is truncated: {store.size} bytes, the table alone needs {tcl * cs}")
    if len(table_raw) != sf.table_bytes(h.cluster_count):
        return Invalid("backing store table is short")
    watermark = tcl
    if verify:
        try:
            watermark = max(tcl, sf.decode_commit(commit_raw).watermark)
        except sf.StoreFormatError:
            watermark = tcl  # no trustworthy watermark: every copy is checked

    table = array.array("I", bytes(4 * h.cluster_count))
    seen: set[int] = set()
    dropped = verified = 0
    top = tcl
    for c, k, crc in sf.iter_entries(table_raw):
        if c >= h.cluster_count:
            return Invalid("backing store table has an entry past the volume's end")
        n = min(cs, h.volume_size - c * cs)  # the last cluster may be partial
        if k < tcl or (h.limit_clusters and k >= h.limit_clusters):
            return Invalid(f"table entry for cluster {c} names store cluster {k}, outside the store")
        in_doubt = verify and k >= watermark
        if k * cs + n > store.size:
            if in_doubt:  # its sync never completed: the live write never happened
                dropped += 1
                continue
            return Invalid(f"table entry for cluster {c} points past the end of the backing store (truncated?)")
        if k in seen:
            return Invalid(f"two table entries name store cluster {k}")
        if in_doubt:
            verified += 1
            if sf.crc(read_store(k * cs, n)) != crc:
                dropped += 1
                continue
        seen.add(k)
        table[c] = k
        top = max(top, k + 1)
    return Intact(table.tobytes(), len(seen), top, dropped, verified)


# Never following a symlink, never waiting on a FIFO put where a file was: the identity
# check then tells whether it is still the very file fssd had open.
_RO = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


def _facts(path: str, fd: int) -> tuple[os.stat_result, FileIdentity]:
    st = os.fstat(fd)
    return st, identity(st)


def open_store(rec: SnapshotRecord) -> int:
    """The recorded store, read-write (it goes on serving the snapshot), or -1 if it can't be
    opened. Never follows a symlink or waits on a FIFO; decide() then checks it is the very file."""
    if not rec.store_path:
        return -1
    try:
        fd = os.open(rec.store_path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return -1
    os.set_blocking(fd, True)
    return fd


def gather(rec: SnapshotRecord, boot_id: str, store_fd: int) -> Intact | Invalid:
    """Read what decide() needs from the volume (opened read-only here) and the store (the
    descriptor from open_store(), -1 if missing), and decide. Writes nothing."""
    try:
        vfd = os.open(rec.volume_path, _RO)
    except OSError:
        volume = VolumeFacts(None)
    else:
        try:
            st, ident = _facts(rec.volume_path, vfd)
            size = _dev_size(vfd) if ident.kind == "block" else st.st_size
            volume = VolumeFacts(ident, msgspec.structs.replace(volume_stamp(st), size=size))
        finally:
            os.close(vfd)
    if store_fd < 0:
        return decide(rec, b"", b"", b"", StoreFacts(None), volume, boot_id, lambda o, n: b"")
    st, ident = _facts(rec.store_path, store_fd)
    size = _dev_size(store_fd) if ident.kind == "block" else st.st_size
    store = StoreFacts(ident, size)
    if ident != rec.store_id:  # not the file fssd had: read nothing from it
        return decide(rec, b"", b"", b"", store, volume, boot_id, lambda o, n: b"")
    header = os.pread(store_fd, sf.SECTOR, sf.HEADER_OFFSET)
    commit = os.pread(store_fd, sf.SECTOR, sf.COMMIT_OFFSET)
    count = -(-rec.volume_size // rec.cluster_size)
    table = os.pread(store_fd, sf.table_bytes(count), sf.TABLE_OFFSET)
    return decide(rec, header, commit, table, store, volume, boot_id, lambda o, n: os.pread(store_fd, n, o))


def _dev_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)
