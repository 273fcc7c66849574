"""A volume served by several worker processes (`[[volume]] processes`), end to end.

Connections are steered into a chosen process by stopping the others (SIGSTOP)
while the client connects: they all accept on one listening socket, so the one
left running takes it. The raw NBD client is deliberate: the checks need to
know exactly which writes were answered, and when.
"""

import contextlib
import json
import os
import random
import signal
import struct
import subprocess
import threading
import time

import pytest

from fsshelp import run, sha256_file, wait_for
from ipc import names, nbd
from ipc.clustermap import ClusterMap
from stress import nbd_connect

MiB = 1 << 20
BLOCK = 4096


def _volume_pids(f) -> dict[int, int]:
    """{process number (1-based): pid} of the live volume processes of `data`."""
    out = {}
    for w in f.status()["workers"]:
        if w["kind"] == "volume" and w["alive"] and "volume data [" in w["name"]:
            out[int(w["name"].rsplit("[", 1)[1].split("/")[0])] = w["pid"]
    return out


@contextlib.contextmanager
def _only(pids: list[int]):
    """Every other volume process stopped meanwhile: a connection made now lands in `pids`."""
    stopped = []
    try:
        for p in pids:
            os.kill(p, signal.SIGSTOP)
            stopped.append(p)
        # kill() returns before the process has stopped: until then it may still accept.
        wait_for(lambda: all(_state(p) == "T" for p in pids), 10, "the other processes to stop")
        yield
    finally:
        for p in stopped:
            os.kill(p, signal.SIGCONT)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


def _connect_in(f, want: int) -> object:
    pids = _volume_pids(f)
    with _only([p for i, p in pids.items() if i != want]):
        return nbd_connect(f.sock("data"))


def _write(s, cookie: int, offset: int, data: bytes) -> None:
    s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, cookie, offset, len(data)) + data)
    got = b""
    while len(got) < 16:
        chunk = s.recv(16 - len(got))
        assert chunk, "server hung up"
        got += chunk
    magic, err, back = struct.unpack(">IIQ", got)
    assert (magic, err, back) == (nbd.SIMPLE_REPLY_MAGIC, 0, cookie)


def _wchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as fh:
        return int(next(line for line in fh if line.startswith("wchar:")).split()[1])


def _title(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().split(b"\0")[0].decode()


def test_titles_status_and_each_process_serving_its_own_connections(fssd_factory, shmdir):
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "64M", "processes": 2}])
    pids = _volume_pids(f)
    assert sorted(pids) == [1, 2] and len(set(pids.values())) == 2
    for i, pid in pids.items():  # `ps` says which volume, and which of its processes
        assert _title(pid).endswith(f": volume data [{i}/2]"), _title(pid)
    vols = json.loads(f.fssconfig("--volumes", "--json").stdout)
    assert vols[0]["processes"] == 2 and sorted(vols[0]["pids"]) == sorted(pids.values())
    line = f.fssconfig("--volumes", "-v").stdout.splitlines()[1]
    assert f"pids {pids[1]}, {pids[2]} (2 processes)" in line, line
    # A connection made while process 1 is stopped is served by process 2, and the other way round.
    for i in (2, 1):
        s = _connect_in(f, i)
        try:
            before = {j: _wchar(p) for j, p in pids.items()}
            for k in range(64):
                _write(s, k + 1, (i * 16 + k % 16) * 64 * 1024, os.urandom(64 * 1024))
            grew = {j: _wchar(p) - before[j] for j, p in pids.items()}
            assert grew[i] >= 4 * MiB and grew[3 - i] < MiB, grew
        finally:
            s.close()


