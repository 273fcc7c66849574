"""appvss: the VSS application simulator of FreeBSD hv_vss(4) EXAMPLES, on fssd's queues.

    appvss [-f 0|1|2] [-c 0|1|2] [-t 0|1|2] [-d] [-n] [-w SECONDS] [--name NAME] [-r RUNDIR]

For freeze (-f), check (-c) and thaw (-t): 0 succeeds, 1 simulates a timeout,
2 a failure. Like the example, every request first takes the work time
(-w, default 2 s); a timeout then waits ten times that and answers OK late;
a failure answers FAIL. Requests are handled one at a time, in order.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from daemon.cli import clitool
from daemon.version import version
from workers import logfmt
from ipc.names import resolve_rundir
from ipc.vss_client import Application, VssError

log = logging.getLogger("appvss")

SUCCESS, TIMEOUT, FAILURE = 0, 1, 2


class Stopped(Exception):
    """SIGTERM / SIGINT: leave whatever we are doing (a simulated wait included) and unregister."""


def simulate(op: str, mode: int, work: float) -> tuple[bool, str]:
    time.sleep(work)
    if mode == TIMEOUT:
        time.sleep(work * 10)
        log.info("%s timeout simulation", op)
        return True, ""
    if mode == FAILURE:
        log.info("%s failure simulation", op)
        return False, f"{op} failure simulation"
    log.info("%s success simulation", op)
    return True, ""


def daemonize() -> int:
    """Double fork: no controlling terminal, not a session leader, stdio on /dev/null.

    Returns the write end of a pipe on which the daemon reports one line (its
    pid once registered, or its error); the original process prints that line
    and exits with the daemon's verdict, so the caller learns the pid.
    """
    r, w = os.pipe()
    if os.fork() > 0:
        os.close(w)
        with os.fdopen(r, "rb") as f:
            line = f.readline().decode(errors="replace").strip()
        ok = line.startswith("appvss: registered")
        print(line or "appvss: the daemon exited before registering", file=sys.stdout if ok else sys.stderr, flush=True)
        os._exit(0 if ok else 1)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    return w


def _mode(text: str) -> int:
    v = int(text)
    if v not in (0, 1, 2):
        raise argparse.ArgumentTypeError("must be 0 (success), 1 (timeout) or 2 (failure)")
    return v


@clitool.entry
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="appvss", description="Simulate a VSS application (hv_vss(4) example).")
    ap.add_argument("-f", type=_mode, default=0, metavar="0|1|2", help="freeze: 0 success, 1 timeout, 2 failure")
    ap.add_argument("-c", type=_mode, default=0, metavar="0|1|2", help="check: 0 success, 1 timeout, 2 failure")
    ap.add_argument("-t", type=_mode, default=0, metavar="0|1|2", help="thaw: 0 success, 1 timeout, 2 failure")
    ap.add_argument("-d", action="store_true", help="debug messages")
    ap.add_argument("-n", action="store_true", help="stay in the foreground")
    ap.add_argument("-w", type=float, default=2.0, metavar="SECONDS", help="simulated work time (default 2)")
    ap.add_argument("--name", default="appvss", help="the name to register with the broker (default appvss)")
    ap.add_argument("-r", "--rundir", metavar="DIR", help="fssd run directory (default $FSSD_RUNDIR or /run/fssd)")
    ap.add_argument("--version", action="version", version=f"%(prog)s {version()}", help="print the version and exit")
    args = ap.parse_args(argv)
    if not 0 <= args.w <= 3600:
        ap.error("-w must be between 0 and 3600 seconds")
    modes = {"check": args.c, "freeze": args.f, "thaw": args.t}

    report = -1 if args.n else daemonize()
    logfmt.setup("appvss", args.d, use_syslog=not args.n)

    def tell(line: str) -> None:
        """The one line the user sees: on stdout (-n) or through the pipe to the original process."""
        if report < 0:
            print(line, file=sys.stdout if line.startswith("appvss: registered") else sys.stderr, flush=True)
        else:
            os.write(report, (line + "\n").encode())

    stopping = False

    def on_term(signum, frame):
        # The flag covers a wait in C that swallows the exception (a queue receive); the
        # exception cuts a simulated work time short. Once only: cleanup must not be interrupted.
        nonlocal stopping
        if not stopping:
            stopping = True
            raise Stopped()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    app = Application(resolve_rundir(args.rundir), args.name)
    try:
        app.register()
        log.info("registered as %s, pid %d", args.name, os.getpid())
        tell(f"appvss: registered {args.name} pid {os.getpid()}")
        while not stopping:
            req = app.receive(timeout=0.5)
            if req is None:
                continue
            log.debug("request %s msgid %#x", req.op, req.msgid)
            ok, reason = simulate(req.op, modes[req.op], args.w)
            app.answer(req, ok, reason)
            log.info("sent response %s for %s", "OK" if ok else "FAIL", req.op)
    except Stopped:
        log.info("stopping: unregistered")
        return 0
    except VssError as e:
        if report >= 0:
            log.error("%s", e)  # syslog; the user sees the line through the pipe
        tell(f"appvss: {e}")
        return 1
    finally:
        stopping = True  # a signal from here on only sets the flag
        app.close()
    log.info("stopping: unregistered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
