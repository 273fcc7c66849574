"""Messages on the socketpair between the supervisor and each worker.

Every worker inherits one end of a socketpair (`--channel-fd N`). EOF on it
means the supervisor is gone: the worker exits at once, executing nothing
more (Stop is the orderly way: in-flight requests finish first).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from ipc.listenpolicy import ListenSection


class _Msg(msgspec.Struct, tag_field="t", frozen=True):
    pass


# supervisor -> worker


class AttachSnapshot(_Msg, tag="attach"):
    """Volume worker: barrier, then copy-on-write into this map. The backing-store fd rides along;
    for a tracked volume (nfds 2) so does the next generation's change map, which the barrier
    swaps in (generation track_gen)."""

    device: str
    map_name: str
    req: int = 0  # echoed in the reply, so a late reply is never taken for a newer request
    track_gen: int = 0
    nfds: int = 1  # descriptors that travel with this message (SCM_RIGHTS): store [, change map]


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


class TrackFailed(_Msg, tag="track-failed"):
    """Volume worker: a change-map mark could not be made durable (durability "power"); the
    change history can no longer be trusted, the supervisor retires the lineage."""

    reason: str


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


ToWorker = AttachSnapshot | DetachSnapshot | ListenUpdate | Stop | VssAsk | InvalidRecorded
FromWorker = Ready | Attached | Detached | Refused | Invalidated | TrackFailed | ClientsChanged | VssState | VssAnswer
