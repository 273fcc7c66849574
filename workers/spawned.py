"""What every worker process shares: its command line and its channel to the supervisor.

Workers are spawned as `python -m workers.<kind> --channel-fd N SETTINGS_JSON`.
EOF on the channel means the supervisor is gone: the worker finishes what is
in flight and exits, so no worker outlives its supervisor.
"""

from __future__ import annotations

import argparse
import logging
import socket
from typing import Any, Iterator

import msgspec

from ipc import workermsg
from ipc.channel import Channel

log = logging.getLogger("worker")


def command_line(prog: str, settings_type: Any, argv: list[str] | None) -> tuple[Any, int]:
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--channel-fd", type=int, required=True)
    ap.add_argument("settings")
    args = ap.parse_args(argv)
    return msgspec.json.decode(args.settings, type=settings_type), args.channel_fd


def channel(fd: int) -> Channel:
    return Channel(socket.socket(fileno=fd), workermsg.ToWorker)


def supervisor_messages(chan: Channel) -> Iterator[tuple[Any, list[int]]]:
    """(message, descriptors) from the supervisor, until Stop or the supervisor goes away."""
    while True:
        try:
            got = chan.recv()
        except (OSError, ValueError) as e:
            log.error("channel to the supervisor failed: %s", e)
            return
        if got is None or isinstance(got[0], workermsg.Stop):
            return
        yield got
