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

from daemon.version import version
from ipc import logfmt
from ipc.names import instance_prefix, resolve_rundir
from ipc.vss_client import Application, VssError

log = logging.getLogger("appvss")

SUCCESS, TIMEOUT, FAILURE = 0, 1, 2


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


def daemonize() -> None:
    """Double fork: no controlling terminal, not a session leader, stdio on /dev/null."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def _mode(text: str) -> int:
    v = int(text)
    if v not in (0, 1, 2):
        raise argparse.ArgumentTypeError("must be 0 (success), 1 (timeout) or 2 (failure)")
    return v


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
    modes = {"check": args.c, "freeze": args.f, "thaw": args.t}

    if not args.n:
        daemonize()
    logfmt.setup("appvss", args.d, use_syslog=not args.n)
    prefix = instance_prefix(resolve_rundir(args.rundir))
    stop = False

    def on_term(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    app = Application(prefix, args.name)
    try:
        app.open()
        app.register()
        log.info("registered as %s, pid %d", args.name, os.getpid())
        if args.n:
            print(f"appvss: registered {args.name} pid {os.getpid()}", flush=True)
        while not stop:
            req = app.receive(timeout=0.5)
            if req is None:
                continue
            log.debug("request %s msgid %#x", req.op, req.msgid)
            ok, reason = simulate(req.op, modes[req.op], args.w)
            app.answer(req, ok, reason)
            log.info("sent response %s for %s", "OK" if ok else "FAIL", req.op)
    except VssError as e:
        log.error("%s", e)
        return 1
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
