"""The snapshot worker's dirty bitmaps (workers/dirtybitmaps.py) and how real clients see them.

Generation maps are written here by hand in a track directory, as the volume
worker leaves them; nbdinfo and qemu-img then read the union through the serving
loop (workers/nbdserve.py) exactly as they would from a snapshot export.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import threading

import pytest
from fsshelp import run
from nbdwire import Raw, info_data, meta_data, req

from ipc import nbd, trackmap
from workers.dirtybitmaps import DirtyBitmaps

G = trackmap.GRANULE
SIZE = 64 * G + 4096  # a partial last granule
LIN = "0123456789abcdef0123456789abcdef"


def write_map(d, gen: int, dirty: set[int], size: int = SIZE) -> None:
    m = bytearray(trackmap.map_len(size))
    for i in dirty:
        m[i] = 1
    (d / trackmap.map_name(gen)).write_bytes(bytes(m))


@pytest.fixture
def track(tmp_path):
    """Generations 2..5 on disk: 2 {0,1}, 3 {10}, 4 {}, 5 {64 (the partial last granule), 11}."""
    for g, dirty in {2: {0, 1}, 3: {10}, 4: set(), 5: {64, 11}}.items():
        write_map(tmp_path, g, dirty)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield tmp_path, fd
    os.close(fd)


def dirty_granules(b: DirtyBitmaps, base: str) -> set[int]:
    out, pos = set(), 0
    for n, flags in b.extents(base, 0, SIZE):
        if flags & nbd.STATE_DIRTY:
            out |= set(range(pos // G, -(-(pos + n) // G)))
        pos += n
    assert pos == SIZE
    return out


def test_the_union_of_the_later_generations(track):
    d, fd = track
    b = DirtyBitmaps(fd, LIN, 5, [1, 2, 3, 4], SIZE)
    assert b.names() == [f"{LIN}-{m}" for m in (1, 2, 3, 4)]
    assert dirty_granules(b, f"{LIN}-1") == {0, 1, 10, 11, 64}
    assert dirty_granules(b, f"{LIN}-2") == {10, 11, 64}  # m's own map is not in it
    assert dirty_granules(b, f"{LIN}-4") == {11, 64}
    # The last extent ends at the volume's end, not the granule's.
    assert b.extents(f"{LIN}-4", 64 * G, 1 << 20) == [(4096, nbd.STATE_DIRTY)]


def test_only_bases_whose_maps_are_all_there_are_offered(track):
    d, fd = track
    os.unlink(d / trackmap.map_name(2))
    b = DirtyBitmaps(fd, LIN, 5, [1, 2, 3, 5, 7, 0], SIZE)  # n itself and later ones never
    assert b.names() == [f"{LIN}-2", f"{LIN}-3"]


@pytest.mark.parametrize("how", ["symlink", "wrong size", "directory"])
def test_a_map_that_is_not_a_regular_file_of_the_right_size_is_not_offered(track, how):
    d, fd = track
    p = d / trackmap.map_name(3)
    p.unlink()
    if how == "symlink":
        p.symlink_to(d / trackmap.map_name(2))  # O_NOFOLLOW: never followed
    elif how == "wrong size":
        p.write_bytes(b"\x01" * 3)
    else:
        p.mkdir()
    b = DirtyBitmaps(fd, LIN, 5, [2, 3], SIZE)
    assert b.names() == [f"{LIN}-3"]


def test_a_map_gone_after_the_offer_is_an_error_not_a_guess(track):
    d, fd = track
    b = DirtyBitmaps(fd, LIN, 5, [2, 3], SIZE)
    assert b.names() == [f"{LIN}-2", f"{LIN}-3"]
    (d / trackmap.map_name(4)).unlink()
    (d / trackmap.map_name(4)).symlink_to(d / trackmap.map_name(2))
    with pytest.raises(OSError) as e:
        b.extents(f"{LIN}-2", 0, SIZE)
    assert e.value.errno == errno.EIO and "gen-4.map" in e.value.strerror and "full backup" in e.value.strerror


def test_once_computed_a_union_is_kept_bounded(track):
    d, fd = track
    ml = trackmap.map_len(SIZE)
    b = DirtyBitmaps(fd, LIN, 5, [1, 2, 3, 4], SIZE, cache_bytes=2 * ml)
    assert dirty_granules(b, f"{LIN}-3") == {11, 64}
    (d / trackmap.map_name(5)).unlink()  # still answered from the cache
    assert dirty_granules(b, f"{LIN}-3") == {11, 64}
    assert b.names() == [f"{LIN}-3"]
    for m in (1, 2):  # gen-5 is gone: these fail and cache nothing
        with pytest.raises(OSError):
            b.extents(f"{LIN}-{m}", 0, SIZE)
    write_map(d, 5, {64, 11})
    for m in (1, 2, 4):
        b.extents(f"{LIN}-{m}", 0, SIZE)
    assert len(b._cache) == 2  # never more than the budget


def test_any_nonzero_byte_counts_as_written(track):
    d, fd = track
    m = bytearray(trackmap.map_len(SIZE))
    m[20] = 0x80
    (d / trackmap.map_name(4)).write_bytes(bytes(m))
    assert dirty_granules(DirtyBitmaps(fd, LIN, 5, [3], SIZE), f"{LIN}-3") == {11, 20, 64}


@pytest.mark.parametrize("name", [f"{LIN}-9", f"{'f' * 32}-2", "nonsense", f"{LIN}-5"])
def test_names_not_offered_are_refused(track, name):
    _, fd = track
    with pytest.raises(OSError) as e:
        DirtyBitmaps(fd, LIN, 5, [2], SIZE).extents(name, 0, SIZE)
    assert e.value.errno == errno.EINVAL


def test_untracked_offers_nothing(track):
    _, fd = track
    assert DirtyBitmaps(fd, "", 5, [2], SIZE).names() == []
    assert DirtyBitmaps(-1, LIN, 5, [2], SIZE).names() == []


# -- through the serving loop, with real clients ---------------------------------------------


class Backend:
    """A read-only export of zeros with the track directory's bitmaps (what workers.snapshot wires up)."""

    read_only = True

    def __init__(self, bitmaps: DirtyBitmaps):
        self.size = SIZE
        self.bitmaps = bitmaps

    def read(self, offset, length):
        return bytes(length)

    def read_into(self, view, offset):
        view[:] = bytes(len(view))

    def sendfile_source(self, offset, length):
        return None

    def extents(self, offset, length):
        return [(min(length, SIZE - offset), nbd.STATE_HOLE | nbd.STATE_ZERO)]

    def dirty_bitmaps(self):
        return self.bitmaps.names()

    def dirty_extents(self, name, offset, length):
        return self.bitmaps.extents(name, offset, length)


