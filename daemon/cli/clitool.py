"""What every command-line tool shares at its edge with the shell.

Imports only os and sys up front: fssconfig's start is most of a snapshot's
creation (select and signal load enum, functools collections)."""

from __future__ import annotations

import os
import sys


def _stdout_gone() -> bool:
    """The reader of stdout went away (a pipe's write end then polls as an error)."""
    import select

    try:
        p = select.poll()
        p.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _fd, ev in p.poll(0))
    except (OSError, ValueError):
        return False


def entry(main):
    """Wrap a tool's main(): `fssconfig -l -v | head -1` ends the tool quietly, with
    the status a C tool killed by SIGPIPE has, instead of a BrokenPipeError traceback.
    A broken pipe anywhere else (a socket to fssd) is not this and still surfaces."""

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
            import signal

            return 128 + signal.SIGPIPE

    run.__name__, run.__qualname__, run.__doc__, run.__wrapped__ = main.__name__, main.__qualname__, main.__doc__, main
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
