"""Fault injection: SIGKILL every kind of fssd process under a write storm, snapshots being taken,
and check the live volume and every valid snapshot against a model of acknowledged writes.

    python tests/stress.py [--seed N] [--rounds N] [--writers N] [--size 16M] [--no-vss]

Each round: writers storm the volume, snapshots are taken during it, and at a
random moment one process is SIGKILLed (the kinds take turns in a seeded
order: supervisor, volume worker, snapshot worker, VSS broker, and "all":
every fssd process at once). After the process is back (a killed supervisor
is started again, as systemd would), the writers pause and everything is read
back and compared with the model. Snapshots outlive a killed supervisor
(docs/architecture.md "Durability"): after the restart each one must read
exactly as it did before, or be invalid with a reason; the counts are printed.

The model. Every 4 KiB block has exactly one writer (writers own interleaved
16 KiB stripes, so several of them share each snapshot cluster), and a block's
content names the write that produced it (write id and block number, all
through the block, so a torn or misplaced block shows). A write counts once
its NBD reply arrived; a write whose connection died unanswered may or may
not have landed, so both are allowed for that block until the next check
sees which. Killed workers must not land such a write later: a later check
that finds it over a newer acknowledged write is a loss. A snapshot may hold,
per block, what was there when its configure began or anything written while
it ran; once read, it must read the same forever (until fssd stops).

The raw NBD client here is deliberate: the model needs to know exactly which
writes were answered. The data is read back with nbdcopy.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fsshelp import Fssd, run, wait_for  # noqa: E402

from daemon.cli.client import ControlClient, NotRunning  # noqa: E402
from daemon.cli import storeopen  # noqa: E402
from ipc import control, nbd  # noqa: E402

BLOCK = 4096
STRIPE = 4  # blocks a writer owns in a row
ZERO = -1  # the version of a block WRITE_ZEROES cleared
KINDS = ("supervisor", "volume", "snapshot", "spare", "broker", "all")
RESTARTS = ("supervisor", "all")  # kinds after which fssd itself starts again
DEVICES = ("fss0", "fss1", "fss2", "fss3")
CLUSTERS = (4096, 16384, 65536)


def _tag(b: int) -> int:
    return (b << 8) | 0xA5  # never 0: no version of any block reads as zeroes


def block_bytes(version: int, b: int) -> bytes:
    if version == ZERO:
        return bytes(BLOCK)
    return struct.pack("<QQ", version, _tag(b)) * (BLOCK // 16)


def decode(data: bytes | memoryview, b: int) -> int | None:
    """The version a block holds, or None when it is no whole version of this block."""
    v, tag = struct.unpack_from("<QQ", data, 0)
    if tag == 0 and data == bytes(BLOCK):
        return ZERO
    if tag != _tag(b) or data != block_bytes(v, b):
        return None
    return v


class Model:
    def __init__(self, nblocks: int):
        self.lock = threading.Lock()
        self.acked = [0] * nblocks  # version 0: the initial fill
        self.maybe: dict[int, set[int]] = {}  # block -> unanswered versions (may have landed)
        self.inflight: dict[int, tuple[range, list]] = {}  # writer -> (blocks, event)
        self.windows: list[dict[int, list[list]]] = []  # snapshots being configured: block -> events
        self.next_version = 1

    def sending(self, writer: int, blocks: range, zero: bool) -> int:
        """A new write id; the blocks will hold that id, or ZERO for WRITE_ZEROES."""
        with self.lock:
            v = self.next_version
            self.next_version += 1
            # [content, sent (taken before the send), answered (after the reply) or None]
            event = [ZERO if zero else v, time.time_ns(), None]
            self.inflight[writer] = (blocks, event)
            for w in self.windows:
                for b in blocks:
                    w.setdefault(b, []).append(event)
            return v

    def answered(self, writer: int, ok: bool) -> None:
        now = time.time_ns()
        with self.lock:
            blocks, event = self.inflight.pop(writer)
            if ok:
                event[2] = now
            for b in blocks:
                if ok:
                    self.acked[b] = event[0]
                    self.maybe.pop(b, None)
                else:
                    self.maybe.setdefault(b, set()).add(event[0])

    def window_open(self) -> dict:
        with self.lock:
            w: dict[int, list[list]] = {}
            for blocks, event in self.inflight.values():
                for b in blocks:
                    w.setdefault(b, []).append(event)
            snap = {"acked": list(self.acked), "maybe": {b: set(s) for b, s in self.maybe.items()}, "events": w}
            self.windows.append(w)
            return snap

    def window_close(self, snap: dict) -> None:
        with self.lock:
            self.windows.remove(snap["events"])

    @staticmethod
    def at_instant(snap: dict, b: int, t_ns: int) -> set[int]:
        """What block b may hold at the barrier stamped t_ns: the last write answered before it
        (else what the block held when the configure began), and any write sent before it
        that was not answered before it. A write sent after it can't be in the snapshot."""
        eps = 2000  # the stamp reaches us as a float of seconds: allow its rounding
        events = snap["events"].get(b, [])
        k = -1
        for i, (_c, _sent, ans) in enumerate(events):
            if ans is not None and ans < t_ns - eps:
                k = i
        poss = {events[k][0]} if k >= 0 else {snap["acked"][b]} | snap["maybe"].get(b, set())
        for content, sent, _ans in events[k + 1 :]:
            if sent < t_ns + eps:
                poss.add(content)
        return poss

    def possible(self, b: int) -> set[int]:
        return {self.acked[b]} | self.maybe.get(b, set())


