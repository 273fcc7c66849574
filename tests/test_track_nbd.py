"""Changed blocks served the standard way, end to end: real clients against a live fssd.

Writes (WRITE, TRIM, WRITE_ZEROES, through qemu-io) between snapshots fss0 (M) and
fss1 (N) of one volume; `nbdinfo --map=qemu:dirty-bitmap:<id of M>`, `qemu-img map`
with `x-dirty-bitmap` and `fssconfig --changes fss1 --since <id> --json` must all
report exactly the granules written (no fewer: a missed one is a corrupt backup),
and the base stays answerable after fss0 is unconfigured.
"""

from __future__ import annotations

import json
import socket
import tempfile
from pathlib import Path

import pytest
from fsshelp import Fssd, run, running

from ipc import trackmap

MiB = 1 << 20
G = trackmap.GRANULE
SIZE = 64 * MiB

# Between M and N: (qemu-io command, the granules it touches).
WRITES = [
    ("write -P 0x11 0 4096", {0}),
    ("write -P 0x22 1048576 200000", set(range(16, 20))),
    ("write -P 0x33 8388607 2", {127, 128}),  # straddles a granule boundary
    ("discard 16777216 131072", {256, 257}),
    ("write -z 33554432 65536", {512}),
    ("write -P 0x44 67076096 32768", {1023}),  # the last granule
]


def changed_granules() -> set[int]:
    out: set[int] = set()
    for _, g in WRITES:
        out |= g
    return out


