"""Resource floods on every fssd socket (issue 9's recipes at scale), round after round.

    python tests/stress_limits.py [--seed N] [--rounds N] [--time-limit SEC]

One fssd of its own (run directory under /dev/shm, a [daemon] group with a
member made for the run, a snapshot fss0 whose export the member may open).
Each round, while the floods are held:

* the member (its own uid, through SO_PEERCRED) opens more control
  connections than its cap, half of them with half-sent requests and half
  announcing oversized ones; more snapshot-export connections than its
  per-uid cap, some stalled before the handshake, the rest asking for the
  export; more VSS registrations than its per-uid cap, garbage frames, and
  queue names pre-created with a 1-byte message size;
* root holds 1000 idle NBD connections on the live volume past the handshake,
  and a few clients send half of a 32 MiB WRITE against a 64 MiB buffer budget;

and root's `fssconfig -l` is timed, an honest nbdinfo and nbdcopy read the
volume, the RSS and threads of the supervisor, the volume and snapshot workers
and the broker are sampled. After each round: the stalled and half-sent
connections were dropped at their deadlines, no worker was restarted, nothing
is frozen, no traceback in the log. Everything made is removed on exit, also
on failure (processes by pid, the users, the shared-memory and queue names).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fsshelp import Fssd, run, sha256_file, wait_for  # noqa: E402
from nbdwire import connect, req  # noqa: E402
from secusers import Users  # noqa: E402

from daemon.control_server import FRAME_TIMEOUT, MAX_PER_UID  # noqa: E402
from ipc import nbd  # noqa: E402
from ipc.names import instance_prefix  # noqa: E402
from ipc.vss_client import Requestor  # noqa: E402

MiB = 1 << 20
HANDSHAKE_TIMEOUT = 2.0
IDLE_CONNECTIONS = 1000
HALF_WRITES = 12
FSSCONFIG = Path(sys.executable).parent / "fssconfig"

# Run as the group member: open the floods, report what was refused, hold them
# until a line on stdin, then report what fssd dropped by itself and when.
MEMBER = r"""
import json, os, select, socket, struct, sys, threading, time
import posix_ipc
from ipc import vssproto
rundir, prefix, rnd = sys.argv[1], sys.argv[2], int(sys.argv[3])
n_ctl, n_nbd_stalled, n_nbd_go, n_reg = (int(x) for x in sys.argv[4:8])
out = {}

def unix(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s

def answered(socks, wait):
    # {sock: first bytes or b"" if closed} for those fssd spoke to (or closed) within `wait`.
    got, deadline = {}, time.monotonic() + wait
    pending = list(socks)
    while pending and time.monotonic() < deadline:
        r, _, _ = select.select(pending, [], [], 0.1)
        for s in r:
            try:
                got[s] = s.recv(65536)
            except OSError:
                got[s] = b""
            pending.remove(s)
    return got

# -- control socket: beyond the per-uid cap; half-sent and oversized frames
ctl = []
for i in range(n_ctl):
    s = unix(rundir + "/control.sock")
    try:
        if i % 2:
            s.sendall(struct.pack(">I", 1 << 20) + bytes(64 << 10))  # oversized: refused on the length
        else:
            s.sendall(struct.pack(">I", 4000) + b"\x81" * 100)  # 100 of 4000 bytes, never the rest
    except OSError:
        pass
    ctl.append(s)
t_ctl = time.monotonic()
got = answered(ctl, 2.0)
out["ctl_refused"] = sum(1 for d in got.values() if b"too many connections" in d)
out["ctl_closed"] = sum(1 for d in got.values() if b"too many connections" not in d)
ctl_held = [s for s in ctl if s not in got]
watched = {}
def watch_ctl():  # from now on: when fssd drops the half-sent requests by itself (frame timeout)
    got = answered(ctl_held, 15.0)
    watched.update(ctl_dropped=len(got), ctl_dropped_after=time.monotonic() - t_ctl, ctl_still_open=len(ctl_held) - len(got))
ctl_watcher = threading.Thread(target=watch_ctl)
ctl_watcher.start()

# -- the snapshot export: stalled handshakes, then more asking for it than the cap allows
t_nbd = time.monotonic()
stalled = [unix(rundir + "/fss0.sock") for _ in range(n_nbd_stalled)]
go = []
name = b"fss0"
for _ in range(n_nbd_go):
    s = unix(rundir + "/fss0.sock")
    s.settimeout(5)
    try:
        hello = b""
        while len(hello) < 18:
            b = s.recv(18 - len(hello))
            if not b:
                break
            hello += b
        s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 7, 4 + len(name) + 2) + struct.pack(">I", len(name)) + name + b"\0\0")
        head = s.recv(20)
        typ = struct.unpack(">QII", head[:16])[2] if len(head) >= 16 else None
    except OSError:
        typ = None
    go.append((s, typ))