def test_a_snapshot_drains_writes_in_flight_in_every_process(fssd_factory, shmdir):
    """One writer per process, each writing numbered blocks one after the other: the snapshot
    must hold, for each writer, exactly a prefix of its writes (one cut), everything answered
    before fssconfig began, and nothing sent after it returned. A process that the barrier
    missed would go on writing over uncopied clusters, which the snapshot would show."""
    nblocks = 1024  # per writer
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "16M", "processes": 2}])
    stop = threading.Event()
    acked = [0, 0]  # per writer: the last version answered
    sent_log: list[list[tuple[float, int]]] = [[], []]  # (time sent, version)
    errors = []

    def body(w: int, v: int) -> bytes:
        return struct.pack("<QQ", v, w) * (BLOCK // 16)

    def writer(w: int, s) -> None:
        try:
            v = 0
            while not stop.is_set():
                v += 1
                sent_log[w].append((time.monotonic(), v))
                _write(s, v, (w * nblocks + v % nblocks) * BLOCK, body(w, v))
                acked[w] = v
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    socks = [_connect_in(f, 1), _connect_in(f, 2)]
    threads = [threading.Thread(target=writer, args=(w, socks[w])) for w in (0, 1)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: min(acked) > 3 * nblocks, 60, "every block written a few times")
        before = list(acked)
        t0 = time.monotonic()
        f.fssconfig("fss0", "data", shmdir / "bs0", "4K")
        t1 = time.monotonic()
        at1 = list(acked)
        wait_for(lambda: all(a > b + nblocks for a, b in zip(acked, at1)), 60, "writes after the snapshot, over every block")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        for s in socks:
            s.close()
    assert not errors, errors
    out = shmdir / "fss0.out"
    run("nbdcopy", f.uri("fss0"), out)
    data = out.read_bytes()
    for w in (0, 1):
        found = {}
        for b in range(nblocks):
            v, who = struct.unpack_from("<QQ", data, (w * nblocks + b) * BLOCK)
            assert data[(w * nblocks + b) * BLOCK : (w * nblocks + b + 1) * BLOCK] == body(who, v), f"writer {w} block {b} torn"
            found[b] = v
        cut = max(found.values())
        # A prefix: each block holds the last version up to the cut that went to it.
        for b, v in found.items():
            want = cut - ((cut - b) % nblocks)
            assert v == want, f"writer {w}: block {b} holds version {v}, not {want} (the cut is {cut})"
        first_after = min((v for ts, v in sent_log[w] if ts > t1), default=None)
        assert before[w] <= cut, (w, before[w], cut)
        assert first_after is not None and cut < first_after, (w, cut, first_after)


def test_sigkill_of_one_process_mid_copy_loses_nothing_and_leaks_no_store_space(fssd_factory, shmdir):
    """Issue 8's check with two processes: ten SIGKILLs (each of one process, the other serving
    on) under first-touch writes from four clients, then the whole volume overwritten: every
    cluster finds room in a default-size store and the snapshot keeps its instant. Under
    "power": a killed process's reservations lie below the live one's, and are reused too."""
    size = 64 * MiB
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "64M", "processes": 2}],
                     extra="max_restarts = 100")  # durability "power", the default
    base = shmdir / "base.img"
    with open(base, "wb") as fh:
        fh.write(os.urandom(size))
    run("nbdcopy", base, f.uri("data"))
    f.fssconfig("fss0", "data", shmdir / "bs0", "4K")  # default size: room for every cluster
    m = ClusterMap.attach(names.map_name(f.prefix, "fss0"), writable=False)
    try:
        tc = m.table_clusters
        rng = random.Random(15)
        for round_ in range(10):
            cmds = []
            for _ in range(6):
                cmds += ["-c", f"aio_write -P {round_ + 1} {rng.randrange(0, size - MiB, 4096)} 1M"]
            victim = 1 + round_ % 2
            pid = _volume_pids(f)[victim]
            reserved = m.bs_next
            writers = [subprocess.Popen(["qemu-io", "-f", "raw", *cmds, "-c", "aio_flush", f.uri("data")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(4)]
            wait_for(lambda: m.bs_next > reserved, 20, "copies to start")
            os.kill(pid, signal.SIGKILL)
            for w in writers:
                w.wait(60)  # a killed connection fails its writer: those writes were never acknowledged
            wait_for(lambda: _volume_pids(f).get(victim) not in (None, pid), 30, "the killed process to come back")
            wait_for(lambda: f.log.read_text().count("fss0: re-attached") == round_ + 1, 30, "its successor to re-attach fss0")
            assert len(_volume_pids(f)) == 2
        assert m.valid, m.error
        other = shmdir / "other.img"
        with open(other, "wb") as fh:
            fh.write(os.urandom(size))
        run("nbdcopy", other, f.uri("data"))
        info = json.loads(f.fssconfig("-l", "--json").stdout)[0]
        assert info["state"] == "active", info
        slots = [k for k in m.table if k]
        assert len(slots) == size // 4096 == len(set(slots))
        assert m.copies == size // 4096 and m.bs_next == tc + size // 4096, (m.copies, m.bs_next)
        out = shmdir / "fss0.out"
        run("nbdcopy", f.uri("fss0"), out)
        assert sha256_file(out) == sha256_file(base)
    finally:
        m.close()


def test_volume_processes_default_is_one_per_cpu(tmp_path, monkeypatch):
    """0 (the default): one volume process per CPU fssd may run on, at most 8; a volume's own
    `processes` and an explicit count win; a negative count is refused."""
    from daemon import config

    p = tmp_path / "fssd.toml"
    for name in ("v", "w"):
        (tmp_path / f"{name}.img").write_bytes(bytes(4096))
    p.write_text(f'[[volume]]\nname = "v"\npath = "{tmp_path}/v.img"\n[[volume]]\nname = "w"\npath = "{tmp_path}/w.img"\nprocesses = 3\n')
    cfg = config.load(str(p))
    assert cfg.daemon.volume_processes == 0
    for cpus, want in ((1, 1), (2, 2), (32, config.AUTO_PROCESSES_MAX)):
        monkeypatch.setattr(config.os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)))
        assert config.auto_processes() == want
        assert [cfg.processes_for(v) for v in cfg.volume] == [want, 3]
    p.write_text("[daemon]\nvolume_processes = -1\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(str(p))
    assert "volume_processes must be between 1 and 64, or 0 for one per CPU" in str(e.value)


def _sockets(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return n


def test_new_clients_go_to_the_less_busy_process(fssd_factory, shmdir):
    """Four clients connect while process 2 is stopped (all land in process 1, which takes
    the later ones although it is the busier, since nobody else does); then four more
    connect with both running: the busier process leaves them to the other (accept
    balancing through the volume's shared segment), 4 and 4. Left to whichever process
    woke first, all four would go to process 2 once in 16 runs."""
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "64M", "processes": 2}])
    pids = _volume_pids(f)
    base = {i: _sockets(p) for i, p in pids.items()}
    socks = []
    try:
        with _only([pids[2]]):
            for _ in range(4):
                socks.append(nbd_connect(f.sock("data")))
        assert {i: _sockets(p) - base[i] for i, p in pids.items()} == {1: 4, 2: 0}
        for _ in range(4):
            socks.append(nbd_connect(f.sock("data")))
        wait_for(lambda: sum(_sockets(p) - base[i] for i, p in pids.items()) == 8, 10, "8 connections served")
        assert {i: _sockets(p) - base[i] for i, p in pids.items()} == {1: 4, 2: 4}
        for k, s in enumerate(socks):  # and every one of them is served
            _write(s, k + 1, k * BLOCK, os.urandom(BLOCK))
    finally:
        for s in socks:
            s.close()
