"""Snapshots through real clients: each keeps the image as it was at its barrier."""

import json
import os
import re
import signal
import subprocess
import threading


from fsshelp import run, sha256_file, wait_for
from nbdwire import connect, req

from ipc import nbd

MiB = 1 << 20
SIZE = 64 * MiB
CLUSTER = 64 * 1024


def fill_random(fssd, shmdir, name="base.img", size=SIZE):
    img = shmdir / name
    with open(img, "wb") as f:
        f.write(os.urandom(size))
    run("nbdcopy", "--connections=4", "--threads=4", img, fssd.uri("data"))
    return img


def export_sha(fssd, shmdir, export):
    out = shmdir / f"{export}.out"
    run("nbdcopy", "--connections=4", "--threads=4", fssd.uri(export), out)
    digest = sha256_file(out)
    out.unlink()
    return digest


def qemu_io(uri, *cmds, check=True):
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    return run(*argv, uri, check=check)


class Model:
    """What the live image must be after the same operations, kept in memory."""

    def __init__(self, path):
        self.data = bytearray(open(path, "rb").read())

    def pattern(self, off, n, byte):
        self.data[off : off + n] = bytes([byte]) * n

    def zero(self, off, n):
        self.pattern(off, n, 0)

    def sha(self):
        import hashlib

        return hashlib.sha256(self.data).hexdigest()


def snapinfo(fssd, device):
    snaps = json.loads(fssd.fssconfig("-l", "--json").stdout)
    return next(s for s in snaps if s["device"] == device)


def test_snapshot_keeps_the_image_at_its_barrier(fssd, shmdir):
    base = fill_random(fssd, shmdir)
    before = sha256_file(base)
    model = Model(base)
    fssd.fssconfig("fss0", "data", shmdir / "bs0")

    # Unaligned, multi-cluster, several connections, TRIM and zeroes on the live volume.
    qemu_io(fssd.uri("data"), "write -P 0x11 12345 200000", "write -P 0x22 1048575 3", "write -z 5M 300k", "discard 9M 128k")
    model.pattern(12345, 200000, 0x11)
    model.pattern(1048575, 3, 0x22)
    model.zero(5 * MiB, 300 * 1024)
    model.zero(9 * MiB, 128 * 1024)  # TRIM punches a hole: it reads back as zeroes here
    other = shmdir / "other.img"
    with open(other, "wb") as f:
        f.write(os.urandom(16 * MiB))
    run("nbdcopy", "--connections=4", "--threads=4", other, fssd.uri("data"))
    model.data[0 : 16 * MiB] = open(other, "rb").read()

    assert export_sha(fssd, shmdir, "fss0") == before
    assert export_sha(fssd, shmdir, "data") == model.sha()


def test_two_snapshots_keep_their_own_moments_and_go_in_any_order(fssd, shmdir):
    base = fill_random(fssd, shmdir)
    moment0 = sha256_file(base)
    model = Model(base)
    fssd.fssconfig("fss0", "data", shmdir / "bs0")
    qemu_io(fssd.uri("data"), "write -P 0x33 0 8M")
    model.pattern(0, 8 * MiB, 0x33)
    moment1 = model.sha()
    fssd.fssconfig("fss1", str(shmdir / "data.img"), shmdir / "bs1")  # the volume by its image path
    qemu_io(fssd.uri("data"), "write -P 0x44 4M 8M")
    model.pattern(4 * MiB, 8 * MiB, 0x44)

    assert export_sha(fssd, shmdir, "fss0") == moment0
    assert export_sha(fssd, shmdir, "fss1") == moment1
    fssd.fssconfig("-u", "fss0")  # the older one first
    assert not (shmdir / "bs0").exists(), "fssd created bs0, so unconfigure removes it"
    qemu_io(fssd.uri("data"), "write -P 0x55 20M 1M")
    model.pattern(20 * MiB, MiB, 0x55)
    assert export_sha(fssd, shmdir, "fss1") == moment1
    assert export_sha(fssd, shmdir, "data") == model.sha()


