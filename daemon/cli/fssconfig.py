"""fssconfig: configure, unconfigure and list fssd snapshot devices, as NetBSD's fssconfig(8).

usage: fssconfig [-Ccxv] [-t timeout] [--no-suspend] device path backup [cluster [size]]
       fssconfig [-Ccxv] [-t timeout] [--no-suspend] device path backup device path backup ...
       fssconfig -u [-v] device
       fssconfig -l [-v] [--json] [device]
       fssconfig --volumes [-v] [--json]
       fssconfig --changes device --since id [--json]
common: -r RUNDIR (else $FSSD_RUNDIR, else /run/fssd)
"""

from __future__ import annotations

import errno
import os
import sys

# Only what the configure path needs (daemon.cli.lightclient: a snapshot's creation is
# mostly this program starting); the other requests import the typed client when used.
from daemon.cli import clitool, lightclient, storeopen
from daemon.cli.lightclient import NotRunning
from ipc import names
from daemon.units import strsuftoll

PROG = "fssconfig"
USAGE = """usage: fssconfig [-Ccxv] [-t timeout] [--no-suspend] [-r rundir] device path backup [cluster [size]]
       fssconfig [-Ccxv] [-t timeout] [--no-suspend] [-r rundir] device path backup device path backup ...
       fssconfig -u [-v] [-r rundir] device
       fssconfig -l [-v] [--json] [-r rundir] [device]
       fssconfig --volumes [-v] [--json] [-r rundir]
       fssconfig --changes device --since id [--json] [-r rundir]"""
HELP = USAGE + """

Configure, unconfigure and list fssd snapshot devices (fssN), as NetBSD's
fssconfig(8). `path` is a volume name, mountpoint or image path; `backup` a
file, a directory or a raw block device; `cluster` and `size` take k/M/G.
Two or more `device path backup` triples take a snapshot set: one snapshot
of each volume at one instant (one VSS freeze or suspend, one barrier), all
configured or none; each with the default cluster size and store limit.

options:
  -C                take the snapshot application-consistently (VSS CHECK,
                    FREEZE, barrier, THAW) and print the freeze window
  -t SECONDS        with -C: each VSS phase's timeout (default [vss] timeout)
  --no-suspend      do not suspend (FIFREEZE) the volume's file systems around
                    the snapshot: it is then crash-consistent
  -c                unconfigure the device when its last NBD client disconnects
  -x                unlink the backing file once the snapshot is configured
  -l                list the devices (all, or the one named)
  -u                unconfigure the device
  -v                verbose: list the device after configuring or before
                    unconfiguring; with -l and --volumes, details
  --volumes         list the volumes and their NBD URIs
  --changes DEVICE  print the extents of the volume written between the barrier
                    of snapshot --since ID and DEVICE's (one "offset length" in
                    bytes per line; a summary on stderr)
  --since ID        with --changes: the earlier snapshot's id (fssconfig -l -v),
                    configured or long unconfigured
  --json            with -l, --volumes or --changes: print JSON
  -r, --rundir DIR  fssd's run directory (default $FSSD_RUNDIR, else /run/fssd)
  -h, --help        print this help and exit
  --version         print the version and exit

See fssconfig(8)."""


class Usage(Exception):
    pass


def _die(msg: str, status: int = 1) -> int:
    print(f"{PROG}: {msg}", file=sys.stderr)
    return status


SHORT_OPTS = "Cchlr:t:uvx"
LONG_OPTS = ["json", "volumes", "rundir=", "help", "no-suspend", "version", "changes=", "since="]


