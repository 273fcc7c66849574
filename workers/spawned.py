"""What every worker process shares: its start (bootstrap) and its channel to the supervisor.

Workers are spawned as `python -m workers.<kind> --channel-fd N SETTINGS_JSON`
through workers.launch, which ties their life to the supervisor's
(PR_SET_PDEATHSIG) before the worker's module is even imported. Each worker's
main() then calls bootstrap(): decode its settings (workers.settings), set the
process title, set up logging (stderr or syslog), and open its channel.
EOF on the channel means the supervisor is gone: the worker exits at once,
without executing anything a client still has queued (a new instance may
already be serving the volume, and a late write would land behind its
snapshots' backs). Backends call refuse_if_orphaned() before each request,
so a request racing with the end of file is refused too.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
from typing import Any, Callable, Iterator, Literal

import msgspec

from ipc import names, workermsg
from workers import logfmt
from ipc.channel import Channel

log = logging.getLogger("worker")

EXIT_SUPERVISOR_GONE = 75  # EX_TEMPFAIL
orphaned = False  # set once, by the main thread, when the supervisor is gone (read: refuse_if_orphaned)


def refuse_if_orphaned() -> None:
    """Called before a request touches any data: an orphan executes nothing.

    A flag, not getppid() (a syscall per request costs small requests ~5 %): the
    main thread sets it the moment the channel reads end of file, the kernel's
    PR_SET_PDEATHSIG follows within microseconds, and a new instance waits until
    this process is gone, so nothing executed in between can reach it."""
    if orphaned:
        raise OSError(errno.ESHUTDOWN, "the supervisor is gone; not executing")


def _supervisor_gone(why: str) -> None:
    global orphaned
    orphaned = True  # first: request threads stop executing now, before the log line below
    log.error("%s: exiting without executing anything still queued", why)
    logging.shutdown()
    os._exit(EXIT_SUPERVISOR_GONE)


ChannelKind = Literal["messages", "optional", "socket"]


def bootstrap(prog: str, settings_type: Any, argv: list[str] | None, *, title: Callable[[Any], str], log_name: Callable[[Any], str],
              channel_kind: ChannelKind = "messages") -> tuple[Any, Any]:
    """Every worker's start, in this order: settings, process title, logging, channel.

    `title(settings)` is the body of the process title (names.proc_title adds the
    instance), `log_name(settings)` the logger prefix. channel_kind: "messages"
    (a Channel of workermsg, required), "optional" (the same, None without
    --channel-fd: the broker run by hand), "socket" (the bare socket, for a worker
    with its own datagram protocol). Bad settings: one line on stderr, exit 2.
    Returns (settings, channel)."""
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--channel-fd", type=int, required=channel_kind != "optional", default=None)
    ap.add_argument("settings")
    args = ap.parse_args(argv)
    try:
        settings = msgspec.json.decode(args.settings, type=settings_type)
    except msgspec.DecodeError as e:
        print(f"{prog}: bad settings: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    become(settings, title, log_name)
    if args.channel_fd is None:
        return settings, None
    sock = socket.socket(fileno=args.channel_fd)
    return settings, sock if channel_kind == "socket" else Channel(sock, workermsg.ToWorker)


def become(settings: Any, title: Callable[[Any], str], log_name: Callable[[Any], str]) -> None:
    """Process title and logging for these settings (at start, and again when a spare
    worker is assigned its snapshot: `ps` always shows what the process is now)."""
    try:
        import setproctitle

        setproctitle.setproctitle(names.proc_title(title(settings), getattr(settings, "rundir", None)))
    except ImportError:
        pass
    logfmt.setup(log_name(settings), settings.debug, settings.use_syslog)


def _is_fd_field(key: str) -> bool:
    return key.endswith("_fd") or key.endswith("fds")


def _remap_fds(obj: Any, where: dict[int, int], used: set[int]) -> Any:
    """Every descriptor field's supervisor number replaced by ours (-1, "none", stays)."""

    def one(key: str, n: Any) -> Any:
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            return n
        if n not in where:
            raise ValueError(f"{key} = {n}: that descriptor did not come with the assignment")
        used.add(n)
        return where[n]

    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k.endswith("_fd"):
                out[k] = one(k, v)
            elif _is_fd_field(k) and isinstance(v, list):
                out[k] = [one(k, n) for n in v]
            else:
                out[k] = _remap_fds(v, where, used)
        return out
    if isinstance(obj, list):
        return [_remap_fds(v, where, used) for v in obj]
    return obj


def assigned_settings(settings_json: str, theirs: list[int], ours: list[int], settings_type: Any) -> Any:
    """The settings a spare worker is assigned (AssignSnapshot): the JSON a fresh worker gets on
    its command line, whose descriptor fields (`*_fd`, `*fds`) name the supervisor's numbers
    (`theirs`, sent in this order); `ours` are the same descriptors as received. Any field
    added to the settings flows through as it is; bad settings raise ValueError."""
    if len(theirs) != len(ours) or len(set(theirs)) != len(theirs):
        raise ValueError(f"{len(ours)} descriptor(s) for {len(theirs)} announced")
    used: set[int] = set()
    try:
        raw = msgspec.json.decode(settings_json)
        mapped = _remap_fds(raw, dict(zip(theirs, ours)), used)
        settings = msgspec.convert(mapped, settings_type)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ValueError(f"bad settings: {e}") from None
    if used != set(theirs):
        raise ValueError(f"descriptor(s) {sorted(set(theirs) - used)} sent but named by no field")
    return settings


def supervisor_messages(chan: Channel) -> Iterator[tuple[Any, list[int]]]:
    """(message, descriptors) from the supervisor, until Stop (then the caller finishes
    what is in flight). The supervisor going away ends the process here and now."""
    while True:
        try:
            got = chan.recv()
        except (OSError, ValueError) as e:
            _supervisor_gone(f"channel to the supervisor failed ({e})")
        if got is None:
            _supervisor_gone("the supervisor is gone (end of file on its channel)")
        if isinstance(got[0], workermsg.Stop):
            return
        yield got
