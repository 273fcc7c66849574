"""fssconfig's requests other than a plain configure: listing, unconfiguring, the volumes,
changed extents, snapshot sets, and the whole snapshot `-v` prints. Typed (msgspec,
ipc.control, daemon.cli.client); imported only when one of them is asked for, so that a
configure (a snapshot's creation) loads and compiles none of it."""

from __future__ import annotations

import errno
import os
import sys
import time

import msgspec

from daemon.cli import storeopen
from daemon.cli.client import ControlClient
from daemon.cli.fssconfig import Usage, _die
from daemon.units import humanize
from ipc import control


def format_snapshot(s: control.SnapshotInfo, verbose: bool) -> str:
    """NetBSD's list(): `fss0: data` / `fss0: data, taken ..., 16384 cluster of 64K, 128K backup`."""
    if not s.in_use:
        return f"{s.device}: not in use"
    line = f"{s.device}: {s.volume}"
    if verbose:
        line += ", taken " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.taken))
        if s.unconfig_on_close:
            line += ", unconfig on close"
        line += f", {s.cluster_count} cluster of {humanize(s.cluster_size)}, {humanize(s.bs_clusters * s.cluster_size)} backup"
    if s.set_id:
        line += f", set {s.set_id}"
    if s.state == "invalid":
        line += f", invalid: {s.error}"
    elif s.state != "active":
        line += f", {s.state}"
    if verbose:
        limit = f" of {humanize(s.bs_limit_clusters * s.cluster_size)}" if s.bs_limit_clusters else ""
        line += (
            f"\n    pid {s.pid or '-'}, up {_duration(s.uptime)}, {s.restarts} restart(s)"
            f"{', last error: ' + s.last_error if s.last_error else ''}, {s.clients} client(s)"
            f"\n    {s.uri}\n    backing store {s.backup}{limit}, {s.copies} cluster(s) copied"
        )
        if s.usage_warning:
            line += f", {s.store_usage:.0f}% full (warned at {s.usage_warning}%)"
        if s.id:
            line += f"\n    id {s.id}"
        if s.durability:
            line += f"\n    durability {s.durability}"
            if s.recovered:
                line += ", recovered " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.recovered))
        consistency = _consistency(s)
        if consistency:
            line += f"\n    {consistency}"
        if s.set_id:
            line += f"\n    snapshot set {s.set_id}: {', '.join(s.set_members)}, one instant"
    return line


def _consistency(s: control.SnapshotInfo) -> str:
    """How the instant was taken, one line (-l -v)."""
    if s.consistency == "application":
        return f"application-consistent (VSS), freeze window {s.window_ms:.1f} ms"
    if s.consistency == "file-system" and s.suspended:
        return f"file-system-consistent: suspended {', '.join(s.suspended)} for {s.window_ms:.1f} ms"
    return s.note


def _duration(sec: float) -> str:
    sec = int(sec)
    if sec < 60:
        return f"{sec}s"
    if sec < 3600:
        return f"{sec // 60}m{sec % 60:02d}s"
    return f"{sec // 3600}h{sec % 3600 // 60:02d}m"


def _json(obj) -> str:
    return msgspec.json.format(msgspec.json.encode(obj)).decode()


def _client(rundir: str):
    """The typed control client (msgspec)."""
    return ControlClient(rundir)



def volumes(rundir: str, verbose: bool, as_json: bool) -> int:
    reply = _expect(_client(rundir).request(control.ListVolumes()), control.Volumes)
    if as_json:
        print(_json(reply.volumes))
    else:
        for v in reply.volumes:
            mp = f", mounted at {v.mountpoint}" if v.mountpoint else ""
            print(f"{v.name}: {v.path}, {humanize(v.size)} ({v.size} bytes){mp}, {v.uri}")
            if verbose:
                err = f", last error: {v.last_error}" if v.last_error else ""
                snaps = ", ".join(v.snapshots) or "none"
                if v.processes > 1:  # "pids 101, 102 (2 processes)"; "-" for one that is down
                    who = f"pids {', '.join(str(p) if p else '-' for p in v.pids)} ({v.processes} processes)"
                else:
                    who = f"pid {v.pid or '-'}"
                print(f"    {who}, up {_duration(v.uptime)}, {v.restarts} restart(s){err}; snapshots: {snaps}")
    return 0


def list_devices(rundir: str, device: str | None, verbose: bool, as_json: bool) -> int:
    reply = _expect(_client(rundir).request(control.ListSnapshots(device)), control.Snapshots)
    if as_json:
        print(_json(reply.snapshots))
    else:
        for s in reply.snapshots:
            print(format_snapshot(s, verbose))
    return 0


