"""The NBD protocol, server side, sans-IO (after h11): bytes in, events out.

One `ServerConnection` per client. The caller owns the socket:

    conn = ServerConnection(exports)
    sock.sendall(conn.greeting())
    conn.receive_data(sock.recv(...))
    for ev in conn.events(): ...           # Request, BadRequest, Disconnect, ...
    sock.sendall(conn.data_to_send())      # option replies produced by the handshake
    sock.sendall(conn.simple_reply(cookie))  # transmission replies, built on demand

The handshake (fixed newstyle only) is answered inside the connection; the
caller sees `Ready` when transmission starts. In transmission every request
passes `_validate` (each command's constraints in one place, as nbdkit's
validate_request) and comes out either as a `Request` the caller can execute
without checking anything again, or as a `BadRequest` naming the errno and the
reason. Anything that leaves the stream unparseable (wrong magic, an option
too long to hold) puts the connection in the ERROR state: a `ProtocolError`
event, and the caller closes the socket.

Two more modes serve the TCP front (workers/tcpfront.py): `tls=True` answers
every option before NBD_OPT_STARTTLS with NBD_REP_ERR_TLS_REQD and hands the
caller a StartTLS event; `allowed=` (proxy mode) refuses names the policy
denies with NBD_REP_ERR_POLICY and turns INFO/GO into ExportWanted events the
caller answers with the export worker's own replies.

Meta contexts: `base:allocation` always; with `dirty_bitmaps=` (snapshot exports of
a tracked volume) also qemu's `qemu:dirty-bitmap:<name>` for each name it returns,
asked afresh at every LIST/SET. `meta` holds the selection as (context id, name);
the caller answers a BLOCK_STATUS with block_status_reply(), one chunk per context.

Spec: NetworkBlockDevice/nbd doc/proto.md; qemu's contexts: qemu docs/interop/nbd.rst.
"""

from __future__ import annotations

import enum
import functools
import mmap
import struct
from typing import Callable, NamedTuple

# --- magic numbers -----------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_TLS_REQD = 0x80000005
REP_ERR_UNKNOWN = 0x80000006
REP_ERR_SHUTDOWN = 0x80000007
REP_ERR_TOO_BIG = 0x80000009

# info types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_NAMES = {0: "READ", 1: "WRITE", 2: "DISC", 3: "FLUSH", 4: "TRIM", 5: "CACHE", 6: "WRITE_ZEROES", 7: "BLOCK_STATUS"}

# command flags
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply chunks
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = 32769

# errors (errno values on the wire)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# base:allocation status bits
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1
# qemu's dirty-bitmap contexts (qemu docs/interop/nbd.rst): `qemu:dirty-bitmap:<bitmap>`,
# status bit 0 set = dirty. Here a bitmap is named by the id of the earlier snapshot
# it counts changes from. They get context ids from 2 on, in the order offered.
QEMU_DIRTY_BITMAP = "qemu:dirty-bitmap:"
STATE_DIRTY = 1 << 0
# Wildcard queries LIST_META_CONTEXT expands (the empty leaf name lists the namespace;
# in SET they select nothing, as the spec recommends and qemu does).
_META_WILDCARDS = ("base:", "qemu:", QEMU_DIRTY_BITMAP)
# At most this many descriptors in one BLOCK_STATUS chunk (spec: SHOULD NOT send more than 2^20).
MAX_EXTENTS = 1 << 20

# --- limits (each with its precedent) -----------------------------------------

# Block sizes advertised in NBD_INFO_BLOCK_SIZE: what qemu-storage-daemon
# advertises (1 / 4096 / 32 MiB); the spec says any payload <= 32 MiB SHOULD be
# accepted whatever the advertised maximum.
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
MAX_PAYLOAD = 32 * 1024 * 1024
# Option data: strings are at most 4096 bytes (spec); INFO/GO/META_CONTEXT
# carry a name plus a few queries. nbdkit refuses options over 64 KiB too.
MAX_OPTION = 64 * 1024
# Strings in options (export names, queries): the spec's MUST limit.
MAX_STRING = 4096
# Options before GO: a client that never stops negotiating is a loop, not a
# client. nbdkit allows 32 per connection; be a little more generous.
MAX_OPTIONS = 128
# The receive buffer: one WRITE (header + MAX_PAYLOAD) always fits, with room
# to read ahead. Anonymous memory, so untouched pages cost nothing.
RECV_BUFFER = MAX_PAYLOAD + (1 << 20)
# Received data stays within this much of the buffer's head unless a message
# needs more, so a connection of small requests keeps a few MiB resident.
RECV_SOFT = 4 << 20
# Unparsed bytes this small are moved to the head whenever convenient.
RECV_CHEAP_MOVE = 64 * 1024

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_OPT_HDR = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPT_REPLY = struct.Struct(">QIII")  # magic, option, type, length
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_SIMPLE = struct.Struct(">IIQ")  # magic, error, cookie
_CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
_CHUNK_DATA = struct.Struct(">IHHQIQ")  # chunk header + offset


