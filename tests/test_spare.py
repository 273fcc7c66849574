"""The spare snapshot worker (daemon/spares.py, workers/spare.py): a configure assigns a
process started ahead instead of waiting for a new Python to start."""

import os
import re
import signal
import socket

import msgspec
import pytest

from fsshelp import run, sha256_file, wait_for
from workers import settings as ws
from workers import spawned

from daemon.spares import NO_SPARE_ENV

MiB = 1 << 20


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")[0].decode()


def spares(fssd) -> list[int]:
    return [w["pid"] for w in fssd.status()["workers"] if w["kind"] == "spare" and w["alive"]]


def ready_spare(fssd, other_than: int = 0) -> int:
    """The pid of a spare that has said Ready (the supervisor logs it with -d)."""
    found = []

    def ready():
        pids = [p for p in spares(fssd) if p != other_than]
        text = fssd.log.read_text(errors="replace")
        found[:] = [p for p in pids if f"spare snapshot worker ready (pid {p})" in text or f"spare snapshot: restarted (pid {p})" in text]
        return bool(found)

    wait_for(ready, 60, "a ready spare snapshot worker")
    return found[0]


def fd_targets(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


def fill(fssd, shmdir):
    img = shmdir / "base.img"
    with open(img, "wb") as f:
        f.write(os.urandom(8 * MiB))
    run("nbdcopy", img, fssd.uri("data"))
    return img


def snapshot_sha(fssd, shmdir, device, length):
    out = shmdir / f"{device}.out"
    run("nbdcopy", fssd.uri(device), out)
    digest = sha256_file(out, length)
    out.unlink()
    return digest


def test_configure_assigns_the_spare_retitles_it_and_starts_another(fssd, shmdir):
    inst = f"fssd[{os.path.abspath(fssd.rundir)}]: "
    spare = ready_spare(fssd)
    assert cmdline(spare) == inst + "fss spare"
    # It holds nothing to serve: its only socket is its channel, no store, no export.
    targets = fd_targets(spare)
    assert sum(t.startswith("socket:") for t in targets) == 1, targets
    assert not any(str(shmdir) in t for t in targets), targets

    base = fill(fssd, shmdir)
    before = sha256_file(base)
    fssd.fssconfig("fss0", "data", shmdir / "bs0")
    # The snapshot is served by the process that was started before the request, retitled.
    pid = fssd.worker_pid("snapshot", "fss0")
    assert pid == spare
    assert re.fullmatch(re.escape(inst) + r"fss0 data@\S+Z", cmdline(pid)), cmdline(pid)
    assert run("pgrep", "-f", f"^{re.escape(inst)}fss0 data@").stdout.split() == [str(pid)]
    assert str(shmdir / "bs0") in fd_targets(pid)  # the store came over the channel
    # It serves the snapshot: the image at the barrier, whatever the volume gets after.
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 3M", fssd.uri("data"))
    assert snapshot_sha(fssd, shmdir, "fss0", 8 * MiB) == before
    info = [s for s in fssd.status()["snapshots"] if s["device"] == "fss0"][0]
    assert info["pid"] == pid and info["restarts"] == 0 and info["state"] == "active"

    # The next spare starts in the background, and the next configure gets it.
    nxt = ready_spare(fssd, other_than=spare)
    assert cmdline(nxt) == inst + "fss spare"
    fssd.fssconfig("fss1", "data", shmdir / "bs1")
    assert fssd.worker_pid("snapshot", "fss1") == nxt
    fssd.fssconfig("-u", "fss0")
    fssd.fssconfig("-u", "fss1")
    assert "Traceback" not in fssd.log.read_text(errors="replace")


def test_a_killed_spare_is_replaced_and_nothing_else_notices(fssd, shmdir):
    fssd.fssconfig("fss0", "data", shmdir / "bs0")
    snap = fssd.worker_pid("snapshot", "fss0")
    vol = fssd.worker_pid("volume", "data")
    spare = ready_spare(fssd)
    assert spare != snap
    os.kill(spare, signal.SIGKILL)
    new = ready_spare(fssd, other_than=spare)
    assert new != spare and not os.path.exists(f"/proc/{spare}")
    # The snapshot and the volume are as they were: same processes, no restart, still serving.
    assert fssd.worker_pid("snapshot", "fss0") == snap and fssd.worker_pid("volume", "data") == vol
    info = [s for s in fssd.status()["snapshots"] if s["device"] == "fss0"][0]
    assert info["restarts"] == 0 and info["state"] == "active" and info["last_error"] == ""
    run("nbdinfo", fssd.uri("fss0"))
    # ... and the new spare is assigned as the first would have been.
    fssd.fssconfig("fss1", "data", shmdir / "bs1")
    assert fssd.worker_pid("snapshot", "fss1") == new
    log = fssd.log.read_text(errors="replace")
    assert f"spare snapshot (pid {spare}) killed by SIGKILL" in log


def test_configure_with_no_spare_ready_spawns_the_worker(fssd_factory, shmdir):
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "64M"}], env={NO_SPARE_ENV: "1"})
    assert spares(f) == []
    base = fill(f, shmdir)
    before = sha256_file(base)
    f.fssconfig("fss0", "data", shmdir / "bs0")
    pid = f.worker_pid("snapshot", "fss0")
    inst = f"fssd[{os.path.abspath(f.rundir)}]: "
    assert re.fullmatch(re.escape(inst) + r"fss0 data@\S+Z", cmdline(pid)), cmdline(pid)
    assert snapshot_sha(f, shmdir, "fss0", 8 * MiB) == before
    assert spares(f) == []
    assert "assigned to spare worker" not in f.log.read_text(errors="replace")


