"""An incremental backup with standard tools: copy a snapshot's changed extents onto a full backup.

    python -m examples.incremental SOCKET EXPORT CHANGES.json BACKUP.img

CHANGES.json is what `fssconfig --changes fssN --since ID --json` prints (a list
of {"offset", "length"} in bytes). nbdcopy reads the snapshot through nbdkit's
nbd plugin with the extentlist filter, which reports the changed extents as
data and everything else as holes; `--destination-is-zero` makes nbdcopy skip
the holes, and `-S 0` keeps it from skipping changed blocks that happen to be
zeros. The backup image is written through nbdkit's file plugin (nbdcopy would
truncate a plain file destination) with the stats filter counting the bytes
that really moved. Unchanged blocks of the backup are never touched, so it
must be the full backup of the base snapshot (or a backup brought up to it).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# nbdcopy's request size: one granule, so nothing unchanged is copied along.
REQUEST = 64 * 1024


def extent_list(changes: list[dict]) -> str:
    """nbdkit-extentlist-filter's format: one "offset length" line per changed extent (gaps are holes)."""
    return "".join(f"{c['offset']} {c['length']}\n" for c in changes)


def apply_changes(socket_path: str, export: str, changes: list[dict], backup: str, count: bool = True) -> str:
    """Copy the snapshot's changed extents onto `backup` in place; with `count`, nbdkit's
    account of the writes the backup received ("write: N ops, ... 3.19 MiB ...")."""
    with tempfile.TemporaryDirectory(prefix="fssd-incremental-") as tmp:
        extents = Path(tmp) / "changed.txt"
        extents.write_text(extent_list(changes))
        stats = Path(tmp) / "stats.txt"
        argv = [
            "nbdcopy", "-S", "0", "--destination-is-zero", f"--request-size={REQUEST}", "--",
            "[", "nbdkit", "-r", "--filter=extentlist", "nbd", f"socket={socket_path}", f"export={export}", f"extentlist={extents}", "]",
            "[", "nbdkit", *(["--filter=stats"] if count else []), "file", backup, *([f"statsfile={stats}"] if count else []), "]",
        ]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        if p.returncode:
            raise RuntimeError(f"nbdcopy failed ({p.returncode}): {p.stderr.strip()}")
        text = stats.read_text() if count and stats.exists() else ""
        m = re.search(r"^write: .*$", text, re.M)
        return m.group(0) if m else "write: 0 ops"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 4:
        print(__doc__.splitlines()[2].strip(), file=sys.stderr)
        return 2
    sock, export, changes, backup = args
    print(f"{backup}: {apply_changes(sock, export, json.loads(Path(changes).read_text()), backup)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
