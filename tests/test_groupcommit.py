"""Group commit (workers/groupcommit.py): concurrent commits share one sync; none returns early."""

import threading
import time

import pytest

from workers.groupcommit import CommitFailed, GroupCommit, Watermark


class SlowSync:
    """A sync that records which writes it covered: everything issued before it began."""

    def __init__(self):
        self.issued = 0  # writes issued so far (a counter the writers bump before committing)
        self.durable = 0
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.started = threading.Event()
        self.calls = 0

    def issue(self):
        with self.lock:
            self.issued += 1
            return self.issued

    def __call__(self):
        with self.lock:
            covered = self.issued
        self.calls += 1
        self.started.set()
        self.release.wait(5)
        self.durable = max(self.durable, covered)


def test_writers_waiting_during_a_sync_share_the_next_one():
    s = SlowSync()
    gc = GroupCommit(s)
    seen = []

    def writer():
        mine = s.issue()
        gc.commit()
        seen.append(mine <= s.durable)  # never released before a sync covered our write

    first = threading.Thread(target=writer)
    first.start()
    assert s.started.wait(5)  # the first writer's sync is running
    others = [threading.Thread(target=writer) for _ in range(20)]
    for t in others:
        t.start()
    while gc.commits < 21:  # all 20 hold tickets, waiting behind the running sync
        threading.Event().wait(0.001)
    s.release.set()
    for t in [first] + others:
        t.join(5)
    assert seen == [True] * 21
    assert s.calls == 2, "the 20 that waited during the first sync must share one"
    assert gc.syncs == 2


def test_many_threads_every_commit_is_covered_and_syncs_are_shared():
    s = SlowSync()
    s.release.set()

    def disk():  # a sync that takes as long as a fast disk's (others arrive meanwhile)
        time.sleep(0.002)
        s()

    gc = GroupCommit(disk)
    bad = []

    def writer():
        for _ in range(50):
            mine = s.issue()
            gc.commit()
            if mine > s.durable:
                bad.append(mine)

    ts = [threading.Thread(target=writer) for _ in range(16)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert bad == []
    assert gc.commits == 800 and gc.syncs < gc.commits / 2


def test_a_failed_sync_fails_exactly_its_batch_and_the_next_one_recovers():
    fail = [True]

    def sync():
        if fail[0]:
            fail[0] = False
            raise OSError(5, "EIO")

    gc = GroupCommit(sync)
    with pytest.raises(CommitFailed, match="sync of the backing store failed"):
        gc.commit()
    gc.commit()  # a new write, a new sync that works


def test_before_and_after_run_around_each_sync():
    log = []
    gc = GroupCommit(lambda: log.append("sync"), before=lambda: log.append("before") or 42, after=lambda tok: log.append(("after", tok)))
    gc.commit()
    assert log == ["before", "sync", ("after", 42)]


def test_watermark_is_the_lowest_open_reservation():
    w = Watermark(10)
    assert w.low() == 10
    w.opened(10, 4)
    w.opened(14, 1)
    assert w.low() == 10
    w.closed(14)
    assert w.low() == 10
    w.closed(10)
    assert w.low() == 15
