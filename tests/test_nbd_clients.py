"""The real-client matrix: libnbd tools, qemu, nbd-client and fio against one live fssd.

Each tool parses the protocol its own way; a disagreement with any of them is a bug
even where our own unit tests pass. One fssd serves the whole module:
  data (64 MiB): [0, 8M) holds PATTERN from before snapshot fss0 was taken;
                 other tests keep to their own regions (named where used)
  whole (16 MiB): scratch for tools that write a whole export (nbdcopy, convert, fio)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from fsshelp import Fssd, run, sha256_file, running

MiB = 1 << 20
DATA = 64 * MiB
WHOLE = 16 * MiB
PATTERN = 0x5A  # [0, 8M) of data when fss0 was taken
HOLE = 3  # nbdinfo --map type: hole|zero
DATA_T = 0


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    shm = Path(tempfile.mkdtemp(prefix="fssd-test-nbdcli-", dir="/dev/shm"))
    f = Fssd(
        tmp_path_factory.mktemp("nbdcli") / "i0",
        [
            {"name": "data", "path": str(shm / "data.img"), "size": "64M"},
            {"name": "whole", "path": str(shm / "whole.img"), "size": "16M"},
        ],
    )
    f.shm = shm
    with running(f, shm):
        qemu_io(f.uri("data"), f"write -P {PATTERN:#x} 0 8M")
        f.fssconfig("fss0", "data", str(shm / "bs0"))
        yield f


def qemu_io(uri: str, *cmds: str, read_only: bool = False, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for c in cmds:
        argv += ["-c", c]
    p = run(*argv, uri, check=check)
    # qemu-io reports a failed command on stdout and may still exit 0: look for it.
    if check:
        for bad in ("Pattern verification failed", "failed:", "error"):
            assert bad not in p.stdout + p.stderr, p.stdout + p.stderr
    return p


def nbd_map(uri: str) -> list[dict]:
    return json.loads(run("nbdinfo", "--map", "--json", uri).stdout)


def types_in(extents: list[dict], start: int, end: int) -> set[int]:
    """The extent types that cover any of [start, end)."""
    return {e["type"] for e in extents if e["offset"] < end and e["offset"] + e["length"] > start}


def expected_snapshot() -> bytes:
    return bytes([PATTERN]) * (8 * MiB) + bytes(DATA - 8 * MiB)


# -- nbdinfo -----------------------------------------------------------------------------------


def test_nbdinfo_list(srv):
    out = json.loads(run("nbdinfo", "--list", "--json", srv.uri("data")).stdout)
    assert [(e["export-name"], e["export-size"], e["is_read_only"]) for e in out["exports"]] == [("data", DATA, False)]
    assert out["exports"][0]["description"] == "fssd volume data"
    snap = json.loads(run("nbdinfo", "--list", "--json", srv.uri("fss0")).stdout)["exports"]
    assert [(e["export-name"], e["export-size"], e["is_read_only"]) for e in snap] == [("fss0", DATA, True)]
    assert snap[0]["can_multi_conn"] is True and snap[0]["can_trim"] is False and snap[0]["can_zero"] is False


def test_nbdinfo_map_follows_writes_trims_and_zeroes(srv):
    uri = srv.uri("data")
    base = 16 * MiB  # region [16M, 24M), never written before this test
    assert types_in(nbd_map(uri), base, base + 8 * MiB) == {HOLE}
    qemu_io(uri, f"write -P 0x11 {base} 4M")
    m = nbd_map(uri)
    assert types_in(m, base, base + 4 * MiB) == {DATA_T}
    assert types_in(m, base + 4 * MiB, base + 8 * MiB) == {HOLE}
    # TRIM punches a hole; WRITE_ZEROES that may unmap too; NO_HOLE zeroes stay allocated.
    qemu_io(uri, f"discard {base} 1M", f"write -z -u {base + MiB} 1M", f"write -z {base + 2 * MiB} 1M")
    m = nbd_map(uri)
    assert types_in(m, base, base + 2 * MiB) == {HOLE}
    assert types_in(m, base + 2 * MiB, base + 4 * MiB) == {DATA_T}
    qemu_io(uri, f"read -P 0 {base + MiB} 2M", f"read -P 0x11 {base + 3 * MiB} 1M")
    # The snapshot maps its own past: never "zero" over PATTERN (that would be wrong data),
    # holes where neither it nor the volume ever had data. ("data" elsewhere is always safe.)
    s = nbd_map(srv.uri("fss0"))
    assert types_in(s, 0, 8 * MiB) == {DATA_T}
    assert types_in(s, 48 * MiB, DATA) == {HOLE}


# -- qemu --------------------------------------------------------------------------------------


def test_qemu_img_info_and_map(srv):
    info = json.loads(run("qemu-img", "info", "--output=json", srv.uri("data")).stdout)
    assert info["virtual-size"] == DATA
    m = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", srv.uri("fss0")).stdout)
    # qemu-img map asks BLOCK_STATUS with REQ_ONE: the answers must tile the export exactly.
    assert m[0]["start"] == 0 and sum(e["length"] for e in m) == DATA
    assert all(a["start"] + a["length"] == b["start"] for a, b in zip(m, m[1:]))
    for e in m:
        if e["start"] < 8 * MiB:  # PATTERN: must be data, never zero
            assert e["data"] and not e["zero"], e
        if e["start"] + e["length"] > 48 * MiB:  # never written by anyone
            assert e["start"] <= 48 * MiB and not e["data"] and e["zero"], e


def test_qemu_img_convert_and_compare(srv):
    src = srv.shm / "convert-src.img"
    src.write_bytes(os.urandom(WHOLE // 2) + bytes(WHOLE // 4) + os.urandom(WHOLE // 4))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, srv.uri("whole"))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, srv.uri("whole"))
    back = srv.shm / "convert-back.img"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri("whole"), back)
    assert sha256_file(back) == sha256_file(src)
    # compare must be able to say "differ" (exit 1) over NBD too.
    with open(src, "r+b") as f:
        f.seek(WHOLE - 1)
        f.write(b"\xff")
    assert run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, srv.uri("whole"), check=False).returncode == 1
    # And the snapshot compares equal to what the volume held when it was taken.
    exp = srv.shm / "expected-snap.img"
    exp.write_bytes(expected_snapshot())
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", exp, srv.uri("fss0"))


def test_qemu_io_patterns(srv):
    uri = srv.uri("data")
    b = 24 * MiB  # region [24M, 28M)
    qemu_io(
        uri,
        f"write -P 0xab {b} 64k",
        f"write -P 0x11 {b + 4097} 3000",  # unaligned, inside the first
        f"write -P 0x22 {b + 60 * 1024 + 5} 200k",  # unaligned, across several 64 KiB clusters
        f"write -f -P 0xcd {b + MiB} 64k",  # FUA
        "flush",
    )
    qemu_io(
        uri,
        f"read -P 0xab {b} 4097",
        f"read -P 0x11 {b + 4097} 3000",
        f"read -P 0xab {b + 7097} {60 * 1024 + 5 - 7097}",
        f"read -P 0x22 {b + 60 * 1024 + 5} 200k",
        f"read -P 0 {b + 260 * 1024 + 5} 4k",
        f"read -P 0xcd {b + MiB} 64k",
    )
    # A pattern check that must fail, so a passing one means something.
    p = qemu_io(uri, f"read -P 0xab {b + 4097} 16", check=False)
    assert "Pattern verification failed" in p.stdout + p.stderr


def test_qemu_io_zeroes_and_discard(srv):
    uri = srv.uri("data")
    b = 28 * MiB  # region [28M, 32M)
    qemu_io(uri, f"write -P 0x77 {b} 4M", f"write -z {b} 1M", f"write -z -u {b + MiB} 1M", f"discard {b + 2 * MiB} 1M")
    qemu_io(uri, f"read -P 0 {b} 2M", f"read -P 0x77 {b + 3 * MiB} 1M")
    # FAST_ZERO that may not punch (no -u) is refused with ENOTSUP, and nothing changes.
    p = qemu_io(uri, f"write -z -n {b + 3 * MiB} 64k", check=False)
    assert "Operation not supported" in p.stdout + p.stderr, p.stdout + p.stderr
    qemu_io(uri, f"read -P 0x77 {b + 3 * MiB} 1M")
    # FAST_ZERO that may punch works.
    qemu_io(uri, f"write -z -n -u {b + 3 * MiB} 64k", f"read -P 0 {b + 3 * MiB} 64k")


def test_qemu_io_snapshot_is_read_only(srv):
    uri = srv.uri("fss0")
    qemu_io(uri, f"read -P {PATTERN:#x} 0 8M", "read -P 0 8M 1M", read_only=True)
    # READ_ONLY in the flags: qemu refuses to open it for writing (server-side EPERM is in test_nbd_malformed).
    p = qemu_io(uri, "write -P 0x99 0 4k", check=False)
    assert p.returncode != 0 and "Permission denied" in p.stderr, p.stderr
    qemu_io(uri, f"read -P {PATTERN:#x} 0 4k", read_only=True)


def test_qemu_nbd_list(srv):
    out = run("qemu-nbd", "--list", "-k", srv.sock("data")).stdout
    assert "export: 'data'" in out
    assert "size:  67108864" in out
    assert "multi" in out and "fast-zero" in out and "readonly" not in out
    assert "base:allocation" in out
    snap = run("qemu-nbd", "--list", "-k", srv.sock("fss0")).stdout
    assert "export: 'fss0'" in snap and "readonly" in snap


def test_nbd_client_list(srv):
    # nbd-client 3.24: handshake only (the kernel module isn't there to take the socket).
    p = run("nbd-client", "-l", "-unix", srv.sock("data"))
    assert "data: fssd volume data" in p.stdout.splitlines()


# -- throughput tools ----------------------------------------------------------------------------


def test_fio_randwrite_with_verify(srv):
    p = run(
        "fio", "--name=v", "--ioengine=nbd", f"--uri={srv.uri('whole')}", "--rw=randwrite", "--bs=4k",
        "--iodepth=16", "--size=16M", "--verify=crc32c", "--do_verify=1", "--randrepeat=0",
        "--verify_state_save=0", "--output-format=json",  # no state file left in the cwd
    )  # fmt: skip
    report = json.loads(p.stdout[p.stdout.index("{") :])  # fio prints "connected" first
    job = report["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == WHOLE
    assert job["read"]["io_bytes"] == WHOLE  # the verify pass read everything back


def test_nbdcopy_both_ways_with_four_connections(srv):
    src = srv.shm / "copy-src.img"
    src.write_bytes(os.urandom(WHOLE))
    run("nbdcopy", "--connections=4", "--threads=4", src, srv.uri("whole"))
    back = srv.shm / "copy-back.img"
    run("nbdcopy", "--connections=4", "--threads=4", srv.uri("whole"), back)
    assert sha256_file(back) == sha256_file(src)
    # The snapshot, read with 4 connections, is the volume as it was.
    snap = srv.shm / "copy-snap.img"
    run("nbdcopy", "--connections=4", "--threads=4", srv.uri("fss0"), snap)
    assert sha256_file(snap) == hashlib.sha256(expected_snapshot()).hexdigest()
    # And copying into it is refused (nbdcopy sees READ_ONLY), leaving it as it was.
    p = run("nbdcopy", "--connections=4", "--threads=4", src, srv.uri("fss0"), check=False)
    assert p.returncode != 0 and "read-only" in p.stderr, p.stderr
    run("nbdcopy", srv.uri("fss0"), snap)
    assert sha256_file(snap) == hashlib.sha256(expected_snapshot()).hexdigest()


def test_several_connections_writing_at_once(srv):
    uri = srv.uri("data")
    b = 32 * MiB  # region [32M, 48M): 8 writers, 2 MiB each
    procs = [
        subprocess.Popen(["qemu-io", "-f", "raw", "-c", f"write -P {0x30 + i:#x} {b + i * 2 * MiB} {2 * MiB}", uri],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(8)
    ]  # fmt: skip
    for pr in procs:
        out, _ = pr.communicate(timeout=60)
        assert pr.returncode == 0 and "wrote 2097152/2097152" in out, out
    qemu_io(uri, *[f"read -P {0x30 + i:#x} {b + i * 2 * MiB} {2 * MiB}" for i in range(8)])
