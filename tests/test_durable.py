"""Supervisor-side durable helpers (daemon/durable.py)."""

import os

from daemon import durable
from ipc import storeformat as sf


def test_usage_warnings_once_each_in_order():
    w = durable.UsageWatch()
    tcl, limit = 10, 110  # room for 100 copies
    assert w.check("fss0", 10 + 79, tcl, limit) == []
    assert w.check("fss0", 10 + 80, tcl, limit) == [80]
    assert w.check("fss0", 10 + 90, tcl, limit) == []
    assert w.check("fss0", 10 + 96, tcl, limit) == [95]
    assert w.check("fss0", 10 + 100, tcl, limit) == []
    assert w.check("fss1", 10 + 99, tcl, limit) == [80, 95]  # a jump past both still says both
    w.forget("fss0")
    assert w.check("fss0", 10 + 85, tcl, limit) == [80]


def test_layout_is_header_plus_clear_table_and_synced(tmp_path):
    p = tmp_path / "store"
    p.write_bytes(b"old contents " * 100000)
    fd = os.open(p, os.O_RDWR)
    try:
        h = sf.StoreHeader(sf.new_id(), 1, 2, 1 << 30, 65536, 16384, sf.table_clusters(16384, 65536), 0, 5)
        durable.write_layout(fd, False, h)
        assert os.fstat(fd).st_size == h.table_clusters * 65536
        assert sf.decode_header(os.pread(fd, 512, 0)) == h
        assert os.pread(fd, h.table_clusters * 65536 - 512, 512) == bytes(h.table_clusters * 65536 - 512)
        assert durable.opened_path(fd) == str(p)
        os.unlink(p)
        assert durable.opened_path(fd) == ""  # unlinked: nothing to come back to
    finally:
        os.close(fd)
