"""Changed-block tracking: the per-generation change maps and the questions asked of them (no I/O).

A tracked volume has a lineage (a random UUID) and a generation counter. The
writes made after snapshot generation g-1's barrier and before generation g's
barrier are recorded in generation g's map: one byte per granule (0 clean,
1 written). One byte, never one bit, per granule: a store of one byte is
independent of its neighbours, so threads and processes marking neighbouring
granules at once never lose each other's mark (a bit would need a
read-modify-write). A snapshot taken at a barrier gets the generation whose map
was collecting writes; the barrier swaps in the next map, already created, so
it costs O(1) whatever the volume size.

The clusters changed between snapshot M (generation m) and a later snapshot N
(generation n) of the same lineage are the union of the maps m+1 .. n.

Each map file holds three parts: the exact map, bytes [0, map_len) (all that
readers read); then a coarse section, one byte per COARSE region (16 MiB, 256 granules),
set and synced under durability "power" before the first write to anything in
the region, so the exact bytes themselves need no sync on the write path; then
one seal byte, set (and synced) once the exact map is complete and on disk. A
map left unsealed by a host crash under "power" is expanded at the next start:
every granule of a marked coarse region counts as written (over-reported inside
regions actually written, never missed).

A snapshot's id is `<lineage uuid, 32 hex digits>-<generation>`: no spaces, so
it is a valid part of an NBD meta-context name (`qemu:dirty-bitmap:<id>`).
"""

from __future__ import annotations

import re

GRANULE = 64 << 10  # bytes per tracked granule (qemu's default dirty-bitmap granularity)
GRANULE_SHIFT = 16

COARSE = 16 << 20  # bytes per coarse region: one durable mark (one fdatasync) per region per generation (measured: 1/4/16 MiB)
COARSE_SHIFT = 24
SEALED = 1

_ID = re.compile(r"^([0-9a-f]{32})-([1-9][0-9]{0,9})$")


def map_len(volume_size: int, granule: int = GRANULE) -> int:
    """Bytes in one generation's map: one per granule, the last one partial."""
    return max(1, -(-volume_size // granule))


def coarse_len(volume_size: int) -> int:
    """Bytes in the coarse section: one per COARSE region."""
    return max(1, -(-volume_size // COARSE))


def seal_offset(volume_size: int) -> int:
    """Where the seal byte is: after the exact map and the coarse section."""
    return map_len(volume_size) + coarse_len(volume_size)


def file_len(volume_size: int) -> int:
    """The whole map file: exact map, coarse section, seal byte."""
    return seal_offset(volume_size) + 1


def sealed(raw: bytes, volume_size: int) -> bool:
    """Is this whole map file sealed (its exact map complete and durable)?"""
    off = seal_offset(volume_size)
    return len(raw) > off and raw[off] == SEALED


def expand(raw: bytes, volume_size: int) -> bytes:
    """The exact map of this whole map file with every granule of each marked coarse region
    set: what is known written after a host crash left it unsealed. Any nonzero byte counts."""
    n = map_len(volume_size)
    per = COARSE >> GRANULE_SHIFT
    exact = bytearray(raw[:n].ljust(n, b"\x00"))
    coarse = raw[n : n + coarse_len(volume_size)]
    for c, b in enumerate(coarse):
        if b:
            lo = c * per
            hi = min(n, lo + per)
            exact[lo:hi] = b"\x01" * (hi - lo)
    return bytes(exact)


def map_name(gen: int) -> str:
    return f"gen-{gen}.map"


def format_id(lineage: str, gen: int) -> str:
    return f"{lineage}-{gen}"


def parse_id(text: str) -> tuple[str, int] | None:
    """(lineage, generation) of a snapshot id, or None if it is not one."""
    m = _ID.match(text)
    return (m.group(1), int(m.group(2))) if m else None


def union(maps: list) -> bytes:
    """The granules written in any of these generations' maps (equal lengths), as 0/1 bytes."""
    if not maps:
        raise ValueError("no generations to join")
    n = len(maps[0])
    acc = 0
    for m in maps:
        if len(m) != n:
            raise ValueError("generation maps of different lengths")
        acc |= int.from_bytes(m, "little")
    # Each byte is 0 or 1, so OR-ing the maps as big integers ORs them byte by byte.
    return acc.to_bytes(n, "little")


def extents(changed: bytes, offset: int, length: int, volume_size: int, granule: int = GRANULE) -> list[tuple[int, bool]]:
    """The range [offset, offset+length) as runs (length in bytes, changed?), in order,
    the first starting at offset, the last ending at min(offset+length, volume_size).
    A granule counts as changed as a whole (rounding: reported, never missed)."""
    end = min(offset + length, volume_size)
    out: list[tuple[int, bool]] = []
    pos = offset
    while pos < end:
        g = pos // granule
        state = changed[g] != 0
        # The next granule in the other state, found in C (bytes.find), not by a Python loop.
        if state:
            nxt = changed.find(b"\x00", g + 1)
        else:
            nxt = _find_nonzero(changed, g + 1)
        stop = end if nxt < 0 else min(end, nxt * granule)
        out.append((stop - pos, state))
        pos = stop
    return out


def _find_nonzero(buf: bytes, start: int) -> int:
    """Index of the first nonzero byte at or after start, or -1 (maps hold only 0 and 1)."""
    return buf.find(b"\x01", start)


def changed_ranges(changed: bytes, volume_size: int, granule: int = GRANULE) -> list[tuple[int, int]]:
    """Every changed run as (offset, length) in bytes, for `fssconfig --changes`."""
    out = []
    pos = 0
    for n, state in extents(changed, 0, volume_size, volume_size, granule):
        if state:
            out.append((pos, n))
        pos += n
    return out