class Writer(threading.Thread):
    """One NBD connection writing only its own blocks, one request at a time."""

    def __init__(self, idx: int, nwriters: int, st: "Stress"):
        super().__init__(name=f"writer{idx}", daemon=True)
        self.idx = idx
        self.st = st
        self.rng = random.Random(st.seed * 1000 + idx)
        nstripes = st.nblocks // STRIPE
        self.stripes = [s for s in range(1, nstripes) if s % nwriters == idx]  # stripe 0: the Staller's
        self.sock: socket.socket | None = None
        self.idle = threading.Event()
        self.acked = self.unanswered = self.errors = 0

    def _connect(self) -> None:
        self.sock = nbd_connect(self.st.f.sock("data"))

    def run(self) -> None:
        while not self.st.finished:
            if not self.st.storming.is_set():
                self.idle.set()
                self.st.storming.wait(0.5)
                continue
            self.idle.clear()
            if self.sock is None:
                try:
                    self._connect()
                except (OSError, EOFError, ConnectionError):
                    self.idle.set()  # the export is down (a restart): try again shortly
                    time.sleep(0.02)
                    continue
            self._one_write()

    def _one_write(self) -> None:
        stripe = self.rng.choice(self.stripes)
        first = stripe * STRIPE + self.rng.randrange(STRIPE)
        n = self.rng.randint(1, stripe * STRIPE + STRIPE - first)
        blocks = range(first, first + n)
        zero = self.rng.random() < 0.05
        v = self.st.model.sending(self.idx, blocks, zero)
        if zero:
            req = struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE_ZEROES, v, first * BLOCK, n * BLOCK)
        else:
            payload = b"".join(block_bytes(v, b) for b in blocks)
            req = struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, v, first * BLOCK, n * BLOCK) + payload
        try:
            self.sock.sendall(req)
            magic, err, cookie = struct.unpack(">IIQ", _recv(self.sock, 16))
        except (OSError, EOFError):
            self.st.model.answered(self.idx, False)
            self.unanswered += 1
            self.sock.close()
            self.sock = None
            return
        if magic != nbd.SIMPLE_REPLY_MAGIC or cookie != v:
            raise SystemExit(f"writer {self.idx}: bad reply {magic:#x} cookie {cookie} for {v}")
        if err:
            self.errors += 1  # no answer as to what landed: either
        else:
            self.acked += 1
        self.st.model.answered(self.idx, not err)


