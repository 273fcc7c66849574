"""Group commit: concurrent copy-on-writes share one fdatasync of the backing store.

Under `durability = "power"` a first-touch live write waits until the old
cluster's copy and its table entry are durable (LVM's persistent exception
store: the origin write is released only after the exception is committed).
One fdatasync per copy would serialise every writer behind the disk; here
whoever arrives while no sync runs syncs for everyone whose writes were issued
before it started, and those who arrive during a sync wait for the next one,
which the first of them starts. Writes to clusters already copied never come
here.

`Watermark` tracks store clusters reserved but not yet committed, so the
commit record can say "every store cluster below W is durable with its entry"
and recovery re-reads only the copies at or above W.
"""

from __future__ import annotations

import threading
from typing import Callable


class CommitFailed(OSError):
    """The sync covering these writes failed: they may not be durable."""


class GroupCommit:
    def __init__(self, sync: Callable[[], None], before: Callable[[], object] | None = None, after: Callable[[object], None] | None = None):
        """`sync` makes every write issued before it durable (os.fdatasync of the store).
        `before()` runs just before each sync, under the lock; `after(its result)` runs
        after the sync succeeded, before the waiters are released."""
        self._sync = sync
        self._before = before
        self._after = after
        self._cond = threading.Condition()
        self._issued = 0  # tickets handed out
        self._durable = 0  # every ticket up to this one is durable
        self._failed_upto = 0  # tickets up to this one were covered by a failed sync
        self._error: OSError | None = None
        self._syncing = False
        self.syncs = 0  # for tests and status: how many syncs served how many commits
        self.commits = 0

    def commit(self) -> None:
        """Call after your writes were issued; returns when a sync that began after them
        has returned. Raises CommitFailed if that sync failed."""
        with self._cond:
            self._issued += 1
            self.commits += 1
            ticket = self._issued
            while self._durable < ticket:
                if ticket <= self._failed_upto:
                    raise CommitFailed(self._error.errno if self._error else 5, f"sync of the backing store failed: {self._error}")
                if self._syncing:
                    self._cond.wait()
                    continue
                self._syncing = True
                target = self._issued  # everyone who has a ticket issued their writes already
                token = self._before() if self._before else None
                self._cond.release()
                err: OSError | None = None
                try:
                    self._sync()
                    if self._after:
                        self._after(token)
                except OSError as e:
                    err = e
                finally:
                    self._cond.acquire()
                    self._syncing = False
                    self.syncs += 1
                    if err is None:
                        self._durable = max(self._durable, target)
                    else:
                        self._error = err
                        self._failed_upto = max(self._failed_upto, target)
                    self._cond.notify_all()


class Watermark:
    """Store clusters handed out but not yet durable; low() is the lowest of them."""

    def __init__(self, start: int):
        self._lock = threading.Lock()
        self._open: dict[int, int] = {}  # first store cluster of a reservation -> how many reservations start there
        self._high = start  # the next cluster that would be handed out
        # Told the lowest open reservation (None: none) after each change, under this lock:
        # with several processes per volume, published in the process's slot (ipc/cowshare.py).
        self.on_change: Callable[[int | None], None] | None = None

    def opened(self, first: int, n: int) -> None:
        with self._lock:
            self._open[first] = self._open.get(first, 0) + 1
            self._high = max(self._high, first + n)
            if self.on_change is not None:
                self.on_change(min(self._open))

    def closed(self, first: int) -> None:
        with self._lock:
            left = self._open.get(first, 0) - 1
            if left > 0:
                self._open[first] = left
            else:
                self._open.pop(first, None)
            if self.on_change is not None:
                self.on_change(min(self._open, default=None))

    def low(self) -> int:
        """Every store cluster below this is either not handed out or written and closed."""
        with self._lock:
            return min(self._open, default=self._high)
