"""Snapshots that survive restarts (issue 11): a real fssd stopped, killed and started again.

Each instance has its own state directory (tests/fsshelp.py puts it beside the
run directory); volumes and stores live in the test's /dev/shm directory.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading

import pytest

from fsshelp import BIN, run, sha256_file, wait_for
from ipc import storeformat as sf

SIZE = 32 << 20


def _fill(f, shmdir, seed: int, size: int = SIZE) -> None:
    """Write size bytes of seeded data through the live export (nbdcopy, a real client)."""
    src = shmdir / f"src{seed}"
    src.write_bytes(bytes((i * 7 + seed) % 251 for i in range(256)) * (size // 256))
    run("nbdcopy", src, f.uri("data"))
    src.unlink()


def _sha(f, shmdir, export: str) -> str:
    out = shmdir / f"{export}.out"
    run("nbdcopy", f.uri(export), out)
    try:
        return sha256_file(out)
    finally:
        out.unlink()


def _snap(f, device: str) -> dict:
    for s in json.loads(run(BIN / "fssconfig", "-r", f.rundir, "-l", "--json").stdout):
        if s["device"] == device:
            return s
    raise AssertionError(device)


def _kill_all(f) -> None:
    """SIGKILL the supervisor and every worker at once (as the OOM killer or a power cut would)."""
    pids = [f.proc.pid] + [w["pid"] for w in f.status()["workers"] if w["alive"]]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    f.proc.wait()
    f._logf.close()
    f.proc = None


def _record(f, device: str):
    return f.tmp / "state" / "snapshots" / f"{device}.json"


def _edit_record(f, device: str, **changes) -> None:
    p = _record(f, device)
    rec = json.loads(p.read_bytes())
    rec.update(changes)
    p.write_text(json.dumps(rec))


@pytest.fixture
def two(fssd_factory, shmdir):
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": SIZE}])
    _fill(f, shmdir, 1)
    f.fssconfig("fss0", "data", shmdir / "bs0", "64k")
    _fill(f, shmdir, 2, SIZE // 2)
    f.fssconfig("fss1", "data", shmdir / "bs1", "16k")
    _fill(f, shmdir, 3, SIZE // 4)
    return f


def test_sigterm_restart_keeps_both_snapshots_under_a_write_load(two, shmdir):
    f = two
    before = {d: _sha(f, shmdir, d) for d in ("fss0", "fss1")}
    usage = {d: (_snap(f, d)["bs_clusters"], _snap(f, d)["copies"]) for d in ("fss0", "fss1")}
    stop = threading.Event()

    def load():  # writes until fssd goes away under it
        src = shmdir / "load"
        src.write_bytes(bytes(range(256)) * (SIZE // 256))  # reaches clusters no snapshot has copied yet
        while not stop.is_set():
            if subprocess.run(["nbdcopy", str(src), f.uri("data")], capture_output=True).returncode:
                break

    t = threading.Thread(target=load)
    t.start()
    try:
        wait_for(lambda: _snap(f, "fss0")["copies"] > usage["fss0"][1] or _snap(f, "fss1")["copies"] > usage["fss1"][1], 20,
                 "the load to copy a cluster")
        assert f.stop() == 0
    finally:
        stop.set()
        t.join(60)
    usage = {d: None for d in usage}
    f.start()
    for d in ("fss0", "fss1"):
        s = _snap(f, d)
        assert s["state"] == "active", s
        assert s["durability"] == "power" and s["recovered"] > 0
        assert _sha(f, shmdir, d) == before[d], f"{d} changed across the restart"
        usage[d] = (s["bs_clusters"], s["copies"])
    # Store usage did not move across the restart: nothing was copied or reclaimed twice.
    f.stop()
    f.start()
    for d in ("fss0", "fss1"):
        s = _snap(f, d)
        assert (s["bs_clusters"], s["copies"]) == usage[d]
    assert "recovered" in f.fssconfig("-l", "-v").stdout


def test_sigkill_of_every_process_then_restart(two, shmdir):
    f = two
    before = {d: _sha(f, shmdir, d) for d in ("fss0", "fss1")}
    _kill_all(f)
    f.start()
    for d in ("fss0", "fss1"):
        assert _snap(f, d)["state"] == "active"
        assert _sha(f, shmdir, d) == before[d]
    # Nothing stale blocks the new instance; unconfigure removes the record and the store.
    f.fssconfig("-u", "fss1")
    assert not _record(f, "fss1").exists() and not (shmdir / "bs1").exists()


def test_recovery_never_writes_the_volume(two, shmdir):
    f = two
    f.stop()
    img = shmdir / "data.img"
    sha = sha256_file(img)
    f.start()  # recovery, then the volume worker (which only probes past the end)
    assert _snap(f, "fss0")["state"] == "active"
    f.stop()
    assert sha256_file(img) == sha
    f.start()  # the clean stop's stamp matches again: nothing wrote the image meanwhile
    assert _snap(f, "fss0")["state"] == "active" and _snap(f, "fss1")["state"] == "active"


def _restart_invalid(f, device: str, reason: str) -> None:
    f.start()
    s = _snap(f, device)
    assert s["state"] == "invalid" and reason in s["error"], s
    assert reason in f.fssconfig("-l", "-v").stdout
    assert reason in f.log.read_text()
    # An invalid snapshot answers no reads, and fssconfig -u still removes it.
    f.fssconfig("-u", device)
    assert not _record(f, device).exists()


def test_host_crash_under_process_is_invalid(fssd_factory, shmdir):
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": SIZE}], extra='durability = "process"')
    f.fssconfig("fss0", "data", shmdir / "bs0")
    _fill(f, shmdir, 1, SIZE // 4)
    _kill_all(f)
    _edit_record(f, "fss0", boot_id="00000000-0000-0000-0000-000000000000")  # the boot it ran in is over
    _restart_invalid(f, "fss0", "host crashed while the snapshot was active")


def test_host_crash_under_power_is_intact(two, shmdir):
    f = two
    before = _sha(f, shmdir, "fss0")
    _kill_all(f)
    _edit_record(f, "fss0", boot_id="00000000-0000-0000-0000-000000000000")
    f.start()
    assert _snap(f, "fss0")["state"] == "active"
    assert _sha(f, shmdir, "fss0") == before


@pytest.mark.parametrize("damage, reason", [
    ("header", "backing store header: store header checksum does not match"),
    ("truncate", "points past the end of the backing store"),
    ("replace", "was replaced by another file"),
    ("volume", "volume image was written while fssd was not running"),
    ("missing", "is missing"),
])
def test_damage_while_stopped_is_invalid_with_the_reason(two, shmdir, damage, reason):
    f = two
    f.stop()
    store, img = shmdir / "bs0", shmdir / "data.img"
    if damage == "header":
        with open(store, "r+b") as fh:
            fh.seek(100)
            b = fh.read(1)
            fh.seek(100)
            fh.write(bytes([b[0] ^ 0x10]))
    elif damage == "truncate":
        os.truncate(store, os.path.getsize(store) - 65536 - 1)
    elif damage == "replace":
        (shmdir / "copy").write_bytes(store.read_bytes())
        os.rename(shmdir / "copy", store)
    elif damage == "volume":
        with open(img, "r+b") as fh:
            fh.seek(4096)
            fh.write(b"written behind fssd's back")
    elif damage == "missing":
        store.unlink()
    _restart_invalid(f, "fss0", reason)
    assert _snap(f, "fss1")["state"] == "active" or damage == "volume"


def test_unlinked_store_cannot_come_back(fssd_factory, shmdir):
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": SIZE}])
    f.fssconfig("-x", "fss0", "data", shmdir / "bs0")
    f.stop()
    _restart_invalid(f, "fss0", "unlinked (-x)")


def test_store_usage_warnings_once_each(fssd_factory, shmdir):
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": SIZE}])
    cs = 65536
    tcl = sf.table_clusters(SIZE // cs, cs)
    f.fssconfig("fss0", "data", shmdir / "bs0", "64k", str((tcl + 20) * cs))  # room for 20 copies

    def touch(first: int, n: int) -> None:
        run("qemu-io", "-f", "raw", "-c", f"write -P 0x5a {first * cs} {n * cs}", f.uri("data"))

    touch(0, 15)
    assert _snap(f, "fss0")["usage_warning"] == 0
    touch(15, 1)  # 16 of 20: 80 %
    wait_for(lambda: _snap(f, "fss0")["usage_warning"] == 80, 10, "the 80 % warning")
    touch(16, 3)  # 19 of 20: 95 %
    wait_for(lambda: _snap(f, "fss0")["usage_warning"] == 95, 10, "the 95 % warning")
    touch(19, 1)  # 100 %: no third line
    s = _snap(f, "fss0")
    assert s["state"] == "active" and s["store_usage"] == pytest.approx(100.0)
    text = f.log.read_text()
    assert len(re.findall(r"fss0: backing store 8\d% full", text)) == 1
    assert len(re.findall(r"fss0: backing store (9\d|100)% full", text)) == 1
    assert "(warned at 95%)" in f.fssconfig("-l", "-v").stdout


def test_durability_none_is_in_memory_only(fssd_factory, shmdir):
    """The behaviour before durability existed: stopping fssd unconfigures, nothing is recorded."""
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": SIZE}], extra='durability = "none"')
    f.fssconfig("fss0", "data", shmdir / "bs0")
    assert _snap(f, "fss0")["durability"] == "none"
    assert not _record(f, "fss0").exists()
    f.stop()
    assert not (shmdir / "bs0").exists()
    f.start()
    assert _snap(f, "fss0")["in_use"] is False


def test_invalid_before_a_kill_stays_invalid_after_it(fssd_factory, shmdir):
    """A snapshot whose store filled up stops copying; the volume is then written without
    copies. Killed right after, fssd must not bring it back as if it were intact."""
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": SIZE}])
    cs = 65536
    tcl = sf.table_clusters(SIZE // cs, cs)
    f.fssconfig("fss0", "data", shmdir / "bs0", "64k", str((tcl + 4) * cs))  # room for 4 copies
    run("qemu-io", "-f", "raw", "-c", f"write -P 0x33 0 {8 * cs}", f.uri("data"))
    wait_for(lambda: _snap(f, "fss0")["state"] == "invalid", 10, "the store to fill")
    _kill_all(f)  # at once: the supervisor may not have written anything down yet
    f.start()
    s = _snap(f, "fss0")
    assert s["state"] == "invalid" and ("backing store full" in s["error"] or "already invalid" in s["error"]), s
