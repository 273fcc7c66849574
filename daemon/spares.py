"""The spare snapshot worker: one kept started and idle, so a configure need not wait for Python.

Starting a snapshot worker (a Python process and its imports) takes 100-200 ms
on a busy machine; the rest of a configure takes a few. The supervisor keeps
one `fssd: fss spare` process (workers/spare.py) started in the background,
holding nothing and serving nothing. A configure takes it (`take()`): the
snapshot's Worker assigns it the snapshot's settings and descriptors
(Worker.start(spare=...)) and owns the process from then on. The next spare is
started once the configure has been answered (the supervisor calls start()
after every control reply): a Python start takes a CPU for 100 ms or more, and
on a small machine it would compete with the snapshot's worker, the
supervisor and the fssconfig waiting for them. A spare still starting is waited for (it is
ahead of a new process); none at all (dead, waiting for its restart): the
snapshot's worker is spawned afresh, as are restarts after a crash and
snapshots brought back at start-up.

A spare that dies is started again under its own RestartPolicy, like any
worker; it was never a snapshot, so nothing else notices. It is tied to the
supervisor's life like every worker (workers/launch.py), so an orphaned spare
exits.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from daemon.procs import Worker, WorkerGone

log = logging.getLogger("supervisor")

# Test hook: set to keep no spare (every snapshot worker spawned afresh).
NO_SPARE_ENV = "FSSD_TEST_NO_SPARE"


class SparePool:
    def __init__(self, make: Callable[[], Worker], enabled: bool = True):
        self.make = make  # a new, not yet started spare Worker
        self.enabled = enabled
        self.spare: Worker | None = None
        self.stopped = False

    def workers(self) -> list[Worker]:
        return [self.spare] if self.spare is not None else []

    def start(self) -> None:
        """Start a spare in the background, unless there is one (it restarts itself)."""
        if not self.enabled or self.stopped or self.spare is not None:
            return
        w = self.make()
        self.spare = w
        asyncio.ensure_future(self._start(w))

    async def _start(self, w: Worker) -> None:
        if self.stopped or w.stopping:  # stopped before this task ran
            return
        try:
            await w.start()
            if w.alive:  # else a configure took it the moment it was ready
                log.debug("spare snapshot worker ready (pid %d)", w.pid)
        except WorkerGone as e:  # its exit (or the kill after a time-out) schedules the restart
            log.warning("spare snapshot worker: %s", e)
        except OSError as e:
            log.error("spare snapshot worker: cannot start: %s", e)
            if self.spare is w and not w.alive:
                w._schedule_restart()

    def take(self) -> Worker | None:
        """The spare, for a snapshot's Worker to assign (Worker.start waits for its Ready if it
        is still starting: it is ahead of a fresh spawn). The next one is started by start(),
        once the configure has answered. None (no spare, or it is between a death and its
        restart): spawn afresh."""
        w = self.spare
        if w is None or not w.alive or w.stopping or w.ready is None:
            return None
        self.spare = None
        w.stopping = True  # a snapshot's from now on: never restarted as a spare
        return w

    async def stop(self) -> None:
        self.stopped = True
        w, self.spare = self.spare, None
        if w is not None:
            await w.stop()