def _getopt(argv: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """getopt.getopt(argv, SHORT_OPTS, LONG_OPTS) for the usual command lines, without importing
    getopt (gettext, re: milliseconds of every snapshot's creation). Anything it does not
    take as it is (an error, an abbreviated long option) goes to getopt itself, so results
    and messages are getopt's."""
    opts: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            i += 1
            break
        if not a.startswith("-") or a == "-":
            break
        if a.startswith("--"):
            name, eq, val = a[2:].partition("=")
            if name + "=" in LONG_OPTS:
                if not eq:
                    if i + 1 >= len(argv):
                        return _real_getopt(argv)
                    i += 1
                    val = argv[i]
                opts.append(("--" + name, val))
            elif name in LONG_OPTS and not eq:
                opts.append(("--" + name, ""))
            else:
                return _real_getopt(argv)
        else:
            j = 1
            while j < len(a):
                c = a[j]
                k = SHORT_OPTS.find(c)
                if c == ":" or k < 0:
                    return _real_getopt(argv)
                if SHORT_OPTS[k + 1:k + 2] == ":":
                    val = a[j + 1:]
                    if not val:
                        if i + 1 >= len(argv):
                            return _real_getopt(argv)
                        i += 1
                        val = argv[i]
                    opts.append(("-" + c, val))
                    break
                opts.append(("-" + c, ""))
                j += 1
        i += 1
    return opts, argv[i:]


def _real_getopt(argv: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    import getopt

    try:
        return getopt.getopt(argv, SHORT_OPTS, LONG_OPTS)
    except getopt.GetoptError as e:
        raise Usage(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    rc = _run(sys.argv[1:] if argv is None else argv)
    if argv is None:  # run as the program (the console script): nothing is left to tear down
        clitool.quick_exit(rc)
    return rc


@clitool.entry
def _run(argv: list[str]) -> int:
    try:
        return _main(argv)
    except Usage as e:
        if str(e):
            print(f"{PROG}: {e}", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 1
    except NotRunning as e:
        return _die(str(e))
    except ValueError as e:
        return _die(str(e))


def _main(argv: list[str]) -> int:
    opts, args = _getopt(argv)
    action = None
    verbose = unlink = uoc = consistent = as_json = no_suspend = False
    rundir = None
    timeout = None
    changes_of = since = None
    for o, v in opts:
        if o in ("-l", "-u", "--volumes", "--changes"):
            if action is not None:
                raise Usage("")
            action = o
            if o == "--changes":
                changes_of = v
        elif o == "--since":
            since = v
        elif o == "-c":
            uoc = True
        elif o == "-C":
            consistent = True
        elif o == "-v":
            verbose = True
        elif o == "-x":
            unlink = True
        elif o == "-t":
            try:
                timeout = float(v)
            except ValueError:
                timeout = -1.0
            if not 0 < timeout <= 3600:
                raise Usage(f"-t {v}: timeout must be between 0 and 3600 seconds")
        elif o == "--no-suspend":
            no_suspend = True
        elif o == "--json":
            as_json = True
        elif o in ("-r", "--rundir"):
            rundir = v
        elif o in ("-h", "--help"):
            print(HELP)
            return 0
        elif o == "--version":
            from daemon.version import version

            print(f"{PROG} {version()}")
            return 0
    rundir = names.resolve_rundir(rundir)
    if action in ("-l", "-u", "--volumes", "--changes") and (unlink or uoc or consistent or no_suspend or timeout is not None):
        raise Usage("")
    if (since is None) != (action != "--changes"):
        raise Usage("--changes and --since go together")

    if action == "--changes":
        if args or verbose:
            raise Usage("")
        from daemon.cli import fssquery

        return fssquery.changes(fssquery._client(rundir), changes_of, since, as_json)
    if timeout is not None and not consistent:
        raise Usage("-t applies to -C (the VSS phases)")
    if consistent and no_suspend:
        raise Usage("-C and --no-suspend exclude each other")

    if action == "--volumes":
        if args:
            raise Usage("")
        from daemon.cli import fssquery

        return fssquery.volumes(rundir, verbose, as_json)
    if action == "-l":
        if len(args) > 1:
            raise Usage("")
        from daemon.cli import fssquery

        return fssquery.list_devices(rundir, args[0] if args else None, verbose, as_json)
    if action == "-u":
        if len(args) != 1:
            raise Usage("")
        from daemon.cli import fssquery

        return fssquery.unconfigure(rundir, args[0], verbose)

    # configure (the default action)
    if len(args) >= 6:
        from daemon.cli import fssquery

        return fssquery.configure_set(fssquery._client(rundir), args, unlink, uoc, consistent, timeout, no_suspend, verbose)
    if len(args) < 3:
        raise Usage("")
    device, path, backup = args[:3]
    cluster = strsuftoll("cluster size", args[3], 0, 2**31 - 1) if len(args) > 3 else 0
    size = strsuftoll("bs size", args[4], 0, 2**63 - 1) if len(args) > 4 else None
    if "/" in path:
        path = os.path.abspath(path)
    # The store is opened here, with the caller's own rights; fssd gets the descriptor.
    # Connected first: nothing is created for an fssd that isn't there or won't talk to us.
    sock = lightclient.connect(rundir)
    try:
        store = storeopen.open_store(backup)
    except storeopen.StoreError as e:
        sock.close()
        return _die(str(e))
    keep_name = store.created and not store.nameless and not unlink  # fssd removes it at unconfigure
    req = lightclient.configure_request(
        device=device,
        path=path,
        backup=os.path.abspath(backup),
        cluster=cluster,
        size=size,
        unconfig_on_close=uoc,
        unlink=unlink or store.nameless,
        consistent=consistent,
        timeout=timeout,
        no_suspend=no_suspend,
        name=store.name if keep_name else "",
        nfds=2 if keep_name else 1,
    )
    ok = False
    try:
        reply, raw = lightclient.request(sock, req, [store.fd, store.dirfd] if keep_name else [store.fd])
        lines = _configured_lines(device, consistent, verbose, reply, raw)
        ok = True
        if unlink:
            storeopen.unlink_name(store, backup)
    finally:
        if not ok:
            storeopen.remove_created(store)  # a file made for a configure that failed (or that got no sound answer)
        storeopen.close(store)
        sock.close()
    for line in lines:
        print(line)
    return 0


def _configured_lines(device: str, consistent: bool, verbose: bool, reply: dict, raw: bytes) -> list[str]:
    """What to print for fssd's answer to a configure (an error raises ValueError with its line,
    a malformed answer NotRunning)."""
    _expect_light(reply, "configured", device)
    if verbose:  # the whole snapshot is printed: decoded as the typed Struct
        import msgspec

        from daemon.cli.fssquery import _expect, format_snapshot
        from ipc import control

        try:
            typed = _expect(msgspec.msgpack.decode(raw, type=control.Reply), control.Configured, device)
        except msgspec.DecodeError as e:
            raise NotRunning(f"bad answer from fssd: {e}") from None
        snap = typed.snapshot
        lines = _summary(device, consistent, typed.freeze_window_ms, typed.suspend_window_ms, typed.barrier_us, snap.suspended)
        return lines + ([f"{device}: {snap.note}"] if snap.note else []) + [format_snapshot(snap, True)]
    get = lightclient.field
    barrier_us = get(reply, "barrier_us", (int,), lightclient.REQUIRED)
    freeze_ms = get(reply, "freeze_window_ms", (float, int))
    suspend_ms = get(reply, "suspend_window_ms", (float, int))
    snap = get(reply, "snapshot", (dict,), lightclient.REQUIRED)
    suspended = get(snap, "suspended", (list,), [])
    if not all(type(m) is str for m in suspended):
        raise NotRunning("bad answer from fssd: suspended is not a list of mounts")
    return _summary(device, consistent, freeze_ms, suspend_ms, barrier_us, suspended)


def _summary(device: str, consistent: bool, freeze_ms, suspend_ms, barrier_us: int, suspended: list[str]) -> list[str]:
    if consistent:
        return [f"{device}: application-consistent snapshot, freeze window {freeze_ms:.1f} ms, barrier {barrier_us} us"]
    if suspend_ms is not None:
        return [f"{device}: file-system-consistent snapshot, suspended {', '.join(suspended)} for {suspend_ms:.1f} ms, "
                f"barrier {barrier_us} us"]
    return []


def _expect_light(reply: dict, tag: str, device: str) -> None:
    """_expect for an answer decoded by lightclient: fssd's error as the line to print."""
    t = reply["t"]
    if t == "error":
        code = lightclient.field(reply, "errno", (int,), lightclient.REQUIRED)
        msg = lightclient.field(reply, "message", (str,), lightclient.REQUIRED)
        if device and not msg.startswith(device) and code == errno.EPERM:
            msg = f"{device}: {msg}"
        raise ValueError(msg)
    if t != tag:
        raise ValueError(f"unexpected answer from fssd: {lightclient.REPLY_NAMES[t]}")


if __name__ == "__main__":
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