def test_backing_store_holds_exactly_the_touched_clusters(fssd, shmdir):
    fssd.fssconfig("fss0", "data", shmdir / "bs0")
    info = snapinfo(fssd, "fss0")
    table = info["bs_clusters"]
    assert info["cluster_size"] == CLUSTER and info["cluster_count"] == SIZE // CLUSTER
    assert table == (SIZE // CLUSTER * 4) // CLUSTER + 1  # fss: the table's clusters come first
    # 3 distinct clusters, one write straddling two of them, one rewriting an already copied one.
    qemu_io(fssd.uri("data"), "write -P 1 0 4k", "write -P 2 131070 4", "write -P 3 100 10")
    info = snapinfo(fssd, "fss0")
    assert info["copies"] == 3
    assert info["bs_clusters"] == table + 3
    assert os.path.getsize(shmdir / "bs0") == (table + 3) * CLUSTER
    line = fssd.fssconfig("-l", "-v", "fss0").stdout.splitlines()[0]
    assert re.fullmatch(r"fss0: data, taken \d{4}-\d\d-\d\d \d\d:\d\d:\d\d, 1024 cluster of 64K, 256K backup", line), line


def test_full_backing_store_invalidates_the_snapshot_never_the_volume(fssd, shmdir):
    base = fill_random(fssd, shmdir)
    model = Model(base)
    # Room for the table (1 cluster) and 4 copies.
    fssd.fssconfig("fss0", "data", shmdir / "bs0", "64k", str(5 * CLUSTER))
    other = shmdir / "new.img"
    with open(other, "wb") as f:
        f.write(os.urandom(8 * MiB))
    run("nbdcopy", "--connections=4", "--threads=4", other, fssd.uri("data"))  # 128 clusters: overflows
    model.data[0 : 8 * MiB] = open(other, "rb").read()
    assert export_sha(fssd, shmdir, "data") == model.sha(), "every live write landed"
    info = snapinfo(fssd, "fss0")
    assert info["state"] == "invalid" and info["error"] == "backing store full"
    assert "fss0: data, invalid: backing store full" in fssd.fssconfig("-l").stdout
    r = run("qemu-io", "-f", "raw", "-r", "-c", "read 0 4k", fssd.uri("fss0"), check=False)
    assert "Input/output error" in r.stdout + r.stderr
    assert "fss0: snapshot invalid: backing store full" in fssd.log.read_text()
    # The volume goes on: more writes, no error.
    qemu_io(fssd.uri("data"), "write -P 0x66 32M 1M")


def test_unconfig_on_close_and_unlink_and_directory_backup(fssd, shmdir):
    bsdir = shmdir / "bsdir"
    bsdir.mkdir()
    fssd.fssconfig("-c", "fss0", "data", bsdir)
    assert list(bsdir.iterdir()) == [], "a file made in a directory is unlinked once configured"
    assert snapinfo(fssd, "fss0")["backup"] == "(unlinked)"
    fssd.fssconfig("-x", "fss1", "data", shmdir / "bs1")
    assert not (shmdir / "bs1").exists()
    qemu_io(fssd.uri("data"), "write -P 7 0 1M")
    assert snapinfo(fssd, "fss1")["copies"] == 16, "the unlinked store still takes copies"
    assert "unconfig on close" in fssd.fssconfig("-l", "-v", "fss0").stdout
    run("nbdinfo", fssd.uri("fss0"))  # connect and close: the last close unconfigures
    wait_for(lambda: not snapinfo(fssd, "fss0")["in_use"], 10, "fss0 to be unconfigured on close")
    assert snapinfo(fssd, "fss1")["in_use"]
    assert not os.path.exists(fssd.sock("fss0"))


def test_snapshot_export_is_read_only(fssd, shmdir):
    fssd.fssconfig("fss0", "data", shmdir / "bs0")
    out = json.loads(run("nbdinfo", "--json", fssd.uri("fss0")).stdout)["exports"][0]
    assert out["is_read_only"] is True and out["export-size"] == SIZE
    before = export_sha(fssd, shmdir, "fss0")
    # Real clients refuse to write a read-only export on their own side, so the writes go
    # through the raw client: the server itself must answer EPERM and change nothing.
    c = connect(fssd, "fss0")
    try:
        assert c.pwrite(1, 0, b"\xee" * 4096) == nbd.EPERM
        for cookie, cmd in ((2, nbd.CMD_TRIM), (3, nbd.CMD_WRITE_ZEROES)):
            c.send(req(cmd, cookie, SIZE - CLUSTER, CLUSTER))
            assert c.reply(cookie)[0] == nbd.EPERM
    finally:
        c.close()
    assert export_sha(fssd, shmdir, "fss0") == before
    assert snapinfo(fssd, "fss0")["state"] != "invalid"


def test_fssconfig_errors(fssd_factory, shmdir):
    # Run directory under /dev/shm: the unprivileged user below must be able to reach the socket.
    fssd = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "16M"}], base=shmdir)
    fssd.fssconfig("fss0", "data", shmdir / "bs0")
    r = fssd.fssconfig("fss0", "data", shmdir / "bsX", check=False)
    assert r.returncode == 1 and r.stderr.strip() == "fssconfig: fss0: Device busy"
    r = fssd.fssconfig("-u", "fss2", check=False)
    assert r.returncode == 1 and r.stderr.strip() == "fssconfig: fss2: Device not configured"
    r = fssd.fssconfig("fss9", "data", shmdir / "bsX", check=False)
    assert r.returncode == 1 and "fss9: Device not configured" in r.stderr
    r = fssd.fssconfig("fss1", "nosuchvol", shmdir / "bsX", check=False)
    assert r.returncode == 1 and "nosuchvol: no such volume" in r.stderr
    r = fssd.fssconfig("fss1", "data", shmdir / "data.img", check=False)
    assert r.returncode == 1 and "is the image of volume data" in r.stderr
    r = fssd.fssconfig("fss1", "data", "/proc/version", check=False)
    assert r.returncode == 1 and "fssconfig: " in r.stderr
    r = fssd.fssconfig("fss1", "data", shmdir / "bsX", "12q", check=False)
    assert r.returncode == 1 and "cluster size `12q': illegal number" in r.stderr
    r = fssd.fssconfig("-l", "-u", check=False)
    assert r.returncode == 1 and r.stderr.startswith("usage: fssconfig")
    r = fssd.fssconfig("fss1", "data", check=False)
    assert r.returncode == 1 and "usage:" in r.stderr
    # Who may do what (root, the group, a stranger): tests/test_security.py.
    # Nothing changed by the refusals.
    assert [s["device"] for s in json.loads(fssd.fssconfig("-l", "--json").stdout) if s["in_use"]] == ["fss0"]