def test_a_spare_orphaned_by_the_supervisor_exits(fssd, shmdir):
    spare = ready_spare(fssd)
    os.kill(fssd.proc.pid, signal.SIGKILL)
    fssd.proc.wait()
    wait_for(lambda: not os.path.exists(f"/proc/{spare}"), 30, "the orphaned spare to exit")


def test_a_killed_assigned_worker_restarts_fresh(fssd, shmdir):
    spare = ready_spare(fssd)
    fssd.fssconfig("fss0", "data", shmdir / "bs0")
    assert fssd.worker_pid("snapshot", "fss0") == spare
    nxt = ready_spare(fssd, other_than=spare)
    os.kill(spare, signal.SIGKILL)
    wait_for(lambda: fssd.alive_pid("snapshot", "fss0") not in (None, spare), 60, "fss0's worker to restart")
    # A new process of its own: the spare stays the spare.
    assert fssd.worker_pid("snapshot", "fss0") != nxt and nxt in spares(fssd)
    run("nbdinfo", fssd.uri("fss0"))
    info = [s for s in fssd.status()["snapshots"] if s["device"] == "fss0"][0]
    assert info["restarts"] == 1 and info["state"] == "active"


# -- the assignment's settings, without processes ------------------------------------------


def test_assigned_settings_put_our_descriptors_in_place_of_the_supervisors():
    s = ws.SnapshotSettings("fss0", "v", "/img", "/m", bs_fd=7, listen_fd=9, taken="t", debug=True)
    text = msgspec.json.encode(s).decode()
    got = spawned.assigned_settings(text, [7, 9], [21, 22], ws.SnapshotSettings)
    assert got == msgspec.structs.replace(s, bs_fd=21, listen_fd=22)
    # Lists of descriptors, and nested ones (any field a settings type adds flows through).
    sus = ws.SuspendSettings("fss0", ["/a", "/b"], [5, 6], 1.0)
    assert spawned.assigned_settings(msgspec.json.encode(sus).decode(), [6, 5], [31, 30], ws.SuspendSettings).fds == [30, 31]
    vol = ws.VolumeSettings("v", "/img", 4096, 3, [ws.AttachedSnapshot("fss0", "/m", 4)])
    got = spawned.assigned_settings(msgspec.json.encode(vol).decode(), [3, 4], [40, 41], ws.VolumeSettings)
    assert got.listen_fd == 40 and got.snapshots[0].bs_fd == 41


@pytest.mark.parametrize("theirs, ours, needle", [
    ([7], [21], "listen_fd = 9"),  # a field names a descriptor that did not come
    ([7, 9, 11], [21, 22, 23], "named by no field"),  # one came that nothing names
    ([7, 9], [21], "2 announced"),
])
def test_assigned_settings_refuse_what_does_not_match(theirs, ours, needle):
    text = msgspec.json.encode(ws.SnapshotSettings("fss0", "v", "/img", "/m", 7, 9, "t")).decode()
    with pytest.raises(ValueError, match=re.escape(needle)):
        spawned.assigned_settings(text, theirs, ours, ws.SnapshotSettings)


def test_assigned_settings_refuse_unknown_fields():
    with pytest.raises(ValueError, match="bad settings"):
        spawned.assigned_settings('{"device": "fss0", "no_such_field": 1}', [], [], ws.SnapshotSettings)


def test_a_bad_assignment_is_one_line_and_exit_2(tmp_path):
    """The spare process itself: an assignment naming a descriptor that did not come."""
    import subprocess
    import sys

    from ipc import workermsg
    from ipc.channel import Channel

    a, b = socket.socketpair()
    p = subprocess.Popen([sys.executable, "-m", "workers.spare", "--channel-fd", str(b.fileno()), "{}"], pass_fds=[b.fileno()],
                         stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    b.close()
    try:
        chan = Channel(a, workermsg.FromWorker)
        got = chan.recv(timeout=60)
        assert isinstance(got[0], workermsg.Ready) and got[0].kind == "spare"
        text = msgspec.json.encode(ws.SnapshotSettings("fss0", "v", "/img", "/m", 7, 9, "t")).decode()
        r, w = os.pipe()
        try:
            chan.send(workermsg.AssignSnapshot(text, [7], 1), [r])
        finally:
            os.close(r)
            os.close(w)
        assert p.wait(60) == 2
        err = p.stderr.read()
        assert err.count("\n") == 1 and "listen_fd = 9" in err and "Traceback" not in err, err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        a.close()


def test_back_to_back_configures_both_get_a_spare(fssd, shmdir):
    """The second configure comes while the next spare is still starting: it waits for that
    one (ahead of a new process) rather than spawning another."""
    first = ready_spare(fssd)
    fssd.fssconfig("fss0", "data", shmdir / "bs0")
    fssd.fssconfig("fss1", "data", shmdir / "bs1")
    p0, p1 = fssd.worker_pid("snapshot", "fss0"), fssd.worker_pid("snapshot", "fss1")
    assert p0 == first and p1 != first
    log = fssd.log.read_text(errors="replace")
    assert f"snapshot fss1: assigned to spare worker pid {p1}" in log
    run("nbdinfo", fssd.uri("fss1"))
    ready_spare(fssd, other_than=p1)  # and a third is started


def test_fssconfig_starts_lean():
    """The client's own start is part of every snapshot's creation: nothing it does not use
    on the way (OpenSSL's hashlib for instance names, package metadata for --version)."""
    import subprocess
    import sys

    err = subprocess.run([sys.executable, "-X", "importtime", "-c", "import daemon.cli.fssconfig"],
                         capture_output=True, text=True, check=True).stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in err.splitlines() if line.startswith("import time:")}
    assert "daemon.cli.fssconfig" in imported
    assert not imported & {"hashlib", "_hashlib", "importlib.metadata", "daemon.version"}, imported & {"hashlib", "importlib.metadata"}