def nbd_connect(path: str, export: bytes = b"data") -> socket.socket:
    """Handshake (fixed newstyle, NBD_OPT_GO; simple replies) and return the socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    try:
        s.connect(path)
        hdr = _recv(s, 18)
        assert struct.unpack(">QQ", hdr[:16]) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
        s.sendall(struct.pack(">I", nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES))
        s.sendall(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, 6 + len(export)) + struct.pack(">I", len(export)) + export + b"\0\0")
        while True:
            _m, _o, typ, n = struct.unpack(">QIII", _recv(s, 20))
            _recv(s, n)
            if typ == nbd.REP_ACK:
                return s
            if typ & 0x80000000:
                raise ConnectionError(f"NBD_OPT_GO refused: {typ:#x}")
    except BaseException:
        s.close()
        raise


STALLER = -1  # the model's writer id for the staller
READ_COOKIE = 1 << 62


class Staller:
    """A client that queues 16 READs of 1 MiB and a WRITE to block 0 (its own) and reads no
    replies, so the write waits behind the stalled READs. Its supervisor killed, the worker
    must never execute that write: a new instance may already be serving the volume."""

    def __init__(self, st: "Stress"):
        self.st = st
        self.sock = nbd_connect(st.f.sock("data"))
        self.version = st.model.sending(STALLER, range(0, 1), False)
        for i in range(16):
            cookie = READ_COOKIE + i  # never a write's version
            self.sock.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, cookie, (i % (st.size >> 20)) << 20, 1 << 20))
        self.sock.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, self.version, 0, BLOCK) + block_bytes(self.version, 0))
        wait_for(self._stalled, 20, "the worker to start answering the staller's READs")

    def _stalled(self) -> bool:
        import fcntl
        import termios

        return struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0] > 0

    def drain(self) -> int | None:
        """Read everything the server still sends: the write's reply (its error), or None."""
        try:
            while True:
                _magic, err, cookie = struct.unpack(">IIQ", _recv(self.sock, 16))
                if cookie == self.version:
                    return err
                if not err:
                    _recv(self.sock, 1 << 20)
        except (OSError, EOFError):
            return None
        finally:
            self.sock.close()


