"""recordwriter: a VSS-aware application that appends checksummed records to a file.

It is what a database does in miniature: writes go through a buffer whose
size is not a multiple of the record size, so between flushes the file can end
in the middle of a record. On FREEZE it flushes, fsyncs and holds; on THAW it
goes on. A snapshot taken inside the freeze window therefore ends on a whole
record. Used by the end-to-end tests and `make demo`.

    python -m examples.recordwriter -r RUNDIR FILE [--name NAME] [--seconds N]
    python -m examples.recordwriter --verify FILE
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import struct
import sys
import time

from ipc import names

RECORD = 64  # u64 sequence, 24 bytes payload, 32 bytes sha256 of the first 32
# Deliberately not a multiple of RECORD: an unflushed buffer leaves a torn tail.
BUFFER = 1000


def make_record(seq: int) -> bytes:
    head = struct.pack("<Q", seq) + os.urandom(24)
    return head + hashlib.sha256(head).digest()


def verify(path: str) -> tuple[int, str]:
    """(whole records, problem or "") for a record file."""
    data = open(path, "rb").read()
    if len(data) % RECORD:
        return len(data) // RECORD, f"torn tail: {len(data) % RECORD} bytes after the last whole record"
    for i in range(0, len(data), RECORD):
        head, digest = data[i : i + 32], data[i + 32 : i + 64]
        if hashlib.sha256(head).digest() != digest or struct.unpack("<Q", head[:8])[0] != i // RECORD:
            return i // RECORD, f"record {i // RECORD} is corrupt"
    return len(data) // RECORD, ""


def run(rundir: str, path: str, name: str, seconds: float | None) -> int:
    from ipc.vss_client import Application

    stop = False

    def on_signal(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    app = Application(rundir, name)
    app.register()
    seq = 0
    if os.path.exists(path):
        seq = verify(path)[0]
    f = open(path, "ab", buffering=BUFFER)
    deadline = None if seconds is None else time.monotonic() + seconds
    holding = False
    print(f"recordwriter: registered as {name}, writing {path}", flush=True)
    try:
        while not stop and (deadline is None or time.monotonic() < deadline):
            req = app.receive(timeout=0.2 if holding else 0)
            if req is not None:
                if req.op == "freeze":
                    f.flush()
                    os.fsync(f.fileno())
                    holding = True
                elif req.op == "thaw":
                    holding = False
                app.answer(req, True)
                continue
            if holding:
                continue
            for _ in range(50):
                f.write(make_record(seq))
                seq += 1
    finally:
        if not holding:
            f.flush()
        f.close()
        app.close()
    print(f"recordwriter: {seq} records", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="recordwriter")
    p.add_argument("file")
    p.add_argument("-r", "--rundir")
    p.add_argument("--name", default="recordwriter")
    p.add_argument("--seconds", type=float)
    p.add_argument("--verify", action="store_true", help="check a record file and exit")
    a = p.parse_args(argv)
    if a.verify:
        n, problem = verify(a.file)
        print(f"{a.file}: {n} whole records" + (f"; {problem}" if problem else ", ends on a whole record"))
        return 1 if problem else 0
    return run(names.resolve_rundir(a.rundir), a.file, a.name, a.seconds)


if __name__ == "__main__":
    sys.exit(main())
