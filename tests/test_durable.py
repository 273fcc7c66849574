"""Supervisor-side durable helpers (daemon/durable.py)."""

import errno
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


def test_a_files_table_is_allocated_not_written(tmp_path, monkeypatch):
    """The all-clear table of a file store is reserved by fallocate (reading as zeros, its
    blocks allocated): only the header is written. A file system without fallocate gets the
    zeros written, as a block device always does."""
    h = sf.StoreHeader(sf.new_id(), 1, 2, 1 << 40, 65536, 1 << 24, sf.table_clusters(1 << 24, 65536), 0, 5)
    nbytes = h.table_clusters * 65536  # 128 MiB: the table of 1 TiB in 64 KiB clusters
    written = []
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, off: written.append(len(data)) or real_pwrite(fd, data, off))
    p = tmp_path / "store"
    p.write_bytes(b"old contents " * 100000)
    fd = os.open(p, os.O_RDWR)
    try:
        durable.write_layout(fd, False, h)
        st = os.fstat(fd)
        assert st.st_size == nbytes and st.st_blocks * 512 >= nbytes
        assert written == [sf.SECTOR]
        assert os.pread(fd, 1 << 20, nbytes - (1 << 20)) == bytes(1 << 20) and os.pread(fd, 1 << 20, 512) == bytes(1 << 20)

        def unsupported(fd, off, n):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")

        monkeypatch.setattr(os, "posix_fallocate", unsupported)
        small = sf.StoreHeader(sf.new_id(), 1, 2, 1 << 30, 65536, 16384, sf.table_clusters(16384, 65536), 0, 5)
        os.pwrite(fd, b"x" * 4096, 8192)
        written.clear()
        durable.write_layout(fd, False, small)
        assert sum(written) == small.table_clusters * 65536 + sf.SECTOR
        assert os.fstat(fd).st_size == small.table_clusters * 65536
        assert os.pread(fd, small.table_clusters * 65536 - 512, 512) == bytes(small.table_clusters * 65536 - 512)
    finally:
        os.close(fd)
