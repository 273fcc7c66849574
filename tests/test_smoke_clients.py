"""Real NBD clients against the live volume export."""

import json
import os

from fsshelp import run, sha256_file


def test_nbdinfo_reports_size_and_flags(fssd):
    out = json.loads(run("nbdinfo", "--json", fssd.uri("data")).stdout)
    exp = out["exports"][0]
    assert exp["export-size"] == 64 << 20
    assert exp["is_read_only"] is False
    assert exp["can_multi_conn"] is True
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache", "can_df"):
        assert exp[flag] is True, flag
    assert exp["block_size_minimum"] == 1
    assert exp["block_size_preferred"] == 4096
    assert exp["block_size_maximum"] == 32 << 20
    assert "base:allocation" in exp["contexts"]


def test_nbdcopy_round_trip_bit_identical(fssd, shmdir):
    src = shmdir / "src.img"
    with open(src, "wb") as f:
        f.write(os.urandom(64 << 20))
    run("nbdcopy", "--connections=4", "--threads=4", src, fssd.uri("data"))
    back = shmdir / "back.img"
    run("nbdcopy", "--connections=4", "--threads=4", fssd.uri("data"), back)
    assert sha256_file(back) == sha256_file(src)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, fssd.uri("data"))
