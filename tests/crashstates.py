"""Power-loss crash states: record the ordered writes and syncs files receive, then build
what a disk could hold after power failed at any point (issue 11, "How it is checked").

Recorder patches os.pwrite / os.pwritev / os.fdatasync / os.fsync (and makes
copy_file_range fall back to pread/pwrite) for the descriptors it tracks, so the
real copy-on-write code runs unchanged over real files while every write and sync
is logged in the order it was issued (the write is made under the log's lock).

crash_state(): everything a completed sync of that file covered is kept; every
other write issued before the cut is kept or dropped sector by sector at random
(a 512-byte sector is the unit a disk writes atomically), in issue order. Nothing
issued after the cut is kept.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from dataclasses import dataclass

SECTOR = 512


@dataclass
class Event:
    kind: str  # "write" | "sync"
    file: str
    offset: int = 0
    data: bytes = b""
    dsync: bool = False  # RWF_DSYNC: this write alone is durable when it returns


class Recorder:
    def __init__(self, files: dict[int, str], skip_sync: frozenset[str] = frozenset()):
        """files: fd -> name. skip_sync: names whose fsync/fdatasync become no-ops (switched off)."""
        self.files = files
        self.skip_sync = skip_sync
        self.events: list[Event] = []
        self.lock = threading.Lock()
        self._saved: dict[str, object] = {}

    def __enter__(self) -> "Recorder":
        real = {n: getattr(os, n) for n in ("pwrite", "pwritev", "fdatasync", "fsync", "copy_file_range")}
        self._saved = real
        files, lock, events = self.files, self.lock, self.events

        def pwrite(fd, data, offset):
            if fd not in files:
                return real["pwrite"](fd, data, offset)
            with lock:
                n = real["pwrite"](fd, data, offset)
                events.append(Event("write", files[fd], offset, bytes(memoryview(data)[:n])))
                return n

        def pwritev(fd, buffers, offset, flags=0):
            if fd not in files:
                return real["pwritev"](fd, buffers, offset, flags)
            with lock:
                n = real["pwritev"](fd, buffers, offset, flags)
                data = b"".join(bytes(b) for b in buffers)[:n]
                events.append(Event("write", files[fd], offset, data, bool(flags & getattr(os, "RWF_DSYNC", 0))))
                return n

        def syncer(name):
            def sync(fd):
                if fd not in files:
                    return real[name](fd)
                if files[fd] in self.skip_sync:
                    return None
                with lock:
                    real[name](fd)
                    events.append(Event("sync", files[fd]))

            return sync

        def copy_file_range(src, dst, count, offset_src=None, offset_dst=None):
            if src in files or dst in files:
                raise OSError(errno.EXDEV, "recorded: use pread/pwrite")
            return real["copy_file_range"](src, dst, count, offset_src, offset_dst)

        os.pwrite, os.pwritev, os.copy_file_range = pwrite, pwritev, copy_file_range
        os.fdatasync, os.fsync = syncer("fdatasync"), syncer("fsync")
        return self

    def __exit__(self, *exc) -> None:
        for n, f in self._saved.items():
            setattr(os, n, f)


def _apply(img: bytearray, offset: int, data: bytes) -> None:
    end = offset + len(data)
    if end > len(img):
        img.extend(bytes(end - len(img)))
    img[offset:end] = data


def crash_state(events: list[Event], base: dict[str, bytes], cut: int, rng: random.Random, keep: float = 0.5) -> dict[str, bytearray]:
    last_sync: dict[str, int] = {}
    for i in range(cut):
        if events[i].kind == "sync":
            last_sync[events[i].file] = i
    imgs = {name: bytearray(b) for name, b in base.items()}
    for i in range(cut):
        ev = events[i]
        if ev.kind != "write":
            continue
        img = imgs[ev.file]
        if ev.dsync or i < last_sync.get(ev.file, -1):
            _apply(img, ev.offset, ev.data)
            continue
        pos, end = ev.offset, ev.offset + len(ev.data)
        while pos < end:  # sector by sector
            stop = min((pos // SECTOR + 1) * SECTOR, end)
            if rng.random() < keep:
                _apply(img, pos, ev.data[pos - ev.offset : stop - ev.offset])
            pos = stop
    return imgs


def cuts(events: list[Event], n: int, rng: random.Random) -> list[int]:
    """n cut points spread over the whole log, plus one right before/after each sync."""
    total = len(events)
    points = {rng.randrange(total + 1) for _ in range(n)}
    for i, ev in enumerate(events):
        if ev.kind == "sync" and len(points) < 2 * n:
            points.update((i, i + 1))
    return sorted(points)
