"""fileio.extents: the holes of a sparse file from SEEK_DATA/SEEK_HOLE, and a fully
allocated file answered as one data run without seeking (SEEK_HOLE on tmpfs walks page by
page to the next hole, however far past the range: every BLOCK_STATUS of a full volume
paid for a walk to its end)."""

from __future__ import annotations

import os

import pytest

from workers import fileio

MiB = 1 << 20


@pytest.fixture
def seeks(monkeypatch):
    calls = []
    real = os.lseek

    def counting(fd, pos, how):
        calls.append(how)
        return real(fd, pos, how)

    monkeypatch.setattr(fileio.os, "lseek", counting)
    return calls


@pytest.fixture(params=["shm", "tmp"])
def fd(request, tmp_path):
    base = "/dev/shm" if request.param == "shm" else str(tmp_path)
    path = os.path.join(base, f"fssd-test-extents-{os.getpid()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    yield fd
    os.close(fd)
    os.unlink(path)


def test_a_fully_allocated_file_is_one_data_run_without_a_seek(fd, seeks):
    os.pwrite(fd, os.urandom(4 * MiB), 0)
    assert fileio.extents(fd, MiB, 2 * MiB) == [(2 * MiB, False)]
    assert fileio.extents(fd, 0, 4 * MiB) == [(4 * MiB, False)]
    assert seeks == []


def test_a_sparse_file_still_has_its_holes(fd, seeks):
    os.ftruncate(fd, 4 * MiB)
    os.pwrite(fd, b"x" * MiB, MiB)  # hole, data, hole, hole
    assert fileio.extents(fd, 0, 4 * MiB) == [(MiB, True), (MiB, False), (2 * MiB, True)]
    assert seeks, "a file with holes is asked where they are"
    # Once the holes are filled, the file is answered from its block count.
    os.pwrite(fd, b"y" * MiB, 0)
    os.pwrite(fd, b"z" * 2 * MiB, 2 * MiB)
    seeks.clear()
    assert fileio.extents(fd, 0, 4 * MiB) == [(4 * MiB, False)]
    assert seeks == []
    # A hole punched again is found again.
    if fileio.punch_hole(fd, MiB, MiB):
        assert fileio.extents(fd, 0, 4 * MiB) == [(MiB, False), (MiB, True), (2 * MiB, False)]


def test_an_empty_file_is_still_a_hole(fd):
    assert fileio.extents(fd, 0, MiB) == [(MiB, True)]
