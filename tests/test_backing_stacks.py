"""Second paths to a volume through block-device stacks, on a sysfs-shaped tree.

The machine tests run on has loop devices but neither device-mapper nor
partition scanning, so the dm and partition walks are checked here on a
tree laid out as /sys lays them out (/sys/dev/block/M:m links, dev files,
slaves/ and holders/ links, partition files, loop/backing_file).
"""

import os
import stat
from types import SimpleNamespace

import pytest

from daemon import backing


def blk(maj, mnr):
    return SimpleNamespace(st_mode=stat.S_IFBLK | 0o660, st_rdev=os.makedev(maj, mnr))


@pytest.fixture
def fake_sys(tmp_path, monkeypatch):
    root = tmp_path / "sys"
    byid = root / "dev" / "block"
    byid.mkdir(parents=True)

    def dev(rel, maj, mnr, partition=False):
        d = root / "devices" / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "dev").write_text(f"{maj}:{mnr}\n")
        (d / "slaves").mkdir(exist_ok=True)
        (d / "holders").mkdir(exist_ok=True)
        if partition:
            (d / "partition").write_text("1\n")
        os.symlink(d, byid / f"{maj}:{mnr}")
        return d

    def link(src, kind, dst):
        os.symlink(dst, src / kind / dst.name)

    image = tmp_path / "vol.img"
    image.write_bytes(b"\0" * 4096)
    # A disk with two partitions; dm-0 over the first; loop9 over the image; dm-1 over loop9.
    sdz = dev("pci/block/sdz", 240, 0)
    sdz1 = dev("pci/block/sdz/sdz1", 240, 1, partition=True)
    sdz2 = dev("pci/block/sdz/sdz2", 240, 2, partition=True)
    dm0 = dev("virtual/block/dm-0", 241, 0)
    link(dm0, "slaves", sdz1)
    link(sdz1, "holders", dm0)
    loop9 = dev("virtual/block/loop9", 242, 9)
    (loop9 / "loop").mkdir()
    (loop9 / "loop" / "backing_file").write_text(f"{image}\n")
    dm1 = dev("virtual/block/dm-1", 241, 1)
    link(dm1, "slaves", loop9)
    link(loop9, "holders", dm1)
    monkeypatch.setattr(backing, "SYSFS", str(root))
    return SimpleNamespace(image=image, sdz=sdz, sdz1=sdz1, sdz2=sdz2)


def overlaps(volume_st, store_st):
    return bool(backing.volume_identities(volume_st) & backing.store_identities(None, store_st))


def test_dm_over_a_loop_over_the_image_is_the_image(fake_sys):
    image = os.stat(fake_sys.image)
    assert overlaps(image, blk(242, 9)), "the loop device over the image"
    assert overlaps(image, blk(241, 1)), "a device-mapper device whose slave is that loop"


def test_partitions_and_holders(fake_sys):
    dm0, sdz, sdz1, sdz2 = blk(241, 0), blk(240, 0), blk(240, 1), blk(240, 2)
    assert overlaps(dm0, sdz1), "the partition under a dm volume"
    assert overlaps(dm0, sdz), "the disk that holds it"
    assert overlaps(sdz1, sdz) and overlaps(sdz, sdz1), "a disk and its partition, either way"
    assert overlaps(sdz1, dm0), "a dm device over the volume's partition"
    assert not overlaps(dm0, sdz2), "a sibling partition is a fine store"
    assert not overlaps(sdz1, sdz2)
    assert not overlaps(os.stat(fake_sys.image), sdz)
