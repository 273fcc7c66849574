"""Small wrappers for the Linux calls Python's os module lacks (fallocate modes)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range (reads back as zeroes). False if the file system can't."""
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        return True
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV, errno.EINVAL):
            return False
        raise


_ZEROS = bytes(1 << 20)


def write_zeroes(fd: int, offset: int, length: int) -> None:
    """Zero a range in place, allocated (NO_HOLE): ZERO_RANGE where supported, else plain writes."""
    try:
        fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        return
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV, errno.EINVAL):
            raise
    end = offset + length
    while offset < end:
        n = min(len(_ZEROS), end - offset)
        pwrite_all(fd, memoryview(_ZEROS)[:n], offset)
        offset += n


def copy_range(src: int, src_off: int, dst: int, dst_off: int, length: int) -> None:
    """Copy in the kernel (copy_file_range) where it works, else pread/pwrite. Short source = zeros."""
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src, dst, length - done, src_off + done, dst_off + done)
            if n == 0:
                break  # end of the source file (last partial cluster)
            done += n
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
            raise
    while done < length:
        chunk = os.pread(src, min(length - done, 1 << 20), src_off + done)
        if not chunk:
            break
        n = os.pwrite(dst, chunk, dst_off + done)
        done += n


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        data = data[n:]
        offset += n


def extents(fd: int, offset: int, length: int, max_extents: int = 1024) -> list[tuple[int, bool]]:
    """(length, is_hole) runs covering [offset, offset+length) from SEEK_DATA/SEEK_HOLE.

    A regular file with as many blocks as bytes has no hole to find: one data run, without
    SEEK_HOLE, which walks on to the next hole however far past the range it lies (on tmpfs
    page by page to EOF: 20 ms from the start of a full 1 GiB file, every BLOCK_STATUS).
    Data is always a safe answer, so a file whose count is padded (metadata blocks,
    preallocation past EOF) only has its small holes reported as data."""
    end = offset + length
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size and st.st_blocks * 512 >= st.st_size:
            return [(length, False)]
    except OSError:
        pass  # the seeks below answer, or say "all data"
    out: list[tuple[int, bool]] = []
    pos = offset
    try:
        while pos < end and len(out) < max_extents:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole from here to EOF
                    out.append((end - pos, True))
                    break
                raise
            if data > pos:
                n = min(data, end) - pos
                out.append((n, True))
                pos += n
                continue
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            n = min(hole, end) - pos
            out.append((n, False))
            pos += n
    except OSError:
        # No SEEK_DATA here (raw devices): everything is data, always a safe answer.
        return [(end - offset, False)]
    return out or [(length, False)]
