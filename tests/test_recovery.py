"""Start-up recovery's decision (daemon/recovery.py) and the state directory (daemon/statedir.py)."""

import os
import stat

import msgspec
import pytest

from daemon import recovery, statedir
from daemon.statedir import FileIdentity, SnapshotRecord, VolumeStamp
from ipc import storeformat as sf

CS = 4096
VSIZE = 20 * CS + 1000  # a partial last cluster
COUNT = 21
TCL = sf.table_clusters(COUNT, CS)
VOL = FileIdentity(2049, 100, "file")
STORE = FileIdentity(2049, 200, "file")
SID = sf.new_id()


def _rec(**kw):
    base = dict(device="fss0", volume="data", volume_path="/img/data", volume_id=VOL, volume_size=VSIZE,
                store_path="/store/fss0", store_id=STORE, cluster_size=CS, limit_clusters=0, flags=0,
                created_ns=1, snapshot_id=SID, durability="power", boot_id="boot-a")
    base.update(kw)
    return SnapshotRecord(**base)


class Store:
    """An in-memory backing store image with two copies in it."""

    def __init__(self, copies=((3, b"x"), (20, b"y"))):
        h = sf.StoreHeader(SID, VOL.dev, VOL.ino, VSIZE, CS, COUNT, TCL, 0, 1)
        self.img = bytearray(TCL * CS)
        self.img[0:512] = sf.encode_header(h)
        self.want = {}
        k = TCL
        for c, fill in copies:
            n = min(CS, VSIZE - c * CS)
            data = fill * n
            self.img += data + bytes(CS - n) if n < CS else data
            self.put_entry(c, k, sf.crc(data))
            self.want[c] = k
            k += 1

    def put_entry(self, c, k, crc):
        off = sf.entry_offset(c)
        self.img[off : off + 8] = sf.encode_entry(k, crc)

    def decide(self, rec=None, volume=None, boot="boot-a", store_id=STORE, size=None):
        img = bytes(self.img)
        return recovery.decide(
            rec or _rec(), img[:512], img[512:1024], img[sf.TABLE_OFFSET : sf.TABLE_OFFSET + 8 * COUNT],
            recovery.StoreFacts(store_id, len(img) if size is None else size),
            volume or recovery.VolumeFacts(VOL, VolumeStamp(VSIZE, 10, 20)), boot, lambda o, n: img[o : o + n])


def _table(res):
    return {c: k for c, k in enumerate(memoryview(res.table).cast("I")) if k}


def test_clean_restart_is_intact_with_the_table():
    s = Store()
    res = s.decide(_rec(clean=True, volume_at_stop=VolumeStamp(VSIZE, 10, 20)))
    assert isinstance(res, recovery.Intact)
    assert _table(res) == s.want and res.copies == 2 and res.bs_next == TCL + 2 and res.verified == 0


def test_process_crash_same_boot_is_intact_without_rereading():
    res = Store().decide(_rec(durability="process"))
    assert isinstance(res, recovery.Intact) and res.verified == 0


def test_host_crash_under_process_is_invalid_with_that_reason():
    res = Store().decide(_rec(durability="process"), boot="boot-b")
    assert res == recovery.Invalid(recovery.HOST_CRASHED + ' (durability "process")')


def test_clean_stop_then_reboot_under_process_is_intact():
    res = Store().decide(_rec(durability="process", clean=True, volume_at_stop=VolumeStamp(VSIZE, 10, 20)), boot="boot-b")
    assert isinstance(res, recovery.Intact)


def test_power_loss_drops_uncommitted_copy_and_keeps_good_ones():
    s = Store()
    k = s.want[20]
    s.img[k * CS : k * CS + 10] = bytes(10)  # the copy's data never reached the disk
    res = s.decide(boot="boot-b")
    assert isinstance(res, recovery.Intact)
    assert _table(res) == {3: s.want[3]} and res.dropped == 1 and res.verified == 2


def test_power_loss_trusts_copies_below_the_watermark():
    s = Store()
    s.img[512:1024] = sf.encode_commit(sf.CommitRecord(1, TCL + 1))  # the first copy was synced
    res = s.decide(boot="boot-b")
    assert isinstance(res, recovery.Intact) and res.verified == 1


def test_power_loss_entry_past_the_end_is_dropped_when_in_doubt():
    s = Store()
    res = s.decide(boot="boot-b", size=len(s.img) - CS + 10)
    assert isinstance(res, recovery.Intact) and _table(res) == {3: s.want[3]}


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(size=TCL * CS + CS), "points past the end of the backing store"),
        (dict(size=CS), "truncated"),
        (dict(store_id=FileIdentity(2049, 999, "file")), "replaced by another file"),
        (dict(store_id=None), "is missing"),
        (dict(volume=recovery.VolumeFacts(FileIdentity(2049, 5, "file"), VolumeStamp(VSIZE, 10, 20))), "volume image /img/data was replaced"),
        (dict(volume=recovery.VolumeFacts(None)), "volume image /img/data is missing"),
        (dict(volume=recovery.VolumeFacts(VOL, VolumeStamp(VSIZE + CS, 10, 20))), "changed size"),
        (dict(rec=_rec(clean=True, volume_at_stop=VolumeStamp(VSIZE, 11, 20))), "written while fssd was not running"),
        (dict(rec=_rec(flags=sf.FLAG_UNLINKED, store_path="")), "unlinked"),
        (dict(rec=_rec(snapshot_id=sf.new_id())), "another snapshot"),
        (dict(rec=_rec(invalid="backing store full")), "backing store full"),
    ],
)
def test_invalid_with_the_right_reason(change, reason):
    res = Store().decide(**change)
    assert isinstance(res, recovery.Invalid), res
    assert reason in res.reason


