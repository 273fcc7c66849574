"""Power loss under durability = "power": the real copy-on-write path over recorded files.

Three snapshots (two sharing the one-read path, one with another cluster size)
are attached to a real VolumeBackend; writer threads storm the volume while a
Recorder logs every write and sync the volume and the stores receive, in issue
order. Then many crash states are built (everything a completed sync covered,
plus a random subset of the sectors written since, up to a cut) and recovery
(daemon/recovery.decide) runs on each, as after a reboot. The property: each
snapshot is bit-identical to its image at the barrier, or invalid with a reason.
The same check is then run with the stores' group-commit sync switched off, and
must find wrong snapshots: the check can fail.
"""

from __future__ import annotations

import os
import random
import threading

import pytest

from daemon import recovery, statedir
from daemon.statedir import SnapshotRecord
from ipc import storeformat as sf
from ipc.clustermap import ClusterMap
from tests.crashstates import Recorder, crash_state, cuts
from workers.cow import SnapshotTarget
from workers.storejournal import StoreJournal
from workers.volume import VolumeBackend

VSIZE = 96 * 4096 + 1536  # a partial last cluster
SNAPS = [4096, 4096, 8192]  # cluster sizes
WRITERS = 6
WRITES = 40


class Rig:
    def __init__(self, tmp, durability=sf.Durability.POWER, seed=1):
        rng = random.Random(seed)
        self.vol_path = os.path.join(tmp, "vol")
        with open(self.vol_path, "wb") as f:
            f.write(rng.randbytes(VSIZE))
        self.vfd = os.open(self.vol_path, os.O_RDWR)
        vst = os.fstat(self.vfd)
        self.backend = VolumeBackend(self.vfd, VSIZE)
        self.snaps = []
        for i, cs in enumerate(SNAPS):
            path = os.path.join(tmp, f"store{i}")
            bfd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            count = -(-VSIZE // cs)
            tcl = sf.table_clusters(count, cs)
            sid = sf.new_id()
            h = sf.StoreHeader(sid, vst.st_dev, vst.st_ino, VSIZE, cs, count, tcl, 0, 1, durability)
            os.pwrite(bfd, bytes(tcl * cs), 0)
            os.pwrite(bfd, sf.encode_header(h), 0)
            os.fsync(bfd)
            name = f"/fssd.test{os.getpid()}.pl{i}"
            ClusterMap.unlink(name)
            cmap = ClusterMap.create(name, cs, VSIZE, 0)
            assert cmap.table_clusters == tcl
            target = SnapshotTarget(f"fss{i}", cmap, bfd, self.vfd, StoreJournal(bfd, durability, tcl))
            self.backend.attach(target)
            rec = SnapshotRecord(
                device=f"fss{i}", volume="vol", volume_path=self.vol_path, volume_id=statedir.identity(vst), volume_size=VSIZE,
                store_path=path, store_id=statedir.identity(os.fstat(bfd)), cluster_size=cs, limit_clusters=0, flags=0,
                created_ns=1, snapshot_id=sid, durability=sf.Durability(durability).name.lower(), boot_id="before",
            )
            self.snaps.append((bfd, cmap, rec))
        os.fsync(self.vfd)
        with open(self.vol_path, "rb") as f:
            self.at_barrier = f.read()

    def base(self) -> dict[str, bytes]:
        out = {"vol": self.at_barrier}
        for i, (bfd, _m, _r) in enumerate(self.snaps):
            out[f"store{i}"] = os.pread(bfd, 1 << 24, 0)
        return out

    def storm(self, seed: int) -> None:
        def writer(n):
            rng = random.Random(seed * 100 + n)
            for j in range(WRITES):
                off = rng.randrange(0, VSIZE - 512) // 512 * 512
                length = min(rng.choice([512, 4096, 6000, 12288]), VSIZE - off)
                self.backend.write(off, memoryview(rng.randbytes(length)), fua=False)
                if j % 17 == 16:
                    self.backend.flush()

        ts = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)

    def close(self):
        for bfd, cmap, _r in self.snaps:
            name = cmap.name
            cmap.close()
            ClusterMap.unlink(name)
            os.close(bfd)
        os.close(self.vfd)


