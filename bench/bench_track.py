"""Issue 12 benchmark: changed-block tracking's cost on live writes, the barrier, incremental backups.

    python bench/bench_track.py [--runs 3] [--results FILE] [--writes-only] [--size MiB]

One fssd, two 1 GiB volumes of incompressible data in /dev/shm: `on` (tracked,
the default) and `off` (`track = false`), plus a 1 TiB sparse tracked volume,
under the default `durability = "power"` (the first mark in each 16 MiB region is
fdatasync'ed before the volume write); the write figures again from a second fssd with
`durability = "process"` (no syncs).
Before each write measurement a snapshot is taken and dropped on both volumes,
so a fresh generation begins and every granule's first mark is paid again
(with no snapshot attached: no copy-on-write in the figures).

  live writes, tracking on vs off   4 KiB random QD32 (fio nbd, 5 s) IOPS;
                                    sequential nbdcopy -C 4 -T 4 of 1 GiB MiB/s
  barrier, 1 GiB / 1 TiB            the supervisor's "created (barrier N us)" line (the longest any of the volume's processes held its writes), us
  incremental backup of 1 GiB       snapshot M, full nbdcopy of M to a file (timed),
                                    5% of the granules rewritten, snapshot N, then
                                    `fssconfig --changes N --since M --json` + nbdcopy
                                    of the changed extents onto the full copy (timed,
                                    examples/incremental.py), checked sha256-equal to N

--writes-only measures just the live-write rows (both durabilities), on volumes
of --size MiB (default 1024) instead of 1 GiB: for a shared machine.

Targets (issue 12): on/off >= 0.95x; barrier < 5 ms and flat (1 TiB <= 2x 1 GiB
or within 0.5 ms); incremental time <= 0.1x the full copy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peers import (  # noqa: E402
    CREATED_RE, GiB, MiB, ROOT, Fssd, Scratch, emit, fio_nbd, fmt_runs, install_signal_handlers, make_random_image, median,
    nbdcopy, row, run,
)

sys.path.insert(0, str(ROOT))
from examples.incremental import apply_changes  # noqa: E402
from ipc import names  # noqa: E402

RATIO_TARGET = 0.95
BARRIER_TARGET_US = 5000
INCREMENTAL_TARGET = 0.1
CHANGED = 0.05
GRANULE = 64 * 1024


def configured(f: Fssd, daemon_line: str = "") -> Fssd:
    """The generated config with volume `off` untracked (and one more [daemon] key)."""
    text = f.config.read_text().replace('name = "off"\n', 'name = "off"\ntrack = false\n', 1)
    if daemon_line:
        text = text.replace("[daemon]\n", f"[daemon]\n{daemon_line}\n", 1)
    f.config.write_text(text)
    return f


def sha256_stream(argv: list[str]) -> str:
    """sha256 of a command's standard output, read in 1 MiB pieces (never all in memory)."""
    h = hashlib.sha256()
    with subprocess.Popen(argv, stdout=subprocess.PIPE) as p:
        while chunk := p.stdout.read(MiB):
            h.update(chunk)
    if p.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}")
    return h.hexdigest()