def test_corrupted_header_is_invalid():
    s = Store()
    s.img[40] ^= 1
    res = s.decide()
    assert isinstance(res, recovery.Invalid) and "checksum" in res.reason


def test_duplicate_and_out_of_store_entries_are_invalid():
    s = Store()
    s.put_entry(5, s.want[3], 0)
    assert "two table entries" in s.decide().reason
    s = Store()
    s.put_entry(5, 1, 0)  # inside the table area
    assert "outside the store" in s.decide().reason


def test_block_device_volume_cannot_detect_writes_while_stopped():
    """Documented limit: a block device's node does not change when the device is written."""
    blk = FileIdentity(VOL.dev, VOL.ino, "block")
    res = Store().decide(_rec(volume_id=blk, clean=True, volume_at_stop=VolumeStamp(VSIZE, 10, 20)),
                         volume=recovery.VolumeFacts(blk, VolumeStamp(VSIZE, 99, 99)))
    assert isinstance(res, recovery.Intact)


# -- gather(): the same decision from real files --------------------------------------------


def test_gather_reads_real_files(tmp_path):
    vol = tmp_path / "vol"
    vol.write_bytes(bytes(VSIZE))
    st = os.stat(vol)
    store = tmp_path / "store"
    s = Store()
    h = sf.StoreHeader(SID, st.st_dev, st.st_ino, VSIZE, CS, COUNT, TCL, 0, 1)
    s.img[0:512] = sf.encode_header(h)
    store.write_bytes(bytes(s.img))
    rec = _rec(volume_path=str(vol), volume_id=statedir.identity(st), store_path=str(store),
               store_id=statedir.identity(os.stat(store)), clean=True, volume_at_stop=statedir.volume_stamp(st))
    def gather():
        fd = recovery.open_store(rec)
        try:
            return recovery.gather(rec, "boot-a", fd)
        finally:
            if fd >= 0:
                os.close(fd)

    res = gather()
    assert isinstance(res, recovery.Intact) and _table(res) == s.want
    os.truncate(vol, VSIZE)  # same size, but the file was written: mtime/ctime moved
    os.utime(vol, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert "written while fssd was not running" in gather().reason
    os.unlink(store)
    os.symlink(str(vol), store)  # never followed
    assert "is missing" in gather().reason
    os.unlink(store)
    os.mkfifo(store)  # a FIFO put in its place: never waited on, never read
    assert "replaced by another file" in gather().reason


# -- the state directory ---------------------------------------------------------------------


def test_statedir_round_trip_and_modes(tmp_path):
    d = statedir.StateDir(str(tmp_path / "state"))
    d.open()
    assert stat.S_IMODE(os.stat(d.path).st_mode) == 0o700
    rec = _rec()
    d.save(rec)
    d.save(msgspec.structs.replace(rec, clean=True))
    recs, bad = d.load()
    assert recs == [msgspec.structs.replace(rec, clean=True)] and bad == []
    assert sorted(os.listdir(d.snapdir)) == ["fss0.json"]
    d.remove("fss0")
    assert d.load() == ([], [])


def test_statedir_ignores_a_half_write_and_reports_garbage(tmp_path):
    d = statedir.StateDir(str(tmp_path / "state"))
    d.open()
    d.save(_rec())
    (tmp_path / "state" / "snapshots" / "fss1.json.new").write_bytes(b'{"dev')  # killed before its rename
    (tmp_path / "state" / "snapshots" / "fss2.json").write_bytes(b"not json")
    (tmp_path / "state" / "snapshots" / "fss3.json").write_bytes(msgspec.json.encode(_rec()))  # says fss0
    recs, bad = d.load()
    assert [r.device for r in recs] == ["fss0"]
    assert len(bad) == 2 and all("not a snapshot record" in b for b in bad)
    assert not (tmp_path / "state" / "snapshots" / "fss1.json.new").exists()


def test_statedir_refuses_a_group_writable_directory(tmp_path):
    p = tmp_path / "state"
    p.mkdir(mode=0o700)
    os.chmod(p, 0o770)
    with pytest.raises(statedir.StateDirError, match="writable by it alone"):
        statedir.StateDir(str(p)).open()


def test_boot_id_is_read():
    assert len(statedir.current_boot_id()) == 36


def test_a_store_flagged_invalid_never_comes_back_valid():
    s = Store()
    h = sf.decode_header(bytes(s.img[:512]))
    import msgspec

    s.img[:512] = sf.encode_header(msgspec.structs.replace(h, flags=sf.FLAG_INVALID))
    res = s.decide(_rec(clean=True, volume_at_stop=VolumeStamp(VSIZE, 10, 20)))
    assert isinstance(res, recovery.Invalid) and "already invalid" in res.reason
