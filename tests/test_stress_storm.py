"""A short seeded slice of the fault-injection loop (tests/stress.py; `make stress` runs it longer).

Also shows the check is not blind: the same loop against a copy of fssd whose
volume worker skips the copy-before-write finds the snapshot changed.
"""

import os
import shutil
from pathlib import Path

from stress import run_stress

ROOT = Path(__file__).resolve().parent.parent


def test_every_process_kind_killed_under_a_write_storm_loses_nothing():
    s = run_stress(seed=8, rounds=4, writers=4, log=print)
    assert s["losses"] == 0, s["loss details"]
    assert s["kills"] == {"supervisor": 1, "volume": 1, "snapshot": 1, "broker": 1}
    assert s["writes answered"] > 1000 and s["snapshots taken"] >= 2
    assert s["bytes checked"] >= 4 * (16 << 20)


def test_the_check_catches_a_volume_worker_without_copy_before_write(tmp_path):
    broken = tmp_path / "broken"
    for pkg in ("daemon", "workers", "ipc"):
        shutil.copytree(ROOT / pkg, broken / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    vol = broken / "workers" / "volume.py"
    src = vol.read_text()
    good = "            if self.targets:\n                self._protect(offset, len(data))\n"
    assert src.count(good) == 1
    vol.write_text(src.replace(good, "            pass  # broken on purpose: writes land without copying for the snapshots\n"))
    env = {"PYTHONPATH": str(broken) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    s = run_stress(seed=8, rounds=1, writers=4, vss=False, env=env, kinds=("volume",), log=print)
    assert s["losses"] > 0
    assert any("not as at the snapshot's instant" in d for d in s["loss details"]), s["loss details"]