def snapshot_image(res: recovery.Intact, vol: bytes, store: bytes, cs: int) -> bytes:
    out = bytearray(vol[:VSIZE])
    for c, k in enumerate(memoryview(res.table).cast("I")):
        if k:
            n = min(cs, VSIZE - c * cs)
            out[c * cs : c * cs + n] = store[k * cs : k * cs + n]
    return bytes(out)


def check(rig: Rig, events, base, n_cuts=120, subsets=3, seed=7) -> dict[str, int]:
    rng = random.Random(seed)
    counts = {"states": 0, "intact": 0, "invalid": 0, "wrong": 0, "dropped": 0}
    for cut in cuts(events, n_cuts, rng):
        for _ in range(subsets):
            imgs = crash_state(events, base, cut, rng)
            counts["states"] += 1
            vol = bytes(imgs["vol"])
            for i, (_bfd, _m, rec) in enumerate(rig.snaps):
                store = bytes(imgs[f"store{i}"])
                cs = rec.cluster_size
                res = recovery.decide(
                    rec, store[:512], store[512:1024], store[sf.TABLE_OFFSET : sf.TABLE_OFFSET + sf.table_bytes(-(-VSIZE // cs))],
                    recovery.StoreFacts(rec.store_id, len(store)), recovery.VolumeFacts(rec.volume_id, statedir.VolumeStamp(len(vol), 0, 0)),
                    "after-reboot", lambda o, n, s=store: s[o : o + n],
                )
                if isinstance(res, recovery.Invalid):
                    assert res.reason
                    counts["invalid"] += 1
                elif snapshot_image(res, vol, store, cs) == rig.at_barrier:
                    counts["intact"] += 1
                    counts["dropped"] += res.dropped
                else:
                    counts["wrong"] += 1
    return counts


def _run(tmp_path, skip_sync):
    rig = Rig(str(tmp_path))
    try:
        base = rig.base()
        files = {rig.vfd: "vol", **{bfd: f"store{i}" for i, (bfd, _m, _r) in enumerate(rig.snaps)}}
        with Recorder(files, skip_sync=skip_sync) as rec:
            rig.storm(seed=3)
        return rig, rec.events, base
    except BaseException:
        rig.close()
        raise


def test_power_every_crash_state_is_intact_or_invalid(tmp_path, capsys):
    rig, events, base = _run(tmp_path, frozenset())
    try:
        syncs = sum(1 for e in events if e.kind == "sync" and e.file != "vol")
        copies = sum(m.copies for _b, m, _r in rig.snaps)
        assert copies > 50 and syncs > 0
        # Group commit: fewer store syncs than committed copy runs.
        commits = sum(t.journal.group.commits for t in rig.backend.targets)
        assert syncs < commits
        counts = check(rig, events, base)
        with capsys.disabled():
            print(f"\npower loss, group commit on: {counts} over {len(events)} recorded writes/syncs, "
                  f"{copies} copies, {commits} commits in {syncs} store syncs")
        assert counts["wrong"] == 0, counts
        assert counts["intact"] > 0 and counts["dropped"] > 0  # states in mid-commit were reached
    finally:
        rig.close()


def test_without_the_group_commit_sync_the_check_finds_wrong_snapshots(tmp_path, capsys):
    rig, events, base = _run(tmp_path, frozenset(f"store{i}" for i in range(len(SNAPS))))
    try:
        counts = check(rig, events, base)
        with capsys.disabled():
            print(f"\npower loss, store syncs switched off: {counts}")
        assert counts["wrong"] > 0, counts
    finally:
        rig.close()