def test_backing_store_on_the_snapshotted_mount_is_refused(fssd_factory, shmdir):
    mnt = shmdir / "mnt"
    mnt.mkdir()
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "16M", "mountpoint": str(mnt)}])
    r = f.fssconfig("fss0", str(mnt), mnt / "bs0", check=False)
    assert r.returncode == 1 and "would deadlock" in r.stderr
    f.fssconfig("fss0", str(mnt), shmdir / "bs0")  # the volume by its mountpoint
    assert snapinfo(f, "fss0")["volume"] == "data"


def test_dead_workers_lose_nothing(fssd_factory, shmdir):
    # One volume process, so killing it takes the whole volume down under the writers.
    fssd = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "64M"}], extra="volume_processes = 1")
    base = fill_random(fssd, shmdir)
    moment = sha256_file(base)
    fssd.fssconfig("fss0", "data", shmdir / "bs0")
    stop = threading.Event()

    def storm():
        i = 0
        while not stop.is_set():
            # Writers see errors while the volume worker is down; what matters is what reaches the snapshot.
            subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {i % 250 + 1} {(i * 3 % 60) * MiB} 1M", fssd.uri("data")], capture_output=True)
            i += 1

    t = threading.Thread(target=storm)
    t.start()
    try:
        for kind, key in (("snapshot", "fss0"), ("volume", "data")):
            wait_for(lambda: snapinfo(fssd, "fss0")["copies"] > 0, 20, "the storm to reach the volume")
            pid = fssd.worker_pid(kind, key)
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: fssd.alive_pid(kind, key) not in (None, pid), 20, f"{kind} worker restart")
    finally:
        stop.set()
        t.join()
    assert export_sha(fssd, shmdir, "fss0") == moment
    status = fssd.status()
    restarted = {w["kind"]: w["restarts"] for w in status["workers"]}
    assert restarted["volume"] >= 1 and restarted["snapshot"] >= 1
    assert "killed by SIGKILL" in fssd.fssconfig("-l", "-v", "fss0").stdout
    qemu_io(fssd.uri("data"), "write -P 0x77 0 1M")  # the restarted volume serves writes
    qemu_io(fssd.uri("data"), "read -P 0x77 0 1M")


