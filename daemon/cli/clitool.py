"""What every command-line tool shares at its edge with the shell."""

from __future__ import annotations

import functools
import os
import select
import signal
import sys
from typing import Callable


def _stdout_gone() -> bool:
    """The reader of stdout went away (a pipe's write end then polls as an error)."""
    try:
        p = select.poll()
        p.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _fd, ev in p.poll(0))
    except (OSError, ValueError):
        return False


def entry(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a tool's main(): `fssconfig -l -v | head -1` ends the tool quietly, with
    the status a C tool killed by SIGPIPE has, instead of a BrokenPipeError traceback.
    A broken pipe anywhere else (a socket to fssd) is not this and still surfaces."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            rc = main(*args, **kwargs)
            sys.stdout.flush()
            return rc
        except BrokenPipeError:
            if not _stdout_gone():
                raise
            # Python flushes stdout once more at exit: let that go nowhere.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return 128 + signal.SIGPIPE

    return run


def quick_exit(rc: int) -> None:
    """End the program now, as a C tool does: output flushed, status `rc`, without the
    interpreter's teardown (freeing every module and object: 5-20 ms of a short tool's
    run, more on a busy machine). Only for a tool run as a program, with nothing left to
    do: no atexit work, no threads; the kernel closes its descriptors."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc)