def _recv(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = s.recv(n - len(buf))
        if not got:
            raise EOFError
        buf += got
    return bytes(buf)


class Snap:
    def __init__(self, device: str, possible: list[set[int]] | None, store: Path):
        self.device = device
        self.possible = possible  # per block, until first read
        self.image: list[int] | None = None  # versions seen at the first read: fixed from then on
        self.store = store


class Stress:
    def __init__(self, workdir: Path, seed: int, size: int, writers: int, vss: bool, log=print, env: dict | None = None, kinds: tuple = KINDS,
                 pace: float = 1.0, processes: int = 1):
        self.seed = seed
        self.processes = processes  # volume worker processes serving `data`
        self.pace = pace  # scales the storm's random waits (a short CI slice runs more rounds)
        self.rng = random.Random(seed)
        self.size = size
        self.nblocks = size // BLOCK
        self.nwriters = writers
        self.vss = vss
        self.log = log
        self.work = workdir
        self.image = workdir / "data.img"
        with open(self.image, "wb") as fh:  # version 0 everywhere
            for b in range(self.nblocks):
                fh.write(block_bytes(0, b))
        vol = {"name": "data", "path": str(self.image), "size": size}
        if processes > 1:
            vol["processes"] = processes
        self.f = Fssd(workdir / "fssd", [vol],
                      # Short VSS timeouts: a broker killed mid-FREEZE costs a round seconds, not a minute.
                      vss={"enabled": vss, "freeze": [], "timeout": 2} if vss else {"enabled": False}, devices=4,
                      extra="max_restarts = 1000")
        self.model = Model(self.nblocks)
        self.storming = threading.Event()
        self.finished = False
        self.snaps: dict[str, Snap] = {}
        self.kills: collections.Counter = collections.Counter()
        self.bytes_checked = 0
        self.losses: list[str] = []
        self.snapshots_taken = 0
        self.snapshot_refusals = 0
        self.writers: list[Writer] = []
        self.generation = 0  # supervisor kills so far: which instance a configure reached
        self.configuring: Path | None = None
        self.configuring_device = ""
        self.across_restarts = collections.Counter()  # snapshots after a restart: intact / invalid
        self.invalid_reasons: list[str] = []
        self.refusals: list[str] = []
        self.env = env
        self.kinds = [k for k in kinds if k != "broker" or vss]

    # -- fssd --------------------------------------------------------------------------

    def status(self):
        return ControlClient(str(self.f.rundir), timeout=30).request(control.Status())

    def pid_of(self, kind: str, key: str | None = None) -> int | None:
        try:
            st = self.status()
        except (NotRunning, OSError):
            return None
        for w in st.workers:
            if w.kind == kind and w.alive and (key is None or key in w.name):
                return w.pid
        return None

    def configure(self, device: str, cluster: int, consistent: bool) -> None:
        store = self.work / f"bs-{device}"
        gen = self.generation
        self.configuring, self.configuring_device = store, device
        window = self.model.window_open()
        opened = None
        try:
            # As fssconfig does: the store is opened here and travels as a descriptor.
            opened = storeopen.open_store(str(store))
            named = opened.created and not opened.nameless
            reply = ControlClient(str(self.f.rundir), timeout=60).request(
                control.Configure(device=device, path="data", backup=str(store), cluster=cluster, consistent=consistent,
                                  name=opened.name if named else "", nfds=2 if named else 1),
                [opened.fd, opened.dirfd] if named else [opened.fd])
        except (NotRunning, OSError, storeopen.StoreError):  # the supervisor was killed meanwhile
            reply = None
        finally:
            if opened is not None:
                if not isinstance(reply, control.Configured):
                    storeopen.remove_created(opened)
                storeopen.close(opened)
            self.model.window_close(window)
            self.configuring, self.configuring_device = None, ""
        if not isinstance(reply, control.Configured) or gen != self.generation:
            # Refused, cut short, or answered across a supervisor kill (which instance made it
            # is unknown: sync_devices removes it if it exists).
            self.snapshot_refusals += 1
            self.refusals.append(f"{device}: {reply!r:.200}")
            return
        t_ns = int(reply.snapshot.taken * 1e9)  # the barrier's stamp
        possible = [Model.at_instant(window, b, t_ns) for b in range(self.nblocks)]
        self.snaps[device] = Snap(device, possible, store)
        self.snapshots_taken += 1

    def unconfigure(self, device: str) -> None:
        with contextlib.suppress(NotRunning, OSError):
            ControlClient(str(self.f.rundir), timeout=60).request(control.Unconfigure(device))
        self.snaps.pop(device, None)

    # -- checks ------------------------------------------------------------------------

    def read_export(self, export: str) -> bytes | None:
        out = self.work / f"{export}.out"
        for _ in range(50):
            p = subprocess.run(["nbdcopy", self.f.uri(export), str(out)], capture_output=True, timeout=120)
            if p.returncode == 0:
                data = out.read_bytes()
                out.unlink()
                return data
            if export != "data" and not self.snap_usable(export):
                return None
            time.sleep(0.1)  # the worker is being restarted: try again
        raise AssertionError(f"cannot read {export}: {p.stderr.decode()}")

    def snap_usable(self, device: str) -> bool:
        for s in self.status().snapshots:
            if s.device == device:
                return s.in_use and s.state == "active"
        return False

    def check_live(self) -> None:
        data = self.read_export("data")
        self.bytes_checked += len(data)
        m = self.model
        for b in range(self.nblocks):
            v = decode(memoryview(data)[b * BLOCK : (b + 1) * BLOCK], b)
            if v is None or v not in m.possible(b):
                self.losses.append(f"volume block {b}: holds {v}, expected one of {sorted(m.possible(b))}")
                continue
            m.acked[b] = v  # collapsed: an unanswered write has landed or never will
            m.maybe.pop(b, None)

    def check_snapshot(self, snap: Snap) -> None:
        if not self.snap_usable(snap.device):
            self.snaps.pop(snap.device, None)  # invalid (said so loudly): nothing to hold it to
            return
        data = self.read_export(snap.device)
        if data is None:
            self.snaps.pop(snap.device, None)
            return
        self.bytes_checked += len(data)
        seen = [decode(memoryview(data)[b * BLOCK : (b + 1) * BLOCK], b) for b in range(self.nblocks)]
        if snap.image is None:
            bad = [b for b in range(self.nblocks) if seen[b] is None or seen[b] not in snap.possible[b]]
            for b in bad[:5]:
                self.losses.append(f"{snap.device} block {b}: holds {seen[b]}, expected one of {sorted(snap.possible[b])}")
            if bad:
                self.losses.append(f"{snap.device}: {len(bad)} block(s) not as at the snapshot's instant")
            snap.image, snap.possible = seen, None
        elif seen != snap.image:
            changed = [b for b in range(self.nblocks) if seen[b] != snap.image[b]]
            self.losses.append(f"{snap.device} changed after it was taken: {len(changed)} block(s), first {changed[0]}: {snap.image[changed[0]]} -> {seen[changed[0]]}")
            snap.image = seen

    # -- one round -----------------------------------------------------------------------

    def pause(self) -> None:
        self.storming.clear()
        for w in self.writers:
            wait_for(w.idle.is_set, 60, f"{w.name} to pause")

    def kill(self, kind: str) -> str:
        if kind == "broker" and not self.vss:
            return "nothing (no broker)"
        if kind in RESTARTS:
            pid = self.f.proc.pid
            pids = [pid]
            if kind == "all":  # every fssd process in one go, as a cgroup-wide SIGKILL would
                with contextlib.suppress(NotRunning, OSError):
                    pids += [w.pid for w in self.status().workers if w.alive]
            for p in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            self.generation += 1
            cut_short = (self.configuring_device, self.configuring) if self.configuring else None
            self.f.proc.wait()
            self.f._logf.close()
            self.f.proc = None
            self.f.start(env=self.env)  # as systemd would; it waits until the old workers are gone
            self.after_restart(cut_short)
            return f"{'supervisor' if kind == 'supervisor' else f'all {len(pids)} processes'} (pid {pid})"
        key = {"volume": "data", "broker": None, "snapshot": None, "spare": None}[kind]
        if kind == "volume" and self.processes > 1:  # one of the volume's processes
            key = f"data [{self.rng.randrange(self.processes) + 1}/{self.processes}]"
        if kind == "snapshot":
            if not self.snaps:
                return "snapshot: none configured"
            key = self.rng.choice(sorted(list(self.snaps)))
        pid = self.pid_of(kind, key)
        if pid is None:
            return f"{kind}: none running"
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: self.pid_of(kind, key) not in (None, pid) or (kind == "snapshot" and not self.snap_usable(key)), 60, f"{kind} to come back")
        return f"{kind} {key or ''} (pid {pid})".replace("  ", " ")

    def after_restart(self, cut_short: tuple[str, Path] | None) -> None:
        """Every snapshot taken before the kill is back: active (checked against what it read
        before at the next check) or invalid with a reason. A configure the kill cut short left
        either a snapshot (its record was written: sync_devices removes it) or nothing at all."""
        listed = {s.device: s for s in self.status().snapshots if s.in_use}
        for dev, snap in list(self.snaps.items()):
            info = listed.get(dev)
            if info is None:
                self.losses.append(f"{dev} did not come back after the restart")
                self.snaps.pop(dev)
            elif info.state != "active":
                if not info.error:
                    self.losses.append(f"{dev} came back {info.state} without a reason")
                self.across_restarts["invalid"] += 1
                self.invalid_reasons.append(f"{dev}: {info.error}")
                self.snaps.pop(dev)
            else:
                self.across_restarts["intact"] += 1  # its data: check_snapshot, below
        if cut_short is not None:
            dev, store = cut_short
            if dev not in listed and store.exists():
                self.losses.append(f"backing store {store} of a configure cut short was left behind")

    def sync_devices(self) -> None:
        """A configure cut short by a kill may still have made its snapshot: remove the unknown."""
        for info in self.status().snapshots:
            if info.in_use and info.device not in self.snaps:
                self.unconfigure(info.device)

    def round(self, i: int, kind: str) -> None:
        t0 = time.monotonic()
        acked0 = sum(w.acked for w in self.writers)
        before = self.bytes_checked
        self.sync_devices()
        free = [d for d in DEVICES if d not in self.snaps]
        if not free:  # make room: the oldest goes
            self.unconfigure(sorted(self.snaps)[0])
            free = [d for d in DEVICES if d not in self.snaps]
        self.storming.set()
        if kind == "snapshot" and not self.snaps:  # something to kill
            self.configure(free.pop(0), self.rng.choice(CLUSTERS), False)
        if kind in RESTARTS and len(self.snaps) < 2 and free:  # something to bring back
            self.configure(free.pop(0), self.rng.choice(CLUSTERS), False)
        staller = Staller(self) if kind in RESTARTS else None
        # The kill comes at a random moment, maybe in the middle of taking a snapshot.
        what: list = []
        delay = self.rng.uniform(0.05, 1.2) * self.pace

        def killer_run() -> None:
            time.sleep(delay)
            try:
                what.append(self.kill(kind))
            except BaseException as e:  # handed to the main thread below
                what.append(e)

        killer = threading.Thread(target=killer_run, name="killer")
        killer.start()
        try:
            for _ in range(2):
                time.sleep(self.rng.uniform(0.02, 0.25) * self.pace)
                if free:
                    self.configure(free.pop(0), self.rng.choice(CLUSTERS), self.vss and self.rng.random() < 0.5)
        finally:
            killer.join()
        if what and isinstance(what[0], BaseException):
            raise what[0]
        if staller is not None:
            # The staller's write went unanswered when its supervisor died: it may have landed
            # by now, never later. Look, then let the staller read on: nothing may land after.
            self.model.answered(STALLER, False)
            self.pause()
            self.check_live()
            err = staller.drain()
            if err == 0:
                self.losses.append("a write queued before the supervisor was killed was executed afterwards")
            self.storming.set()
        self.kills[kind] += 1
        time.sleep(self.rng.uniform(0.1, 0.3) * self.pace)  # the storm goes on against the restarted process
        self.pause()
        self.check_live()
        for s in list(self.snaps.values()):
            self.check_snapshot(s)
        acked = sum(w.acked for w in self.writers) - acked0
        self.log(f"round {i}: killed {what[0] if what else '?'}; {acked} writes answered; checked volume + {len(self.snaps)} snapshot(s) "
                 f"({(self.bytes_checked - before) >> 20} MiB); losses {len(self.losses)}; {time.monotonic() - t0:.1f} s")

    def run(self, rounds: int) -> dict:
        self.f.start(env=self.env)
        self.writers = [Writer(i, self.nwriters, self) for i in range(self.nwriters)]
        for w in self.writers:
            w.start()
        kinds = self.kinds
        order: list[str] = []
        try:
            for i in range(rounds):
                if not order:
                    order = list(kinds)
                    self.rng.shuffle(order)
                self.round(i, order.pop())
                if self.losses:
                    break
        finally:
            self.finished = True
            self.storming.set()
            for w in self.writers:
                w.join(35)
            self.f.stop()
            self.f.kill_everything()
        return self.summary(rounds)

    def summary(self, rounds: int) -> dict:
        return {
            "seed": self.seed,
            "rounds": rounds,
            "kills": dict(self.kills),
            "writes answered": sum(w.acked for w in self.writers),
            "writes unanswered (connection killed)": sum(w.unanswered for w in self.writers),
            "write errors": sum(w.errors for w in self.writers),
            "snapshots taken": self.snapshots_taken,
            "snapshot configures refused or cut short": self.snapshot_refusals,
            "refusals": self.refusals[:10],
            "bytes checked": self.bytes_checked,
            "snapshots back after restarts": dict(self.across_restarts),
            "invalid after restarts": self.invalid_reasons[:10],
            "losses": len(self.losses),
            "loss details": self.losses[:20],
        }


