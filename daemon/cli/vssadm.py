"""vssadm: ask this host's VSS broker to check, freeze, thaw, or show its state.

    vssadm [-r RUNDIR] check|freeze|thaw|status|list [--json] [-t TIMEOUT]

Exit 0 when the broker answers OK, 1 on FAIL or when fssd is not running.
"""

from __future__ import annotations

import argparse
import sys
import time

import msgspec

from daemon.cli import clitool
from daemon.version import version
from ipc.names import resolve_rundir
from ipc.vss_client import BrokerNotRunning, Requestor, VssError
from ipc.vssproto import REQUEST_OPS, VssReply


def _since(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) if t else "-"


def format_reply(r: VssReply) -> str:
    lines = []
    if r.op in ("check", "freeze", "thaw"):
        line = f"{r.op}: {'OK' if r.ok else 'FAIL'}"
        if r.reason:
            line += f": {r.reason}"
        line += f" ({r.elapsed_ms:.1f} ms"
        if r.op == "thaw" and r.window_ms:
            line += f", frozen for {r.window_ms:.1f} ms"
        lines.append(line + ")")
    if r.op in ("status", "list"):
        lines.append(f"state: {r.state} since {_since(r.since)}")
        if r.state == "frozen":
            # What the freeze holds: applications, hooks, mounts (any of them may be none).
            lines.append(f"applications held: {' '.join(r.held) if r.held else '(none registered)'}")
            lines.append(f"freeze hooks run: {r.hooks if r.hooks else '(no hooks_dir)'}")
            lines.append(f"mounts frozen: {' '.join(r.frozen) if r.frozen else '(none configured)'}")
        else:
            lines.append(f"frozen: {' '.join(r.frozen) if r.frozen else '(nothing)'}")
        lines.append(f"applications: {len(r.apps)}{' (truncated)' if r.truncated else ''}")
    if r.op == "list" and r.apps:
        lines.append(f"{'NAME':<20} {'PID':>7} {'STATE':<10} {'LAST OP':<8} {'MS':>9}  LAST ANSWER")
        for a in r.apps:
            lines.append(f"{a.name:<20} {a.pid:>7} {a.state:<10} {a.last_op or '-':<8} {a.last_ms:>9.1f}  {a.last_answer or '-'}")
    return "\n".join(lines)


@clitool.entry
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vssadm", description="Talk to the fssd VSS broker.")
    ap.add_argument("-r", "--rundir", metavar="DIR", help="fssd run directory (default $FSSD_RUNDIR or /run/fssd)")
    ap.add_argument("op", choices=REQUEST_OPS,
                    help="check, freeze or thaw: run that VSS phase; status: the broker's state; list: also every registered application")
    ap.add_argument("--json", action="store_true", help="print the broker's reply as JSON")
    ap.add_argument("-t", "--timeout", type=float, default=None,
                    help="seconds per phase (default: the broker's [vss] timeout)")
    ap.add_argument("--version", action="version", version=f"%(prog)s {version()}", help="print the version and exit")
    args = ap.parse_args(argv)
    if args.timeout is not None and not 0 < args.timeout <= 3600:
        ap.error("timeout must be between 0 and 3600 seconds")
    rundir = resolve_rundir(args.rundir)
    try:
        reply = Requestor(rundir).request(args.op, args.timeout)
    except BrokerNotRunning as e:
        print(f"vssadm: {e}", file=sys.stderr)
        return 1
    except VssError as e:
        print(f"vssadm: {args.op}: {e}", file=sys.stderr)
        return 1
    worker = _broker_worker(rundir) if args.op in ("status", "list") else None
    if args.json:
        out = msgspec.to_builtins(reply)
        if worker is not None:
            out["worker"] = msgspec.to_builtins(worker)
        print(msgspec.json.format(msgspec.json.encode(out).decode(), indent=2))
    else:
        print(format_reply(reply))
        if worker is not None:
            print(format_worker(worker))
    return 0 if reply.ok else 1


def _broker_worker(rundir: str):
    """The supervisor's view of the broker process (pid, uptime, restarts, last error)."""
    from daemon.cli.client import ControlClient, NotRunning
    from ipc.control import Status, StatusReply

    try:
        st = ControlClient(rundir, timeout=5.0).request(Status())
    except NotRunning:
        return None
    if not isinstance(st, StatusReply):
        return None
    return next((w for w in st.workers if w.kind == "broker"), None)


def format_worker(w) -> str:
    err = f", last error: {w.last_error}" if w.last_error else ""
    return f"broker: pid {w.pid if w.alive else '-'}, up {int(w.uptime)}s, {w.restarts} restart(s){err}"


if __name__ == "__main__":
    sys.exit(main())