class Bench:
    def __init__(self, args):
        self.args = args
        self.scratch = Scratch("track")
        self.fssd: Fssd | None = None
        self.r: dict[str, list[float]] = {}
        self.moved: list[int] = []

    def add(self, key: str, v: float) -> None:
        self.r.setdefault(key, []).append(v)

    def snap(self, dev: str, vol: str) -> None:
        self.fssd.fssconfig(dev, vol, str(self.scratch.shm / f"bs-{dev}"))

    def drop(self, dev: str) -> None:
        self.fssd.fssconfig("-u", dev)
        p = self.scratch.shm / f"bs-{dev}"
        if p.exists():
            p.unlink()

    def new_generation(self) -> None:
        for vol in ("on", "off"):
            self.snap("fss0", vol)
            self.drop("fss0")

    def snapshot_id(self, dev: str) -> str:
        for s in json.loads(self.fssd.fssconfig("-l", "--json").stdout):
            if s.get("device") == dev:
                return s["id"]
        raise RuntimeError(f"{dev} has no id in fssconfig -l --json")

    # -- measurements -------------------------------------------------------------------

    def writes(self, tag: str = "") -> None:
        for i in range(self.args.runs):
            for vol in (("on", "off") if i % 2 == 0 else ("off", "on")):  # rotate the order
                self.new_generation()
                self.add(f"rand {vol}{tag}", fio_nbd(self.fssd.uri(vol), "randwrite", size=f"{self.args.size}M", runtime=5, ramp=1,
                                                     extra=[f"--randseed={i + 1}"]))
                self.new_generation()
                self.add(f"seq {vol}{tag}", nbdcopy(str(self.src), self.fssd.uri(vol), self.args.size * MiB))
            print(f"  writes run {i + 1}/{self.args.runs} done", flush=True)

    def barriers(self) -> None:
        for vol in ("on", "big"):
            for _ in range(self.args.runs):
                before = len(CREATED_RE.findall(self.fssd.log_text()))
                self.snap("fss0", vol)
                found = CREATED_RE.findall(self.fssd.log_text())
                if len(found) <= before:
                    raise RuntimeError("no barrier line in the fssd log after fssconfig")
                self.add(f"barrier {vol}", float(found[-1][1]))
                self.drop("fss0")

    def incremental(self) -> None:
        size = GiB
        granules = size // GRANULE
        full = self.scratch.shm / "full.img"
        rng = random.Random(12)
        for i in range(self.args.runs):
            self.snap("fss1", "on")
            base = self.snapshot_id("fss1")
            t0 = time.perf_counter()
            run("nbdcopy", "-C", 4, "-T", 4, self.fssd.uri("fss1"), full)
            self.add("full", time.perf_counter() - t0)
            # 5% of the granules rewritten, at random, through the live export.
            picks = sorted(rng.sample(range(granules), int(granules * CHANGED)))
            self._rewrite(picks, i)
            self.snap("fss2", "on")
            t0 = time.perf_counter()
            out = self.fssd.fssconfig("--changes", "fss2", "--since", base, "--json").stdout
            changes = json.loads(out)
            t1 = time.perf_counter()
            apply_changes(names.export_socket(str(self.fssd.rundir), "fss2"), "fss2", changes, str(full), count=False)
            t2 = time.perf_counter()
            self.add("incremental", t2 - t0)
            self.add("changes", t1 - t0)
            self.add("copy", t2 - t1)
            # The same through the export's own qemu:dirty-bitmap context (nbdinfo, no fssconfig):
            # applied a second time it writes the same bytes again, so the check below covers both.
            t0 = time.perf_counter()
            mapped = json.loads(run("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{base}", self.fssd.uri("fss2")).stdout)
            via_map = [{"offset": e["offset"], "length": e["length"]} for e in mapped if e["type"] & 1]
            t1 = time.perf_counter()
            apply_changes(names.export_socket(str(self.fssd.rundir), "fss2"), "fss2", via_map, str(full), count=False)
            self.add("incremental nbdinfo", time.perf_counter() - t0)
            self.add("map", t1 - t0)
            self.moved.append(sum(c["length"] for c in changes))
            want = sha256_stream(["nbdcopy", self.fssd.uri("fss2"), "-"])
            got = sha256_stream(["cat", str(full)])
            if got != want:
                raise RuntimeError(f"incremental backup differs from the snapshot (run {i + 1})")
            self.drop("fss2")
            self.drop("fss1")
            print(f"  incremental run {i + 1}/{self.args.runs} done ({self.moved[-1] // MiB} MiB changed)", flush=True)

    def _rewrite(self, picks: list[int], i: int) -> None:
        """Write the picked granules with new bytes: nbdcopy of a file holding them, through nbdkit's
        extentlist filter (the same path as the backup, so only those granules are written)."""
        patch = self.scratch.shm / "patch.img"
        with open(patch, "wb") as f:
            f.truncate(GiB)
            block = os.urandom(GRANULE)
            for g in picks:
                f.seek(g * GRANULE)
                f.write(block[: GRANULE - 8] + (g * 31 + i).to_bytes(8, "little"))
        ext = self.scratch.tmp / "patch.txt"
        ext.write_text("".join(f"{g * GRANULE} {GRANULE}\n" for g in picks))
        run("nbdcopy", "-S", "0", "--destination-is-zero", f"--request-size={GRANULE}", "--",
            "[", "nbdkit", "-r", "--filter=extentlist", "file", patch, f"extentlist={ext}", "]", self.fssd.uri("on"))
        patch.unlink()

    # -- report -----------------------------------------------------------------------------

    def report(self) -> None:
        r = self.r
        m = {k: median(v) for k, v in r.items()}
        out: list[dict] = []
        for tag, dur in (("", "power"), (" p", "process")):
            for kind, label, unit in (("rand", "4k randwrite QD32", "IOPS"), ("seq", "seq write nbdcopy", "MiB/s")):
                on, off = f"{kind} on{tag}", f"{kind} off{tag}"
                ratio = m[on] / m[off]
                out.append(row(f"{label}, tracking on, {dur}", m[on], unit, r[on], "tracking off", m[off],
                               r[off], ratio, f">= {RATIO_TARGET:.2f}x", ratio >= RATIO_TARGET))
        if self.args.writes_only:
            self._print(out)
            return
        for vol, label in (("on", "1 GiB"), ("big", "1 TiB")):
            out.append(row(f"barrier, tracked, {label}", m[f"barrier {vol}"], "us", r[f"barrier {vol}"], target=f"< {BARRIER_TARGET_US} us",
                           ok=m[f"barrier {vol}"] < BARRIER_TARGET_US))
        b1, bt = m["barrier on"], m["barrier big"]
        out.append(row("barrier 1 TiB / 1 GiB, tracked", bt, "us", r["barrier big"], "1 GiB", b1, r["barrier on"], bt / b1 if b1 else None,
                       "no growth", bt <= 2 * b1 or bt - b1 <= 500))
        ratio = m["incremental"] / m["full"]
        out.append(row(f"incremental backup, {CHANGED:.0%} of 1 GiB changed", m["incremental"] * 1000, "ms", [x * 1000 for x in r["incremental"]],
                       "full nbdcopy", m["full"] * 1000, [x * 1000 for x in r["full"]], ratio, f"<= {INCREMENTAL_TARGET:.1f}x",
                       ratio <= INCREMENTAL_TARGET))
        for part, label in (("changes", "  of which fssconfig --changes --json"), ("copy", "  of which nbdcopy of the changed extents")):
            out.append(row(label, m[part] * 1000, "ms", [x * 1000 for x in r[part]]))
        ratio = m["incremental nbdinfo"] / m["full"]
        out.append(row("  same, extents from nbdinfo --map=qemu:dirty-bitmap", m["incremental nbdinfo"] * 1000, "ms",
                       [x * 1000 for x in r["incremental nbdinfo"]], "full nbdcopy", m["full"] * 1000, [x * 1000 for x in r["full"]],
                       ratio, f"<= {INCREMENTAL_TARGET:.1f}x", ratio <= INCREMENTAL_TARGET))
        out.append(row("    of which nbdinfo --map", m["map"] * 1000, "ms", [x * 1000 for x in r["map"]]))
        self._print(out)
        print(f"incremental: {median(self.moved) / MiB:.1f} MiB of changed extents moved per run, of a {GiB // MiB} MiB volume")

    def _print(self, out: list[dict]) -> None:
        print(f"{'figure':44} {'fssd':>10} {'peer':>22} {'ratio':>6}  runs | peer runs")
        for x in out:
            peer = f"{x['peer']:.0f} {x['peer_name']}" if x["peer"] is not None else ""
            ratio_s = f"{x['ratio']:.2f}x" if x["ratio"] is not None else ""
            pr = fmt_runs(x["peer_runs"]) if x["peer_runs"] else ""
            print(f"{x['figure']:44} {x['value']:10.0f} {peer:>22} {ratio_s:>6}  {fmt_runs(x['runs'])} | {pr}  {x['unit']}")
        emit(self.args.results, out)

    def main(self) -> int:
        try:
            shm = self.scratch.shm
            on, off, self.src, big = shm / "on.img", shm / "off.img", shm / "src.img", shm / "big.img"
            for p in (on, off, self.src):
                make_random_image(p, self.args.size * MiB)
            with open(big, "wb") as f:  # sparse, never written
                f.truncate(1 << 40)
            self.fssd = configured(Fssd(self.scratch, [("on", str(on), None), ("off", str(off), None), ("big", str(big), None)])).start()
            print('live writes, tracking on vs off, durability = "power":', flush=True)
            self.writes()
            if not self.args.writes_only:
                print("barriers:", flush=True)
                self.barriers()
                print("incremental backup:", flush=True)
                self.incremental()
            self.fssd.stop()
            self.fssd = configured(Fssd(self.scratch, [("on", str(on), None), ("off", str(off), None)], tag="process"),
                                   'durability = "process"').start()
            print('live writes, tracking on vs off, durability = "process":', flush=True)
            self.writes(" p")
            self.report()
            return 0
        finally:
            if self.fssd:
                self.fssd.stop()
            self.scratch.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--results", default=os.environ.get("FSSD_BENCH_RESULTS"))
    ap.add_argument("--writes-only", action="store_true", help="only the live-write rows")
    ap.add_argument("--size", type=int, default=GiB // MiB, help="volume size in MiB (default 1024)")
    args = ap.parse_args()
    if args.size != GiB // MiB and not args.writes_only:
        ap.error("--size goes with --writes-only (the barrier and incremental rows are of 1 GiB)")
    install_signal_handlers()
    return Bench(args).main()


if __name__ == "__main__":
    sys.exit(main())
