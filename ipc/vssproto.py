"""VSS messages (sans-IO): Structs in, bytes out.

Two transports carry them, each decoded as its own union so a message in the
wrong place is refused like any other garbage:

* the broker's Unix socket (RUNDIR/vss.sock), length-prefixed frames; the
  kernel tells the broker who connected (SO_PEERCRED):
    client -> broker: Register, then Opened (an application) or VssRequest (a requestor)
    broker -> client: Registered or VssReply
  An application keeps its connection open while registered: EOF unregisters.
* two POSIX message queues per application, created by the broker, owned by
  the application's uid, mode 0600:
    requests queue: broker -> application, Request
    answers queue:  application -> broker, Answer
  An answer is attributed to the application whose queue it arrived on, so
  nobody can answer for another uid's application.

Every transaction carries a 64-bit msgid, so an answer that arrives after its
transaction timed out is recognised and dropped, never taken for the current
one. Decoding is validation: anything that does not decode raises
ProtocolError naming the path (msgspec's `$.field` message).
"""

from __future__ import annotations

import struct
from typing import Annotated, Literal

import msgspec

# Queue messages are small: a Request is ~40 bytes, an Answer at most ~450.
MAX_MESSAGE = 512
# Socket frames from clients: a Register or a VssRequest is well under this.
MAX_CLIENT_FRAME = 1024
# Replies carry the application table; beyond this, rows are dropped (and flagged).
MAX_REPLY = 65536

U64 = Annotated[int, msgspec.Meta(ge=0)]  # msgpack ints stop at 2**64 - 1
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")]
QueueName = Annotated[str, msgspec.Meta(min_length=2, max_length=200, pattern=r"^/[^/]+$")]
Reason = Annotated[str, msgspec.Meta(max_length=400)]
Timeout = Annotated[float, msgspec.Meta(gt=0, le=3600)]

AppOp = Literal["check", "freeze", "thaw"]
RequestOp = Literal["check", "freeze", "thaw", "status", "list"]
APP_OPS = ("check", "freeze", "thaw")
REQUEST_OPS = ("check", "freeze", "thaw", "status", "list")
CONTROL_OPS = ("check", "freeze", "thaw")


class ProtocolError(ValueError):
    """A message that is not what this transport carries (malformed, wrong kind, too large)."""


class _Msg(msgspec.Struct, tag_field="t", frozen=True):
    pass


# client -> broker (socket)


class Register(_Msg, tag="register"):
    """An application asks for its queues. Its pid and uid are the kernel's, not in here."""

    name: Name


class Opened(_Msg, tag="opened"):
    """The application has opened both queues: the broker removes their names (nothing to leak,
    nobody else to open them), the open descriptors carry on."""


class VssRequest(_Msg, tag="request"):
    msgid: U64
    op: RequestOp
    # Per-phase timeout in seconds for this transaction; None = the broker's [vss] timeout.
    timeout: Timeout | None = None


# broker -> application (socket)


class Registered(_Msg, tag="registered"):
    name: str
    ok: bool = True
    reason: str = ""
    requests: str = ""  # queue the application reads Requests from
    answers: str = ""  # queue the application writes Answers to
    pid: int = 0  # the pid the broker registered (the kernel's word)


# broker -> application (its requests queue)


class Request(_Msg, tag="op"):
    msgid: U64
    op: AppOp
    timeout: float = 15.0  # how long the broker waits for the answer


# application -> broker (its answers queue)


class Answer(_Msg, tag="answer"):
    msgid: U64
    ok: bool
    reason: Reason = ""


# broker -> requestor (socket)


class AppInfo(msgspec.Struct, frozen=True):
    name: str
    pid: int
    state: str  # idle, checking, freezing, thawing, ok, failed, timeout
    last_op: str = ""
    last_answer: str = ""  # "OK", "FAIL: reason", "timeout"
    last_ms: float = 0.0  # duration of its last phase
    uid: int = -1


class VssReply(_Msg, tag="reply"):
    msgid: U64
    op: RequestOp
    ok: bool
    reason: str = ""
    elapsed_ms: float = 0.0  # request received to answer sent
    state: str = "idle"  # broker state after the request: idle, checking, freezing, frozen, thawing
    since: float = 0.0  # wall-clock time the broker entered `state`
    frozen: list[str] = []  # mounts frozen now
    window_ms: float = 0.0  # thaw replies: how long the file systems were frozen
    apps: list[AppInfo] = []
    truncated: bool = False  # the app table did not fit in one message
    # What a freeze holds, while frozen: applications that answered FREEZE OK, the freeze
    # hooks that ran (their directory; "" = none configured), the mounts configured to freeze.
    held: list[str] = []
    hooks: str = ""
    mounts: list[str] = []


