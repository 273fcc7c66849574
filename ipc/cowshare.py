"""What the processes serving one volume share for copy-on-write: stripe locks and in-flight reservations.

A volume may be served by several worker processes (`[[volume]] processes`).
They write the same snapshots' maps, so three things must hold across them:

* writers of one cluster are serialised: the stripe locks are open-file-description
  byte-range locks (fcntl F_OFD_SETLKW), one byte per stripe, on this segment. Each
  process opens the segment afresh (its own open file description: OFD locks taken
  through one description do not exclude each other), so threads of one process
  still need their own lock first (workers/cow.py takes a thread lock, then this).
  The kernel drops the locks of a killed process. Measured on this box: lock +
  unlock 2.7 us, against 40-70 us for the copy it guards; taken only when a copy is
  needed. (A futex word in shared memory would need an atomic compare-and-set,
  which Python lacks without a C extension.)
* store clusters are handed out once: ipc/clustermap.py's allocation lock.
* a killed process loses nothing and leaks nothing: every process records the store
  clusters it has reserved and not yet published in its own slot here (written
  under the map's allocation lock, removed once published and counted). A restarted
  process takes its predecessor's slot (the same index) and finds there exactly
  what the dead one had in flight: reconcile() (workers/cow.py) reclaims that, and
  never another live process's reservation.
  Under durability "power" each slot also says, per snapshot, the lowest store
  cluster it has reserved and not yet written: the commit record's watermark is
  the lowest over every process.

Layout (a memfd the supervisor creates per volume, passed to each process):

    offset 0                header: magic "FSSDCOW1", version, process count
    CLIENTS_BASE + 4*i      u32: process i's NBD connections (accept balancing)
    SLOT_BASE + i*SLOT_SIZE slot i: u32 pid, then LOWS u32 "lowest open" per device
                            (NONE: nothing open), then ENTRIES entries of 4 u32:
                            (device + 1 or 0 when free, first store cluster, count,
                            first volume cluster)
    LOCK_BASE + s           stripe s's lock byte (locks only, never data)

No I/O but the segment's own mapping and its locks.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading

MAGIC = b"FSSDCOW1"
VERSION = 1
HEADER = struct.Struct("<8sII")
SLOT_BASE = 4096
CLIENTS_BASE = 64  # within the header page, before SLOT_BASE (MAX_PROCESSES u32s fit)
SLOT_SIZE = 32 * 1024
LOWS = 1023  # devices fss0..fss1022 (the config allows 64)
ENTRY_BASE = 4096  # within a slot
ENTRIES = (SLOT_SIZE - ENTRY_BASE) // 16
RUNS_MAX = 4  # store runs one reservation may take (reclaimed runs, then the end): entries claimed per copy
NONE = 0xFFFFFFFF
LOCK_BASE = 1 << 40  # lock bytes far past the data: a lock range never meets the mapping
MAX_PROCESSES = 256

# struct flock (x86-64 / aarch64): l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = struct.Struct("hhqqi4x")
_F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)


def size_for(processes: int) -> int:
    return SLOT_BASE + processes * SLOT_SIZE


def create(processes: int) -> int:
    """The supervisor's side: a fresh segment for a volume served by `processes` processes.
    Returns the memfd (close-on-exec; passed to the workers explicitly)."""
    if not 1 <= processes <= MAX_PROCESSES:
        raise ValueError(f"processes must be between 1 and {MAX_PROCESSES}")
    fd = os.memfd_create("fssd-cow", os.MFD_CLOEXEC)
    os.ftruncate(fd, size_for(processes))  # sparse: untouched slots cost nothing
    mm = mmap.mmap(fd, size_for(processes))
    HEADER.pack_into(mm, 0, MAGIC, VERSION, processes)
    for p in range(processes):  # nothing open yet in any slot (a zero would hold the watermark at 0)
        off = SLOT_BASE + p * SLOT_SIZE + 4
        mm[off : off + 4 * LOWS] = b"\xff" * (4 * LOWS)
    mm.close()
    return fd


def ofd_lock(fd: int, kind: int, start: int, length: int) -> None:
    """Take (waiting) or drop an OFD byte-range lock; the GIL is released while waiting."""
    fcntl.fcntl(fd, _F_OFD_SETLKW, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))


class CowShare:
    """One process's view: its own open file description (for the locks) and its slot."""

    def __init__(self, inherited_fd: int, index: int):
        # A new open file description of the same memfd: OFD locks then exclude the others.
        self.fd = os.open(f"/proc/self/fd/{inherited_fd}", os.O_RDWR | os.O_CLOEXEC)
        size = os.fstat(self.fd).st_size
        self._mm = mmap.mmap(self.fd, size)
        magic, version, processes = HEADER.unpack_from(self._mm, 0)
        if magic != MAGIC or version != VERSION or not 0 <= index < processes or size < size_for(processes):
            self.close()
            raise ValueError(f"not an fssd copy-on-write segment for process {index} (magic {magic!r}, {processes} processes)")
        self.processes = processes
        self.index = index
        self._u32 = memoryview(self._mm).cast("I")
        self._mine = (SLOT_BASE + index * SLOT_SIZE) // 4
        self._lock = threading.Lock()  # this process's threads, for its free entries
        self._free: list[int] = []
        self._has_room = threading.Condition(self._lock)
        # What a killed predecessor in this slot had in flight, per device: its successor
        # reclaims exactly that (workers/cow.py reconcile()), then takes the slot (reset()).
        # Until then the slot stays as the dead one left it, so the others' watermark still
        # sees its reservations.
        self.predecessor: dict[int, list[tuple[int, int, int]]] = {}
        u = self._u32
        e0 = self._mine + ENTRY_BASE // 4
        for j, tag in enumerate(u[e0 : e0 + 4 * ENTRIES : 4]):
            if tag:
                i = e0 + 4 * j
                self.predecessor.setdefault(tag - 1, []).append((u[i + 1], u[i + 2], u[i + 3]))

    def close(self) -> None:
        try:
            self._u32.release()
        except AttributeError:
            pass
        try:
            self._mm.close()
        except (BufferError, ValueError):
            pass
        os.close(self.fd)

    # -- stripe locks ---------------------------------------------------------------

    def lock_stripes(self, first: int, count: int) -> None:
        ofd_lock(self.fd, fcntl.F_WRLCK, LOCK_BASE + first, count)

    def unlock_stripes(self, first: int, count: int) -> None:
        ofd_lock(self.fd, fcntl.F_UNLCK, LOCK_BASE + first, count)

    # -- this process's slot ----------------------------------------------------------

    def reset(self) -> None:
        """Take the slot, once the predecessor's reservations are reclaimed: its records go,
        this process's start (nothing reserved until then: add() refuses before this)."""
        u = self._u32
        base = self._mine
        u[base] = os.getpid()
        u[base + 1 : base + 1 + LOWS] = memoryview(bytes(b"\xff" * 4 * LOWS)).cast("I")
        e0 = base + ENTRY_BASE // 4
        u[e0 : e0 + 4 * ENTRIES] = memoryview(bytes(16 * ENTRIES)).cast("I")
        with self._lock:
            self._free = list(range(ENTRIES - 1, -1, -1))

    def claim(self, k: int) -> list[int]:
        """k free entries for reservations about to be made, waiting while this process has
        ENTRIES in flight already (called before the allocation lock, never under it: a
        reservation must always be recorded, or another process's reconcile() would take its
        clusters for a killed process's)."""
        with self._lock:
            while len(self._free) < k:
                self._has_room.wait()
            got = self._free[-k:]
            del self._free[-k:]
            return got

    def add(self, slot: int, device: int, first: int, count: int, c0: int) -> int:
        """Record a reservation in a claimed entry (the caller holds the map's allocation lock)."""
        i = self._mine + ENTRY_BASE // 4 + 4 * slot
        u = self._u32
        u[i + 1], u[i + 2], u[i + 3] = first, count, c0
        u[i] = device + 1  # last: a reader that sees the tag sees the rest
        return slot

    def remove(self, slot: int) -> None:
        """The reservation is published and counted (the caller holds the allocation lock), or a
        claimed entry was not needed."""
        self._u32[self._mine + ENTRY_BASE // 4 + 4 * slot] = 0
        with self._lock:
            self._free.append(slot)
            self._has_room.notify_all()

    def in_flight(self, device: int, others_only: bool = True) -> list[tuple[int, int, int]]:
        """(first store cluster, count, first volume cluster) reserved and not yet published by
        the other processes (or all, with others_only=False)."""
        u = self._u32
        tag = device + 1
        out = []
        for p in range(self.processes):
            if others_only and p == self.index:
                continue
            e0 = (SLOT_BASE + p * SLOT_SIZE + ENTRY_BASE) // 4
            tags = u[e0 : e0 + 4 * ENTRIES : 4]
            if tag not in tags:
                continue
            for j, t in enumerate(tags):
                if t == tag:
                    i = e0 + 4 * j
                    out.append((u[i + 1], u[i + 2], u[i + 3]))
        return out

    def set_low(self, device: int, low: int | None) -> None:
        """Under "power": this process's lowest reserved-and-unwritten store cluster (None: none)."""
        self._u32[self._mine + 1 + device] = NONE if low is None else low

    def lowest(self, device: int) -> int:
        """The lowest open reservation over every process (NONE if none)."""
        u = self._u32
        return min(u[(SLOT_BASE + p * SLOT_SIZE) // 4 + 1 + device] for p in range(self.processes))

    # -- accept balancing --------------------------------------------------------------

    def set_clients(self, n: int) -> None:
        """This process now serves `n` connections (Server.on_clients)."""
        self._u32[CLIENTS_BASE // 4 + self.index] = n

    def busier(self) -> bool:
        """Does this process serve more connections than another of the volume's? Then it
        leaves the next one to that other (workers/nbdserve.py, Server.defer_accept)."""
        u = self._u32
        base = CLIENTS_BASE // 4
        mine = u[base + self.index]
        return any(u[base + p] < mine for p in range(self.processes) if p != self.index)

    def pid_of(self, index: int) -> int:
        return self._u32[(SLOT_BASE + index * SLOT_SIZE) // 4]


def device_number(device: str) -> int:
    """fssN -> N, the index of a snapshot's records in a slot."""
    n = int(device[3:]) if device.startswith("fss") and device[3:].isdigit() else -1
    if not 0 <= n < LOWS:
        raise ValueError(f"{device}: not a snapshot device name")
    return n
