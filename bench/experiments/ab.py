"""A/B: this tree vs a patched copy (PYTHONPATH), interleaved, same images: python bench/experiments/ab.py RUNS EXP_TREE."""
import sys, os, statistics
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from peers import *
EXP = sys.argv[2] if len(sys.argv) > 2 else os.environ["FSSD_EXP_TREE"]  # a copy of daemon/ workers/ ipc/ with the patch applied
install_signal_handlers()
s = Scratch("ab")
fs = {}
try:
    src = s.shm / "src.img"; make_random_image(src, GiB)
    for tag, env in (("main", None), ("exp", {"PYTHONPATH": EXP})):
        img = s.shm / f"{tag}.img"; make_random_image(img, GiB)
        fs[tag] = Fssd(s, [("vol", str(img), None)], tag=tag, env=env).start()
    res = {}
    def take(f, k, tag):
        for i in range(k): f.fssconfig(f"fss{i}", "vol", str(s.shm / f"{tag}-bs{i}"))
    def drop(f, k):
        for i in reversed(range(k)): f.fssconfig("-u", f"fss{i}")
    for run in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
        for tag, f in fs.items():
            live = f.uri("vol")
            for k in (1, 4):
                take(f, k, tag)
                res.setdefault((tag, f"seq1 k{k}"), []).append(nbdcopy(str(src), live, GiB))
                if k == 1:
                    res.setdefault((tag, "snapread copied"), []).append(nbdcopy(f.uri("fss0"), "null:", GiB))
                    res.setdefault((tag, "live read"), []).append(nbdcopy(live, "null:", GiB))
                drop(f, k)
                take(f, k, tag)
                res.setdefault((tag, f"rand1 k{k}"), []).append(fio_nbd(live, "randwrite", runtime=None, ramp=None, extra=["--blockalign=64k", "--number_ios=16384", f"--randseed={run+1}"]))
                drop(f, k)
    for key in sorted({k for _, k in res}):
        a, b = res[("main", key)], res[("exp", key)]
        print(f"{key:18} main {statistics.median(a):8.0f} exp {statistics.median(b):8.0f}  x{statistics.median(b)/statistics.median(a):.2f}   {fmt_runs(a)} | {fmt_runs(b)}")
    for tag, f in fs.items():
        errs = [l for l in f.log_text().splitlines() if "ERROR" in l or "Traceback" in l]
        print(tag, "errors:", errs[:3])
finally:
    for f in fs.values(): f.stop()
    s.cleanup()
