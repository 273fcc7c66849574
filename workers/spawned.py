"""What every worker process shares: its command line and its channel to the supervisor.

Workers are spawned as `python -m workers.<kind> --channel-fd N SETTINGS_JSON`
(through workers.launch, which ties their life to the supervisor's).
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
from typing import Any, Iterator

import msgspec

from ipc import workermsg
from ipc.channel import Channel

log = logging.getLogger("worker")

EXIT_SUPERVISOR_GONE = 75  # EX_TEMPFAIL
_gone = False


def refuse_if_orphaned() -> None:
    """Called before a request touches any data: an orphan executes nothing.

    A flag, not getppid() (a syscall per request costs small requests ~5 %): the
    main thread sets it the moment the channel reads end of file, the kernel's
    PR_SET_PDEATHSIG follows within microseconds, and a new instance waits until
    this process is gone, so nothing executed in between can reach it."""
    if _gone:
        raise OSError(errno.ESHUTDOWN, "the supervisor is gone; not executing")


def _supervisor_gone(why: str) -> None:
    global _gone
    _gone = True  # first: request threads stop executing now, before the log line below
    log.error("%s: exiting without executing anything still queued", why)
    logging.shutdown()
    os._exit(EXIT_SUPERVISOR_GONE)


def command_line(prog: str, settings_type: Any, argv: list[str] | None) -> tuple[Any, int]:
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--channel-fd", type=int, required=True)
    ap.add_argument("settings")
    args = ap.parse_args(argv)
    return msgspec.json.decode(args.settings, type=settings_type), args.channel_fd


def channel(fd: int) -> Channel:
    return Channel(socket.socket(fileno=fd), workermsg.ToWorker)


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
