"""Where the volume and snapshot workers spend their time, per workload (py-spy).

    python bench/profile_workers.py [--scenario NAME ...] [--rate 250] [--gil]

Starts a private fssd on a 1 GiB image in /dev/shm, runs each workload and
samples the worker serving it with `py-spy record --format raw` (install it with
`.venv/bin/pip install py-spy`). Prints, per scenario, the throughput and the
top frames by self and by inclusive samples. --gil samples only the thread
holding the GIL (what serialises the connection threads).

Scenarios: seqwrite, randwrite, seqread, randread (no snapshot); cow-seq,
cow-rand (first touch with one snapshot); second-seq (second touch);
snapread-fresh, snapread-copied (the fss0 worker).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peers import GiB, Fssd, Scratch, fio_nbd, install_signal_handlers, make_random_image, nbdcopy  # noqa: E402

PYSPY = shutil.which("py-spy", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))


def profile(pid: int, out: str, work, rate: int, gil: bool):
    """Sample pid while work() runs; returns (work's result, Counter of stacks)."""
    argv = [PYSPY, "record", "-p", str(pid), "-r", str(rate), "-f", "raw", "-o", out, "--nonblocking"]
    if gil:
        argv.append("--gil")
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        result = work()
    finally:
        spy.send_signal(2)  # py-spy writes its output on SIGINT
        spy.wait(30)
    stacks = collections.Counter()
    with open(out) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if stack:
                stacks[stack] += int(n)
    return result, stacks


def short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func file.py:123"
    name, _, loc = frame.partition(" (")
    loc = loc.rstrip(")")
    return f"{name} {os.path.basename(loc)}"


def report(stacks: collections.Counter, top: int) -> None:
    total = sum(stacks.values()) or 1
    self_c, incl = collections.Counter(), collections.Counter()
    for stack, n in stacks.items():
        frames = [short(f) for f in stack.split(";")]
        self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    print(f"    {total} samples")
    print("    self:", "; ".join(f"{f} {100 * n / total:.0f}%" for f, n in self_c.most_common(top)))
    print("    incl:", "; ".join(f"{f} {100 * n / total:.0f}%" for f, n in incl.most_common(top + 6) if not f.startswith(("_bootstrap", "run ", "_run_conn", "<module>"))))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", action="append")
    ap.add_argument("--rate", type=int, default=250)
    ap.add_argument("--gil", action="store_true")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    if not PYSPY:
        print("py-spy not found; .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    install_signal_handlers()
    scratch = Scratch("prof")
    fssd = None
    try:
        img, src = scratch.shm / "volume.img", scratch.shm / "src.img"
        make_random_image(img, GiB)
        make_random_image(src, GiB)
        fssd = Fssd(scratch, [("vol", str(img), None)]).start()
        live = fssd.uri("vol")
        vol_pid = fssd.worker_pid("volume vol")
        bs = str(scratch.shm / "bs0")

        def snap():
            fssd.fssconfig("fss0", "vol", bs)

        def unsnap():
            fssd.fssconfig("-u", "fss0")

        fio_rand = lambda rw: (lambda: fio_nbd(live, rw, runtime=5))  # noqa: E731
        fio_first = lambda: fio_nbd(live, "randwrite", runtime=None, ramp=None,  # noqa: E731
                                    extra=["--blockalign=64k", "--number_ios=16384"])
        scenarios = {
            "seqwrite": (None, lambda: nbdcopy(str(src), live, GiB), None, "vol", "MiB/s"),
            "randwrite": (None, fio_rand("randwrite"), None, "vol", "IOPS"),
            "seqread": (None, lambda: nbdcopy(live, "null:", GiB), None, "vol", "MiB/s"),
            "randread": (None, fio_rand("randread"), None, "vol", "IOPS"),
            "cow-seq": (snap, lambda: nbdcopy(str(src), live, GiB), unsnap, "vol", "MiB/s"),
            "cow-rand": (snap, fio_first, unsnap, "vol", "IOPS"),
            "second-seq": (lambda: (snap(), nbdcopy(str(src), live, GiB)), lambda: nbdcopy(str(src), live, GiB), unsnap, "vol", "MiB/s"),
            "snapread-fresh": (snap, lambda: nbdcopy(fssd.uri("fss0"), "null:", GiB), unsnap, "fss0", "MiB/s"),
            "snapread-copied": (lambda: (snap(), nbdcopy(str(src), live, GiB)), lambda: nbdcopy(fssd.uri("fss0"), "null:", GiB), unsnap, "fss0", "MiB/s"),
        }
        for name in args.scenario or list(scenarios):
            before, work, after, who, unit = scenarios[name]
            if before:
                before()
            pid = vol_pid if who == "vol" else fssd.worker_pid("fss0")
            result, stacks = profile(pid, str(scratch.tmp / f"{name}.raw"), work, args.rate, args.gil)
            if after:
                after()
            print(f"== {name}: {result:.0f} {unit} (worker {who}, pid {pid}{', GIL holder only' if args.gil else ''})")
            report(stacks, args.top)
            sys.stdout.flush()
        return 0
    finally:
        if fssd:
            fssd.stop()
        scratch.cleanup()


if __name__ == "__main__":
    sys.exit(main())
