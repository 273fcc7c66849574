"""ipc.nbd, sans-IO: bytes in, events and reply bytes out, checked against doc/proto.md.

No sockets here: every test feeds a ServerConnection the bytes a client would
send and looks at the events and at the bytes it would answer.
"""

from __future__ import annotations

import hashlib
import struct

import pytest
from nbdwire import info_data, meta_data, opt, req, write

from ipc import nbd
from ipc.nbd import BadRequest, Disconnect, Export, ProtocolError, Ready, Request, ServerConnection, State

SIZE = 1 << 20
VOL = Export("data", SIZE, False, "the volume")
SNAP = Export("fss0", SIZE, True, "a snapshot")
MiB = 1 << 20

# -- what the server answers (what a client sends: tests/nbdwire.py) --------------------------


def opt_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split handshake output into (option, reply type, payload); every byte must belong to a reply."""
    out, pos = [], 0
    while pos < len(data):
        magic, o, typ, n = struct.unpack_from(">QIII", data, pos)
        assert magic == nbd.OPT_REPLY_MAGIC, f"bad option reply magic at {pos}: {data[pos:pos + 20]!r}"
        out.append((o, typ, data[pos + 20 : pos + 20 + n]))
        assert len(out[-1][2]) == n, "truncated option reply"
        pos += 20 + n
    return out


def feed(conn: ServerConnection, data: bytes) -> list:
    conn.receive_data(data)
    return conn.events()


def negotiated(exports=(VOL, SNAP), flags: int = 3) -> ServerConnection:
    conn = ServerConnection(list(exports))
    assert feed(conn, struct.pack(">I", flags)) == []
    return conn


def ask(conn: ServerConnection, *options: bytes) -> tuple[list, list[tuple[int, int, bytes]]]:
    evs = feed(conn, b"".join(options))
    return evs, opt_replies(conn.data_to_send())


def transmission(export: Export = VOL, structured: bool = True, meta: bool = False) -> ServerConnection:
    conn = negotiated()
    if structured:
        ask(conn, opt(nbd.OPT_STRUCTURED_REPLY))
    if meta:
        _, r = ask(conn, opt(nbd.OPT_SET_META_CONTEXT, meta_data(export.name, nbd.BASE_ALLOCATION)))
        assert r[-1][1] == nbd.REP_ACK
    evs, r = ask(conn, opt(nbd.OPT_GO, info_data(export.name)))
    assert evs == [Ready(export)]
    assert r[-1][1] == nbd.REP_ACK
    return conn


def one(conn: ServerConnection, data: bytes):
    evs = feed(conn, data)
    assert len(evs) == 1, evs
    return evs[0]


def errno_of(conn: ServerConnection, data: bytes) -> int:
    ev = one(conn, data)
    assert isinstance(ev, BadRequest), ev
    return ev.errno


def info_export(payload: bytes) -> tuple[int, int]:
    typ, size, flags = struct.unpack(">HQH", payload)
    assert typ == nbd.INFO_EXPORT
    return size, flags


# == handshake ===========================================================================


def test_greeting_is_fixed_newstyle_with_no_zeroes():
    g = ServerConnection([VOL]).greeting()
    assert g == struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 0b11)


@pytest.mark.parametrize("flags", [1 << 2, 1 << 31, 0x3 | 0x10])
def test_unknown_client_flags_drop_the_connection(flags):
    conn = ServerConnection([VOL])
    evs = feed(conn, struct.pack(">I", flags) + opt(nbd.OPT_LIST))
    assert [type(e) for e in evs] == [ProtocolError]
    assert conn.state is State.ERROR
    assert conn.data_to_send() == b""  # the LIST behind it is never answered


def test_client_without_fixed_newstyle_is_dropped():
    conn = ServerConnection([VOL])
    assert [type(e) for e in feed(conn, struct.pack(">I", 0))] == [ProtocolError]


def test_client_flags_can_arrive_a_byte_at_a_time():
    conn = ServerConnection([VOL])
    for b in struct.pack(">I", 3)[:3]:
        assert feed(conn, bytes([b])) == []
        assert conn.state is State.CLIENT_FLAGS
    assert feed(conn, b"\x03") == []
    assert conn.state is State.OPTIONS and conn.no_zeroes


@pytest.mark.parametrize("client_flags, padding", [(1, 124), (3, 0)])
def test_export_name_reply_honours_no_zeroes(client_flags, padding):
    conn = negotiated(flags=client_flags)
    evs = feed(conn, opt(nbd.OPT_EXPORT_NAME, b"data"))
    assert evs == [Ready(VOL)]
    out = conn.data_to_send()
    # No option-reply header: size, flags, then 124 zeroes unless NO_ZEROES.
    assert len(out) == 10 + padding
    size, flags = struct.unpack_from(">QH", out)
    assert size == SIZE
    assert flags & nbd.TF_HAS_FLAGS and not flags & nbd.TF_READ_ONLY
    assert out[10:] == bytes(padding)
    assert conn.state is State.TRANSMISSION and not conn.structured


def test_export_name_unknown_hangs_up_without_a_reply():
    conn = negotiated()
    evs = feed(conn, opt(nbd.OPT_EXPORT_NAME, b"nope"))
    assert [type(e) for e in evs] == [ProtocolError]
    assert conn.data_to_send() == b""


def test_export_name_default_is_the_only_export():
    conn = negotiated(exports=[VOL])
    assert feed(conn, opt(nbd.OPT_EXPORT_NAME, b"")) == [Ready(VOL)]


def test_export_name_after_structured_reply_keeps_structured():
    conn = negotiated()
    ask(conn, opt(nbd.OPT_STRUCTURED_REPLY))
    assert feed(conn, opt(nbd.OPT_EXPORT_NAME, b"data")) == [Ready(VOL)]
    _, flags = struct.unpack_from(">QH", conn.data_to_send())
    assert flags & nbd.TF_SEND_DF
    assert conn.structured


def test_go_without_info_requests_sends_export_info_then_ack():
    conn = negotiated()
    evs, r = ask(conn, opt(nbd.OPT_GO, info_data("data")))
    assert evs == [Ready(VOL)]
    assert [(o, t) for o, t, _ in r] == [(nbd.OPT_GO, nbd.REP_INFO), (nbd.OPT_GO, nbd.REP_ACK)]
    assert info_export(r[0][2])[0] == SIZE
    assert r[1][2] == b""
    assert conn.state is State.TRANSMISSION


def test_go_with_every_info_request():
    conn = negotiated()
    evs, r = ask(conn, opt(nbd.OPT_GO, info_data("data", nbd.INFO_NAME, nbd.INFO_DESCRIPTION, nbd.INFO_BLOCK_SIZE, 0x7777)))
    assert evs == [Ready(VOL)]
    assert r[-1][1] == nbd.REP_ACK
    assert all(t == nbd.REP_INFO for _, t, _ in r[:-1])
    infos = {struct.unpack_from(">H", p)[0]: p[2:] for _, _, p in r[:-1]}
    assert set(infos) == {nbd.INFO_EXPORT, nbd.INFO_NAME, nbd.INFO_DESCRIPTION, nbd.INFO_BLOCK_SIZE}  # 0x7777 ignored
    assert infos[nbd.INFO_NAME] == b"data"
    assert infos[nbd.INFO_DESCRIPTION] == b"the volume"
    assert struct.unpack(">III", infos[nbd.INFO_BLOCK_SIZE]) == (1, 4096, 32 * MiB)
    assert len(infos[nbd.INFO_EXPORT]) == 10  # reply length 12 with the type


def test_info_does_not_start_transmission_and_go_follows():
    conn = negotiated()
    evs, r = ask(conn, opt(nbd.OPT_INFO, info_data("fss0", nbd.INFO_BLOCK_SIZE)))
    assert evs == [] and conn.state is State.OPTIONS
    assert [t for _, t, _ in r] == [nbd.REP_INFO, nbd.REP_INFO, nbd.REP_ACK]
    assert all(o == nbd.OPT_INFO for o, _, _ in r)
    size, flags = info_export(r[0][2])
    assert flags & nbd.TF_READ_ONLY
    assert not flags & (nbd.TF_SEND_FUA | nbd.TF_SEND_TRIM | nbd.TF_SEND_WRITE_ZEROES | nbd.TF_SEND_FAST_ZERO)
    evs, r = ask(conn, opt(nbd.OPT_GO, info_data("fss0")))
    assert evs == [Ready(SNAP)]


@pytest.mark.parametrize("code", [nbd.OPT_INFO, nbd.OPT_GO])
def test_info_go_unknown_export_is_err_unknown_and_negotiation_goes_on(code):
    conn = negotiated()
    evs, r = ask(conn, opt(code, info_data("nope")))
    assert evs == [] and [t for _, t, _ in r] == [nbd.REP_ERR_UNKNOWN]
    assert conn.state is State.OPTIONS
    evs, _ = ask(conn, opt(nbd.OPT_GO, info_data("data")))
    assert evs == [Ready(VOL)]


def test_default_export_only_when_there_is_one():
    one_export = negotiated(exports=[VOL])
    evs, r = ask(one_export, opt(nbd.OPT_GO, info_data("", nbd.INFO_NAME)))
    assert evs == [Ready(VOL)]
    names = [p[2:] for _, t, p in r if t == nbd.REP_INFO and p[:2] == struct.pack(">H", nbd.INFO_NAME)]
    assert names == [b"data"]  # the canonical name
    two = negotiated(exports=[VOL, SNAP])
    evs, r = ask(two, opt(nbd.OPT_GO, info_data("")))
    assert evs == [] and [t for _, t, _ in r] == [nbd.REP_ERR_UNKNOWN]


@pytest.mark.parametrize(
    "data",
    [
        b"",  # nothing at all
        struct.pack(">I", 4) + b"da",  # name longer than the option
        struct.pack(">I", 4) + b"data" + struct.pack(">H", 2) + struct.pack(">H", 1),  # 2 infos announced, 1 sent
        info_data("data") + b"\0",  # trailing byte
        struct.pack(">I", 0xFFFFFFFF) + b"x" * 10,  # absurd name length
    ],
)
def test_go_malformed_is_err_invalid_and_stays_in_sync(data):
    conn = negotiated()
    evs, r = ask(conn, opt(nbd.OPT_GO, data), opt(nbd.OPT_GO, info_data("data")))
    assert evs == [Ready(VOL)]
    assert [t for _, t, _ in r] == [nbd.REP_ERR_INVALID, nbd.REP_INFO, nbd.REP_ACK]


def test_list_names_every_export_with_its_description():
    conn = negotiated()
    evs, r = ask(conn, opt(nbd.OPT_LIST))
    assert evs == []
    assert [t for _, t, _ in r] == [nbd.REP_SERVER, nbd.REP_SERVER, nbd.REP_ACK]
    servers = []
    for _, _, p in r[:2]:
        (n,) = struct.unpack_from(">I", p)
        assert n <= len(p) - 4
        servers.append((p[4 : 4 + n], p[4 + n :]))
    assert servers == [(b"data", b"the volume"), (b"fss0", b"a snapshot")]


def test_list_with_data_is_err_invalid():
    conn = negotiated()
    evs, r = ask(conn, opt(nbd.OPT_LIST, b"x"), opt(nbd.OPT_LIST))
    assert [t for _, t, _ in r] == [nbd.REP_ERR_INVALID, nbd.REP_SERVER, nbd.REP_SERVER, nbd.REP_ACK]


@pytest.mark.parametrize("data", [b"", b"ignored"])
def test_abort_is_acked_then_disconnect(data):
    conn = negotiated()
    evs, r = ask(conn, opt(nbd.OPT_ABORT, data), opt(nbd.OPT_LIST))
    assert [type(e) for e in evs] == [Disconnect]
    assert r == [(nbd.OPT_ABORT, nbd.REP_ACK, b"")]  # nothing after ABORT is answered
    assert conn.state is State.CLOSED


def test_starttls_is_unsupported_never_tls_reqd():
    conn = negotiated()
    _, r = ask(conn, opt(nbd.OPT_STARTTLS))
    assert [(o, t) for o, t, _ in r] == [(nbd.OPT_STARTTLS, nbd.REP_ERR_UNSUP)]


@pytest.mark.parametrize("code", [4, 11, 99, 0xFFFFFFFF])  # PEEK_EXPORT, EXTENDED_HEADERS, made up
def test_unknown_option_is_err_unsup_and_stays_in_sync(code):
    conn = negotiated()
    # The unknown option's data looks like a GO: the server must skip it by its length.
    evs, r = ask(conn, opt(code, opt(nbd.OPT_GO, info_data("data"))), opt(nbd.OPT_GO, info_data("data")))
    assert evs == [Ready(VOL)]
    assert [(o, t) for o, t, _ in r] == [(code, nbd.REP_ERR_UNSUP), (nbd.OPT_GO, nbd.REP_INFO), (nbd.OPT_GO, nbd.REP_ACK)]


def test_truncated_option_waits_for_the_rest():
    conn = negotiated()
    whole = opt(nbd.OPT_GO, info_data("data", nbd.INFO_BLOCK_SIZE))
    assert feed(conn, whole[:20]) == [] and conn.data_to_send() == b""
    assert feed(conn, whole[20:-1]) == [] and conn.data_to_send() == b""
    assert feed(conn, whole[-1:]) == [Ready(VOL)]


def test_oversized_option_is_refused_before_its_data_arrives():
    conn = negotiated()
    evs = feed(conn, struct.pack(">QII", nbd.IHAVEOPT, 99, nbd.MAX_OPTION + 1))
    assert [type(e) for e in evs] == [ProtocolError]
    # An option of exactly the limit is still read (and answered).
    conn = negotiated()
    evs, r = ask(conn, opt(99, bytes(nbd.MAX_OPTION)))
    assert evs == [] and [t for _, t, _ in r] == [nbd.REP_ERR_UNSUP]


def test_bad_option_magic_is_a_protocol_error():
    conn = negotiated()
    evs = feed(conn, struct.pack(">QII", 0x1122334455667788, nbd.OPT_LIST, 0))
    assert [type(e) for e in evs] == [ProtocolError]
    assert conn.state is State.ERROR
    assert feed(conn, opt(nbd.OPT_LIST)) == []  # nothing more is parsed


def test_endless_negotiation_is_cut_off():
    conn = negotiated()
    evs, _ = ask(conn, *[opt(nbd.OPT_LIST)] * nbd.MAX_OPTIONS)
    assert evs == []
    assert [type(e) for e in feed(conn, opt(nbd.OPT_LIST))] == [ProtocolError]


def test_structured_reply_once_twice_and_with_data():
    conn = negotiated()
    _, r = ask(conn, opt(nbd.OPT_STRUCTURED_REPLY, b"x"))
    assert [t for _, t, _ in r] == [nbd.REP_ERR_INVALID] and not conn.structured
    _, r = ask(conn, opt(nbd.OPT_STRUCTURED_REPLY))
    assert [t for _, t, _ in r] == [nbd.REP_ACK] and conn.structured
    _, r = ask(conn, opt(nbd.OPT_STRUCTURED_REPLY))
    assert [t for _, t, _ in r] == [nbd.REP_ERR_INVALID] and conn.structured


def test_send_df_only_with_structured_replies():
    plain = transmission(structured=False)
    assert not plain.transmission_flags(VOL) & nbd.TF_SEND_DF
    assert transmission(structured=True).transmission_flags(VOL) & nbd.TF_SEND_DF


def test_transmission_flags_tell_the_truth():
    conn = transmission()
    rw = conn.transmission_flags(VOL)
    want = (
        nbd.TF_HAS_FLAGS
        | nbd.TF_SEND_FLUSH
        | nbd.TF_SEND_FUA
        | nbd.TF_SEND_TRIM
        | nbd.TF_SEND_WRITE_ZEROES
        | nbd.TF_SEND_DF
        | nbd.TF_CAN_MULTI_CONN
        | nbd.TF_SEND_CACHE
        | nbd.TF_SEND_FAST_ZERO
    )
    assert rw == want
    ro = conn.transmission_flags(SNAP)
    assert ro == nbd.TF_HAS_FLAGS | nbd.TF_READ_ONLY | nbd.TF_SEND_FLUSH | nbd.TF_SEND_DF | nbd.TF_CAN_MULTI_CONN | nbd.TF_SEND_CACHE


# -- metadata contexts ----------------------------------------------------------------------


def contexts(r) -> list[tuple[int, bytes]]:
    assert r[-1][1] == nbd.REP_ACK, r
    assert all(t == nbd.REP_META_CONTEXT for _, t, _ in r[:-1]), r
    return [(struct.unpack_from(">I", p)[0], p[4:]) for _, _, p in r[:-1]]


@pytest.mark.parametrize(
    "queries, listed",
    [
        ((), [b"base:allocation"]),  # no query: everything
        (("base:",), [b"base:allocation"]),  # the whole namespace
        (("base:allocation",), [b"base:allocation"]),
        (("qemu:dirty-bitmap:b0", "x-other:thing"), []),  # unknown namespaces: silently nothing
        (("base:nosuchleaf",), []),
    ],
)
def test_list_meta_context(queries, listed):
    conn = negotiated()
    ask(conn, opt(nbd.OPT_STRUCTURED_REPLY))
    _, r = ask(conn, opt(nbd.OPT_LIST_META_CONTEXT, meta_data("data", *queries)))
    got = contexts(r)
    assert [n for _, n in got] == listed
    assert all(i == 0 for i, _ in got)  # ids in LIST SHOULD be 0
    assert not conn.meta_base_allocation  # LIST selects nothing


def test_meta_context_unknown_export_and_malformed():
    conn = negotiated()
    ask(conn, opt(nbd.OPT_STRUCTURED_REPLY))
    _, r = ask(conn, opt(nbd.OPT_SET_META_CONTEXT, meta_data("nope", "base:allocation")))
    assert [t for _, t, _ in r] == [nbd.REP_ERR_UNKNOWN]
    bad = meta_data("data", "base:allocation")[:-3]  # query shorter than its length
    _, r = ask(conn, opt(nbd.OPT_LIST_META_CONTEXT, bad), opt(nbd.OPT_LIST_META_CONTEXT, meta_data("data")))
    assert [t for _, t, _ in r] == [nbd.REP_ERR_INVALID, nbd.REP_META_CONTEXT, nbd.REP_ACK]


def test_set_meta_context_before_structured_replies_is_err_invalid():
    conn = negotiated()
    _, r = ask(conn, opt(nbd.OPT_SET_META_CONTEXT, meta_data("data", "base:allocation")))
    assert [t for _, t, _ in r] == [nbd.REP_ERR_INVALID]
    assert not conn.meta_base_allocation


def test_set_meta_context_selects_and_replaces():
    conn = negotiated()
    ask(conn, opt(nbd.OPT_STRUCTURED_REPLY))
    _, r = ask(conn, opt(nbd.OPT_SET_META_CONTEXT, meta_data("data", "x-junk:a", "base:allocation")))
    got = contexts(r)
    assert [n for _, n in got] == [b"base:allocation"]
    ctx_id = got[0][0]
    assert ctx_id == nbd.BASE_ALLOCATION_ID
    # A second SET replaces the first: nothing selected now.
    _, r = ask(conn, opt(nbd.OPT_SET_META_CONTEXT, meta_data("data", "qemu:dirty-bitmap:b0")))
    assert contexts(r) == []
    assert feed(conn, opt(nbd.OPT_GO, info_data("data"))) == [Ready(VOL)]
    assert errno_of(conn, req(nbd.CMD_BLOCK_STATUS, 7, 0, 4096)) == nbd.EINVAL


@pytest.mark.parametrize(
    "failing",
    [
        meta_data("nope", "base:allocation"),  # unknown export: ERR_UNKNOWN
        meta_data("data", "base:allocation")[:-3],  # malformed: ERR_INVALID
        b"",  # too short to hold anything
    ],
)
def test_failed_set_meta_context_clears_the_selection(failing):
    # "replaces all previously-set metadata contexts, including when this command fails"
    conn = negotiated()
    ask(conn, opt(nbd.OPT_STRUCTURED_REPLY))
    _, r = ask(conn, opt(nbd.OPT_SET_META_CONTEXT, meta_data("data", "base:allocation")))
    assert [n for _, n in contexts(r)] == [b"base:allocation"]
    _, r = ask(conn, opt(nbd.OPT_SET_META_CONTEXT, failing))
    assert len(r) == 1 and r[0][1] & 0x80000000
    assert not conn.meta_base_allocation
    assert feed(conn, opt(nbd.OPT_GO, info_data("data"))) == [Ready(VOL)]
    assert errno_of(conn, req(nbd.CMD_BLOCK_STATUS, 7, 0, 4096)) == nbd.EINVAL


def test_failed_list_meta_context_keeps_the_selection():
    # LIST never selects anything, so neither does its failure clear anything.
    conn = negotiated()
    ask(conn, opt(nbd.OPT_STRUCTURED_REPLY))
    ask(conn, opt(nbd.OPT_SET_META_CONTEXT, meta_data("data", "base:allocation")))
    _, r = ask(conn, opt(nbd.OPT_LIST_META_CONTEXT, meta_data("nope")))
    assert [t for _, t, _ in r] == [nbd.REP_ERR_UNKNOWN]
    assert conn.meta_base_allocation


def test_set_meta_context_reply_matches_what_block_status_accepts():
    # Whatever SET answers for "base:" (the spec leaves namespace-only SET queries to the
    # server), BLOCK_STATUS must be accepted exactly when a context was announced.
    conn = negotiated()
    ask(conn, opt(nbd.OPT_STRUCTURED_REPLY))
    _, r = ask(conn, opt(nbd.OPT_SET_META_CONTEXT, meta_data("data", "base:")))
    announced = contexts(r)
    ask(conn, opt(nbd.OPT_GO, info_data("data")))
    ev = one(conn, req(nbd.CMD_BLOCK_STATUS, 7, 0, 4096))
    assert isinstance(ev, Request) == bool(announced)


# == transmission: validation ==================================================================

# Flags the spec documents per command (FUA is valid on every command once SEND_FUA is offered).
ALLOWED = {
    nbd.CMD_READ: nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_DF,
    nbd.CMD_WRITE: nbd.CMD_FLAG_FUA,
    nbd.CMD_FLUSH: nbd.CMD_FLAG_FUA,
    nbd.CMD_TRIM: nbd.CMD_FLAG_FUA,
    nbd.CMD_CACHE: nbd.CMD_FLAG_FUA,
    nbd.CMD_WRITE_ZEROES: nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO,
    nbd.CMD_BLOCK_STATUS: nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_REQ_ONE,
}


def valid_request(cmd: int, flags: int, cookie: int) -> bytes:
    if cmd == nbd.CMD_WRITE:
        return write(cookie, 512, b"w" * 512, flags)
    if cmd == nbd.CMD_FLUSH:
        return req(cmd, cookie, 0, 0, flags)
    return req(cmd, cookie, 512, 4096, flags)


@pytest.mark.parametrize("cmd", sorted(ALLOWED), ids=lambda c: nbd.CMD_NAMES[c])
def test_command_flags(cmd):
    conn = transmission(meta=True)
    for bit in range(16):
        flag = 1 << bit
        ev = one(conn, valid_request(cmd, flag, 100 + bit))
        if flag & ALLOWED[cmd]:
            assert isinstance(ev, Request) and ev.flags == flag and ev.cookie == 100 + bit, (bit, ev)
        else:
            assert ev == BadRequest(cmd, 100 + bit, nbd.EINVAL, ev.reason), (bit, ev)
    assert isinstance(one(conn, valid_request(cmd, 0, 1)), Request)  # in sync after all refusals


def test_df_needs_structured_replies():
    conn = transmission(structured=False)
    assert errno_of(conn, req(nbd.CMD_READ, 1, 0, 512, nbd.CMD_FLAG_DF)) == nbd.EINVAL


def test_read_only_export_refuses_writes_with_eperm_and_consumes_the_payload():
    conn = transmission(SNAP)
    payload = req(nbd.CMD_READ, 99, 0, 512)  # a payload that looks like a request must not be parsed
    evs = feed(conn, write(1, 0, payload) + req(nbd.CMD_READ, 2, 0, 512))
    assert evs[0] == BadRequest(nbd.CMD_WRITE, 1, nbd.EPERM, evs[0].reason)
    assert evs[1] == Request(nbd.CMD_READ, 0, 2, 0, 512, b"")
    assert len(evs) == 2
    for cmd, flags in [(nbd.CMD_TRIM, 0), (nbd.CMD_WRITE_ZEROES, 0), (nbd.CMD_WRITE_ZEROES, nbd.CMD_FLAG_NO_HOLE)]:
        assert errno_of(conn, req(cmd, 3, 0, 4096, flags)) == nbd.EPERM
    # What a read-only export may do.
    for cmd in (nbd.CMD_READ, nbd.CMD_CACHE, nbd.CMD_FLUSH):
        n = 0 if cmd == nbd.CMD_FLUSH else 4096
        assert isinstance(one(conn, req(cmd, 4, 0, n)), Request)
    # Clients send FUA on anything once they think it is there; a no-op, not an error.
    assert isinstance(one(conn, req(nbd.CMD_READ, 5, 0, 512, nbd.CMD_FLAG_FUA)), Request)


def test_read_only_write_payload_consumed_in_pieces():
    conn = transmission(SNAP)
    data = write(1, 0, bytes(range(256)) * 64) + req(nbd.CMD_READ, 2, 0, 1)
    evs = []
    for i in range(0, len(data), 1000):
        evs += feed(conn, data[i : i + 1000])
    assert [type(e) for e in evs] == [BadRequest, Request]
    assert evs[0].errno == nbd.EPERM and evs[1].cookie == 2


@pytest.mark.parametrize(
    "cmd, want",
    [
        (nbd.CMD_WRITE, nbd.ENOSPC),
        (nbd.CMD_WRITE_ZEROES, nbd.ENOSPC),  # a write request too (WRITE_ZEROES extension; qemu and nbdkit agree)
        (nbd.CMD_READ, nbd.EINVAL),
        (nbd.CMD_TRIM, nbd.EINVAL),
        (nbd.CMD_CACHE, nbd.EINVAL),
        (nbd.CMD_BLOCK_STATUS, nbd.EINVAL),
    ],
    ids=lambda x: nbd.CMD_NAMES.get(x, x) if isinstance(x, int) and x < 8 else str(x),
)
def test_past_the_end(cmd, want):
    conn = transmission(meta=True)

    def at(cookie, offset, length):
        if cmd == nbd.CMD_WRITE:
            return write(cookie, offset, b"x" * length)
        return req(cmd, cookie, offset, length)

    assert isinstance(one(conn, at(1, SIZE - 512, 512)), Request)  # up to the last byte is fine
    assert errno_of(conn, at(2, SIZE - 511, 512)) == want  # one byte over
    assert errno_of(conn, at(3, SIZE, 1)) == want
    assert errno_of(conn, at(4, (1 << 64) - 1, 2)) == want  # offset+length wraps in 64 bits
    assert isinstance(one(conn, at(5, 0, 1)), Request)  # in sync (WRITE payloads consumed)


@pytest.mark.parametrize("cmd", [nbd.CMD_READ, nbd.CMD_WRITE, nbd.CMD_TRIM, nbd.CMD_CACHE, nbd.CMD_WRITE_ZEROES, nbd.CMD_BLOCK_STATUS])
def test_length_zero_is_einval(cmd):
    conn = transmission(meta=True)
    assert errno_of(conn, req(cmd, 1, 0, 0)) == nbd.EINVAL
    assert isinstance(one(conn, req(nbd.CMD_FLUSH, 2)), Request)


def test_flush_with_offset_or_length_is_einval():
    conn = transmission()
    assert errno_of(conn, req(nbd.CMD_FLUSH, 1, 512, 0)) == nbd.EINVAL
    assert errno_of(conn, req(nbd.CMD_FLUSH, 2, 0, 512)) == nbd.EINVAL
    assert one(conn, req(nbd.CMD_FLUSH, 3)) == Request(nbd.CMD_FLUSH, 0, 3, 0, 0, b"")


def transmission_big(structured=True):
    """An export far larger than any payload, so only the size limits can refuse."""
    big = Export("big", 1 << 40, False)
    conn = ServerConnection([big])
    feed(conn, struct.pack(">I", 3) + (opt(nbd.OPT_STRUCTURED_REPLY) if structured else b""))
    assert feed(conn, opt(nbd.OPT_GO, info_data("big"))) == [Ready(big)]
    conn.data_to_send()
    return conn


def test_oversized_read():
    structured = transmission_big()
    assert isinstance(one(structured, req(nbd.CMD_READ, 1, 0, 32 * MiB)), Request)
    assert errno_of(structured, req(nbd.CMD_READ, 2, 0, 32 * MiB + 1)) == nbd.EOVERFLOW
    # EOVERFLOW only for clients that negotiated structured replies.
    plain = transmission_big(structured=False)
    assert errno_of(plain, req(nbd.CMD_READ, 3, 0, 32 * MiB + 1)) == nbd.EINVAL


def test_oversized_write_is_refused_and_its_payload_skipped_without_buffering():
    conn = transmission_big()
    n = 32 * MiB + 4096
    assert feed(conn, req(nbd.CMD_WRITE, 1, 0, n)) == []
    chunk = bytes(1 << 20)
    sent = 0
    while sent + len(chunk) < n:
        assert feed(conn, chunk) == []
        sent += len(chunk)
        assert conn.buffered < 2 * len(chunk)  # skipped, not held
    evs = feed(conn, bytes(n - sent) + req(nbd.CMD_READ, 2, 0, 512))
    assert evs == [BadRequest(nbd.CMD_WRITE, 1, nbd.EINVAL, evs[0].reason), Request(nbd.CMD_READ, 0, 2, 0, 512, b"")]


def test_no_payload_limit_for_commands_without_payload():
    conn = transmission_big()
    for cmd in (nbd.CMD_TRIM, nbd.CMD_WRITE_ZEROES, nbd.CMD_CACHE):
        assert isinstance(one(conn, req(cmd, 1, 0, 0xFFFFFFFF)), Request), nbd.CMD_NAMES[cmd]


def test_block_status_needs_a_context():
    plain = transmission(meta=False)
    assert errno_of(plain, req(nbd.CMD_BLOCK_STATUS, 1, 0, 4096)) == nbd.EINVAL
    conn = transmission(meta=True)
    assert one(conn, req(nbd.CMD_BLOCK_STATUS, 2, 0, 4096, nbd.CMD_FLAG_REQ_ONE)) == Request(
        nbd.CMD_BLOCK_STATUS, nbd.CMD_FLAG_REQ_ONE, 2, 0, 4096, b""
    )


def test_fast_zero():
    conn = transmission()
    assert isinstance(one(conn, req(nbd.CMD_WRITE_ZEROES, 1, 0, 4096, nbd.CMD_FLAG_FAST_ZERO)), Request)
    assert isinstance(one(conn, req(nbd.CMD_WRITE_ZEROES, 2, 0, 4096, nbd.CMD_FLAG_NO_HOLE)), Request)
    both = nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE
    assert errno_of(conn, req(nbd.CMD_WRITE_ZEROES, 3, 0, 4096, both)) == nbd.ENOTSUP


@pytest.mark.parametrize("cmd", [8, 9, 0x100, 0xFFFF])
def test_unknown_command_is_einval_and_the_next_request_is_served(cmd):
    conn = transmission()
    evs = feed(conn, req(cmd, 1, 0, 512) + req(nbd.CMD_READ, 2, 0, 512))
    assert evs == [BadRequest(cmd, 1, nbd.EINVAL, evs[0].reason), Request(nbd.CMD_READ, 0, 2, 0, 512, b"")]


def test_disc_ends_the_connection():
    conn = transmission()
    evs = feed(conn, req(nbd.CMD_READ, 1, 0, 512) + req(nbd.CMD_DISC, 2) + req(nbd.CMD_READ, 3, 0, 512))
    assert [type(e) for e in evs] == [Request, Disconnect]
    assert conn.state is State.CLOSED
    assert feed(conn, req(nbd.CMD_READ, 4, 0, 512)) == []


def test_bad_request_magic_is_a_protocol_error():
    conn = transmission()
    bad = struct.pack(">IHHQQI", 0x25609514, 0, nbd.CMD_READ, 1, 0, 512)
    evs = feed(conn, req(nbd.CMD_READ, 1, 0, 512) + bad + req(nbd.CMD_READ, 2, 0, 512))
    assert [type(e) for e in evs] == [Request, ProtocolError]
    assert conn.state is State.ERROR


def test_write_waits_for_its_whole_payload():
    conn = transmission()
    data = bytes(range(256)) * 16
    whole = write(9, 4096, data, nbd.CMD_FLAG_FUA)
    assert feed(conn, whole[:28]) == []
    assert feed(conn, whole[28:-1]) == []
    assert feed(conn, whole[-1:]) == [Request(nbd.CMD_WRITE, nbd.CMD_FLAG_FUA, 9, 4096, len(data), data)]


# A whole conversation: handshake with detours, then every kind of request, good and bad.
SESSION = b"".join(
    [
        struct.pack(">I", 3),
        opt(77, b"junk"),
        opt(nbd.OPT_STRUCTURED_REPLY),
        opt(nbd.OPT_LIST),
        opt(nbd.OPT_LIST_META_CONTEXT, meta_data("data")),
        opt(nbd.OPT_SET_META_CONTEXT, meta_data("data", "base:allocation")),
        opt(nbd.OPT_INFO, info_data("nope")),
        opt(nbd.OPT_GO, info_data("data", nbd.INFO_BLOCK_SIZE, nbd.INFO_NAME)),
        write(1, 0, b"A" * 3000, nbd.CMD_FLAG_FUA),
        req(nbd.CMD_READ, 2, 100, 2000, nbd.CMD_FLAG_DF),
        write(3, SIZE - 10, b"B" * 20),  # past the end: payload skipped
        req(nbd.CMD_BLOCK_STATUS, 4, 0, SIZE, nbd.CMD_FLAG_REQ_ONE),
        req(nbd.CMD_WRITE_ZEROES, 5, 4096, 8192, nbd.CMD_FLAG_NO_HOLE),
        req(nbd.CMD_TRIM, 6, 0, 4096),
        req(12, 7, 0, 1),
        req(nbd.CMD_CACHE, 8, 0, SIZE),
        req(nbd.CMD_FLUSH, 9),
        write(10, 0, b"", 0),  # length 0
        req(nbd.CMD_DISC, 11),
    ]
)


def run_session(chunks) -> tuple[list, bytes]:
    conn = ServerConnection([VOL])
    evs, out = [], b""
    for c in chunks:
        conn.receive_data(c)
        evs += conn.events()
        out += conn.data_to_send()
    return evs, out


def test_session_in_one_buffer():
    evs, out = run_session([SESSION])
    kinds = [type(e).__name__ for e in evs]
    assert kinds == ["Ready"] + ["Request", "Request", "BadRequest", "Request", "Request", "Request", "BadRequest"] + [
        "Request",
        "Request",
        "BadRequest",
        "Disconnect",
    ]
    assert [e.cookie for e in evs[1:-1]] == list(range(1, 11))
    assert evs[1].data == b"A" * 3000
    assert evs[3].errno == nbd.ENOSPC and evs[7].errno == nbd.EINVAL and evs[10].errno == nbd.EINVAL
    r = opt_replies(out)
    assert [o for o, _, _ in r][0] == 77 and r[0][1] == nbd.REP_ERR_UNSUP
    assert r[-1] == (nbd.OPT_GO, nbd.REP_ACK, b"")


@pytest.mark.parametrize("step", [1, 3, 7, 29, 1000])
def test_session_split_at_any_boundary_gives_the_same_events(step):
    whole = run_session([SESSION])
    split = run_session([SESSION[i : i + step] for i in range(0, len(SESSION), step)])
    assert split == whole


def test_pipelined_requests_keep_their_order():
    conn = transmission()
    batch = b"".join(req(nbd.CMD_READ, c, c * 512, 512) if c % 2 else write(c, c * 512, bytes([c]) * 512) for c in range(1, 201))
    evs = feed(conn, batch)
    assert [e.cookie for e in evs] == list(range(1, 201))
    assert all(isinstance(e, Request) for e in evs)
    assert evs[1].data == bytes([2]) * 512


# == replies ============================================================================================


def test_simple_reply_layout():
    conn = transmission(structured=False)
    assert conn.simple_reply(0x0102030405060708) == bytes.fromhex("67446698 00000000 0102030405060708".replace(" ", ""))
    assert conn.error_reply(7, nbd.EPERM, "read-only") == struct.pack(">IIQ", 0x67446698, 1, 7)
    # Simple READ: the 16-byte header, the data follows with no length of its own.
    assert conn.read_reply_header(7, 4096, 512) == struct.pack(">IIQ", 0x67446698, 0, 7)


def test_structured_read_reply_layout():
    conn = transmission()
    h = conn.read_reply_header(0xABCDEF, 4096, 512)
    # magic, flags=DONE, type=OFFSET_DATA, cookie, length = 8 (offset) + data
    assert h == struct.pack(">IHHQIQ", 0x668E33EF, 1, 1, 0xABCDEF, 8 + 512, 4096)


def test_structured_read_reply_not_done_then_none_chunk():
    # A read whose data can still fail after its header left: the data chunk is not
    # the last one, and a NONE chunk flagged DONE ends the reply.
    conn = transmission()
    h = conn.read_reply_header(0xABCDEF, 4096, 512, done=False)
    assert h == struct.pack(">IHHQIQ", 0x668E33EF, 0, 1, 0xABCDEF, 8 + 512, 4096)
    assert conn.read_reply_end(0xABCDEF) == struct.pack(">IHHQI", 0x668E33EF, 1, 0, 0xABCDEF, 0)


def test_structured_error_reply_layout():
    conn = transmission()
    r = conn.error_reply(5, nbd.ENOSPC, "no room")
    magic, flags, typ, cookie, length = struct.unpack_from(">IHHQI", r)
    assert (magic, flags, typ, cookie) == (0x668E33EF, 1, 32769, 5)
    assert length == len(r) - 20 == 6 + 7
    err, msglen = struct.unpack_from(">IH", r, 20)
    assert (err, msglen, r[26:]) == (28, 7, b"no room")


def test_structured_error_message_is_bounded_and_stays_utf8():
    conn = transmission()
    r = conn.error_reply(5, nbd.EIO, "€" * 2000)  # 6000 bytes of 3-byte characters
    (msglen,) = struct.unpack_from(">H", r, 24)
    assert 4000 < msglen <= 4096
    assert r[26:].decode("utf-8") == "€" * (msglen // 3)  # cut between characters, not inside one


def test_block_status_reply_layout():
    conn = transmission(meta=True)
    r = conn.block_status_reply(9, 3 * 4096, False, [(nbd.BASE_ALLOCATION_ID, [(4096, 0), (8192, nbd.STATE_HOLE | nbd.STATE_ZERO)])])
    magic, flags, typ, cookie, length = struct.unpack_from(">IHHQI", r)
    assert (magic, flags, typ, cookie, length) == (0x668E33EF, 1, 5, 9, 4 + 2 * 8)
    assert struct.unpack_from(">IIIII", r, 20) == (nbd.BASE_ALLOCATION_ID, 4096, 0, 8192, 3)


def test_zero_copy_payloads_stay_whole_across_buffer_moves():
    """The serving loop's path: recv_into the connection's own buffer, payloads as views.

    Writes of many sizes (up to the 32 MiB maximum) arrive in odd-sized pieces, so the
    unparsed tail keeps being moved to the head; every payload must come out intact,
    and nothing must stay buffered after the last one.
    """
    import random

    big = Export("big", 1 << 40, False)
    conn = ServerConnection([big], zero_copy=True)
    conn.receive_data(struct.pack(">I", 3) + opt(nbd.OPT_STRUCTURED_REPLY) + opt(nbd.OPT_GO, info_data("big")))
    assert conn.events() == [Ready(big)]
    rng = random.Random(7)
    sizes = [1, 4096, 65536, 1000003, 32 * MiB, 7, 256 * 1024, 3 * MiB + 1, 512, 32 * MiB]
    payloads = [rng.randbytes(n) for n in sizes]
    stream = memoryview(b"".join(write(i, i * 4096, p) for i, p in enumerate(payloads)))
    got = []
    while len(stream):
        room = conn.receive_buffer()
        n = min(len(room), len(stream), rng.choice([13, 4096, 65536, 1 << 20, 5 << 20]))
        room[:n] = stream[:n]
        conn.received(n)
        stream = stream[n:]
        for ev in conn.events():
            assert isinstance(ev, Request)
            # Views are valid until the next receive_buffer(): check them now.
            got.append((ev.cookie, ev.offset, hashlib.sha256(ev.data).digest()))
    assert got == [(i, i * 4096, hashlib.sha256(p).digest()) for i, p in enumerate(payloads)]
    assert conn.buffered == 0


# == hooks for a serving loop that bounds its resources ====================================


def test_refused_connection_answers_err_policy_to_every_export_option():
    conn = ServerConnection([VOL], refusal="too many connections to data (at most 2)")
    feed(conn, struct.pack(">I", 3))
    evs, r = ask(
        conn,
        opt(nbd.OPT_STRUCTURED_REPLY),
        opt(nbd.OPT_LIST),
        opt(nbd.OPT_INFO, info_data("data")),
        opt(nbd.OPT_SET_META_CONTEXT, meta_data("data", "base:allocation")),
        opt(nbd.OPT_GO, info_data("data")),
    )
    assert evs == []  # never Ready
    assert [(o, t) for o, t, _ in r] == [
        (nbd.OPT_STRUCTURED_REPLY, nbd.REP_ACK),
        (nbd.OPT_LIST, nbd.REP_ERR_POLICY),
        (nbd.OPT_INFO, nbd.REP_ERR_POLICY),
        (nbd.OPT_SET_META_CONTEXT, nbd.REP_ERR_POLICY),
        (nbd.OPT_GO, nbd.REP_ERR_POLICY),
    ]
    assert r[-1][2] == b"too many connections to data (at most 2)"
    # ABORT still ends it politely; EXPORT_NAME (which cannot be refused) hangs up.
    assert isinstance(ask(conn, opt(nbd.OPT_ABORT))[0][0], Disconnect)
    conn = ServerConnection([VOL], refusal="no")
    feed(conn, struct.pack(">I", 3))
    assert isinstance(feed(conn, opt(nbd.OPT_EXPORT_NAME, b"data"))[0], ProtocolError)


def test_events_until_ready_leaves_pipelined_requests_buffered():
    conn = negotiated([VOL])
    data = opt(nbd.OPT_GO, info_data("data")) + req(nbd.CMD_READ, 5, 0, 512)
    conn.receive_data(data)
    assert conn.events(until_ready=True) == [Ready(VOL)]
    assert conn.buffered == 28
    assert conn.events() == [Request(nbd.CMD_READ, 0, 5, 0, 512, b"")]


def test_receive_buffer_stays_within_soft_unless_a_message_needs_more():
    big = Export("big", 1 << 40, False)
    conn = ServerConnection([big], zero_copy=True)
    conn.receive_data(struct.pack(">I", 3) + opt(nbd.OPT_GO, info_data("big")))
    assert conn.events() == [Ready(big)]
    assert len(conn.receive_buffer(MiB)) == MiB
    conn.receive_data(req(nbd.CMD_WRITE, 1, 0, 8 * MiB))  # a header announcing 8 MiB
    view = conn.receive_buffer(MiB)
    assert conn.filled + len(view) == 28 + 8 * MiB  # the message's whole size, no more


def test_refuse_pending_write_skips_its_payload_without_buffering_it():
    big = Export("big", 1 << 40, False)
    conn = ServerConnection([big], zero_copy=True)
    conn.receive_data(struct.pack(">I", 3) + opt(nbd.OPT_STRUCTURED_REPLY) + opt(nbd.OPT_GO, info_data("big")))
    assert conn.events() == [Ready(big)]
    conn.receive_data(req(nbd.CMD_WRITE, 4, 0, 8 * MiB) + bytes(1000))
    assert conn.events() == []  # waiting for the payload
    assert conn.refuse_pending_write(nbd.ENOMEM, "no memory for it")
    assert conn.events() == []
    for _ in range(8):
        assert len(conn.receive_buffer(MiB)) <= MiB  # never asks for room for the payload
        conn.receive_data(bytes(MiB - (1000 if _ == 0 else 0)))
        evs = conn.events()
    assert evs == [BadRequest(nbd.CMD_WRITE, 4, nbd.ENOMEM, "no memory for it")]
    assert one(conn, req(nbd.CMD_READ, 5, 0, 512)).cookie == 5
    # Nothing to refuse when no WRITE header waits.
    assert not conn.refuse_pending_write(nbd.ENOMEM, "x")


def test_release_memory_only_between_messages():
    conn = transmission(VOL)
    conn.receive_data(req(nbd.CMD_WRITE, 1, 0, 4096) + bytes(100))
    assert conn.events() == []
    assert not conn.release_memory()  # half a WRITE is buffered: kept
    assert conn.release_memory(keep=MiB)  # ... but it lies within the first MiB
    assert conn.buffered == 128
    conn.receive_data(bytes(3996))
    assert len(conn.events()) == 1
    assert conn.release_memory()
    assert conn.buffered == 0