out["nbd_refused"] = sum(1 for _, t in go if t in (None, 0x80000002))
out["nbd_served"] = sum(1 for _, t in go if t not in (None, 0x80000002))

# -- the VSS socket: registrations beyond the cap, garbage, pre-created queue names
made = []
for n in (f"/{prefix}.app.x{rnd}", f"/{prefix}.app.x{rnd}.1", f"/{prefix}.ans.x{rnd}"):
    try:
        posix_ipc.MessageQueue(n, posix_ipc.O_CREX, max_messages=1, max_message_size=1)
        made.append(n)
    except posix_ipc.ExistentialError:
        pass
regs, reg_ok, reg_refused = [], 0, 0
for i in range(n_reg):
    s = unix(rundir + "/vss.sock")
    s.settimeout(5)
    try:
        s.sendall(vssproto.frame(vssproto.Register(f"x{rnd}" if i == 0 else f"flood{rnd}_{i}")))
        data = s.recv(65536)
        msgs = vssproto.client_reader().feed(data) if data else []
    except OSError:
        msgs = []
    if msgs and getattr(msgs[0], "ok", False):
        reg_ok += 1
        regs.append(s)
    else:
        reg_refused += 1
        s.close()
garbage = []
for payload in (struct.pack(">I", 1 << 31), struct.pack(">I", 40) + os.urandom(40), b"\xc1" * 7):
    s = unix(rundir + "/vss.sock")
    try:
        s.sendall(payload)
    except OSError:
        pass
    garbage.append(s)
out.update(reg_ok=reg_ok, reg_refused=reg_refused, queues_made=len(made))
print(json.dumps(out), flush=True)

# While root measures: the stalled handshakes and the garbage are dropped by fssd itself.
def watch():
    got = answered(stalled, 5.0)
    watched.update(nbd_stalled_dropped=len(got), nbd_stalled_open=len(stalled) - len(got))
    got = answered(garbage, 10.0)
    watched.update(vss_garbage_closed=len(got))
watcher = threading.Thread(target=watch)
watcher.start()
sys.stdin.readline()
watcher.join()
ctl_watcher.join()
out = watched
for n in made:
    try:
        posix_ipc.unlink_message_queue(n)
    except posix_ipc.ExistentialError:
        pass
for s in ctl + stalled + [g for g, _ in go] + regs + garbage:
    s.close()
print(json.dumps(out), flush=True)
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Failures(list):
    def check(self, ok: bool, what: str) -> None:
        if not ok:
            print(f"FAILURE: {what}", flush=True)
            self.append(what)


def timed(argv, timeout=60) -> tuple[float, subprocess.CompletedProcess]:
    t = time.monotonic()
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)
    return time.monotonic() - t, r


