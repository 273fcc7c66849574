"""VSS messages on the POSIX message queues (sans-IO): Structs in, bytes out.

Three queues carry them, each decoded as its own tagged union so a message on
the wrong queue is refused like any other garbage:

* the broker's inbox  <- Register, Unregister, Answer (apps), VssRequest (requestors)
* an application's queue <- Registered, Request (broker)
* a requestor's reply queue <- VssReply (broker)

Every transaction carries a 64-bit msgid, so an answer that arrives after its
transaction timed out is recognised and dropped, never taken for the current
one. Decoding is validation: anything that does not decode raises
ProtocolError naming the path (msgspec's `$.field` message).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

# Small messages: the kernel default ceiling is 10 messages x 8 KiB per queue
# and RLIMIT_MSGQUEUE (800 KiB) is charged per creator; 1 KiB is plenty for
# everything but a status reply (docs/architecture.md, VSS sequence).
MAX_MESSAGE = 1024
# Reply queues carry the application table; 8 KiB is the sysctl msgsize_max
# default, so no privilege is needed (about 100 applications fit).
MAX_REPLY = 8192

U64 = Annotated[int, msgspec.Meta(ge=0)]  # msgpack ints stop at 2**64 - 1
Pid = Annotated[int, msgspec.Meta(gt=0, lt=1 << 31)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
QueueName = Annotated[str, msgspec.Meta(min_length=2, max_length=200, pattern=r"^/[^/]+$")]
Reason = Annotated[str, msgspec.Meta(max_length=400)]

AppOp = Literal["check", "freeze", "thaw"]
RequestOp = Literal["check", "freeze", "thaw", "status", "list"]
APP_OPS = ("check", "freeze", "thaw")
REQUEST_OPS = ("check", "freeze", "thaw", "status", "list")


class ProtocolError(ValueError):
    """A message that is not what this queue carries (malformed, wrong kind, too large)."""


class _Msg(msgspec.Struct, tag_field="t", frozen=True):
    pass


# application -> broker


class Register(_Msg, tag="register"):
    name: Name
    pid: Pid
    queue: QueueName  # created by the application: ipc.names.app_queue(prefix, name, pid)


class Unregister(_Msg, tag="unregister"):
    name: Name
    pid: Pid


class Answer(_Msg, tag="answer"):
    msgid: U64
    name: Name
    pid: Pid
    ok: bool
    reason: Reason = ""


# requestor -> broker


class VssRequest(_Msg, tag="request"):
    msgid: U64
    op: RequestOp
    reply_queue: QueueName
    pid: Pid
    # Per-phase timeout in seconds for this transaction; None = the broker's [vss] timeout.
    timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] | None = None


# broker -> application


class Registered(_Msg, tag="registered"):
    name: Name
    ok: bool = True
    reason: Reason = ""


class Request(_Msg, tag="op"):
    msgid: U64
    op: AppOp
    timeout: float = 15.0  # how long the broker waits for the answer


# broker -> requestor


class AppInfo(msgspec.Struct, frozen=True):
    name: str
    pid: int
    state: str  # idle, checking, freezing, thawing, ok, failed, timeout
    last_op: str = ""
    last_answer: str = ""  # "OK", "FAIL: reason", "timeout"
    last_ms: float = 0.0  # duration of its last phase


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


ToBroker = Register | Unregister | Answer | VssRequest
ToApp = Registered | Request

_enc = msgspec.msgpack.Encoder()
_dec_broker = msgspec.msgpack.Decoder(ToBroker)
_dec_app = msgspec.msgpack.Decoder(ToApp)
_dec_reply = msgspec.msgpack.Decoder(VssReply)


def encode(msg: msgspec.Struct, limit: int = MAX_MESSAGE) -> bytes:
    data = _enc.encode(msg)
    if len(data) > limit:
        raise ProtocolError(f"{type(msg).__name__} of {len(data)} bytes exceeds the {limit}-byte limit")
    return data


def encode_reply(reply: VssReply, limit: int = MAX_REPLY) -> bytes:
    """Encode a reply, dropping application rows (and saying so) until it fits."""
    data = _enc.encode(reply)
    apps = list(reply.apps)
    while len(data) > limit and apps:
        apps = apps[: len(apps) // 2]
        data = _enc.encode(msgspec.structs.replace(reply, apps=apps, truncated=True))
    if len(data) > limit:
        raise ProtocolError(f"reply of {len(data)} bytes exceeds the {limit}-byte limit")
    return data


def _decode(dec: msgspec.msgpack.Decoder, data: bytes, limit: int, what: str):
    if len(data) > limit:
        raise ProtocolError(f"{what} message of {len(data)} bytes exceeds the {limit}-byte limit")
    try:
        return dec.decode(data)
    except msgspec.DecodeError as e:  # ValidationError is a DecodeError
        raise ProtocolError(f"bad {what} message: {e}") from None


def decode_to_broker(data: bytes) -> ToBroker:
    return _decode(_dec_broker, data, MAX_MESSAGE, "broker")


def decode_to_app(data: bytes) -> ToApp:
    return _decode(_dec_app, data, MAX_MESSAGE, "application")


def decode_reply(data: bytes) -> VssReply:
    return _decode(_dec_reply, data, MAX_REPLY, "reply")
