"""Issue 2 benchmark: fssd's volume export against `nbdkit file`, same 1 GiB image, same run.

    python bench/bench_nbd.py [--runs 3] [--fio-runtime 5] [--results FILE]

One 1 GiB image of incompressible data in /dev/shm, served at the same time by
fssd (one volume) and by nbdkit's file plugin. Runs alternate between the two
servers so drift on the shared 2-vCPU box hits both alike. Figures (median of
--runs):
  sequential write   nbdcopy -C 4 -T 4 SRC.img URI        MiB/s (wall time)
  sequential read    nbdcopy -C 4 -T 4 URI null:          MiB/s
  4k random write    fio --ioengine=nbd --iodepth=32      IOPS (time based)
  4k random read     fio --ioengine=nbd --iodepth=32      IOPS
Target: fssd / nbdkit >= 1.0 on all four.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peers import GiB, Fssd, Nbdkit, Scratch, emit, fio_nbd, fmt_runs, install_signal_handlers, make_random_image, median, nbdcopy, row  # noqa: E402

TARGET = 1.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--fio-runtime", type=float, default=5)
    ap.add_argument("--results", default=os.environ.get("FSSD_BENCH_RESULTS"))
    args = ap.parse_args()
    install_signal_handlers()

    scratch = Scratch("nbd")
    fssd = nbdkit = None
    try:
        img = scratch.shm / "volume.img"
        src = scratch.shm / "src.img"
        make_random_image(img, GiB)
        make_random_image(src, GiB)
        fssd = Fssd(scratch, [("vol", str(img), None)]).start()
        nbdkit = Nbdkit(scratch, img)
        servers = {"fssd": fssd.uri("vol"), "nbdkit": nbdkit.uri}

        tests = [
            ("seq write (nbdcopy -C4 -T4)", "MiB/s", lambda u: nbdcopy(str(src), u, GiB)),
            ("seq read (nbdcopy -C4 -T4)", "MiB/s", lambda u: nbdcopy(u, "null:", GiB)),
            ("4k randwrite QD32 (fio nbd)", "IOPS", lambda u: fio_nbd(u, "randwrite", runtime=args.fio_runtime)),
            ("4k randread QD32 (fio nbd)", "IOPS", lambda u: fio_nbd(u, "randread", runtime=args.fio_runtime)),
        ]
        rows = []
        print(f"{'figure':32} {'fssd':>9} {'nbdkit':>9} {'ratio':>6}  runs fssd | nbdkit")
        for name, unit, fn in tests:
            got = {"fssd": [], "nbdkit": []}
            for _ in range(args.runs):
                for server, uri in servers.items():
                    got[server].append(fn(uri))
            f, k = median(got["fssd"]), median(got["nbdkit"])
            ratio = f / k
            print(f"{name:32} {f:9.0f} {k:9.0f} {ratio:5.2f}x  {fmt_runs(got['fssd'])} | {fmt_runs(got['nbdkit'])}  {unit}", flush=True)
            rows.append(row(f"volume {name}", f, unit, got["fssd"], "nbdkit", k, got["nbdkit"], ratio,
                            f">= {TARGET:.2f}x", ratio >= TARGET))
        emit(args.results, rows)
        return 0
    finally:
        if nbdkit:
            nbdkit.stop()
        if fssd:
            fssd.stop()
        scratch.cleanup()


if __name__ == "__main__":
    sys.exit(main())