def half_writes(f: Fssd, n: int, rng: random.Random) -> list:
    """n clients past the handshake, each sending the header of a 32 MiB WRITE and part of its payload."""
    conns = [connect(f, "data") for _ in range(n)]
    chunk = bytes(MiB)
    want = [rng.randint(4, 16) * MiB for _ in conns]
    sent = [0] * n
    for c in conns:
        c.s.setblocking(False)
        c.s.send(req(nbd.CMD_WRITE, 9, 0, 32 * MiB))
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and any(s < w for s, w in zip(sent, want)):
        for i, c in enumerate(conns):
            if sent[i] < want[i]:
                with contextlib.suppress(BlockingIOError):
                    sent[i] += c.s.send(chunk[: want[i] - sent[i]])
        time.sleep(0.01)  # the other side drains at its pace; this is a pacing period, not a wait for readiness
    return conns


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--time-limit", type=float, default=600, help="stop starting rounds after this many seconds")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    os.umask(0o022)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fails = Failures()
    users = Users()
    base = Path(tempfile.mkdtemp(prefix="fssd-stress-limits-", dir="/dev/shm"))
    base.chmod(0o755)
    f = None
    t_start = time.monotonic()
    try:
        users.create()
        f = Fssd(
            base / "i0",
            [{"name": "data", "path": str(base / "data.img"), "size": "64M"}],
            vss={"enabled": True, "freeze": [], "timeout": 2},
            extra="\n".join([
                f'group = "{users.group}"',
                f"nbd_max_connections = {IDLE_CONNECTIONS + 100}",
                "nbd_max_connections_per_uid = 32",
                f"nbd_handshake_timeout = {HANDSHAKE_TIMEOUT}",
                "nbd_request_timeout = 4",
                'nbd_buffer_limit = "64M"',
            ]),
        )
        f.start()
        f.fssconfig("fss0", "data", base / "bs0")
        run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 8M", f.uri("data"))
        want = sha256_file(base / "data.img")  # no WRITE of the rounds is ever completed
        prefix = instance_prefix(str(f.rundir))
        pids = {
            "supervisor": f.proc.pid,
            "volume": f.worker_pid("volume", "data"),
            "snapshot": f.worker_pid("snapshot", "fss0"),
            "broker": f.worker_pid("broker", ""),
        }
        max_rss = {k: rss_kib(p) for k, p in pids.items()}
        max_thr = {k: threads(p) for k, p in pids.items()}
        start_rss = dict(max_rss)
        start_fds = {k: fds(p) for k, p in pids.items()}
        idle_list = [timed([FSSCONFIG, "-r", f.rundir, "-l"])[0] for _ in range(3)]
        answers: list[float] = []
        nbdcopy_s: list[float] = []
        totals = {k: 0 for k in ("ctl_attempted", "ctl_refused", "ctl_closed", "ctl_dropped", "nbd_attempted", "nbd_refused",
                                 "nbd_stalled_dropped", "idle_held", "half_writes", "vss_attempted", "vss_refused",
                                 "vss_garbage_closed", "queues_made")}
        rounds = 0
        ctl_dropped_after = 0.0
        idle_threads = 0
        max_log_lines = 0
        log_lines_before = f.log.read_text(errors="replace").count("\n")
        for rnd in range(args.rounds):
            if time.monotonic() - t_start > args.time_limit:
                print(f"time limit reached after {rounds} rounds", flush=True)
                break
            t0 = time.monotonic()
            n_ctl, n_stall, n_go, n_reg = rng.randint(24, 48), rng.randint(8, 16), rng.randint(40, 80), rng.randint(12, 24)
            member = users.py(users.member, str(f.rundir), prefix, str(rnd), str(n_ctl), str(n_stall), str(n_go), str(n_reg),
                              code=MEMBER, wait=False)
            line = member.stdout.readline()
            if not line:
                fails.check(False, f"round {rnd}: member flood died: {member.stderr.read()[-2000:]}")
                break
            m1 = json.loads(line)
            idle = [connect(f, "data") for _ in range(IDLE_CONNECTIONS)]
            idle_threads = max(idle_threads, threads(pids["volume"]))
            writers = half_writes(f, HALF_WRITES, rng)
            try:
                took = []
                for _ in range(5):
                    s, r = timed([FSSCONFIG, "-r", f.rundir, "-l"])
                    fails.check(r.returncode == 0 and "fss0: data" in r.stdout, f"round {rnd}: root fssconfig -l: {r.stderr.strip()}")
                    took.append(s)
                answers += took
                fails.check(max(took) < statistics.median(idle_list) + 1.0, f"round {rnd}: root's fssconfig -l took {max(took):.2f} s, over a second more than idle")
                s, r = timed(["nbdinfo", "--size", f.uri("data")])
                fails.check(r.returncode == 0 and r.stdout.strip() == str(64 * MiB), f"round {rnd}: nbdinfo: {r.stderr.strip()}")
                copy = base / "copy.img"
                s, r = timed(["nbdcopy", f.uri("data"), copy], timeout=120)
                fails.check(r.returncode == 0, f"round {rnd}: nbdcopy: {r.stderr.strip()}")
                fails.check(r.returncode == 0 and sha256_file(copy) == want, f"round {rnd}: nbdcopy read other data than the volume's")
                copy.unlink(missing_ok=True)
                nbdcopy_s.append(s)
                for k, p in pids.items():
                    max_rss[k] = max(max_rss[k], rss_kib(p))
                    max_thr[k] = max(max_thr[k], threads(p))
                st = Requestor(str(f.rundir)).request("status")
                fails.check(st.ok and st.frozen == [], f"round {rnd}: broker status {st}")
            finally:
                for c in idle + writers:
                    c.close()
                member.stdin.write("\n")
                member.stdin.flush()
            line = member.stdout.readline()
            member.wait(30)
            if not line:
                fails.check(False, f"round {rnd}: member flood died: {member.stderr.read()[-2000:]}")
                break
            m2 = json.loads(line)
            # The member's caps: MAX_PER_UID control connections, 32 NBD connections, 8 registrations ([vss] max_apps_per_uid).
            fails.check(m1["ctl_refused"] + m1["ctl_closed"] >= n_ctl - MAX_PER_UID, f"round {rnd}: control flood not capped {m1}")
            fails.check(m2["ctl_still_open"] == 0 and m2["ctl_dropped_after"] < FRAME_TIMEOUT + 3, f"round {rnd}: half-sent control requests not dropped in time {m2}")
            fails.check(m1["ctl_refused"] + m1["ctl_closed"] + m2["ctl_dropped"] == n_ctl, f"round {rnd}: control connections unaccounted for {m1} {m2}")
            fails.check(m1["nbd_served"] <= 32 - n_stall, f"round {rnd}: NBD per-uid cap not kept {m1}")
            fails.check(m2["nbd_stalled_open"] == 0, f"round {rnd}: stalled NBD handshakes not dropped {m2}")
            fails.check(m1["reg_ok"] <= 8 and m1["reg_refused"] >= n_reg - 8, f"round {rnd}: registrations not capped {m1}")
            fails.check(m2["vss_garbage_closed"] == 3, f"round {rnd}: garbage VSS connections not closed {m2}")
            for k, p in pids.items():
                alive = f.proc.poll() is None if k == "supervisor" else f.alive_pid(k, {"volume": "data", "snapshot": "fss0", "broker": ""}[k]) == p
                fails.check(alive, f"round {rnd}: {k} (pid {p}) restarted or gone")
            # Every connection of the round is gone on fssd's side too (no descriptor kept).
            for k, p in pids.items():
                try:
                    wait_for(lambda: fds(p) <= start_fds[k] + 2, 15, f"{k}'s descriptors back to {start_fds[k]}", interval=0.1)
                except TimeoutError as e:
                    fails.check(False, f"round {rnd}: {e} (has {fds(p)})")
            log = f.log.read_text(errors="replace")
            fails.check("Traceback" not in log, f"round {rnd}: traceback in the log")
            log_lines = log.count("\n")
            fails.check(log_lines - log_lines_before < 60, f"round {rnd}: {log_lines - log_lines_before} log lines (refusals and drops are rate-limited)")
            max_log_lines = max(max_log_lines, log_lines - log_lines_before)
            log_lines_before = log_lines
            totals["ctl_attempted"] += n_ctl
            totals["ctl_refused"] += m1["ctl_refused"]
            totals["ctl_closed"] += m1["ctl_closed"]
            totals["ctl_dropped"] += m2["ctl_dropped"]
            ctl_dropped_after = max(ctl_dropped_after, m2["ctl_dropped_after"])
            totals["nbd_attempted"] += n_stall + n_go
            totals["nbd_refused"] += m1["nbd_refused"]
            totals["nbd_stalled_dropped"] += m2["nbd_stalled_dropped"]
            totals["idle_held"] += len(idle)
            totals["half_writes"] += len(writers)
            totals["vss_attempted"] += n_reg + 3
            totals["vss_refused"] += m1["reg_refused"]
            totals["vss_garbage_closed"] += m2["vss_garbage_closed"]
            totals["queues_made"] += m1["queues_made"]
            rounds += 1
            print(f"round {rnd}: control {n_ctl} (refused {m1['ctl_refused']}, closed {m1['ctl_closed']}, dropped at timeout {m2['ctl_dropped']}); "
                  f"nbd fss0 {n_stall + n_go} (refused {m1['nbd_refused']}, stalled dropped {m2['nbd_stalled_dropped']}); "
                  f"data: {len(idle)} idle + {len(writers)} half WRITEs; vss {n_reg} registrations (refused {m1['reg_refused']}) + 3 garbage; "
                  f"root -l {statistics.median(took) * 1000:.0f}/{max(took) * 1000:.0f} ms; nbdcopy {nbdcopy_s[-1]:.2f} s; "
                  f"failures {len(fails)}; {time.monotonic() - t0:.1f} s", flush=True)
        print(f"seed {args.seed}: {rounds} rounds in {time.monotonic() - t_start:.0f} s")
        print(f"control: {totals['ctl_attempted']} connections (member), refused {totals['ctl_refused']}, closed on an oversized frame {totals['ctl_closed']}, "
              f"half-sent dropped at the timeout {totals['ctl_dropped']} (the last {ctl_dropped_after:.1f} s after the flood began)")
        print(f"nbd: {totals['nbd_attempted']} connections to fss0 (member), refused {totals['nbd_refused']}, stalled handshakes dropped {totals['nbd_stalled_dropped']}; "
              f"{totals['idle_held']} idle and {totals['half_writes']} half-sent 32 MiB WRITEs (root) on data")
        print(f"vss: {totals['vss_attempted']} connections (member), registrations refused {totals['vss_refused']}, garbage closed {totals['vss_garbage_closed']}, "
              f"pre-created queue names {totals['queues_made']}")
        if answers:
            print(f"root fssconfig -l: median {statistics.median(answers) * 1000:.0f} ms, worst {max(answers) * 1000:.0f} ms "
                  f"(before the floods {statistics.median(idle_list) * 1000:.0f} ms); nbdcopy 64 MiB: median {statistics.median(nbdcopy_s):.2f} s, worst {max(nbdcopy_s):.2f} s")
        print("max RSS (MiB, start -> max): " + ", ".join(f"{k} {start_rss[k] / 1024:.0f} -> {max_rss[k] / 1024:.0f}" for k in pids))
        print(f"log lines per round: at most {max_log_lines}")
        print("max threads: " + ", ".join(f"{k} {max_thr[k]}" for k in pids) + f" (volume with {IDLE_CONNECTIONS} idle connections only: {idle_threads})")
    except Exception as e:  # reported as a failure, cleanup below
        fails.append(f"{type(e).__name__}: {e}")
        print(f"FAILURE: {type(e).__name__}: {e}", flush=True)
    finally:
        if f is not None:
            with contextlib.suppress(Exception):
                f.stop()
            f.kill_everything()
        users.remove()
        shutil.rmtree(base, ignore_errors=True)
    print(f"failures: {len(fails)}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
