"""A short seeded slice of the fault-injection loop (tests/stress.py; `make stress` runs it longer).

Also shows the check is not blind: the same loop against a copy of fssd with
one guarantee removed on purpose (the copy-before-write; workers dying with
their supervisor) finds the damage.
"""

import os
import shutil
from pathlib import Path

from stress import run_stress

ROOT = Path(__file__).resolve().parent.parent


def test_every_process_kind_killed_under_a_write_storm_loses_nothing():
    s = run_stress(seed=8, rounds=4, writers=4, log=print, kinds=("supervisor", "volume", "snapshot", "broker"))
    assert s["losses"] == 0, s["loss details"]
    assert s["kills"] == {"supervisor": 1, "volume": 1, "snapshot": 1, "broker": 1}
    # (A configure the kill cuts short is not counted; the snapshot round always has one.)
    assert s["writes answered"] > 1000 and s["snapshots taken"] >= 1
    assert s["bytes checked"] >= 4 * (16 << 20)


def _broken_copy(tmp_path: Path, patches: list[tuple[str, str, str]]) -> dict:
    """fssd's packages copied and patched; the environment that runs fssd from the copy."""
    broken = tmp_path / "broken"
    for pkg in ("daemon", "workers", "ipc"):
        shutil.copytree(ROOT / pkg, broken / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, good, bad in patches:
        f = broken / rel
        src = f.read_text()
        assert src.count(good) == 1, (rel, good)
        f.write_text(src.replace(good, bad))
    return {"PYTHONPATH": str(broken) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_the_check_catches_a_volume_worker_without_copy_before_write(tmp_path):
    env = _broken_copy(tmp_path, [(
        "workers/cow.py",
        "                self._protect(offset, length)\n",
        "                pass  # broken on purpose: writes land without copying for the snapshots\n",
    )])
    # A snapshot round: one snapshot is taken before the kill, so there is one to check.
    s = run_stress(seed=8, rounds=1, writers=4, vss=False, env=env, kinds=("snapshot",), log=print)
    assert s["losses"] > 0
    assert any("not as at the snapshot's instant" in d for d in s["loss details"]), s["loss details"]


def test_the_check_catches_workers_that_outlive_their_supervisor(tmp_path):
    """As before issue 8: no PR_SET_PDEATHSIG, end of file on the channel finishes queued
    requests, and no lock keeps a new instance from starting meanwhile."""
    env = _broken_copy(tmp_path, [
        ("workers/launch.py", "    set_parent_death_signal(sig)\n", ""),
        ("workers/spawned.py", '            _supervisor_gone("the supervisor is gone (end of file on its channel)")\n', "            return\n"),
        ("daemon/procs.py", "        held = [] if self.hold_fd is None else [self.hold_fd]\n", "        held = []\n"),
        # ... and an orphan finishes its connections however long that takes, as before.
        ("workers/nbdserve.py", "            t.join(timeout)\n", "            t.join()\n"),
    ])
    s = run_stress(seed=5, rounds=1, writers=4, vss=False, env=env, kinds=("supervisor",), log=print)
    assert "a write queued before the supervisor was killed was executed afterwards" in s["loss details"], s["loss details"]
    assert any(d.startswith("volume block 0: holds") for d in s["loss details"]), s["loss details"]


def test_a_volume_served_by_two_processes_loses_nothing_when_either_is_killed():
    """The same storm with the volume's writes spread over two processes: SIGKILLs of either
    (the other serving on), of a snapshot worker and of the supervisor; every snapshot taken
    meanwhile is as at its instant, the live volume as acknowledged."""
    s = run_stress(seed=3, rounds=4, writers=6, vss=False, kinds=("volume", "snapshot", "supervisor"), processes=2, log=print)
    assert s["losses"] == 0, s["loss details"]
    assert s["kills"]["volume"] >= 1 and s["kills"]["supervisor"] >= 1, s["kills"]
    assert s["writes answered"] > 1000 and s["snapshots taken"] >= 1
