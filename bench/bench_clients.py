"""Issue 15's many-clients rows: fssd's volume export against `nbdkit file` with 4 and 64 clients.

    python bench/bench_clients.py [--runs 3] [--fio-runtime 3] [--processes N] [--results FILE]

One 1 GiB image of incompressible data in /dev/shm, served in the same run by
fssd with one volume process, by fssd with N processes (`volume_processes`,
default the CPU count) and by nbdkit's file plugin (its default thread pool).
Each figure is fio's nbd engine with one connection per job (`--numjobs`,
`--thread`, `--group_reporting`), QD8 per connection, 4 KiB, time based;
servers alternate within each run. Figures (median of --runs):
  4 clients x QD8 random write, 64 clients x QD8 random read and random write   IOPS
and the volume processes' peak RSS (VmHWM, summed over the processes) after
the 64-client runs. Target: fssd / nbdkit >= 1.0; RSS bounded.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peers import GiB, Fssd, Nbdkit, Scratch, emit, fio_nbd, fmt_runs, install_signal_handlers, make_random_image, median, row  # noqa: E402

TARGET = 1.0


def _peak_rss_mib(f: Fssd) -> float:
    """Sum of the volume processes' VmHWM."""
    total = 0
    for w in f.status()["workers"]:
        if w["kind"] == "volume" and w["alive"]:
            with open(f"/proc/{w['pid']}/status") as fh:
                total += next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    return total / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--fio-runtime", type=float, default=3)
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--results", default=os.environ.get("FSSD_BENCH_RESULTS"))
    args = ap.parse_args()
    install_signal_handlers()

    scratch = Scratch("clients")
    started = []
    try:
        img = scratch.shm / "volume.img"
        make_random_image(img, GiB)
        # 64 clients and fio's own: above the default cap of 64 connections per process.
        caps = "nbd_max_connections = 128"
        one = Fssd(scratch, [("vol", str(img), None)], tag="fssd1", daemon_extra=f"{caps}\nvolume_processes = 1").start()
        started.append(one)
        many = Fssd(scratch, [("vol", str(img), None)], tag="fssdN", daemon_extra=f"{caps}\nvolume_processes = {args.processes}").start()
        started.append(many)
        nbdkit = Nbdkit(scratch, img)
        started.append(nbdkit)
        n = args.processes
        servers = {"fssd x1": one.uri("vol"), f"fssd x{n}": many.uri("vol"), "nbdkit": nbdkit.uri}

        def clients(jobs: int, rw: str):
            extra = [f"--numjobs={jobs}", "--thread", "--group_reporting"]
            return lambda u: fio_nbd(u, rw, iodepth=8, runtime=args.fio_runtime, extra=extra)

        tests = [
            ("4 clients x QD8 4k randwrite", clients(4, "randwrite")),
            ("64 clients x QD8 4k randread", clients(64, "randread")),
            ("64 clients x QD8 4k randwrite", clients(64, "randwrite")),
        ]
        rows = []
        names = list(servers)
        print(f"{'figure (IOPS)':32} " + " ".join(f"{s:>9}" for s in names) + f" {'best/nbdkit':>11}  runs", flush=True)
        for name, fn in tests:
            got = {s: [] for s in names}
            for _ in range(args.runs):
                for s, uri in servers.items():
                    got[s].append(fn(uri))
            med = {s: median(v) for s, v in got.items()}
            best = max(med["fssd x1"], med[f"fssd x{n}"])
            ratio = best / med["nbdkit"]
            print(f"{name:32} " + " ".join(f"{med[s]:9.0f}" for s in names) + f" {ratio:10.2f}x  "
                  + " | ".join(fmt_runs(got[s]) for s in names), flush=True)
            for s in ("fssd x1", f"fssd x{n}"):
                r = med[s] / med["nbdkit"]
                rows.append(row(f"volume {name} ({s.split()[1]} process{'es' if s != 'fssd x1' else ''})", med[s], "IOPS", got[s],
                                "nbdkit", med["nbdkit"], got["nbdkit"], r, f">= {TARGET:.2f}x", r >= TARGET))
        rss = {"fssd x1": _peak_rss_mib(one), f"fssd x{n}": _peak_rss_mib(many)}
        print("volume processes' peak RSS after the 64-client runs: "
              + ", ".join(f"{s} {v:.0f} MiB" for s, v in rss.items()), flush=True)
        emit(args.results, rows)
        return 0
    finally:
        for s in reversed(started):
            s.stop()
        scratch.cleanup()


if __name__ == "__main__":
    sys.exit(main())
