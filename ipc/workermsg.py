"""Messages on the socketpair between the supervisor and each worker.

Every worker inherits one end of a socketpair (`--channel-fd N`). EOF on it
means the supervisor is gone: the worker exits at once, executing nothing
more (Stop is the orderly way: in-flight requests finish first).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import msgspec

from ipc.listenpolicy import ListenSection


class _Msg(msgspec.Struct, tag_field="t", frozen=True):
    pass


# supervisor -> worker


class AttachSnapshot(_Msg, tag="attach"):
    """Volume worker: barrier, then copy-on-write into this map. The backing-store fd rides along."""

    nfds: ClassVar[int] = 1  # descriptors that travel with this message (SCM_RIGHTS)
    device: str
    map_name: str
    req: int = 0  # echoed in the reply, so a late reply is never taken for a newer request
    hold: int = 0  # inside this Hold (its Held.token): attach without closing the gate again
    when_ns: int = 0  # the instant to stamp (a set's one instant); 0 = now


class Hold(_Msg, tag="hold"):
    """Volume worker, first phase of a barrier across several workers (a snapshot set): close
    the write gate and drain every write in flight; answered Held (or Refused). The gate
    opens at Release, or by itself after the worker's bound (workers.cow.HOLD_MAX)."""

    sync: bool = False  # fdatasync the volume before closing (durability "power")
    req: int = 0


class Release(_Msg, tag="release"):
    """Volume worker: open the gate held under `token`; answered Released."""

    token: int
    req: int = 0


class DetachSnapshot(_Msg, tag="detach"):
    device: str
    req: int = 0


class ListenUpdate(_Msg, tag="listen-update"):
    """TCP front (SIGHUP): reload the TLS credentials from tls_dir and apply these rules
    and limits to new connections (those open stay as they are); `volumes` are the
    live volumes now configured (the exports that are not snapshots)."""

    listen: ListenSection
    volumes: list[str]


class Stop(_Msg, tag="stop"):
    pass


class VssAsk(_Msg, tag="vss-ask"):
    """Broker: CHECK, FREEZE or THAW for `fssconfig -C`, answered with VssAnswer on this channel
    (the same answer a requestor on the VSS socket gets)."""

    op: Literal["check", "freeze", "thaw"]
    timeout: float | None = None  # per phase; None = [vss] timeout
    req: int = 0


class InvalidRecorded(_Msg, tag="invalid-recorded"):
    """Answer to Invalidated: the reason is on disk in the state directory (ok), or could not be."""

    ticket: int
    ok: bool = True


# worker -> supervisor


class Ready(_Msg, tag="ready"):
    kind: str  # "volume" | "snapshot" | "broker" | "listen"
    pid: int


class Attached(_Msg, tag="attached"):
    device: str
    barrier_us: int  # how long writes were held at the barrier
    req: int = 0


class Held(_Msg, tag="held"):
    token: int  # names the hold in AttachSnapshot.hold and Release
    drain_us: int  # closing the gate until no write was in flight
    req: int = 0


class Released(_Msg, tag="released"):
    token: int
    held_us: int  # how long writes were held, gate closed to gate open
    expired: bool = False  # it had opened by itself before the Release: the set did not hold
    req: int = 0


class Detached(_Msg, tag="detached"):
    device: str
    req: int = 0


class Refused(_Msg, tag="refused"):
    device: str
    errno: int
    reason: str
    req: int = 0


class Invalidated(_Msg, tag="invalidated"):
    """Volume worker: snapshot `device` turned invalid and its store's header could not be
    flagged; the write that found it waits for InvalidRecorded(ticket) before it goes on
    without copying. (`ticket`, not `req`: this is a request of the worker's, not a reply.)"""

    device: str
    reason: str
    ticket: int


class ClientsChanged(_Msg, tag="clients"):
    """A snapshot worker's NBD client count changed (unconfig-on-close)."""

    device: str
    count: int


class VssState(_Msg, tag="vss"):
    """The broker's phase: idle, checking, freezing, frozen, thawing; frozen mounts listed."""

    state: str
    detail: str = ""
    frozen: list[str] = []


class VssAnswer(_Msg, tag="vss-answer"):
    ok: bool
    reason: str = ""
    req: int = 0


ToWorker = AttachSnapshot | Hold | Release | DetachSnapshot | ListenUpdate | Stop | VssAsk | InvalidRecorded
FromWorker = Ready | Held | Released | Attached | Detached | Refused | Invalidated | ClientsChanged | VssState | VssAnswer