ToBroker = Register | Opened | VssRequest
FromBroker = Registered | VssReply

_enc = msgspec.msgpack.Encoder()
_dec_broker = msgspec.msgpack.Decoder(ToBroker)
_dec_client = msgspec.msgpack.Decoder(FromBroker)
_dec_request = msgspec.msgpack.Decoder(Request)
_dec_answer = msgspec.msgpack.Decoder(Answer)
_LEN = struct.Struct(">I")


def encode(msg: msgspec.Struct, limit: int = MAX_MESSAGE) -> bytes:
    """A queue message."""
    data = _enc.encode(msg)
    if len(data) > limit:
        raise ProtocolError(f"{type(msg).__name__} of {len(data)} bytes exceeds the {limit}-byte limit")
    return data


def _fit_reply(reply: VssReply, limit: int) -> bytes:
    """Drop application rows (and say so) until the reply fits."""
    data = _enc.encode(reply)
    apps = list(reply.apps)
    while len(data) > limit and apps:
        apps = apps[: len(apps) // 2]
        data = _enc.encode(msgspec.structs.replace(reply, apps=apps, truncated=True))
    if len(data) > limit:
        raise ProtocolError(f"reply of {len(data)} bytes exceeds the {limit}-byte limit")
    return data


def frame(msg: msgspec.Struct, limit: int = MAX_REPLY) -> bytes:
    """A socket frame: u32 big-endian length, then msgpack."""
    body = _fit_reply(msg, limit) if isinstance(msg, VssReply) else _enc.encode(msg)
    if len(body) > limit:
        raise ProtocolError(f"{type(msg).__name__} of {len(body)} bytes exceeds the {limit}-byte limit")
    return _LEN.pack(len(body)) + body


class FrameReader:
    """Socket bytes in, messages out; the length is checked before anything is buffered."""

    def __init__(self, decoder: msgspec.msgpack.Decoder, limit: int, what: str):
        self._dec, self._limit, self._what = decoder, limit, what
        self._buf = bytearray()

    def feed(self, data: bytes) -> list:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf)
            if n > self._limit:
                raise ProtocolError(f"{self._what} frame of {n} bytes exceeds the {self._limit}-byte limit")
            if len(self._buf) < 4 + n:
                break
            body = bytes(self._buf[4 : 4 + n])
            del self._buf[: 4 + n]
            out.append(_decode(self._dec, body, self._limit, self._what))
        return out

    def wants(self) -> int:
        """Bytes still needed for the next frame (at least 1): reads never take more."""
        if len(self._buf) < 4:
            return 4 - len(self._buf)
        return max(1, 4 + _LEN.unpack_from(self._buf)[0] - len(self._buf))


def broker_reader() -> FrameReader:
    """What the broker reads from a client."""
    return FrameReader(_dec_broker, MAX_CLIENT_FRAME, "client")


def client_reader() -> FrameReader:
    """What a client reads from the broker."""
    return FrameReader(_dec_client, MAX_REPLY, "broker")


def _decode(dec: msgspec.msgpack.Decoder, data: bytes, limit: int, what: str):
    if len(data) > limit:
        raise ProtocolError(f"{what} message of {len(data)} bytes exceeds the {limit}-byte limit")
    try:
        return dec.decode(data)
    except msgspec.DecodeError as e:  # ValidationError is a DecodeError
        raise ProtocolError(f"bad {what} message: {e}") from None


def decode_to_broker(data: bytes) -> ToBroker:
    return _decode(_dec_broker, data, MAX_CLIENT_FRAME, "client")


def decode_request(data: bytes) -> Request:
    return _decode(_dec_request, data, MAX_MESSAGE, "request")


def decode_answer(data: bytes) -> Answer:
    return _decode(_dec_answer, data, MAX_MESSAGE, "answer")


def decode_reply(data: bytes) -> VssReply:
    msg = _decode(_dec_client, data, MAX_REPLY, "reply")
    if not isinstance(msg, VssReply):
        raise ProtocolError(f"bad reply message: expected a reply, got {type(msg).__name__}")
    return msg