@pytest.fixture
def served(track, tmp_path):
    from workers.nbdserve import Server

    d, fd = track
    path = str(tmp_path / "fss1.sock")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(8)
    srv = Server(lst, nbd.Export("fss1", SIZE, True), Backend(DirtyBitmaps(fd, LIN, 5, [1, 2, 3], SIZE)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield path, d
    finally:
        srv.stop()
        t.join(10)
        lst.close()


def test_nbdinfo_lists_the_contexts_and_maps_the_bitmap(served):
    path, _ = served
    uri = f"nbd+unix:///fss1?socket={path}"
    info = json.loads(run("nbdinfo", "--json", uri).stdout)
    (exp,) = info["exports"]
    assert exp["contexts"] == ["base:allocation"] + [f"qemu:dirty-bitmap:{LIN}-{m}" for m in (1, 2, 3)]
    got = json.loads(run("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{LIN}-2", uri).stdout)
    assert [(e["offset"], e["length"], e["type"]) for e in got] == [
        (0, 10 * G, 0), (10 * G, 2 * G, 1), (12 * G, 52 * G, 0), (64 * G, 4096, 1)
    ]


def test_qemu_img_map_with_x_dirty_bitmap(served):
    path, _ = served
    p = run("qemu-img", "map", "--output=json", "--image-opts",
            f"driver=nbd,server.type=unix,server.path={path},export=fss1,x-dirty-bitmap=qemu:dirty-bitmap:{LIN}-3")
    # x-dirty-bitmap reads the bitmap as if it were base:allocation: dirty (bit 0) shows as a hole.
    dirty = [(e["start"], e["length"]) for e in json.loads(p.stdout) if not e["data"]]
    assert dirty == [(11 * G, G), (64 * G, 4096)]


def test_block_status_answers_every_selected_context_in_one_reply(served):
    path, _ = served
    c = Raw(path)
    try:
        c.hello()
        c.option(nbd.OPT_STRUCTURED_REPLY)
        c.structured = True
        r = c.option(nbd.OPT_SET_META_CONTEXT, meta_data("fss1", nbd.BASE_ALLOCATION, f"qemu:dirty-bitmap:{LIN}-1", f"qemu:dirty-bitmap:{LIN}-3"))
        ids = {p[4:].decode(): int.from_bytes(p[:4], "big") for t, p in r if t == nbd.REP_META_CONTEXT}
        assert len(ids) == 3
        c.option(nbd.OPT_GO, info_data("fss1"))
        c.send(req(nbd.CMD_BLOCK_STATUS, 5, 0, 12 * G, nbd.CMD_FLAG_REQ_ONE))
        chunks = {}
        while True:
            magic, flags, typ, cookie, n = struct.unpack(">IHHQI", c.recv(20))
            assert (magic, typ, cookie) == (nbd.STRUCTURED_REPLY_MAGIC, nbd.REPLY_TYPE_BLOCK_STATUS, 5)
            p = c.recv(n)
            chunks[int.from_bytes(p[:4], "big")] = [tuple(int.from_bytes(p[i:i + 4], "big") for i in (j, j + 4)) for j in range(4, n, 8)]
            if flags & nbd.REPLY_FLAG_DONE:
                break
        assert chunks == {
            ids[nbd.BASE_ALLOCATION]: [(12 * G, 3)],
            ids[f"qemu:dirty-bitmap:{LIN}-1"]: [(2 * G, 1)],
            ids[f"qemu:dirty-bitmap:{LIN}-3"]: [(11 * G, 0)],
        }
    finally:
        c.close()


def test_a_base_whose_map_went_meanwhile_answers_an_error(served):
    path, d = served
    c = Raw(path)
    try:
        c.hello()
        c.option(nbd.OPT_STRUCTURED_REPLY)
        c.structured = True
        r = c.option(nbd.OPT_SET_META_CONTEXT, meta_data("fss1", f"qemu:dirty-bitmap:{LIN}-1"))
        assert [t for t, _ in r] == [nbd.REP_META_CONTEXT, nbd.REP_ACK]
        c.option(nbd.OPT_GO, info_data("fss1"))
        (d / trackmap.map_name(2)).unlink()  # pruned before the first question
        c.send(req(nbd.CMD_BLOCK_STATUS, 6, 0, G))
        err, _ = c.reply(6)
        assert err == nbd.EIO
        assert c.pread(7, 0, 4096) == bytes(4096)  # the connection goes on
        r = Raw(path)
        r.hello()
        r.option(nbd.OPT_STRUCTURED_REPLY)
        got = r.option(nbd.OPT_LIST_META_CONTEXT, meta_data("fss1", "qemu:"))
        assert [p[4:].decode() for t, p in got if t == nbd.REP_META_CONTEXT] == [f"qemu:dirty-bitmap:{LIN}-2", f"qemu:dirty-bitmap:{LIN}-3"]
        r.close()
    finally:
        c.close()


def test_malformed_meta_options_and_requests_change_nothing(served):
    path, _ = served
    name = f"qemu:dirty-bitmap:{LIN}-1".encode()
    c = Raw(path)
    try:
        c.hello()
        c.option(nbd.OPT_STRUCTURED_REPLY)
        c.structured = True
        ok = c.option(nbd.OPT_SET_META_CONTEXT, meta_data("fss1", name.decode()))
        assert [t for t, _ in ok] == [nbd.REP_META_CONTEXT, nbd.REP_ACK]
        bad = [
            struct.pack(">I", 4) + b"fss1" + struct.pack(">I", 0xFFFFFFFF),  # more queries than bytes
            struct.pack(">I", 4) + b"fss1" + struct.pack(">II", 1, 1 << 20) + name,  # query longer than the option
            struct.pack(">I", 4) + b"fss1" + struct.pack(">II", 1, len(name) + 1) + name + b"\xff",  # not UTF-8
        ]
        for data in bad:
            for code in (nbd.OPT_LIST_META_CONTEXT, nbd.OPT_SET_META_CONTEXT):
                assert [t for t, _ in c.option(code, data)] == [nbd.REP_ERR_INVALID]
        # The failed SET cleared the selection: select again, then ask wrong questions.
        c.option(nbd.OPT_SET_META_CONTEXT, meta_data("fss1", name.decode()))
        c.option(nbd.OPT_GO, info_data("fss1"))
        for cookie, offset, length, flags in [(1, 0, 0, 0), (2, SIZE, 1, 0), (3, 0, SIZE + 1, 0), (4, 0, 4096, 1 << 7)]:
            c.send(req(nbd.CMD_BLOCK_STATUS, cookie, offset, length, flags))
            assert c.reply(cookie)[0] == nbd.EINVAL
        c.send(req(nbd.CMD_BLOCK_STATUS, 9, 0, SIZE))
        err, payload = c.reply(9)
        assert err == 0 and struct.unpack(">11I", payload) == (2, 2 * G, 1, 8 * G, 0, 2 * G, 1, 52 * G, 0, 4096, 1)
    finally:
        c.close()
