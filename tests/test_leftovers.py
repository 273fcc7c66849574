"""What a killed instance left (daemon/leftovers.py): removed, except the stores of snapshots that come back."""

import os
import socket

from daemon import leftovers


def _sock(path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


def test_removes_what_it_made_but_keeps_stores_the_state_directory_knows(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    kept, lost, other = tmp_path / "kept", tmp_path / "lost", tmp_path / "other"
    for p in (kept, lost, other):
        p.write_bytes(b"x")
    _sock(run / "fss0.sock")
    leftovers.save(str(run), [(str(kept), "store"), (str(lost), "store"), (str(other), "store"), (str(run / "fss0.sock"), "socket")])
    (tmp_path / "new").write_bytes(b"a file a user put there since")
    os.rename(tmp_path / "new", other)  # same name, another file: never touched
    st = os.stat(kept)
    removed = leftovers.remove(str(run), keep=frozenset({(st.st_dev, st.st_ino)}))
    assert sorted(removed) == sorted([str(lost), str(run / "fss0.sock")])
    assert kept.exists() and other.exists() and not lost.exists()
    # The log names only what was removed.
    logged = [r.getMessage() for r in caplog.records]
    assert not any(str(kept) in m or str(other) in m for m in logged)
    assert not (run / leftovers.RECORD).exists()