def run_stress(seed: int, rounds: int, writers: int = 6, size: int = 16 << 20, vss: bool = True, log=print, env: dict | None = None, kinds: tuple = KINDS,
               pace: float = 1.0, processes: int = 1) -> dict:
    work = Path(tempfile.mkdtemp(prefix="fssd-stress-", dir="/dev/shm"))
    try:
        return Stress(work, seed, size, writers, vss, log, env, kinds, pace, processes).run(rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--writers", type=int, default=6)
    ap.add_argument("--size", default="16M", help="volume size (K/M suffix)")
    ap.add_argument("--no-vss", action="store_true", help="no VSS broker (so no broker kills)")
    ap.add_argument("--processes", type=int, default=1, help="volume worker processes serving the volume")
    args = ap.parse_args()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    size = int(args.size[:-1]) * mult[args.size[-1].upper()] if args.size[-1].isalpha() else int(args.size)
    t0 = time.monotonic()
    s = run_stress(args.seed, args.rounds, args.writers, size, not args.no_vss, log=lambda m: print(m, flush=True), processes=args.processes)
    print(f"seed {s['seed']}: {s['rounds']} rounds in {time.monotonic() - t0:.0f} s; kills: "
          + ", ".join(f"{k} {n}" for k, n in sorted(s["kills"].items())))
    print(f"writes answered {s['writes answered']}, unanswered {s['writes unanswered (connection killed)']}, errors {s['write errors']}; "
          f"snapshots taken {s['snapshots taken']} (refused or cut short {s['snapshot configures refused or cut short']}); "
          f"bytes checked {s['bytes checked']} ({s['bytes checked'] >> 20} MiB); losses: {s['losses']}")
    back = s["snapshots back after restarts"]
    print(f"snapshots after supervisor restarts: {back.get('intact', 0)} intact (read back unchanged), {back.get('invalid', 0)} invalid"
          + "".join(f"\n  invalid: {r}" for r in s["invalid after restarts"]))
    for d in s["loss details"]:
        print("  " + d)
    return 1 if s["losses"] else 0


if __name__ == "__main__":
    sys.exit(main())
