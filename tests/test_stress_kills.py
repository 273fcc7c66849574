"""SIGKILLs that used to change a snapshot after it was taken, or leak its backing store.

1. A supervisor killed while a client had requests queued: its orphaned volume
   worker executed a write after a new fssd had started and taken fss0, and the
   write showed in fss0. Now every worker dies with its supervisor and a new
   fssd starts only once all of them are gone, removing what they left.
2. A volume worker killed between reserving backing-store clusters and
   publishing them leaked those clusters, so a default-size snapshot later went
   "backing store full". Now a restarted worker reclaims them.
"""

import fcntl
import json
import os
import random
import signal
import socket
import struct
import subprocess
import time

from fsshelp import BIN, run, sha256_file, wait_for
from ipc import names, nbd
from ipc.clustermap import ClusterMap, table_clusters

MiB = 1 << 20
ORPHAN_AT = 40 * MiB
ORPHAN_DATA = b"ORPHANED-WRITE!!" * 256  # 4 KiB


class PipelinedClient:
    """Queues requests and reads no replies: the worker stalls on the first big READ reply."""

    def __init__(self, path: str, export: str):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(30)
        self.s.connect(path)
        magic, opt, _flags = struct.unpack(">QQH", self._recv(18))
        assert (magic, opt) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
        self.s.sendall(struct.pack(">I", nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES))
        name = export.encode()
        self.s.sendall(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, 4 + len(name) + 2) + struct.pack(">I", len(name)) + name + b"\0\0")
        while True:
            _m, _o, typ, n = struct.unpack(">QIII", self._recv(20))
            self._recv(n)
            if typ == nbd.REP_ACK:
                break
            assert not typ & 0x80000000, f"NBD_OPT_GO refused: {typ:#x}"

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            got = self.s.recv(n - len(buf))
            if not got:
                raise EOFError
            buf += got
        return bytes(buf)

    def send(self, cmd: int, cookie: int, offset: int, length: int, data: bytes = b"") -> None:
        self.s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, cmd, cookie, offset, length) + data)

    def pending_bytes(self) -> int:
        import fcntl
        import termios

        return struct.unpack("i", fcntl.ioctl(self.s.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]

    def drain(self) -> dict[int, int]:
        """Read until the server hangs up or every reply is in: {cookie: error} of the replies seen."""
        seen: dict[int, int] = {}
        try:
            while True:
                magic, err, cookie = struct.unpack(">IIQ", self._recv(16))
                assert magic == nbd.SIMPLE_REPLY_MAGIC
                seen[cookie] = err
                if cookie < 100 and not err:
                    self._recv(MiB)  # a READ's data
                if len(seen) == 17:
                    return seen
        except (EOFError, ConnectionResetError):
            return seen


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _restart_after_kill(f) -> None:
    os.kill(f.proc.pid, signal.SIGKILL)
    f.proc.wait()
    f._logf.close()
    f.proc = None
    f.start()


def test_no_orphan_write_after_the_supervisor_is_killed(fssd_factory, shmdir):
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "64M"}])
    store = shmdir / "bs1"
    f.fssconfig("fss1", "data", store)
    old_workers = [f.worker_pid("volume", "data"), f.worker_pid("snapshot", "fss1")]

    c = PipelinedClient(f.sock("data"), "data")
    for i in range(16):
        c.send(nbd.CMD_READ, i, i * MiB, MiB)
    c.send(nbd.CMD_WRITE, 100, ORPHAN_AT, len(ORPHAN_DATA), ORPHAN_DATA)
    wait_for(lambda: c.pending_bytes() > 0, 20, "the worker to start answering the queued READs")

    _restart_after_kill(f)
    lingering = [pid for pid in old_workers if not _dead(pid)]  # when the new instance was ready

    f.fssconfig("fss0", "data", shmdir / "bs0")
    replies = c.drain()
    # Neither the snapshot taken after the restart nor the volume holds the orphaned write.
    with open(shmdir / "data.img", "rb") as img:
        img.seek(ORPHAN_AT)
        assert img.read(4096) == bytes(4096), "the orphaned write landed in the volume"
    run("qemu-io", "-f", "raw", "-r", "-c", f"read -P 0 {ORPHAN_AT} 4k", f.uri("fss0"))
    assert 100 not in replies, "the orphaned write was acknowledged"
    # The new instance started only once every process of the old one was gone. fss1 outlived
    # the killed instance (docs/architecture.md "Durability"): back, and without the orphaned write.
    assert lingering == [], f"old workers still alive after the new fssd started: {lingering}"
    assert json.loads(f.fssconfig("-l", "--json", "fss1").stdout)[0]["state"] == "active"
    run("qemu-io", "-f", "raw", "-r", "-c", f"read -P 0 {ORPHAN_AT} 4k", f.uri("fss1"))
    assert store.exists()


def _held(path) -> bool:
    """Someone holds the flock on `path` (tested with a non-blocking try of our own)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_a_new_fssd_waits_for_what_holds_the_run_directory_then_refuses_naming_it(fssd_factory, shmdir):
    """Whatever still shares the old instance's lock (here flock(1)) keeps a new one out."""
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "16M"}], start=False)
    f.rundir.mkdir()
    pidfile = f.rundir / "fssd.pid"
    # -o: only flock itself holds the lock, its child (sleep) does not; a session of their own to kill both.
    holder = subprocess.Popen(["flock", "-o", pidfile, "sleep", "120"], start_new_session=True)
    try:
        wait_for(lambda: _held(pidfile), 20, "flock(1) to hold the pid file")
        t0 = time.monotonic()
        r = run(BIN / "fssd", "-c", f.config, check=False, timeout=60)
        assert r.returncode == 1, r.stderr
        assert f"run directory {f.rundir} is still held by processes of a previous fssd: pid {holder.pid} (flock); not starting" in r.stderr, r.stderr
        assert time.monotonic() - t0 >= 9
        # Waiting, then starting as soon as the holder is gone.
        f.start(wait=False)
        wait_for(lambda: "waiting up to 10 s for the processes of a previous fssd to exit" in f.log.read_text(), 20, "fssd to wait")
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    f.wait_ready()
    run("qemu-io", "-f", "raw", "-c", "write -P 7 0 64k", f.uri("data"))