def test_snapshot_worker_that_keeps_dying_invalidates_its_snapshot(fssd_factory, shmdir):
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "16M"}], extra="max_restarts = 1")
    f.fssconfig("fss0", "data", shmdir / "bs0")
    first = f.worker_pid("snapshot", "fss0")
    os.kill(first, signal.SIGKILL)
    second = wait_for(lambda: f.alive_pid("snapshot", "fss0") not in (None, first) and f.alive_pid("snapshot", "fss0"), 20, "restart")
    os.kill(second, signal.SIGKILL)
    wait_for(lambda: snapinfo(f, "fss0")["state"] == "invalid", 20, "the snapshot to be given up")
    info = snapinfo(f, "fss0")
    assert info["error"].startswith("worker failed repeatedly") and info["pid"] == 0
    assert "fss0: snapshot invalid: worker failed repeatedly" in f.log.read_text()
    run("qemu-io", "-f", "raw", "-c", "write -P 9 0 1M", f.uri("data"))  # the volume is untouched by it
    f.fssconfig("-u", "fss0")  # and the administrator can still remove it


def test_raw_block_device_backing_store(fssd, shmdir, mounts):
    """A raw device as the store: its size is the limit; copies fall back to pread/pwrite."""
    base = fill_random(fssd, shmdir)
    moment = sha256_file(base)
    dev_file = shmdir / "bsdev.img"
    with open(dev_file, "wb") as f:
        f.truncate(2 * MiB)  # table (1 cluster) + 31 copies of 64 KiB
    loop = run("losetup", "-f", "--show", dev_file).stdout.strip()
    mounts._undo.append(("loop", loop))  # detached at cleanup, also on failure
    fssd.fssconfig("fss0", "data", loop)
    info = snapinfo(fssd, "fss0")
    assert info["bs_limit_clusters"] == 32 and info["backup"] == loop
    qemu_io(fssd.uri("data"), "write -P 0x21 0 1M")  # 16 clusters: fits
    assert export_sha(fssd, shmdir, "fss0") == moment
    assert snapinfo(fssd, "fss0")["copies"] == 16
    qemu_io(fssd.uri("data"), "write -P 0x22 8M 2M")  # 32 more: the device is full
    info = snapinfo(fssd, "fss0")
    assert info["state"] == "invalid" and info["error"] == "backing store full"
    fssd.fssconfig("-u", "fss0")
    assert os.path.exists(loop), "fssd never removes a device it did not create"


def test_a_live_image_or_store_is_never_a_backing_store(fssd_factory, shmdir):
    """Not by its path, a hard link, or another volume's name for it: nothing gets truncated."""
    f = fssd_factory([
        {"name": "data", "path": str(shmdir / "data.img"), "size": "16M"},
        {"name": "other", "path": str(shmdir / "other.img"), "size": "8M"},
    ])
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5e 0 1M", f.uri("other"))
    os.link(shmdir / "data.img", shmdir / "alias.img")
    f.fssconfig("fss0", "data", shmdir / "bs0")
    for backup, what in (
        (shmdir / "data.img", "the image of volume data"),
        (shmdir / "alias.img", "the image of volume data"),
        (shmdir / "other.img", "the image of volume other"),
        (shmdir / "bs0", "the backing store of fss0"),
    ):
        r = f.fssconfig("fss1", "data", backup, check=False)
        assert r.returncode == 1 and what in r.stderr, (backup, r.stderr)
    assert os.path.getsize(shmdir / "data.img") == 16 * MiB
    assert os.path.getsize(shmdir / "other.img") == 8 * MiB
    run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x5e 0 1M", f.uri("other"))
    assert snapinfo(f, "fss0")["bs_clusters"] == 1 and os.path.getsize(shmdir / "bs0") == CLUSTER