def unconfigure(rundir: str, device: str, verbose: bool) -> int:
    client = _client(rundir)
    if verbose:
        listed = client.request(control.ListSnapshots(device))
        if isinstance(listed, control.Snapshots):
            for s in listed.snapshots:
                print(format_snapshot(s, True))
    _expect(client.request(control.Unconfigure(device)), control.Unconfigured, device)
    return 0



def changes(client, device: str, since: str, as_json: bool) -> int:
    """Every page of the answer, then the extents (text or JSON) and, for text, a summary on stderr."""
    extents: list[tuple[int, int]] = []
    while True:
        reply = _expect(client.request(control.Changes(device, since, len(extents))), control.ChangedExtents)
        extents += reply.extents
        if not reply.more or not reply.extents:
            break
    if as_json:
        print(_json([{"offset": o, "length": n} for o, n in extents]))
        return 0
    out = sys.stdout
    for o, n in extents:
        out.write(f"{o} {n}\n")
    out.flush()
    pct = 100.0 * reply.changed_bytes / reply.volume_size if reply.volume_size else 0.0
    print(f"{device}: {len(extents)} extent(s), {reply.changed_bytes} bytes ({humanize(reply.changed_bytes)}, {pct:.1f}% of "
          f"{humanize(reply.volume_size)}) changed between {since} and {reply.id}", file=sys.stderr)
    return 0


def configure_set(client, args: list[str], unlink: bool, uoc: bool, consistent: bool,
                   timeout: float | None, no_suspend: bool, verbose: bool) -> int:
    """Several `device path backup` triples: one snapshot set. Every store is opened (or made)
    here before fssd is asked; any trouble removes what was made and configures nothing."""
    if len(args) % 3:
        raise Usage(f"{len(args)} arguments: a snapshot set is `device path backup` triples "
                    "(cluster and size only with a single device)")
    triples = [args[i:i + 3] for i in range(0, len(args), 3)]
    if len(triples) > control.SET_MAX:
        raise Usage(f"a snapshot set has at most {control.SET_MAX} members")
    devices = [t[0] for t in triples]
    for d in devices:
        if devices.count(d) > 1:
            raise Usage(f"{d} twice in one snapshot set")
    paths = [os.path.abspath(t[1]) if "/" in t[1] else t[1] for t in triples]
    for p in paths:
        if paths.count(p) > 1:
            raise Usage(f"{p} twice in one snapshot set (one snapshot per volume)")
    sock = client.connect()
    stores: list = []
    ok = False
    try:
        for _device, _path, backup in triples:
            try:
                stores.append(storeopen.open_store(backup))
            except storeopen.StoreError as e:
                return _die(str(e))
        members, fds = [], []
        for (device, _p, backup), path, store in zip(triples, paths, stores):
            keep_name = store.created and not store.nameless and not unlink
            members.append(control.SetMember(device=device, path=path, backup=os.path.abspath(backup), unlink=unlink or store.nameless,
                                             name=store.name if keep_name else "", nfds=2 if keep_name else 1))
            fds += [store.fd, store.dirfd] if keep_name else [store.fd]
        req = control.ConfigureSet(members=members, unconfig_on_close=uoc, consistent=consistent, timeout=timeout, no_suspend=no_suspend)
        reply = _expect(client.request(req, fds, sock), control.ConfiguredSet)
        ok = True
        if unlink:
            for (_d, _p, backup), store in zip(triples, stores):
                storeopen.unlink_name(store, backup)
    finally:
        for store in stores:
            if not ok:
                storeopen.remove_created(store)  # files made for a set that was not configured
            storeopen.close(store)
        sock.close()
    devs = ", ".join(s.device for s in reply.snapshots)
    if consistent:
        how = f"application-consistent snapshot set, freeze window {reply.freeze_window_ms:.1f} ms"
    elif reply.suspend_window_ms is not None:
        mounts = [m for s in reply.snapshots for m in s.suspended]
        how = f"file-system-consistent snapshot set, suspended {', '.join(mounts)} for {reply.suspend_window_ms:.1f} ms"
    else:
        how = "snapshot set"
    print(f"set {reply.set_id}: {devs}: {how}, barrier {reply.barrier_us} us")
    for s in reply.snapshots:
        if verbose and s.note:
            print(f"{s.device}: {s.note}")
        if verbose:
            print(format_snapshot(s, True))
    return 0


def _expect(reply, kind, device: str | None = None):
    if isinstance(reply, control.Error):
        msg = reply.message
        if device and not msg.startswith(device) and reply.errno == errno.EPERM:
            msg = f"{device}: {msg}"
        raise ValueError(msg)
    if not isinstance(reply, kind):
        raise ValueError(f"unexpected answer from fssd: {type(reply).__name__}")
    return reply
