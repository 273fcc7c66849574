"""ipc.nbd, sans-IO: the qemu:dirty-bitmap meta contexts next to base:allocation.

LIST_META_CONTEXT and SET_META_CONTEXT as doc/proto.md and qemu's server answer
them (wildcards list, exact names select), and BLOCK_STATUS replies of one chunk
per selected context held to the spec's length rules.
"""

from __future__ import annotations

import struct

import pytest
from nbdwire import info_data, meta_data, opt, req

from ipc import nbd
from ipc.nbd import BadRequest, Export, Ready, Request, ServerConnection

SIZE = 1 << 20
SNAP = Export("fss1", SIZE, True, "a snapshot")
OTHER = Export("fss2", SIZE, True, "another snapshot")
A1 = "0123456789abcdef0123456789abcdef-1"
A2 = "0123456789abcdef0123456789abcdef-2"
DB = nbd.QEMU_DIRTY_BITMAP


def replies(data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        magic, _o, typ, n = struct.unpack_from(">QIII", data, pos)
        assert magic == nbd.OPT_REPLY_MAGIC
        out.append((typ, data[pos + 20 : pos + 20 + n]))
        pos += 20 + n
    return out


def connection(bitmaps=(A1, A2), exports=(SNAP,)) -> ServerConnection:
    offered = {SNAP.name: list(bitmaps), OTHER.name: []}
    conn = ServerConnection(list(exports), dirty_bitmaps=lambda name: offered[name])
    conn.offered = offered  # the test changes what is offered between options
    conn.receive_data(struct.pack(">I", 3))
    assert conn.events() == []
    conn.receive_data(opt(nbd.OPT_STRUCTURED_REPLY))
    conn.events()
    assert replies(conn.data_to_send()) == [(nbd.REP_ACK, b"")]
    return conn


def ask(conn: ServerConnection, code: int, data: bytes) -> list[tuple[int, str]]:
    """(context id, name) of each META_CONTEXT reply; the option must end in ACK."""
    conn.receive_data(opt(code, data))
    conn.events()
    r = replies(conn.data_to_send())
    assert r[-1] == (nbd.REP_ACK, b""), r
    assert all(t == nbd.REP_META_CONTEXT for t, _ in r[:-1]), r
    return [(struct.unpack_from(">I", p)[0], p[4:].decode()) for _, p in r[:-1]]


def go(conn: ServerConnection, name: str = "fss1") -> None:
    conn.receive_data(opt(nbd.OPT_GO, info_data(name)))
    evs = conn.events()
    assert [type(e) for e in evs] == [Ready], evs
    conn.data_to_send()


def block_status(conn: ServerConnection, length: int = 4096, flags: int = 0):
    conn.receive_data(req(nbd.CMD_BLOCK_STATUS, 7, 0, length, flags))
    (ev,) = conn.events()
    return ev


# == LIST ========================================================================================


@pytest.mark.parametrize(
    "queries, listed",
    [
        ((), [nbd.BASE_ALLOCATION, DB + A1, DB + A2]),  # no query: every context
        (("qemu:",), [DB + A1, DB + A2]),  # the namespace
        (("qemu:dirty-bitmap:",), [DB + A1, DB + A2]),  # every base
        ((DB + A2,), [DB + A2]),  # an exact name: itself
        ((DB + A2, DB + A2, "qemu:"), [DB + A1, DB + A2]),  # each listed once
        ((DB + "0123456789abcdef0123456789abcdef-9",), []),  # not a base offered
        (("base:",), [nbd.BASE_ALLOCATION]),
        (("qemu:allocation-depth", "x-other:", "nocolon"), []),  # unknown: silently nothing
        (("base:", DB + A1), [nbd.BASE_ALLOCATION, DB + A1]),
    ],
)
def test_list(queries, listed):
    conn = connection()
    got = ask(conn, nbd.OPT_LIST_META_CONTEXT, meta_data("fss1", *queries))
    assert [n for _, n in got] == listed
    assert all(i == 0 for i, _ in got)  # LIST ids are reserved: 0
    assert conn.meta == ()  # LIST selects nothing


def test_list_without_bases_offers_base_allocation_only():
    conn = connection(bitmaps=())
    assert [n for _, n in ask(conn, nbd.OPT_LIST_META_CONTEXT, meta_data("fss1"))] == [nbd.BASE_ALLOCATION]
    assert ask(conn, nbd.OPT_LIST_META_CONTEXT, meta_data("fss1", "qemu:")) == []


def test_list_asks_what_is_offered_now():
    conn = connection()
    conn.offered["fss1"] = [A2]  # A1's map was pruned meanwhile
    assert [n for _, n in ask(conn, nbd.OPT_LIST_META_CONTEXT, meta_data("fss1", "qemu:"))] == [DB + A2]


# == SET =========================================================================================


def test_set_selects_several_contexts_each_with_its_own_id():
    conn = connection()
    got = ask(conn, nbd.OPT_SET_META_CONTEXT, meta_data("fss1", DB + A2, nbd.BASE_ALLOCATION, DB + A1, DB + A1))
    assert sorted(n for _, n in got) == [nbd.BASE_ALLOCATION, DB + A1, DB + A2]
    ids = [i for i, _ in got]
    assert len(set(ids)) == 3 and 0 not in ids
    assert dict((n, i) for i, n in got)[nbd.BASE_ALLOCATION] == nbd.BASE_ALLOCATION_ID  # what the TCP front replays
    assert conn.meta == tuple(got)


@pytest.mark.parametrize("query", ["qemu:", "qemu:dirty-bitmap:", "base:", DB + "nosuch", DB + A1 + " ", "qemu:dirty-bitmap"])
def test_set_selects_exact_names_only(query):
    # Wildcards list but SHOULD NOT select (spec); qemu selects nothing for them either.
    conn = connection()
    assert ask(conn, nbd.OPT_SET_META_CONTEXT, meta_data("fss1", query)) == []
    go(conn)
    ev = block_status(conn)
    assert isinstance(ev, BadRequest) and ev.errno == nbd.EINVAL


def test_a_base_no_longer_offered_is_not_selected():
    conn = connection()
    conn.offered["fss1"] = [A2]
    got = ask(conn, nbd.OPT_SET_META_CONTEXT, meta_data("fss1", DB + A1, DB + A2))
    assert [n for _, n in got] == [DB + A2]


def test_block_status_with_only_a_dirty_bitmap_selected():
    conn = connection()
    got = ask(conn, nbd.OPT_SET_META_CONTEXT, meta_data("fss1", DB + A1))
    assert [n for _, n in got] == [DB + A1]
    assert not conn.meta_base_allocation
    go(conn)
    assert block_status(conn, 4096, nbd.CMD_FLAG_REQ_ONE) == Request(nbd.CMD_BLOCK_STATUS, nbd.CMD_FLAG_REQ_ONE, 7, 0, 4096, b"")


def test_set_replaces_and_a_failed_set_clears():
    conn = connection()
    ask(conn, nbd.OPT_SET_META_CONTEXT, meta_data("fss1", DB + A1, nbd.BASE_ALLOCATION))
    assert len(conn.meta) == 2
    assert [n for _, n in ask(conn, nbd.OPT_SET_META_CONTEXT, meta_data("fss1", DB + A2))] == [DB + A2]
    assert [n for _, n in conn.meta] == [DB + A2]
    conn.receive_data(opt(nbd.OPT_SET_META_CONTEXT, meta_data("fss1", DB + A1)[:-2]))  # malformed
    conn.events()
    assert [t for t, _ in replies(conn.data_to_send())] == [nbd.REP_ERR_INVALID]
    assert conn.meta == ()


def test_contexts_selected_on_another_export_do_not_count():
    # "the final time it was sent, it referred to the same export name used to enter transmission"
    conn = connection(exports=(SNAP, OTHER))
    ask(conn, nbd.OPT_SET_META_CONTEXT, meta_data("fss1", DB + A1))
    go(conn, "fss2")
    ev = block_status(conn)
    assert isinstance(ev, BadRequest) and ev.errno == nbd.EINVAL


def test_default_export_name_keeps_the_selection():
    conn = connection()
    ask(conn, nbd.OPT_SET_META_CONTEXT, meta_data("", DB + A1))  # "" is the socket's only export
    go(conn, "")
    assert isinstance(block_status(conn), Request)


def test_volume_exports_offer_base_allocation_only():
    conn = ServerConnection([Export("data", SIZE, False)])
    conn.receive_data(struct.pack(">I", 3) + opt(nbd.OPT_STRUCTURED_REPLY) + opt(nbd.OPT_LIST_META_CONTEXT, meta_data("data")))
    conn.events()
    r = replies(conn.data_to_send())
    assert [p[4:] for t, p in r if t == nbd.REP_META_CONTEXT] == [b"base:allocation"]


# == the BLOCK_STATUS reply =====================================================================


def chunks_of(r: bytes) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """(flags, context id, descriptors) of each chunk; every byte must belong to one."""
    out, pos = [], 0
    while pos < len(r):
        magic, flags, typ, cookie, n = struct.unpack_from(">IHHQI", r, pos)
        assert (magic, typ, cookie) == (nbd.STRUCTURED_REPLY_MAGIC, nbd.REPLY_TYPE_BLOCK_STATUS, 7)
        assert n >= 12 and (n - 4) % 8 == 0
        vals = struct.unpack_from(f">{(n - 4) // 4}I", r, pos + 24)
        out.append((flags, struct.unpack_from(">I", r, pos + 20)[0], list(zip(vals[::2], vals[1::2]))))
        pos += 20 + n
    return out


def reply(length, req_one, chunks):
    return chunks_of(connection().block_status_reply(7, length, req_one, chunks))


def test_one_chunk_per_context_only_the_last_done():
    got = reply(8192, False, [(1, [(8192, 0)]), (2, [(4096, 1), (4096, 0)]), (3, [(8192, 1)])])
    assert [(f, i) for f, i, _ in got] == [(0, 1), (0, 2), (nbd.REPLY_FLAG_DONE, 3)]
    assert got[1][2] == [(4096, nbd.STATE_DIRTY), (4096, 0)]


def test_req_one_is_one_descriptor_within_the_request():
    got = reply(4096, True, [(1, [(65536, 3)]), (2, [(1024, 1), (3072, 0)])])
    assert [d for _, _, d in got] == [[(4096, 3)], [(1024, 1)]]


def test_descriptors_are_merged_and_cut_at_the_request():
    # Equal neighbours merged, zero lengths dropped, nothing past the request's end.
    got = reply(10000, False, [(2, [(4096, 1), (0, 0), (4096, 1), (4096, 0), (65536, 1)])])
    assert got[0][2] == [(8192, 1), (1808, 0)]
    assert sum(n for n, _ in got[0][2]) <= 10000


def test_descriptors_are_capped(monkeypatch):
    monkeypatch.setattr(nbd, "MAX_EXTENTS", 4)
    got = reply(1 << 20, False, [(2, [(4096, i & 1) for i in range(256)])])
    assert got[0][2] == [(4096, 0), (4096, 1), (4096, 0), (4096, 1)]  # fewer than asked: allowed


def test_no_extent_is_an_error_not_a_clean_report():
    with pytest.raises(ValueError):
        connection().block_status_reply(7, 4096, False, [(1, [(4096, 0)]), (2, [])])


# == the TCP front's question to a worker (ipc/nbdclient.ContextList) =============================


def converse(client, server: ServerConnection) -> None:
    """Run a sans-IO client against a sans-IO server until neither has bytes to send."""
    client.receive_data(server.greeting())
    for _ in range(10):
        out = client.data_to_send()
        if not out:
            return
        server.receive_data(out)
        server.events()
        back = server.data_to_send()
        if back:
            client.receive_data(back)


def test_context_list_learns_what_the_worker_offers():
    from ipc.nbdclient import ContextList

    offered = {"fss1": [A1, A2]}
    srv = ServerConnection([SNAP], dirty_bitmaps=lambda name: offered[name])
    cl = ContextList("fss1", DB)
    converse(cl, srv)
    assert cl.result == [DB + A1, DB + A2]
    assert srv.state is nbd.State.CLOSED  # it said ABORT


def test_context_list_of_an_unknown_export_fails():
    from ipc.nbdclient import ContextList, HandshakeFailed

    srv = ServerConnection([SNAP], dirty_bitmaps=lambda name: [A1])
    cl = ContextList("nope", DB)
    with pytest.raises(HandshakeFailed):
        converse(cl, srv)


def test_bitmaps_are_asked_for_only_when_a_query_could_match_one():
    asked = []
    conn = ServerConnection([SNAP], dirty_bitmaps=lambda name: asked.append(name) or [A1])
    conn.receive_data(struct.pack(">I", 3) + opt(nbd.OPT_STRUCTURED_REPLY))
    conn.events()
    conn.data_to_send()
    assert [n for _, n in ask(conn, nbd.OPT_SET_META_CONTEXT, meta_data("fss1", nbd.BASE_ALLOCATION))] == [nbd.BASE_ALLOCATION]
    ask(conn, nbd.OPT_LIST_META_CONTEXT, meta_data("fss1", "base:"))
    assert asked == []
    ask(conn, nbd.OPT_LIST_META_CONTEXT, meta_data("fss1"))
    ask(conn, nbd.OPT_SET_META_CONTEXT, meta_data("fss1", nbd.BASE_ALLOCATION, DB + A1))
    assert asked == ["fss1", "fss1"]
    assert dict((n, i) for i, n in conn.meta) == {nbd.BASE_ALLOCATION: 1, DB + A1: 2}