# -- 2. a killed volume worker leaks no backing-store space ---------------------------------


def _map(f, device: str) -> ClusterMap:
    return ClusterMap.attach(names.map_name(f.prefix, device), writable=False)


def test_killed_volume_worker_leaks_no_backing_store(fssd_factory, shmdir):
    size = 64 * MiB
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "64M"}], extra="max_restarts = 100")
    base = shmdir / "base.img"
    with open(base, "wb") as fh:
        fh.write(os.urandom(size))
    run("nbdcopy", base, f.uri("data"))
    f.fssconfig("fss0", "data", shmdir / "bs0", "4K")  # default size: room for every cluster
    m = _map(f, "fss0")
    tc = m.table_clusters
    assert (m.cluster_size, m.bs_limit) == (4096, tc + size // 4096)

    # First-touch writes of 1 MiB each (a 256-cluster copy: long between reserving and publishing),
    # four writers, the volume worker SIGKILLed under them again and again.
    rng = random.Random(8)
    for round_ in range(10):
        cmds = []
        for _ in range(6):
            cmds += ["-c", f"aio_write -P {round_ + 1} {rng.randrange(0, size - MiB, 4096)} 1M"]
        pid = f.worker_pid("volume", "data")
        reserved = m.bs_next
        writers = [
            subprocess.Popen(["qemu-io", "-f", "raw", *cmds, "-c", "aio_flush", f.uri("data")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(4)
        ]
        wait_for(lambda: m.bs_next > reserved, 20, "copies to start")
        os.kill(pid, signal.SIGKILL)
        for w in writers:
            w.wait(60)  # a killed connection fails the writer: fine, those writes were never acknowledged
        wait_for(lambda: f.alive_pid("volume", "data") not in (None, pid), 30, "the volume worker to come back")
        # Alive is not done: the new worker reconciles before it serves, and says so.
        wait_for(lambda: f.log.read_text().count("fss0: re-attached") == round_ + 1, 30, "the restarted worker to re-attach fss0")
        # Reconciled with what is published: the count is exact, and every store cluster handed
        # out is published or free to be handed out again (under "power", the default here, the
        # killed worker's reservations go back as free runs: the next free cluster stays).
        slots = [k for k in m.table if k]
        assert m.copies == len(slots), (m.copies, len(slots))
        free = sum(n for _f, n in m.free_runs())
        assert m.bs_next - tc == len(slots) + free, (m.bs_next - tc, len(slots), free)
    assert m.valid
    # The whole volume overwritten: every cluster must find room, and the snapshot keep its instant.
    other = shmdir / "other.img"
    with open(other, "wb") as fh:
        fh.write(os.urandom(size))
    run("nbdcopy", other, f.uri("data"))
    info = json.loads(f.fssconfig("-l", "--json").stdout)[0]
    assert info["state"] == "active", info
    assert m.copies == size // 4096 and m.bs_next == tc + size // 4096
    out = shmdir / "fss0.out"
    run("nbdcopy", f.uri("fss0"), out)
    assert sha256_file(out) == sha256_file(base)
    m.close()


def test_reconcile_frees_reserved_but_unpublished_clusters_and_reuses_them_first(tmp_path):
    """The allocation a killed worker left (holes, a tail, a wrong count) made right, then used up exactly."""
    import uuid

    from workers.cow import SnapshotTarget

    cs, count = 4096, 64
    vol = tmp_path / "vol.img"
    old = bytes((i // cs) % 251 + 1 for i in range(cs * count))
    vol.write_bytes(old)
    bs = tmp_path / "bs"
    bs.touch()
    name = f"/fssd-test-{uuid.uuid4().hex[:12]}"
    tc = table_clusters(count, cs)
    m = ClusterMap.create(name, cs, cs * count, bs_limit_clusters=tc + count)  # room for every cluster
    vfd, bfd = os.open(vol, os.O_RDWR), os.open(bs, os.O_RDWR)
    try:
        m.activate()
        # As a killed worker left it: slots tc..tc+2 and tc+5 published; tc+3, tc+4 and
        # tc+6..tc+8 reserved, never published.
        for c, k in ((10, tc), (11, tc + 1), (12, tc + 2), (20, tc + 5)):
            m.table[c] = k
        m.bs_next, m.copies = tc + 9, 3
        t = SnapshotTarget("fss0", m, bfd, vfd)
        reclaimed, _took = t.reconcile()
        assert (reclaimed, m.bs_next, m.copies) == (5, tc + 6, 4)
        # Every other cluster still fits (the holes are used before the end), and reads right.
        for c in range(count):
            t.copy(c * cs, cs)
        assert m.valid and m.copies == count and m.bs_next == tc + count
        slots = sorted(k for k in m.table)
        assert slots == list(range(tc, tc + count))
        with open(bs, "rb") as f:
            for c in set(range(count)) - {10, 11, 12, 20}:  # those four were never really copied here
                f.seek(m.table[c] * cs)
                assert f.read(cs) == old[c * cs : (c + 1) * cs]
    finally:
        os.close(vfd)
        os.close(bfd)
        m.close()
        ClusterMap.unlink(name)
