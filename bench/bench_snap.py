"""Issue 3 benchmark: live writes with snapshots active, snapshot reads, snapshot creation.

    python bench/bench_snap.py [--runs 3] [--barrier-runs 10] [--creation-only] [--no-spare] [--only reads] [--results FILE]

Same run, same 1 GiB image of incompressible data in /dev/shm, served by fssd
and by qemu-storage-daemon (copy-before-write +
snapshot-access, CBW target a qcow2 in /dev/shm). Every run takes fresh
snapshots before and drops them after, so "first touch" really is the first
write to every cluster since the snapshot.

  seq write, first / second touch   nbdcopy -C 4 -T 4 SRC.img LIVE, twice       MiB/s
      fssd with 0, 1, 4 snapshots; QSD with 1
  4k random write QD32, first touch fio nbd, --blockalign=64k --number_ios=16384 IOPS
      (one pass over the 16384 64 KiB clusters of 1 GiB: every write a fresh cluster)
  snapshot read                     nbdcopy -C 4 -T 4 fss0 null:, vs the live volume
      fresh (every cluster still on the volume) and copied (every cluster in the backing store);
      two live and two snapshot reads per run, ABBA (live snap snap live, then snap live live
      snap in the next run); the snapshot's median against all live reads, the second live
      read against the first as the noise (fssd against itself), and the CPU per GiB of the
      serving processes (the snapshot worker; the volume's workers summed) and nbdcopy's own
      beside the rates (client and server share the 2 CPUs: the rate follows their sum).
      Fair by construction, since both sides pay for things the other does not when done
      naively: the configure takes the spare snapshot worker and its successor (a Python
      start, ~0.2 s of CPU on a 2-CPU box) starts at once, so the reads wait for it; the first
      two reads of a freshly written tmpfs image pay the page cache's LRU activation (~20%
      more kernel time, whoever reads first), so run 1 reads the volume twice untimed first;
      and the order alternates so neither side always follows a write or the other's read.
  snapshot creation                 `fssconfig fss0 VOL BACKUP` started to the export answering
      (its NBD greeting read), fssconfig end to end, and the barrier from the supervisor's
      log line (with several volume processes, the longest any held its writes); 1 GiB and 1 TiB (sparse) volumes, default durability; --barrier-runs each,
      a spare snapshot worker ready before each (as between two backups)

Targets (issue 3): first touch >= 2.0x QSD with one snapshot; second touch >= 0.95x
fssd with none; snapshot read >= 0.95x live read; barrier median < 5 ms and not
growing with the volume size (1 TiB median <= 2x the 1 GiB one, or within 0.5 ms).
Issue 15: fssconfig to the export answering, median <= 50 ms, barrier still < 5 ms.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peers import (  # noqa: E402
    CREATED_RE, GiB, Fssd, Qsd, Scratch, emit, fio_nbd, fmt_runs, install_signal_handlers, make_random_image, median, nbdcopy, row,
    wait_for,
)
from daemon.spares import NO_SPARE_ENV  # noqa: E402

FIRST_TOUCH_TARGET = 2.0
SECOND_TOUCH_TARGET = 0.95
READ_TARGET = 0.95
BARRIER_TARGET_US = 5000
CLUSTERS_1G = GiB // 65536
READY_TARGET_US = 50_000  # issue 15: `fssconfig fssN vol store` to the export answering, median
SPARE_READY_RE = re.compile(r"spare snapshot (?:worker ready|: restarted) \(pid (\d+)\)")


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    """CPU seconds (user + system) of the waited-for children so far (nbdcopy)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _answer(path: str) -> None:
    """Connect to an export and read its greeting (NBDMAGIC): the export answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        got = b""
        while len(got) < 8:
            chunk = s.recv(8 - len(got))
            if not chunk:
                raise RuntimeError(f"{path} closed before its greeting")
            got += chunk
        if got != b"NBDMAGIC":
            raise RuntimeError(f"{path}: not an NBD greeting: {got!r}")


class Bench:
    def __init__(self, args):
        self.args = args
        self.scratch = Scratch("snap")
        self.fssd: Fssd | None = None
        self.qsd: Qsd | None = None
        self.rows: list[dict] = []
        self.r: dict[str, list[float]] = {}

    # -- fssd snapshots ---------------------------------------------------------------

    def take(self, k: int, volume: str = "vol") -> None:
        for i in range(k):
            self.fssd.fssconfig(f"fss{i}", volume, str(self.scratch.shm / f"bs{i}"))

    def drop(self, k: int) -> None:
        for i in reversed(range(k)):
            self.fssd.fssconfig("-u", f"fss{i}")
            p = self.scratch.shm / f"bs{i}"
            if p.exists():
                p.unlink()

    def add(self, key: str, v: float) -> None:
        self.r.setdefault(key, []).append(v)

    # -- measurements -----------------------------------------------------------------

    def writes(self) -> None:
        live, src = self.fssd.uri("vol"), str(self.src)
        reads_only = self.args.only == "reads"
        for run in range(self.args.runs):
            for k in (1,) if reads_only else (0, 1, 4):
                self.take(k)
                if k == 1:
                    self._reads("fresh", run)
                self.add(f"seq1 fssd{k}", nbdcopy(src, live, GiB))
                if not reads_only:
                    self.add(f"seq2 fssd{k}", nbdcopy(src, live, GiB))
                if k == 1:
                    self._reads("copied", run)
                self.drop(k)
                if reads_only:
                    continue
                self.take(k)
                self.add(f"rand1 fssd{k}", self._rand_first_touch(live, run))
                self.drop(k)
            if reads_only:
                print(f"  run {run + 1}/{self.args.runs} done", flush=True)
                continue
            # the peer, same run
            t0 = time.perf_counter()
            self.qsd.take()
            self.add("qsd take", (time.perf_counter() - t0) * 1e6)
            self.add("qsd live read", nbdcopy(self.qsd.live_uri, "null:", GiB))
            self.add("qsd snap read fresh", nbdcopy(self.qsd.snap_uri(1), "null:", GiB))
            self.add("seq1 qsd1", nbdcopy(src, self.qsd.live_uri, GiB))
            self.add("seq2 qsd1", nbdcopy(src, self.qsd.live_uri, GiB))
            self.qsd.drop()
            self.qsd.take()
            self.add("rand1 qsd1", self._rand_first_touch(self.qsd.live_uri, run))
            self.qsd.drop()
            print(f"  run {run + 1}/{self.args.runs} done", flush=True)

    def _reads(self, phase: str, run: int) -> None:
        """Snapshot reads against live reads of the same volume, made fair (see the module doc):
        nothing starting in the background, the volume's pages read twice before the first
        timed read, the order alternated (ABBA), and the workers' CPU per GiB beside the rates."""
        live, snap = self.fssd.uri("vol"), self.fssd.uri("fss0")
        if not self.args.no_spare:  # the configure took the spare: its successor starts now
            wait_for(self._spare_ready, 30, "a ready spare snapshot worker")
        if phase == "fresh" and run == 0:
            for _ in range(2):  # page-cache LRU activation of the image's fresh pages, untimed
                nbdcopy(live, "null:", GiB)
        vol_pids, snap_pids = self._pids("volume vol"), self._pids("fss0 ")
        order = ("live", "snap", "snap", "live") if run % 2 == 0 else ("snap", "live", "live", "snap")
        seen = set()
        for which in order:
            uri, pids = (live, vol_pids) if which == "live" else (snap, snap_pids)
            c0, k0 = sum(map(_cpu, pids)), _children_cpu()
            rate = nbdcopy(uri, "null:", GiB)
            cpu = sum(map(_cpu, pids)) - c0
            self.add(f"{which} client cpu {phase}", _children_cpu() - k0)
            # The second live read of a run against the first is the noise (fssd against itself).
            key = f"{which} read {phase}" + (" again" if which == "live" and which in seen else "")
            seen.add(which)
            self.add(key, rate)
            if which == "live":
                self.add(f"live read {phase} all", rate)  # the peer of the snapshot's median
            self.add(f"{which} cpu {phase}", cpu)

    def _pids(self, key: str) -> list[int]:
        pids = [w["pid"] for w in self.fssd.status()["workers"] if key in w["name"] and w["alive"]]
        if not pids:
            raise RuntimeError(f"no live worker {key!r}")
        return pids

    def _rand_first_touch(self, uri: str, run: int) -> float:
        return fio_nbd(uri, "randwrite", runtime=None, ramp=None,
                       extra=["--blockalign=64k", f"--number_ios={CLUSTERS_1G}", f"--randseed={run + 1}"])

    def barriers(self) -> None:
        sock = str(self.fssd.rundir / "fss0.sock")
        for vol in ("vol", "big"):
            for _ in range(self.args.barrier_runs):
                # As between two backups: the spare worker the previous configure used is replaced.
                if not self.args.no_spare:
                    wait_for(self._spare_ready, 30, "a ready spare snapshot worker")
                before = len(CREATED_RE.findall(self.fssd.log_text()))
                t0 = time.perf_counter()
                self.fssd.fssconfig("fss0", vol, str(self.scratch.shm / "bs0"))
                self.add(f"cfg {vol}", (time.perf_counter() - t0) * 1e6)
                _answer(sock)
                self.add(f"answering {vol}", (time.perf_counter() - t0) * 1e6)
                found = CREATED_RE.findall(self.fssd.log_text())
                if len(found) <= before:
                    raise RuntimeError("no barrier line in the fssd log after fssconfig")
                self.add(f"barrier {vol}", float(found[-1][1]))
                self.drop(1)

    def _spare_ready(self) -> bool:
        """A spare snapshot worker that said Ready (fssd -d logs it) is alive and still a spare."""
        text = self.fssd.log_text()
        for pid in map(int, SPARE_READY_RE.findall(text)):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().split(b"\0")[0].endswith(b": fss spare"):
                        return True
            except OSError:
                pass
        return False

    # -- report -------------------------------------------------------------------------

    def report(self) -> None:
        r = self.r
        m = {k: median(v) for k, v in r.items()}
        out = self.rows

        def line(figure, key, unit, peer_name="", peer_key=None, target=None, good=None, ratio=None):
            if key not in m:  # --creation-only
                return
            v = m[key]
            if peer_key not in m:
                peer_name, peer_key = "", None
            peer = m[peer_key] if peer_key else None
            if ratio is None and peer:
                ratio = v / peer
            ok = None if good is None else good(ratio if ratio is not None else v)
            out.append(row(figure, v, unit, r[key], peer_name, peer, r[peer_key] if peer_key else None, ratio, target or "", ok))

        ge = lambda t: (lambda x: x >= t)  # noqa: E731
        if self.args.only == "reads":
            self._read_rows(line, ge)
            self._print()
            return
        for k in (1, 4):
            line(f"seq write 1st touch, {k} snap", f"seq1 fssd{k}", "MiB/s", "QSD 1 snap", "seq1 qsd1", f">= {FIRST_TOUCH_TARGET:.1f}x", ge(FIRST_TOUCH_TARGET))
            line(f"  same, vs fssd no snapshot", f"seq1 fssd{k}", "MiB/s", "fssd 0 snap", "seq1 fssd0")
        for k in (1, 4):
            line(f"seq write 2nd touch, {k} snap", f"seq2 fssd{k}", "MiB/s", "fssd 0 snap", "seq2 fssd0", f">= {SECOND_TOUCH_TARGET:.2f}x", ge(SECOND_TOUCH_TARGET))
            line(f"  same, vs QSD 2nd touch", f"seq2 fssd{k}", "MiB/s", "QSD 1 snap", "seq2 qsd1")
        for k in (1, 4):
            line(f"4k randwrite QD32 1st touch, {k} snap", f"rand1 fssd{k}", "IOPS", "QSD 1 snap", "rand1 qsd1", f">= {FIRST_TOUCH_TARGET:.1f}x", ge(FIRST_TOUCH_TARGET))
            line(f"  same, vs fssd no snapshot", f"rand1 fssd{k}", "IOPS", "fssd 0 snap", "rand1 fssd0")
        line("seq write, no snapshot", "seq1 fssd0", "MiB/s", "QSD 1 snap", "seq1 qsd1")
        line("4k randwrite QD32, no snapshot", "rand1 fssd0", "IOPS", "QSD 1 snap", "rand1 qsd1")
        self._read_rows(line, ge)
        line("  QSD snapshot read, fresh", "qsd snap read fresh", "MiB/s", "QSD live", "qsd live read")
        for vol, label in (("vol", "1 GiB"), ("big", "1 TiB")):
            line(f"snapshot barrier, {label}", f"barrier {vol}", "us", target=f"< {BARRIER_TARGET_US} us", good=lambda x: x < BARRIER_TARGET_US)
        b1, bt = m["barrier vol"], m["barrier big"]
        flat = bt <= 2 * b1 or bt - b1 <= 500
        out.append(row("barrier 1 TiB / 1 GiB", bt, "us", r["barrier big"], "1 GiB", b1, r["barrier vol"], bt / b1 if b1 else None,
                       "no growth", flat))
        for vol, label in (("vol", "1 GiB"), ("big", "1 TiB")):
            line(f"fssconfig to export answering, {label}", f"answering {vol}", "us",
                 target=f"<= {READY_TARGET_US // 1000} ms", good=lambda x: x <= READY_TARGET_US)
            line(f"  fssconfig end to end, {label}", f"cfg {vol}", "us", "QSD take (QMP)", "qsd take")
        self._print()

    def _read_rows(self, line, ge) -> None:
        for phase, label in (("fresh", "still on the volume"), ("copied", "all copied")):
            line(f"snapshot read, {label}", f"snap read {phase}", "MiB/s", "fssd live", f"live read {phase} all",
                 f">= {READ_TARGET:.2f}x", ge(READ_TARGET))
            line("  noise: live read vs live read", f"live read {phase} again", "MiB/s", "fssd live", f"live read {phase}")
            line("  worker CPU per GiB, snapshot vs volume", f"snap cpu {phase}", "s/GiB", "volume workers", f"live cpu {phase}")
            line("  nbdcopy's CPU per GiB, snapshot vs live", f"snap client cpu {phase}", "s/GiB", "live", f"live client cpu {phase}")

    def _print(self) -> None:
        out = self.rows
        print(f"{'figure':40} {'fssd':>10} {'peer':>16} {'ratio':>6}  runs | peer runs")
        for x in out:
            fine = x["unit"] == "s/GiB"  # CPU seconds: two decimals
            num = (lambda v: f"{v:.2f}") if fine else (lambda v: f"{v:.0f}")
            runs = (lambda xs: " ".join(map(num, xs))) if fine else fmt_runs
            peer = f"{num(x['peer'])} {x['peer_name']}" if x["peer"] is not None else ""
            ratio = f"{x['ratio']:.2f}x" if x["ratio"] is not None else ""
            pr = runs(x["peer_runs"]) if x["peer_runs"] else ""
            print(f"{x['figure']:40} {num(x['value']):>10} {peer:>16} {ratio:>6}  {runs(x['runs'])} | {pr}  {x['unit']}")
        emit(self.args.results, out)

    # -- main -----------------------------------------------------------------------------

    def main(self) -> int:
        try:
            shm = self.scratch.shm
            img, self.src, big = shm / "volume.img", shm / "src.img", shm / "big.img"
            if self.args.creation_only:  # the data is not read: a sparse image will do
                with open(img, "wb") as f:
                    f.truncate(GiB)
            else:
                make_random_image(img, GiB)
                make_random_image(self.src, GiB)
            with open(big, "wb") as f:  # sparse; never written (fssd only reads it for snapshots)
                f.truncate(1 << 40)
            env = {NO_SPARE_ENV: "1"} if self.args.no_spare else None
            self.fssd = Fssd(self.scratch, [("vol", str(img), None), ("big", str(big), None)], env=env).start()
            if not self.args.creation_only:
                if not self.args.only:
                    self.qsd = Qsd(self.scratch, img, GiB)
                print("writes (fssd 0/1/4 snapshots, QSD 1) and snapshot reads:" if not self.args.only else "snapshot reads:", flush=True)
                self.writes()
            if not self.args.only:
                print("snapshot creation:", flush=True)
                self.barriers()
            self.report()
            return 0
        finally:
            if self.qsd:
                self.qsd.stop()
            if self.fssd:
                self.fssd.stop()
            self.scratch.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--barrier-runs", type=int, default=10)
    ap.add_argument("--only", choices=["reads"], help="reads: only the snapshot read rows (and their noise)")
    ap.add_argument("--results", default=os.environ.get("FSSD_BENCH_RESULTS"))
    ap.add_argument("--creation-only", action="store_true", help="only the snapshot creation rows (no 1 GiB writes, no QSD)")
    ap.add_argument("--no-spare", action="store_true", help="fssd keeps no spare snapshot worker: each is started afresh (before issue 15)")
    args = ap.parse_args()
    install_signal_handlers()
    return Bench(args).main()


if __name__ == "__main__":
    sys.exit(main())