# --- exports ---------------------------------------------------------------------


class Export(NamedTuple):
    name: str
    size: int
    read_only: bool
    description: str = ""


# --- events ------------------------------------------------------------------------


class Ready(NamedTuple):
    """Handshake finished: transmission on this export."""

    export: Export


class Request(NamedTuple):
    """A validated request; `data` is the payload of a WRITE, else b""."""

    cmd: int
    flags: int
    cookie: int
    offset: int
    length: int
    data: bytes


class BadRequest(NamedTuple):
    """A request refused by validation: reply `errno` (the payload was consumed)."""

    cmd: int
    cookie: int
    errno: int
    reason: str


class Disconnect(NamedTuple):
    """NBD_CMD_DISC or NBD_OPT_ABORT: finish in-flight work, send what is queued, close."""

    reason: str


class ProtocolError(NamedTuple):
    """The stream cannot be followed any more: send what is queued, then close."""

    reason: str


class StartTLS(NamedTuple):
    """NBD_OPT_STARTTLS accepted (its ACK is queued): send data_to_send(), run the TLS
    handshake, then call tls_started(). Nothing is parsed until then."""


class ExportWanted(NamedTuple):
    """Proxy mode: INFO or GO for an export this client may open. Parsing waits until
    the caller answers with export_answered()."""

    opt: int
    name: str
    info: tuple[int, ...]  # the NBD_INFO_* the client asked for


class PolicyRefused(NamedTuple):
    """Proxy mode: an option named an export this client may not open (answered NBD_REP_ERR_POLICY)."""

    opt: int
    name: str


class State(enum.Enum):
    CLIENT_FLAGS = 1
    OPTIONS = 2
    TRANSMISSION = 3
    CLOSED = 4
    ERROR = 5


Lookup = Callable[[str], "Export | None"]
# The dirty bitmaps an export offers right now (bitmap names, without the context prefix).
Bitmaps = Callable[[str], "list[str]"]