def as_ranges(granules: set[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for g in sorted(granules):
        if out and out[-1][0] + out[-1][1] == g * G:
            out[-1] = (out[-1][0], out[-1][1] + G)
        else:
            out.append((g * G, G))
    return [(o, min(n, SIZE - o)) for o, n in out]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    shm = Path(tempfile.mkdtemp(prefix="fssd-test-tracknbd-", dir="/dev/shm"))
    f = Fssd(tmp_path_factory.mktemp("tracknbd") / "i0", [{"name": "data", "path": str(shm / "data.img"), "size": "64M"}])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        f.port = s.getsockname()[1]
    # A plain-TCP front too: remote clients must see the same contexts (TLS changes nothing here).
    f.config.write_text(f.config.read_text() + f'\n[[listen]]\naddress = "127.0.0.1:{f.port}"\ntls = "off"\n'
                        'allow = [{ client = "127.0.0.1", exports = ["fss*"] }]\n')
    with running(f, shm):
        qemu_io(f.uri("data"), "write -P 0x5a 0 8M")
        f.fssconfig("fss0", "data", str(shm / "bs0"))
        qemu_io(f.uri("data"), *(c for c, _ in WRITES))
        f.fssconfig("fss1", "data", str(shm / "bs1"))
        f.base = snapshot_id(f, "fss0")
        f.shm = shm
        yield f


def qemu_io(uri: str, *cmds: str) -> None:
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    p = run(*argv, uri)
    assert "failed" not in p.stdout + p.stderr, p.stdout + p.stderr


def snapshot_id(f: Fssd, dev: str) -> str:
    (s,) = [s for s in json.loads(f.fssconfig("-l", "--json").stdout) if s.get("device") == dev]
    assert trackmap.parse_id(s["id"]) is not None, s
    return s["id"]


def nbdinfo_dirty(f: Fssd, export: str, base: str) -> list[tuple[int, int]]:
    got = json.loads(run("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{base}", f.uri(export)).stdout)
    assert sum(e["length"] for e in got) == SIZE
    out: list[tuple[int, int]] = []
    for e in got:
        if e["type"] & 1:
            if out and sum(out[-1]) == e["offset"]:
                out[-1] = (out[-1][0], out[-1][1] + e["length"])
            else:
                out.append((e["offset"], e["length"]))
    return out


def qemu_img_dirty(f: Fssd, export: str, base: str) -> list[tuple[int, int]]:
    p = run("qemu-img", "map", "--output=json", "--image-opts",
            f"driver=nbd,server.type=unix,server.path={f.sock(export)},export={export},x-dirty-bitmap=qemu:dirty-bitmap:{base}")
    # x-dirty-bitmap: qemu reads bit 0 (dirty) where base:allocation has "hole": dirty = "data": false.
    return [(e["start"], e["length"]) for e in json.loads(p.stdout) if not e["data"]]


def fssconfig_changes(f: Fssd, export: str, base: str) -> list[tuple[int, int]]:
    return [(c["offset"], c["length"]) for c in json.loads(f.fssconfig("--changes", export, "--since", base, "--json").stdout)]


def test_nbdinfo_lists_the_base_as_a_meta_context(srv):
    info = json.loads(run("nbdinfo", "--json", srv.uri("fss1")).stdout)
    (exp,) = info["exports"]
    assert exp["contexts"] == ["base:allocation", f"qemu:dirty-bitmap:{srv.base}"]
    # The listing form (what `nbdinfo --list --content` prints per export) shows them too.
    listed = json.loads(run("nbdinfo", "--list", "--content", "--json", srv.uri("fss1")).stdout)["exports"]
    assert [e["contexts"] for e in listed] == [["base:allocation", f"qemu:dirty-bitmap:{srv.base}"]]
    # fss0 is the oldest: nothing to compare it with.
    (exp0,) = json.loads(run("nbdinfo", "--json", srv.uri("fss0")).stdout)["exports"]
    assert exp0["contexts"] == ["base:allocation"]


def test_three_clients_agree_on_exactly_the_granules_written(srv):
    want = as_ranges(changed_granules())
    assert nbdinfo_dirty(srv, "fss1", srv.base) == want
    assert qemu_img_dirty(srv, "fss1", srv.base) == want
    assert fssconfig_changes(srv, "fss1", srv.base) == want


def test_the_changed_extents_cover_every_difference(srv):
    """Compare full reads of M and N granule by granule: nothing differs outside the report."""
    a = run("nbdcopy", srv.uri("fss0"), "-", text=False).stdout
    b = run("nbdcopy", srv.uri("fss1"), "-", text=False).stdout
    differ = {i // G for i in range(0, SIZE, G) if a[i:i + G] != b[i:i + G]}
    assert differ <= changed_granules()
    assert differ  # the writes did change something


def test_a_base_stays_answerable_after_it_is_unconfigured(srv):
    srv.fssconfig("-u", "fss0")
    try:
        want = as_ranges(changed_granules())
        assert nbdinfo_dirty(srv, "fss1", srv.base) == want
        # A snapshot taken later answers since the unconfigured base too (nothing written since fss1).
        srv.fssconfig("fss2", "data", str(srv.shm / "bs2"))
        info = json.loads(run("nbdinfo", "--json", srv.uri("fss2")).stdout)["exports"][0]
        id1 = snapshot_id(srv, "fss1")
        assert f"qemu:dirty-bitmap:{srv.base}" in info["contexts"] and f"qemu:dirty-bitmap:{id1}" in info["contexts"]
        assert nbdinfo_dirty(srv, "fss2", srv.base) == want
        assert nbdinfo_dirty(srv, "fss2", id1) == []
    finally:
        srv.fssconfig("-u", "fss2", check=False)


def test_an_unknown_base_is_not_a_context(srv):
    other = "f" * 32 + "-1"
    p = run("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{other}", srv.uri("fss1"), check=False)
    assert p.returncode != 0


def test_one_request_answers_both_contexts_from_the_worker(srv):
    import struct

    from nbdwire import Raw, info_data, meta_data, req

    from ipc import nbd

    c = Raw(srv.sock("fss1"))
    try:
        c.hello()
        c.option(nbd.OPT_STRUCTURED_REPLY)
        c.structured = True
        r = c.option(nbd.OPT_SET_META_CONTEXT, meta_data("fss1", nbd.BASE_ALLOCATION, f"qemu:dirty-bitmap:{srv.base}", "qemu:"))
        ids = {p[4:].decode(): struct.unpack_from(">I", p)[0] for t, p in r if t == nbd.REP_META_CONTEXT}
        assert set(ids) == {nbd.BASE_ALLOCATION, f"qemu:dirty-bitmap:{srv.base}"}  # "qemu:" selects nothing
        assert c.option(nbd.OPT_GO, info_data("fss1"))[-1][0] == nbd.REP_ACK

        def status(cookie: int, offset: int, length: int, flags: int = 0) -> dict[int, list[tuple[int, int]]]:
            c.send(req(nbd.CMD_BLOCK_STATUS, cookie, offset, length, flags))
            chunks = {}
            while True:
                magic, fl, typ, ck, n = struct.unpack(">IHHQI", c.recv(20))
                assert (magic, typ, ck) == (nbd.STRUCTURED_REPLY_MAGIC, nbd.REPLY_TYPE_BLOCK_STATUS, cookie), typ
                p = c.recv(n)
                v = struct.unpack(f">{n // 4}I", p)
                chunks[v[0]] = list(zip(v[1::2], v[2::2]))
                if fl & nbd.REPLY_FLAG_DONE:
                    return chunks

        dirty = ids[f"qemu:dirty-bitmap:{srv.base}"]
        got = status(1, 0, 3 * G, nbd.CMD_FLAG_REQ_ONE)
        assert got[dirty] == [(G, 1)] and len(got[ids[nbd.BASE_ALLOCATION]]) == 1
        got = status(2, 16 * G + 4096, 8 * G)  # unaligned start: granules 16-19 dirty, then clean
        assert got[dirty] == [(4 * G - 4096, 1), (4 * G + 4096, 0)]  # cut at the request's end
        c.send(req(nbd.CMD_BLOCK_STATUS, 3, SIZE - 4096, 8192))  # past the end
        assert c.reply(3)[0] == nbd.EINVAL
    finally:
        c.close()


def test_the_tcp_front_offers_the_same_contexts(srv):
    uri = f"nbd://127.0.0.1:{srv.port}/fss1"
    (exp,) = json.loads(run("nbdinfo", "--json", uri).stdout)["exports"]
    assert exp["contexts"] == ["base:allocation", f"qemu:dirty-bitmap:{srv.base}"]
    got = json.loads(run("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{srv.base}", uri).stdout)
    dirty = [(e["offset"], e["length"]) for e in got if e["type"] & 1]
    assert merged(dirty) == as_ranges(changed_granules())
    # Both contexts at once through the relay: qemu-img's x-dirty-bitmap over TCP.
    p = run("qemu-img", "map", "--output=json", "--image-opts",
            f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={srv.port},export=fss1,"
            f"x-dirty-bitmap=qemu:dirty-bitmap:{srv.base}")
    assert [(e["start"], e["length"]) for e in json.loads(p.stdout) if not e["data"]] == as_ranges(changed_granules())


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for o, n in ranges:
        if out and sum(out[-1]) == o:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((o, n))
    return out


def test_a_snapshot_unconfigured_on_close_survives_the_fronts_questions(srv):
    """nbdinfo lists the meta contexts (the front asks the worker) and then opens the export:
    the worker must never see its client count drop to 0 in between, or `-c` unconfigures it."""
    from fsshelp import wait_for

    srv.fssconfig("-c", "fss3", "data", str(srv.shm / "bs3"))
    try:
        (exp,) = json.loads(run("nbdinfo", "--json", f"nbd://127.0.0.1:{srv.port}/fss3").stdout)["exports"]
        assert exp["contexts"][0] == "base:allocation" and len(exp["contexts"]) >= 2
        # After the client is gone, -c does its job.
        wait_for(lambda: "not in use" in srv.fssconfig("-l", "fss3").stdout, 15, "fss3 unconfigured on close")
    finally:
        srv.fssconfig("-u", "fss3", check=False)
