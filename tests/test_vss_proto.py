"""VSS message types and the Hyper-V codec: round trips and malformed input."""

import msgspec
import pytest

from ipc import hyperv, vssproto as v


@pytest.mark.parametrize("msg", [
    v.Register("db"),
    v.VssRequest(7, "freeze", 1.5),
    v.VssRequest(0, "list"),
])
def test_socket_frames_to_broker_round_trip_in_pieces(msg):
    data = v.frame(msg)
    r = v.broker_reader()
    got = []
    for i in range(len(data)):  # one byte at a time: nothing before the whole frame
        assert r.wants() >= 1
        got += r.feed(data[i : i + 1])
    assert got == [msg]


def test_queue_messages_round_trip():
    assert v.decode_request(v.encode(v.Request(1 << 63, "thaw", 1.0))) == v.Request(1 << 63, "thaw", 1.0)
    assert v.decode_answer(v.encode(v.Answer(2**64 - 1, False, "disk full"))) == v.Answer(2**64 - 1, False, "disk full")


def test_reply_round_trip_and_truncation():
    apps = [v.AppInfo(f"app{i}", 1000 + i, "ok", "freeze", "OK", 1.5) for i in range(4000)]
    r = v.VssReply(5, "list", True, apps=apps, frozen=["/mnt/a"], state="frozen", since=1.0)
    data = v.frame(r)
    assert len(data) <= v.MAX_REPLY + 4
    (back,) = v.client_reader().feed(data)
    assert back.truncated and 0 < len(back.apps) < 4000 and back.frozen == ["/mnt/a"]
    small = v.VssReply(6, "check", False, "busy")
    assert v.client_reader().feed(v.frame(small)) == [small]


@pytest.mark.parametrize("data, words", [
    (b"", "bad client message"),
    (b"\xc1garbage", "bad client message"),
    (msgspec.msgpack.encode({"t": "request", "msgid": -1, "op": "check"}), "msgid"),
    (msgspec.msgpack.encode({"t": "request", "msgid": 1, "op": "explode"}), "op"),
    (msgspec.msgpack.encode({"t": "register", "name": ""}), "name"),
    (msgspec.msgpack.encode({"t": "register", "name": "a\nb"}), "name"),
    (msgspec.msgpack.encode({"t": "nosuch"}), "nosuch"),
    (v.encode(v.Answer(1, True)), "t"),  # a queue message on the socket
    (b"\x00" * (v.MAX_CLIENT_FRAME + 1), "exceeds"),
])
def test_malformed_to_broker_is_refused_with_a_reason(data, words):
    with pytest.raises(v.ProtocolError) as e:
        v.decode_to_broker(data)
    assert words in str(e.value)


def test_oversized_frame_refused_from_its_header():
    r = v.broker_reader()
    with pytest.raises(v.ProtocolError, match="exceeds"):
        r.feed((1 << 20).to_bytes(4, "big"))  # nothing of the body buffered first


def test_answer_queue_refuses_other_kinds():
    with pytest.raises(v.ProtocolError):
        v.decode_answer(v.encode(v.Request(1, "check")))
    with pytest.raises(v.ProtocolError):
        v.decode_answer(b"\xc1")


def test_encode_refuses_oversized():
    with pytest.raises(v.ProtocolError, match="exceeds"):
        v.encode(v.Answer(1, False, "x" * 400), limit=100)


def test_hyperv_handshake_requests_and_answers_byte_for_byte():
    conn = hyperv.DaemonConnection()
    assert conn.start() == bytes([129]) + bytes(11)  # VSS_OP_REGISTER1, rest zero
    # Kernel answers 4 bytes (its version), then a FREEZE and half a THAW in one read.
    ev = conn.receive_data((129).to_bytes(4, "little") + hyperv.request_message(5) + hyperv.request_message(6)[:5])
    assert ev[0] == hyperv.Registered(129)
    assert isinstance(ev[1], hyperv.HostRequest) and ev[1].op == "freeze" and len(ev) == 2
    ev2 = conn.receive_data(hyperv.request_message(6)[5:] + hyperv.request_message(2, flags=5))
    assert [e.op for e in ev2] == ["thaw", "check"] and ev2[1].flags == 5
    ok = hyperv.answer(ev2[1], True)
    assert ok == bytes(8) + (5).to_bytes(4, "little") and len(ok) == 12
    fail = hyperv.answer(ev[1], False)
    assert fail[:4] == bytes.fromhex("05400080") and hyperv.parse_answer(fail) == hyperv.HV_E_FAIL
    assert hyperv.HostRequest(3, 0, bytes(12)).op is None  # GET_DM_INFO: no phase


def test_hyperv_bad_version_is_an_error():
    conn = hyperv.DaemonConnection()
    with pytest.raises(hyperv.HvProtocolError, match="version"):
        conn.receive_data((128).to_bytes(4, "little"))