class ServerConnection:
    """One client connection's protocol state."""

    def __init__(
        self,
        exports: list[Export],
        zero_copy: bool = False,
        refusal: str | None = None,
        tls: bool = False,
        allowed: Callable[[str], bool] | None = None,
        dirty_bitmaps: Bitmaps | None = None,
    ):
        """zero_copy: WRITE payloads are memoryviews into the receive buffer, valid
        until the next receive_buffer()/receive_data() call (the serving loop's
        contract); otherwise they are bytes.

        refusal: the server will not serve this client (e.g. too many connections):
        every option that would reach an export is answered NBD_REP_ERR_POLICY with
        this message (EXPORT_NAME, which cannot be refused, hangs up).

        tls: TLS is required (a TCP front): until STARTTLS has succeeded every option
        but STARTTLS and ABORT is answered NBD_REP_ERR_TLS_REQD (spec, "TLS support").

        allowed: proxy mode (a front that relays to the export's own worker): a name
        this predicate refuses is answered NBD_REP_ERR_POLICY wherever an option names
        it; `exports` (set_exports()) are those the client may open that exist, so LIST
        shows only those; INFO and GO come out as ExportWanted for the caller to answer.

        dirty_bitmaps: for an export name, the dirty bitmaps it offers now; each is
        the meta context `qemu:dirty-bitmap:<name>` next to base:allocation."""
        self._exports = {e.name: e for e in exports}
        self.zero_copy = zero_copy
        self.refusal = refusal
        self.tls = tls
        self.tls_active = False
        self.allowed = allowed
        self._waiting = False  # an ExportWanted or StartTLS is being answered by the caller
        self.state = State.CLIENT_FLAGS
        self.export: Export | None = None
        self.structured = False
        self.no_zeroes = False
        self.dirty_bitmaps = dirty_bitmaps
        # The selected meta contexts as (context id, name), and the export they were selected on.
        self.meta: tuple[tuple[int, str], ...] = ()
        self._meta_export: str | None = None
        self.options_seen = 0
        self._buf = mmap.mmap(-1, RECV_BUFFER)
        self._mv = memoryview(self._buf)
        self._pos = 0  # first unparsed byte
        self._end = 0  # end of received bytes
        self._out: list[bytes] = []
        # Bytes of a refused WRITE's payload still to skip, and its event.
        self._discard = 0
        self._discard_event: BadRequest | None = None

    # -- bytes in / bytes out ------------------------------------------------------

    def greeting(self) -> bytes:
        return _U64.pack(NBDMAGIC) + _U64.pack(IHAVEOPT) + _U16.pack(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

    def receive_buffer(self, soft: int = RECV_SOFT) -> memoryview:
        """Free space to receive into (sock.recv_into), then call received(n).

        The space ends at `soft` bytes from the buffer's head unless the message
        being received needs more (a large WRITE): `filled + len(view)` is how far
        the buffer may be touched, for a caller that budgets memory.

        Zero-copy payloads handed out before are invalid from here on: the
        unparsed tail may be moved to the head of the buffer.
        """
        pos, end = self._pos, self._end
        if pos == end:  # the usual case: everything parsed, start at the head
            self._pos = self._end = 0
            return self._mv[:soft]
        need = self._message_size()
        # Move the unparsed tail to the head when that is cheap, when the message would not
        # fit where it is, or when the buffer is past `soft` -- except for a large message
        # still arriving (a big WRITE's payload): it is finished in place instead (the view
        # ends where the message ends), which saves copying what has arrived of it; once it
        # is parsed the next receive starts at the head again.
        if pos and (end - pos <= RECV_CHEAP_MOVE or pos + need > RECV_BUFFER or (end >= soft and pos + need <= end)):
            self._buf.move(0, pos, end - pos)
            pos, end = 0, end - pos
            self._pos, self._end = pos, end
        return self._mv[end : min(RECV_BUFFER, max(soft, pos + need))]

    def received(self, n: int) -> None:
        self._end += n

    @property
    def filled(self) -> int:
        """Where received data ends in the buffer (the start of receive_buffer()'s view)."""
        return self._end

    def release_memory(self, keep: int = 0) -> bool:
        """Return the buffer's pages beyond `keep` bytes to the system; False (and nothing
        done) while buffered bytes lie beyond `keep`. Untouched again, they cost nothing."""
        if self._pos == self._end:
            self._pos = self._end = 0
        if self._end > keep:
            return False
        keep = -(-keep // mmap.PAGESIZE) * mmap.PAGESIZE
        if keep < RECV_BUFFER:
            self._buf.madvise(mmap.MADV_DONTNEED, keep, RECV_BUFFER - keep)
        return True

    def refuse_pending_write(self, errno: int, reason: str) -> bool:
        """Refuse the WRITE whose header is at the parse position before its payload is
        buffered: the payload will be skipped as it arrives and a BadRequest comes out.
        False if no WRITE header is waiting there."""
        if self.state is not State.TRANSMISSION or self._discard or self._end - self._pos < 28:
            return False
        magic, _f, cmd, cookie, _o, length = _REQUEST.unpack_from(self._buf, self._pos)
        if magic != REQUEST_MAGIC or cmd != CMD_WRITE:
            return False
        self._pos += 28
        self._discard = length
        self._discard_event = BadRequest(cmd, cookie, errno, reason)
        return True

    @property
    def buffered(self) -> int:
        """Bytes received and not yet parsed."""
        return self._end - self._pos

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Copying form of receive_buffer()/received() (tests, simple callers)."""
        data = memoryview(data).cast("B")
        while len(data):
            room = self.receive_buffer()
            n = min(len(room), len(data))
            if not n:
                raise BufferError("receive buffer full: handle events() before feeding more")
            room[:n] = data[:n]
            self.received(n)
            data = data[n:]

    def _message_size(self) -> int:
        """Bytes the message at the parse position needs in all (at least what a header says)."""
        avail = self._end - self._pos
        if self.state is State.TRANSMISSION:
            if self._discard or avail < 28:
                return 28
            magic, _f, cmd, _c, _o, length = _REQUEST.unpack_from(self._buf, self._pos)
            return 28 + length if cmd == CMD_WRITE and magic == REQUEST_MAGIC and length <= MAX_PAYLOAD else 28
        if self.state is State.OPTIONS:
            if avail < _OPT_HDR.size:
                return _OPT_HDR.size
            return _OPT_HDR.size + min(_OPT_HDR.unpack_from(self._buf, self._pos)[2], MAX_OPTION)
        return 4

    def data_to_send(self) -> bytes:
        """Handshake replies produced so far (transmission replies are built by the caller's calls)."""
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def events(self, until_ready: bool = False) -> list:
        """Every event the buffered bytes make; leaves a partial message buffered.

        until_ready: stop after Ready (a handshake loop that hands the connection
        on), leaving any pipelined requests buffered."""
        out: list = []
        try:
            if self.state is State.TRANSMISSION:
                # The hot loop: ordinary READ/WRITE in one tight loop, anything else (and a
                # partial message) through _next_request, until the buffer runs dry.
                next_request = self._next_request
                append = out.append
                while True:
                    if not self._discard:
                        self._ordinary_requests(append)
                    ev = next_request()
                    if ev is None:
                        break
                    append(ev)
                    if self.state is not State.TRANSMISSION:
                        break
                return out
            while self.state not in (State.CLOSED, State.ERROR) and not self._waiting:
                if self.state is State.TRANSMISSION:
                    ev = self._next_request()
                elif self.state is State.OPTIONS:
                    ev = self._next_option()
                else:
                    ev = self._client_flags()
                if ev is None:
                    break
                if ev is not True:
                    out.append(ev)
                    if until_ready and type(ev) is Ready:
                        break
                    if type(ev) is StartTLS and self._end > self._pos:
                        # Bytes sent after STARTTLS but before the TLS handshake would be
                        # taken as if they came over TLS: a plaintext injection. Refuse.
                        out.pop()
                        raise _Fatal("data sent after NBD_OPT_STARTTLS before the TLS handshake")
        except _Fatal as e:
            self.state = State.ERROR
            out.append(ProtocolError(str(e)))
        return out

    def _take(self, n: int) -> memoryview | None:
        if self._end - self._pos < n:
            return None
        view = self._mv[self._pos : self._pos + n]
        self._pos += n
        return view

    # -- handshake -------------------------------------------------------------------

    def _client_flags(self):
        raw = self._take(4)
        if raw is None:
            return None
        (flags,) = _U32.unpack(raw)
        raw.release()
        if flags & ~CLIENT_FLAGS_KNOWN:
            raise _Fatal(f"client flags {flags:#x} have unknown bits")
        if not flags & FLAG_FIXED_NEWSTYLE:
            # Plain newstyle clients cannot be told about errors; the spec lets us drop them.
            raise _Fatal("client does not support fixed newstyle negotiation")
        self.no_zeroes = bool(flags & FLAG_NO_ZEROES)
        self.state = State.OPTIONS
        return True

    def _next_option(self):
        if self._end - self._pos < _OPT_HDR.size:
            return None
        magic, opt, length = _OPT_HDR.unpack_from(self._buf, self._pos)
        if magic != IHAVEOPT:
            raise _Fatal(f"bad option magic {magic:#x}")
        if length > MAX_OPTION:
            raise _Fatal(f"option {opt} carries {length} bytes, over the limit of {MAX_OPTION}")
        if self._end - self._pos < _OPT_HDR.size + length:
            return None
        self._pos += _OPT_HDR.size
        data = bytes(self._take(length))
        self.options_seen += 1
        if self.options_seen > MAX_OPTIONS:
            raise _Fatal(f"more than {MAX_OPTIONS} options; giving up on this client")
        if self.tls and not self.tls_active and opt not in (OPT_STARTTLS, OPT_ABORT):
            if opt == OPT_EXPORT_NAME:
                raise _Fatal("NBD_OPT_EXPORT_NAME before TLS (TLS is required)")
            if opt == OPT_SET_META_CONTEXT:
                self.meta = ()
            self._opt_reply(opt, REP_ERR_TLS_REQD, b"TLS is required: send NBD_OPT_STARTTLS first")
            return True
        if self.refusal is not None and opt not in (OPT_ABORT, OPT_STRUCTURED_REPLY, OPT_STARTTLS):
            if opt == OPT_EXPORT_NAME:
                raise _Fatal(self.refusal)  # EXPORT_NAME has no way to say no
            if opt == OPT_SET_META_CONTEXT:
                self.meta = ()
            self._opt_reply(opt, REP_ERR_POLICY, self.refusal.encode()[:MAX_STRING])
            return True
        handler = self._OPTION_HANDLERS.get(opt)
        if handler is None:
            self._opt_reply(opt, REP_ERR_UNSUP, f"option {opt} is not supported".encode())
            return True
        return handler(self, opt, data)

    def _opt_reply(self, opt: int, rep: int, payload: bytes = b"") -> None:
        self._out.append(_OPT_REPLY.pack(OPT_REPLY_MAGIC, opt, rep, len(payload)) + payload)

    def _lookup(self, name: str) -> Export | None:
        exp = self._exports.get(name)
        if self.allowed is not None:
            return exp  # a front has no default export
        # The default export "" is the only export of this socket (nbdkit and qemu-nbd do the same).
        if exp is None and name == "" and len(self._exports) == 1:
            exp = next(iter(self._exports.values()))
        return exp

    def transmission_flags(self, exp: Export) -> int:
        flags = TF_HAS_FLAGS | TF_CAN_MULTI_CONN | TF_SEND_CACHE | TF_SEND_FLUSH
        if exp.read_only:
            flags |= TF_READ_ONLY
        else:
            flags |= TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO
        if self.structured:
            flags |= TF_SEND_DF
        return flags

    def _opt_export_name(self, opt: int, data: bytes):
        if self.allowed is not None:
            # It cannot be refused politely, and the reply would have to come from the worker.
            raise _Fatal("NBD_OPT_EXPORT_NAME is not served over TCP; use NBD_OPT_GO")
        name = _decode_string(data)
        exp = self._lookup(name) if name is not None else None
        if exp is None:
            # EXPORT_NAME has no way to say no: the spec's answer is to hang up.
            raise _Fatal(f"unknown export {data[:64]!r} requested with NBD_OPT_EXPORT_NAME")
        reply = _U64.pack(exp.size) + _U16.pack(self.transmission_flags(exp))
        if not self.no_zeroes:
            reply += bytes(124)
        self._out.append(reply)
        return self._start(exp)

    def _start(self, exp: Export) -> Ready:
        if self._meta_export != exp.name:
            self.meta = ()  # contexts count only for the export they were selected on (spec)
        self.export = exp
        self.state = State.TRANSMISSION
        read_flags = CMD_FLAG_FUA | (CMD_FLAG_DF if self.structured else 0)
        self._fast_flags = {CMD_READ: read_flags} if exp.read_only else {CMD_READ: read_flags, CMD_WRITE: CMD_FLAG_FUA}
        return Ready(exp)

    def _opt_abort(self, opt: int, data: bytes):
        self._opt_reply(opt, REP_ACK)
        self.state = State.CLOSED
        return Disconnect("client sent NBD_OPT_ABORT")

    def _opt_list(self, opt: int, data: bytes):
        if data:
            self._opt_reply(opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
            return True
        for exp in self._exports.values():
            name = exp.name.encode()
            self._opt_reply(opt, REP_SERVER, _U32.pack(len(name)) + name + exp.description.encode())
        self._opt_reply(opt, REP_ACK)
        return True

    def _opt_starttls(self, opt: int, data: bytes):
        if not self.tls:
            self._opt_reply(opt, REP_ERR_UNSUP, b"TLS is not offered here")
            return True
        if data:
            self._opt_reply(opt, REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
            return True
        if self.tls_active:
            self._opt_reply(opt, REP_ERR_INVALID, b"TLS is already active")
            return True
        self._opt_reply(opt, REP_ACK)
        self._waiting = True
        return StartTLS()

    def tls_started(self) -> None:
        """The TLS handshake after StartTLS succeeded: negotiation goes on over TLS."""
        self.tls_active = True
        self._waiting = False

    def set_exports(self, exports: list[Export]) -> None:
        """Proxy mode: the exports this client may open that exist now (LIST, meta contexts)."""
        self._exports = {e.name: e for e in exports}

    def _refused_by_policy(self, opt: int, name: str | None):
        """Proxy mode: POLICY for a name the client may not open; None if it may."""
        if self.allowed is None or name is None or self.allowed(name):
            return None
        if opt == OPT_SET_META_CONTEXT:
            self.meta = ()
        self._opt_reply(opt, REP_ERR_POLICY, f"export {name!r} is not available to this client".encode()[:MAX_STRING])
        return PolicyRefused(opt, name)

    def export_answered(self, opt: int, replies: bytes, export: Export | None) -> Ready | None:
        """Proxy mode: the answer to an ExportWanted, `replies` as the export's worker gave
        them (INFO replies and ACK, or an error). A GO with an export: transmission starts
        (the caller relays from here; take_buffered() has what the client sent after GO)."""
        self._waiting = False
        self._out.append(replies)
        if opt == OPT_GO and export is not None:
            return self._start(export)
        return None

    def take_buffered(self) -> bytes:
        """Received bytes not parsed yet (a proxy forwards them after GO)."""
        data = bytes(self._mv[self._pos : self._end])
        self._pos = self._end = 0
        return data

    def _opt_info_go(self, opt: int, data: bytes):
        if len(data) < 6:
            self._opt_reply(opt, REP_ERR_INVALID, b"option data too short")
            return True
        (namelen,) = _U32.unpack_from(data, 0)
        if namelen > MAX_STRING or 4 + namelen + 2 > len(data):
            self._opt_reply(opt, REP_ERR_INVALID, b"export name length does not fit the option")
            return True
        name = _decode_string(data[4 : 4 + namelen])
        (n,) = _U16.unpack_from(data, 4 + namelen)
        if 4 + namelen + 2 + 2 * n != len(data):
            self._opt_reply(opt, REP_ERR_INVALID, b"number of info requests does not match the option length")
            return True
        wanted = set(struct.unpack_from(f">{n}H", data, 4 + namelen + 2))
        refused = self._refused_by_policy(opt, name)
        if refused is not None:
            return refused
        exp = self._lookup(name) if name is not None else None
        if exp is None:
            self._opt_reply(opt, REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
            return True
        if self.allowed is not None:
            self._waiting = True
            return ExportWanted(opt, name, tuple(sorted(wanted)))
        self._opt_reply(opt, REP_INFO, _U16.pack(INFO_EXPORT) + _U64.pack(exp.size) + _U16.pack(self.transmission_flags(exp)))
        if INFO_NAME in wanted:
            self._opt_reply(opt, REP_INFO, _U16.pack(INFO_NAME) + exp.name.encode())
        if INFO_DESCRIPTION in wanted and exp.description:
            self._opt_reply(opt, REP_INFO, _U16.pack(INFO_DESCRIPTION) + exp.description.encode())
        if INFO_BLOCK_SIZE in wanted:
            self._opt_reply(opt, REP_INFO, _U16.pack(INFO_BLOCK_SIZE) + struct.pack(">III", MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD))
        self._opt_reply(opt, REP_ACK)
        if opt == OPT_GO:
            return self._start(exp)
        return True

    def _opt_structured_reply(self, opt: int, data: bytes):
        if data:
            self._opt_reply(opt, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")
        elif self.structured:
            self._opt_reply(opt, REP_ERR_INVALID, b"structured replies are already negotiated")
        else:
            self.structured = True
            self._opt_reply(opt, REP_ACK)
        return True

    @property
    def meta_base_allocation(self) -> bool:
        """base:allocation is among the selected meta contexts."""
        return any(name == BASE_ALLOCATION for _, name in self.meta)

    def available_contexts(self, exp: Export) -> list[str]:
        """Every meta context `exp` offers now, base:allocation first; a context's id
        (when selected) is its index here + 1."""
        names = [BASE_ALLOCATION]
        if self.dirty_bitmaps is not None:
            names += [QEMU_DIRTY_BITMAP + b for b in self.dirty_bitmaps(exp.name)]
        return names

    def _opt_meta_context(self, opt: int, data: bytes):
        if opt == OPT_SET_META_CONTEXT:
            # SET replaces the selection "including when this command fails" (spec):
            # whatever happens below, what an earlier SET chose is gone.
            self.meta = ()
        if opt == OPT_SET_META_CONTEXT and not self.structured:
            self._opt_reply(opt, REP_ERR_INVALID, b"NBD_OPT_SET_META_CONTEXT needs structured replies first")
            return True
        parsed = _parse_meta_queries(data)
        if parsed is None:
            self._opt_reply(opt, REP_ERR_INVALID, b"malformed meta context request")
            return True
        name, queries = parsed
        refused = self._refused_by_policy(opt, name)
        if refused is not None:
            return refused
        exp = self._lookup(name)
        if exp is None:
            self._opt_reply(opt, REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
            return True
        # Bitmaps are asked for only when a query could match one (a front asks the worker).
        if (opt == OPT_LIST_META_CONTEXT and not queries) or any(q.startswith("qemu:") for q in queries):
            available = self.available_contexts(exp)
        else:
            available = [BASE_ALLOCATION]
        if opt == OPT_LIST_META_CONTEXT:
            # No query: everything. A namespace wildcard lists what it covers; an exact
            # name lists itself if offered; anything else (unknown namespaces) nothing.
            for ctx in available:
                if not queries or any(q == ctx or (q in _META_WILDCARDS and ctx.startswith(q)) for q in queries):
                    self._opt_reply(opt, REP_META_CONTEXT, _U32.pack(0) + ctx.encode())  # LIST ids are 0
        else:
            # Exact names only; each selected once, whatever the queries repeat.
            wanted = set(queries)
            self.meta = tuple((i + 1, ctx) for i, ctx in enumerate(available) if ctx in wanted)
            self._meta_export = exp.name
            for ctx_id, ctx in self.meta:
                self._opt_reply(opt, REP_META_CONTEXT, _U32.pack(ctx_id) + ctx.encode())
        self._opt_reply(opt, REP_ACK)
        return True

    _OPTION_HANDLERS = {
        OPT_EXPORT_NAME: _opt_export_name,
        OPT_ABORT: _opt_abort,
        OPT_LIST: _opt_list,
        OPT_STARTTLS: _opt_starttls,
        OPT_INFO: _opt_info_go,
        OPT_GO: _opt_info_go,
        OPT_STRUCTURED_REPLY: _opt_structured_reply,
        OPT_LIST_META_CONTEXT: _opt_meta_context,
        OPT_SET_META_CONTEXT: _opt_meta_context,
    }

    # -- transmission ----------------------------------------------------------------

    def _ordinary_requests(self, append) -> None:
        """The fast path of _next_request: every whole READ/WRITE at the parse position that
        _validate's fast test passes (in range, ordinary flags) becomes a Request; the
        first message that isn't one (or isn't whole) is left for _next_request. One
        loop with locals instead of two calls per request: this is the per-request cost
        of small pipelined I/O."""
        pos, end = self._pos, self._end
        if end - pos < 28:
            return
        buf, mv = self._buf, self._mv
        unpack_from = _REQUEST.unpack_from
        fast = self._fast_flags
        size = self.export.size
        zero_copy = self.zero_copy
        try:
            while end - pos >= 28:
                magic, flags, cmd, cookie, offset, length = unpack_from(buf, pos)
                mask = fast.get(cmd)
                if magic != REQUEST_MAGIC or mask is None or flags & ~mask or not 0 < length <= MAX_PAYLOAD or offset + length > size:
                    return  # _next_request says what it is
                if cmd == CMD_WRITE:
                    start = pos + 28
                    stop = start + length
                    if stop > end:
                        return  # its payload is still arriving
                    data = mv[start:stop]
                    append(_new(Request, (cmd, flags, cookie, offset, length, data if zero_copy else bytes(data))))
                    pos = stop
                else:
                    append(_new(Request, (cmd, flags, cookie, offset, length, b"")))
                    pos += 28
        finally:
            self._pos = pos

    def _next_request(self):
        buf = self._buf
        if self._discard:
            n = min(self._discard, self._end - self._pos)
            self._pos += n
            self._discard -= n
            if self._discard:
                return None
            ev, self._discard_event = self._discard_event, None
            return ev
        if self._end - self._pos < 28:
            return None
        magic, flags, cmd, cookie, offset, length = _REQUEST.unpack_from(buf, self._pos)
        if magic != REQUEST_MAGIC:
            raise _Fatal(f"bad request magic {magic:#x}")
        if cmd == CMD_WRITE:
            err = self._validate(cmd, flags, offset, length)
            if err is None:
                if self._end - self._pos < 28 + length:
                    return None
                start = self._pos + 28
                self._pos = start + length
                data = self._mv[start : start + length]
                return _new(Request, (cmd, flags, cookie, offset, length, data if self.zero_copy else bytes(data)))
            # Refused: skip the payload without holding it, then report.
            self._pos += 28
            self._discard = length
            self._discard_event = BadRequest(cmd, cookie, err[0], err[1])
            return self._next_request() if self._discard else self._discard_event
        self._pos += 28
        if cmd == CMD_DISC:
            self.state = State.CLOSED
            return Disconnect("client sent NBD_CMD_DISC")
        err = self._validate(cmd, flags, offset, length)
        if err is not None:
            return BadRequest(cmd, cookie, err[0], err[1])
        return _new(Request, (cmd, flags, cookie, offset, length, b""))

    def _validate(self, cmd: int, flags: int, offset: int, length: int) -> tuple[int, str] | None:
        """Every command's constraints, in one place. None = valid, else (errno, reason)."""
        exp = self.export
        # The hot path: READ / WRITE in range with ordinary flags (masks set at _start
        # from the same rules as below; a WRITE to a read-only export has no mask).
        if 0 < length <= MAX_PAYLOAD and offset + length <= exp.size:
            mask = self._fast_flags.get(cmd)
            if mask is not None and not flags & ~mask:
                return None
        name = CMD_NAMES.get(cmd, f"command {cmd}")
        allowed = CMD_FLAG_FUA if not exp.read_only else 0
        if cmd == CMD_WRITE_ZEROES:
            allowed |= CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO
        elif cmd == CMD_READ and self.structured:
            allowed |= CMD_FLAG_DF
        elif cmd == CMD_BLOCK_STATUS:
            allowed |= CMD_FLAG_REQ_ONE
        if exp.read_only:
            # Clients set FUA on any command once it is advertised; tolerate it as a no-op.
            allowed |= CMD_FLAG_FUA
        if cmd not in CMD_NAMES:
            return EINVAL, f"unknown command {cmd}"
        if flags & ~allowed:
            return EINVAL, f"{name}: unsupported flags {flags & ~allowed:#x}"
        if cmd == CMD_FLUSH:
            if offset or length:
                return EINVAL, "FLUSH: offset and length must be 0"
            return None
        if exp.read_only and cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
            return EPERM, f"{name}: export {exp.name} is read-only"
        if length == 0:
            return EINVAL, f"{name}: length 0"
        if cmd in (CMD_READ, CMD_WRITE) and length > MAX_PAYLOAD:
            if cmd == CMD_READ and self.structured:
                return EOVERFLOW, f"READ: length {length} over the maximum payload {MAX_PAYLOAD}"
            return EINVAL, f"{name}: length {length} over the maximum payload {MAX_PAYLOAD}"
        if offset + length > exp.size:
            # Writes (WRITE_ZEROES included, as its extension says; qemu and nbdkit agree) get ENOSPC.
            if cmd in (CMD_WRITE, CMD_WRITE_ZEROES):
                return ENOSPC, f"{name}: {offset}+{length} is past the end ({exp.size})"
            return EINVAL, f"{name}: {offset}+{length} is past the end ({exp.size})"
        if cmd == CMD_BLOCK_STATUS and not self.meta:
            return EINVAL, "BLOCK_STATUS: no metadata context was negotiated"
        if flags & CMD_FLAG_FAST_ZERO and flags & CMD_FLAG_NO_HOLE:
            # We zero fast only by punching holes; NO_HOLE forbids that.
            return ENOTSUP, "WRITE_ZEROES: FAST_ZERO with NO_HOLE cannot be done fast here"
        return None

    # -- replies (transmission) ----------------------------------------------------------

    def simple_reply(self, cookie: int, error: int = 0) -> bytes:
        return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, cookie)

    def read_reply_header(self, cookie: int, offset: int, length: int, done: bool = True) -> bytes:
        """Header to send before `length` bytes of read data (structured or simple).

        done=False (structured only): the data chunk does not end the reply, so an
        error met while its bytes are still being produced can be reported after
        them; finish with read_reply_end() or error_reply()."""
        if self.structured:
            return _CHUNK_DATA.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, REPLY_TYPE_OFFSET_DATA, cookie, 8 + length, offset)
        return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cookie)

    def read_reply_end(self, cookie: int) -> bytes:
        """The NONE chunk flagged DONE that ends a structured read sent with done=False."""
        return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)

    def error_reply(self, cookie: int, error: int, message: str = "") -> bytes:
        if self.structured:
            # Cut to the spec's string limit between characters: the message must stay UTF-8.
            msg = message.encode()[:MAX_STRING].decode("utf-8", "ignore").encode()
            payload = _U32.pack(error) + _U16.pack(len(msg)) + msg
            return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, len(payload)) + payload
        return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, cookie)

    def block_status_reply(self, cookie: int, length: int, req_one: bool, chunks: list[tuple[int, list[tuple[int, int]]]]) -> bytes:
        """The reply to a BLOCK_STATUS of `length` bytes: one chunk per selected context,
        `chunks` = [(context id, extents as (length, flags))], the extents starting at the
        request's offset. Held to the spec's rules: each chunk has at least one descriptor,
        covers at most the request (the last one cut at its end; with REQ_ONE exactly one
        descriptor), neighbours with equal flags merged, at most MAX_EXTENTS descriptors.
        ValueError if a context has no extent (nothing safe to say: a dirty bitmap must
        never report clean by default)."""
        out = []
        last = len(chunks) - 1
        for i, (ctx_id, extents) in enumerate(chunks):
            desc = _descriptors(extents, length, 1 if req_one else MAX_EXTENTS)
            if not desc:
                raise ValueError(f"no extents for meta context {ctx_id}")
            payload = _U32.pack(ctx_id) + struct.pack(f">{2 * len(desc)}I", *(v for d in desc for v in d))
            out.append(_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if i == last else 0, REPLY_TYPE_BLOCK_STATUS, cookie, len(payload)) + payload)
        return b"".join(out)


def _descriptors(extents: list[tuple[int, int]], length: int, most: int) -> list[tuple[int, int]]:
    """Extents merged and cut to the first `length` bytes, at most `most` of them."""
    out: list[list[int]] = []
    covered = 0
    for n, flags in extents:
        if n <= 0:
            continue
        n = min(n, length - covered)
        if out and out[-1][1] == flags:
            out[-1][0] += n
        elif len(out) == most:
            break
        else:
            out.append([n, flags])
        covered += n
        if covered >= length:
            break
    return [(n, f) for n, f in out]


class _Fatal(Exception):
    pass


# ok_reply(cookie) == simple_reply(cookie): a success reply in one C call (the small-write hot path).
ok_reply = functools.partial(_SIMPLE.pack, SIMPLE_REPLY_MAGIC, 0)


def option_reply(opt: int, rep: int, message: str = "") -> bytes:
    """One option reply (an error's message as its payload), for a proxy's own answers."""
    payload = message.encode()[:MAX_STRING]
    return _OPT_REPLY.pack(OPT_REPLY_MAGIC, opt, rep, len(payload)) + payload


# Builds the per-request NamedTuples without the generated __new__ (twice as fast on the hot path).
_new = tuple.__new__


def _decode_string(data: bytes) -> str | None:
    if len(data) > MAX_STRING or b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _parse_meta_queries(data: bytes) -> tuple[str, list[str]] | None:
    if len(data) < 8:
        return None
    (namelen,) = _U32.unpack_from(data, 0)
    if namelen > MAX_STRING or 4 + namelen + 4 > len(data):
        return None
    name = _decode_string(data[4 : 4 + namelen])
    pos = 4 + namelen
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        if pos + 4 > len(data):
            return None
        (qlen,) = _U32.unpack_from(data, pos)
        pos += 4
        if qlen > MAX_STRING or pos + qlen > len(data):
            return None
        q = _decode_string(data[pos : pos + qlen])
        if q is None:
            return None
        queries.append(q)
        pos += qlen
    if pos != len(data) or name is None:
        return None
    return name, queries
