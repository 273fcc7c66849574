"""The backing store's header, commit record and table entries (ipc/storeformat.py)."""

import pytest

from ipc import storeformat as sf


def _hdr(**kw):
    base = dict(snapshot_id=sf.new_id(), volume_dev=2049, volume_ino=12, volume_size=10 * 65536 + 512,
                cluster_size=65536, cluster_count=11, table_clusters=sf.table_clusters(11, 65536),
                limit_clusters=0, created_ns=1_700_000_000_000_000_000)
    base.update(kw)
    return sf.StoreHeader(**base)


def test_header_round_trip_is_one_sector():
    h = _hdr(flags=sf.FLAG_UNLINKED, durability=sf.Durability.PROCESS, limit_clusters=40)
    raw = sf.encode_header(h)
    assert len(raw) == sf.SECTOR
    assert sf.decode_header(raw) == h


@pytest.mark.parametrize("pos", [0, 9, 40, 100, 300, sf.SECTOR - 1])
def test_any_flipped_byte_is_detected(pos):
    raw = bytearray(sf.encode_header(_hdr()))
    raw[pos] ^= 0x40
    with pytest.raises(sf.StoreFormatError):
        sf.decode_header(bytes(raw))


def test_torn_header_names_the_checksum():
    good = sf.encode_header(_hdr())
    other = sf.encode_header(_hdr(created_ns=5))
    torn = good[:256] + other[256:]  # half of one write, half of another
    with pytest.raises(sf.StoreFormatError, match="checksum"):
        sf.decode_header(torn)


def test_not_a_store_and_short():
    with pytest.raises(sf.StoreFormatError, match="magic"):
        sf.decode_header(bytes(512))
    with pytest.raises(sf.StoreFormatError, match="short"):
        sf.decode_header(sf.encode_header(_hdr())[:100])


def test_inconsistent_geometry_refused_even_with_a_good_crc():
    with pytest.raises(sf.StoreFormatError, match="geometry"):
        sf.decode_header(sf.encode_header(_hdr(cluster_count=12)))
    with pytest.raises(sf.StoreFormatError, match="power of two"):
        sf.decode_header(sf.encode_header(_hdr(cluster_size=3000)))


def test_table_clusters_leave_room_for_header_page_and_entries():
    for count, cs in [(1, 512), (11, 65536), (1 << 24, 65536), (1000, 4096)]:
        tcl = sf.table_clusters(count, cs)
        assert tcl * cs >= sf.TABLE_OFFSET + sf.ENTRY_SIZE * count
        assert (tcl - 1) * cs < sf.TABLE_OFFSET + sf.ENTRY_SIZE * count


def test_commit_record_round_trip_and_torn():
    raw = sf.encode_commit(sf.CommitRecord(7, 1234))
    assert sf.decode_commit(raw) == sf.CommitRecord(7, 1234)
    with pytest.raises(sf.StoreFormatError):
        sf.decode_commit(raw[:200] + bytes(312))


def test_iter_entries_finds_sparse_entries():
    count = 50_000
    table = bytearray(sf.table_bytes(count))
    want = [(0, 5, 11), (8191, 6, 12), (8192, 7, 13), (count - 1, 8, 0xFFFFFFFF)]
    for c, k, crc in want:
        off = sf.entry_offset(c) - sf.TABLE_OFFSET
        table[off : off + 8] = sf.encode_entry(k, crc)
    assert list(sf.iter_entries(bytes(table))) == want
