"""Snapshots across supervisor kills (issue 11): the fault-injection loop of tests/stress.py,
SIGKILLing the supervisor alone (workers orphaned, then gone) or every fssd process at once,
30 rounds, at random moments of a write storm, snapshots being taken meanwhile.

After each restart every snapshot taken before must be back: reading exactly what it read
before (or, at its first read, what the model allows at its barrier), or invalid with a
reason. `make stress` runs the full loop (every process kind) longer.
"""

import time

from test_stress_storm import _broken_copy

from stress import run_stress


def test_snapshots_come_back_intact_after_30_kills_of_fssd():
    t0 = time.monotonic()
    s = run_stress(seed=11, rounds=30, writers=1, size=4 << 20, vss=False, kinds=("supervisor", "all"), pace=0.2, log=print)
    back = s["snapshots back after restarts"]
    print(f"30 rounds in {time.monotonic() - t0:.0f} s: kills {s['kills']}; snapshots back after the restarts: "
          f"{back.get('intact', 0)} intact, {back.get('invalid', 0)} invalid {s['invalid after restarts']}; "
          f"{s['snapshots taken']} taken, {s['writes answered']} writes answered, {s['bytes checked'] >> 20} MiB checked")
    assert s["losses"] == 0, s["loss details"]
    assert s["kills"] == {"supervisor": 15, "all": 15}
    assert back.get("intact", 0) >= 30  # at least one snapshot carried through every restart


def test_the_check_catches_copies_whose_table_entries_never_reach_the_store(tmp_path):
    """Broken on purpose: the volume worker copies but never writes the table entries, so a
    restarted fssd rebuilds a map that misses copies and reads the overwritten volume."""
    env = _broken_copy(tmp_path, [(
        "workers/storejournal.py",
        "        if not self.keeps:\n            return\n        raw =",
        "        return\n        raw =",
    )])
    s = run_stress(seed=11, rounds=2, writers=2, size=4 << 20, vss=False, env=env, kinds=("supervisor",), pace=0.2, log=print)
    assert s["losses"] > 0
    assert any("changed after it was taken" in d or "not as at the snapshot's instant" in d for d in s["loss details"]), s["loss details"]
