import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fsshelp import Fssd, Mounts  # noqa: E402
from secusers import Users  # noqa: E402
from vsshelp import ext4_mount  # noqa: E402

# Volumes and backing stores live in /dev/shm where the data path is fast;
# every test has its own directory there.
SHM = Path("/dev/shm")


@pytest.fixture
def shmdir(tmp_path_factory, request):
    d = Path(tmp_path_factory.mktemp("fssd", numbered=True))
    fast = SHM / f"fssd-test-{os.getpid()}-{d.name}"
    fast.mkdir()
    yield fast
    for p in sorted(fast.rglob("*"), reverse=True):
        if p.is_dir() and not p.is_symlink():
            p.rmdir()
        else:
            p.unlink()
    fast.rmdir()


@pytest.fixture
def mounts():
    m = Mounts()
    yield m
    m.cleanup()


@pytest.fixture
def fssd_factory(tmp_path):
    """Make (and always tear down) fssd instances: fssd_factory(volumes=[...], vss={...})."""
    made: list[Fssd] = []

    def make(volumes, vss=None, devices=4, extra="", start=True, env=None, base=None):
        f = Fssd((base or tmp_path) / f"i{len(made)}", volumes, vss, devices, extra)
        f.tmp.mkdir(parents=True, exist_ok=True)
        made.append(f)
        if start:
            f.start(env=env)
        return f

    yield make
    for f in made:
        try:
            f.stop(timeout=30)
        finally:
            f.kill_everything()


@pytest.fixture
def fssd(fssd_factory, shmdir):
    """One instance with a 64 MiB volume `data` in /dev/shm."""
    return fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "64M"}])


@pytest.fixture(scope="session")
def users():
    """A group, a member of it and a stranger (tests/secusers.py), made once, removed in all cases."""
    u = Users()
    try:
        yield u.create()
    finally:
        u.remove()


@pytest.fixture
def ext4(tmp_path):
    """A loop-mounted ext4 of the test's own, the only mount a VSS test may freeze (its path)."""
    with ext4_mount(tmp_path) as mnt:
        yield mnt
