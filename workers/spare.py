"""A spare snapshot worker (`fssd: fss spare`): started ahead, idle until assigned a snapshot.

Starting a Python process and importing the snapshot worker takes a hundred
milliseconds or more, most of what `fssconfig` used to wait for. The supervisor
keeps one of these started (workers.launch ties its life to the supervisor's,
as every worker's) with its imports done. It holds no store, no export socket
and serves nothing. When a snapshot is configured the supervisor sends it
AssignSnapshot: the very SnapshotSettings a fresh `fssN` worker would get on its
command line, and the descriptors they name, passed over the channel. It puts
its own descriptors in the settings (spawned.assigned_settings), retitles itself
`fssd: fssN volume@time`, and from there on is that snapshot's worker
(workers.snapshot.run). Stop before that: it exits. Bad assignment: one line,
exit 2 (the supervisor starts the snapshot's worker afresh).
"""

from __future__ import annotations

import logging
import os
import sys

from ipc import workermsg
from workers import snapshot, spawned
from workers.settings import SnapshotSettings, SpareSettings

log = logging.getLogger("spare")

EXIT_BAD_ASSIGNMENT = 2


def run(chan) -> int:
    chan.send(workermsg.Ready(kind="spare", pid=os.getpid()))
    for msg, fds in spawned.supervisor_messages(chan):
        if not isinstance(msg, workermsg.AssignSnapshot):
            for fd in fds:  # nothing else is expected; never leak what arrives
                os.close(fd)
            continue
        try:
            settings = spawned.assigned_settings(msg.settings, msg.fds, fds, SnapshotSettings)
        except ValueError as e:
            for fd in fds:
                os.close(fd)
            log.error("assignment refused: %s", e)
            return EXIT_BAD_ASSIGNMENT
        spawned.become(settings, snapshot.title, snapshot.log_name)
        return snapshot.run(settings, chan)
    return 0


def main(argv: list[str] | None = None) -> int:
    _settings, chan = spawned.bootstrap("workers.spare", SpareSettings, argv, title=lambda s: "fss spare", log_name=lambda s: "spare")
    return run(chan)


if __name__ == "__main__":
    sys.exit(main())
