"""Issue 2/15 benchmark: fssd's volume export against `nbdkit file`, same 1 GiB image, same run.

    python bench/bench_nbd.py [--runs 3] [--fio-runtime 5] [--only SUBSTRING] [--results FILE]

One 1 GiB image of incompressible data in /dev/shm, served at the same time by
fssd (one volume) and by two instances of nbdkit's file plugin: the second one
measures the noise (nbdkit against itself, same run, same order). Runs rotate
between the servers so drift on the shared 2-vCPU box hits all alike. Figures
(median of --runs):
  sequential write   nbdcopy -C 4 -T 4 SRC.img URI        MiB/s (wall time)
  sequential read    nbdcopy -C 4 -T 4 URI null:          MiB/s
  4k random write    fio --ioengine=nbd --iodepth=32      IOPS (time based)
  4k random read     fio --ioengine=nbd --iodepth=32      IOPS
and fssd's volume workers' CPU (user + system, summed over the volume's
processes) per GiB or per request, which the box's load moves less than the rates.
Targets: fssd / nbdkit >= 1.05 on writes (issue 15), >= 1.0 on reads (issue 2).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peers import GiB, Fssd, Nbdkit, Scratch, emit, fio_nbd, fmt_runs, install_signal_handlers, make_random_image, median, nbdcopy, row  # noqa: E402


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--fio-runtime", type=float, default=5)
    ap.add_argument("--only", action="append", help="run only the figures whose name contains this (repeatable)")
    ap.add_argument("--results", default=os.environ.get("FSSD_BENCH_RESULTS"))
    args = ap.parse_args()
    install_signal_handlers()

    scratch = Scratch("nbd")
    fssd = nbdkit = nbdkit2 = None
    try:
        img = scratch.shm / "volume.img"
        src = scratch.shm / "src.img"
        make_random_image(img, GiB)
        make_random_image(src, GiB)
        fssd = Fssd(scratch, [("vol", str(img), None)]).start()
        nbdkit = Nbdkit(scratch, img)
        nbdkit2 = Nbdkit(scratch, img, tag="nbdkit2")
        servers = {"fssd": fssd.uri("vol"), "nbdkit": nbdkit.uri, "nbdkit2": nbdkit2.uri}

        # Every process serving the volume (one per CPU by default): a client lands in any of them.
        workers = [w["pid"] for w in fssd.status()["workers"] if w["kind"] == "volume" and w["alive"]]
        # fssd's volume worker CPU per unit of work (user + system): less at the mercy of
        # the box's load than the rates. nbdcopy: seconds per GiB; fio: us per request
        # (its ramp counted as running at the measured rate).
        per_gib = lambda cpu, rate: cpu  # noqa: E731
        per_req = lambda cpu, rate: cpu / (rate * (args.fio_runtime + 1)) * 1e6  # noqa: E731
        tests = [
            ("seq write (nbdcopy -C4 -T4)", "MiB/s", 1.05, lambda u: nbdcopy(str(src), u, GiB), per_gib, "s/GiB"),
            ("seq read (nbdcopy -C4 -T4)", "MiB/s", 1.0, lambda u: nbdcopy(u, "null:", GiB), per_gib, "s/GiB"),
            ("4k randwrite QD32 (fio nbd)", "IOPS", 1.05, lambda u: fio_nbd(u, "randwrite", runtime=args.fio_runtime), per_req, "us/req"),
            ("4k randread QD32 (fio nbd)", "IOPS", 1.0, lambda u: fio_nbd(u, "randread", runtime=args.fio_runtime), per_req, "us/req"),
        ]
        if args.only:
            tests = [t for t in tests if any(o in t[0] for o in args.only)]
        rows = []
        print(f"{'figure':32} {'fssd':>9} {'nbdkit':>9} {'ratio':>6} {'noise':>6} {'fssd CPU':>14}  runs fssd | nbdkit | nbdkit again")
        for i, (name, unit, target, fn, per, cpu_unit) in enumerate(tests):
            got = {s: [] for s in servers}
            cpu = []
            order = list(servers)
            for r in range(args.runs):
                k = (r + i) % len(order)  # rotate who goes first
                for server in order[k:] + order[:k]:
                    c0 = sum(map(_cpu, workers)) if server == "fssd" else 0.0
                    got[server].append(fn(servers[server]))
                    if server == "fssd":
                        cpu.append(per(sum(map(_cpu, workers)) - c0, got[server][-1]))
            f, k1, k2 = median(got["fssd"]), median(got["nbdkit"]), median(got["nbdkit2"])
            ratio, noise = f / k1, k2 / k1
            print(f"{name:32} {f:9.0f} {k1:9.0f} {ratio:5.2f}x {noise:5.2f}x {median(cpu):7.2f} {cpu_unit:6}  "
                  f"{fmt_runs(got['fssd'])} | {fmt_runs(got['nbdkit'])} | {fmt_runs(got['nbdkit2'])}  {unit}", flush=True)
            rows.append(row(f"volume {name}", f, unit, got["fssd"], "nbdkit", k1, got["nbdkit"], ratio,
                            f">= {target:.2f}x", ratio >= target))
            rows.append(row(f"  noise: nbdkit vs nbdkit, {name}", k2, unit, got["nbdkit2"], "nbdkit", k1, got["nbdkit"], noise))
        emit(args.results, rows)
        return 0
    finally:
        for s in (nbdkit, nbdkit2):
            if s:
                s.stop()
        if fssd:
            fssd.stop()
        scratch.cleanup()


if __name__ == "__main__":
    sys.exit(main())
