"""`make demo`: fssd's main job, end to end, on this machine, in under a minute.

A volume with ext4 (through nbdfuse + a loop mount), a writer application
registered with the VSS broker, an application-consistent snapshot, more
writes, the snapshot mounted read-only: e2fsck clean, files as they were.
Then an incremental backup: a full nbdcopy of that snapshot, more writes, a
second snapshot, and only the extents changed between the two (fssconfig
--changes, the same as the export's qemu:dirty-bitmap context) copied onto
the full backup, which comes out sha256-equal to the second snapshot.
Everything it starts or mounts is undone at the end, also on failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from daemon.waiting import wait_for
from examples.incremental import apply_changes

BIN = Path(sys.executable).parent
STEPS = 16
_step = 0


def step(text: str) -> None:
    global _step
    _step += 1
    print(f"\n[{_step}/{STEPS}] {text}", flush=True)


def sh(*argv, show: bool = False, check: bool = True, **kw) -> str:
    argv = [str(a) for a in argv]
    if show:
        print("    $ " + " ".join(argv), flush=True)
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)
    if check and p.returncode:
        raise SystemExit(f"demo: {' '.join(argv)} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    if show and p.stdout.strip():
        print("      " + p.stdout.strip().replace("\n", "\n      "), flush=True)
    return p.stdout


def nbdfuse(stack: contextlib.ExitStack, uri: str, where: Path, readonly: bool = False) -> Path:
    where.mkdir()
    proc = subprocess.Popen(["nbdfuse", *(["-r"] if readonly else []), str(where), uri], stderr=subprocess.DEVNULL)

    def undo():
        subprocess.run(["fusermount3", "-u", str(where)], capture_output=True)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    stack.callback(undo)
    wait_for(lambda: os.path.ismount(where) and (where / "nbd").exists(), 20, f"nbdfuse at {where}")
    return where / "nbd"


def loop_mount(stack: contextlib.ExitStack, image: Path, where: Path, readonly: bool = False) -> Path:
    where.mkdir(exist_ok=True)
    loop = sh("losetup", "-f", "--show", *(["-r"] if readonly else []), image).strip()
    stack.callback(lambda: subprocess.run(["losetup", "-d", loop], capture_output=True))
    sh("mount", "-o", "ro,noload" if readonly else "rw", loop, where)

    def undo():
        subprocess.run(["fsfreeze", "-u", str(where)], capture_output=True)  # never leave it frozen
        if subprocess.run(["umount", str(where)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)

    stack.callback(undo)
    return where


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]


def sha256_of(argv: list) -> str:
    """sha256 of a command's output, read in pieces."""
    h = hashlib.sha256()
    with subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE) as p:
        while chunk := p.stdout.read(1 << 20):
            h.update(chunk)
    if p.returncode:
        raise SystemExit(f"demo: {' '.join(map(str, argv))} failed ({p.returncode})")
    return h.hexdigest()


def dirty_ranges(nbdinfo_map: list[dict]) -> list[tuple[int, int]]:
    """nbdinfo --map=qemu:dirty-bitmap:... --json as merged (offset, length) of the dirty runs."""
    out: list[tuple[int, int]] = []
    for e in nbdinfo_map:
        if e["type"] & 1:
            if out and out[-1][0] + out[-1][1] == e["offset"]:
                out[-1] = (out[-1][0], out[-1][1] + e["length"])
            else:
                out.append((e["offset"], e["length"]))
    return out


def main() -> int:
    if os.geteuid() != 0:
        print("demo: needs root (loop mounts, FUSE, FIFREEZE)", file=sys.stderr)
        return 1
    t_start = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="fssd-demo-", dir="/dev/shm"))
    run, mnt = base / "run", base / "mnt"
    mnt.mkdir()
    config = base / "fssd.toml"
    config.write_text(
        f'[daemon]\nrundir = "{run}"\nstatedir = "{base}/state"\n\n[[volume]]\nname = "demo"\npath = "{base}/demo.img"\n'
        f'size = "256M"\nmountpoint = "{mnt}"\n\n[vss]\ntimeout = 5\nfreeze_max = 5\n'
    )
    env = {**os.environ, "FSSD_RUNDIR": str(run)}
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: shutil.rmtree(base, ignore_errors=True))

        step(f"start fssd on {config} (volume 'demo', 256 MiB, sparse, in {base})")
        log = open(base / "fssd.log", "wb")
        fssd = subprocess.Popen([str(BIN / "fssd"), "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)

        def stop_fssd():
            if fssd.poll() is None:
                fssd.send_signal(signal.SIGTERM)
                try:
                    fssd.wait(30)
                except subprocess.TimeoutExpired:
                    fssd.kill()
                    fssd.wait()

        stack.callback(stop_fssd)
        wait_for(lambda: subprocess.run([BIN / "fssconfig", "-l"], env=env, capture_output=True).returncode == 0, 30, "fssd")
        sh(BIN / "fssconfig", "--volumes", show=True, env=env)
        uri = f"nbd+unix:///demo?socket={run}/demo.sock"

        step("the volume reaches its users only through NBD: nbdfuse it, make ext4, loop mount")
        live = nbdfuse(stack, uri, base / "fuse-live")
        sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-L", "demo", live, show=True)
        loop_mount(stack, live, mnt)
        print(f"    mounted at {mnt}")

        step("write files on the live file system")
        files = {}
        for i in range(8):
            p = mnt / f"file{i}.bin"
            p.write_bytes(os.urandom(200_000 + 37_000 * i))
            files[p.name] = digest(p)
        sh("sync")
        print("    " + "  ".join(f"{k}:{v[:8]}" for k, v in list(files.items())[:4]) + "  ...")

        step("start a writer application registered with the VSS broker (it flushes and holds on FREEZE)")
        records = mnt / "records.bin"
        writer = subprocess.Popen([sys.executable, "-m", "examples.recordwriter", "-r", str(run), str(records)], stdout=subprocess.PIPE, text=True)

        def stop_writer():
            if writer.poll() is None:
                writer.send_signal(signal.SIGTERM)
                writer.wait(30)

        stack.callback(stop_writer)
        print("    " + writer.stdout.readline().strip())
        wait_for(lambda: records.exists() and records.stat().st_size > 256 * 1024, 20, "the writer")
        sh(BIN / "vssadm", "list", show=True, env=env)

        step("take an application-consistent snapshot: CHECK, FREEZE (apps + FIFREEZE), barrier, THAW")
        sh(BIN / "fssconfig", "-C", "-v", "fss0", "demo", base / "backup", show=True, env=env)

        step("keep writing: overwrite half the files, delete two, add new ones (copy-on-write at work)")
        for i in range(0, 8, 2):
            (mnt / f"file{i}.bin").write_bytes(os.urandom(150_000))
        (mnt / "file1.bin").unlink()
        (mnt / "file3.bin").unlink()
        (mnt / "added.bin").write_bytes(os.urandom(500_000))
        sh("sync")
        size_live = records.stat().st_size
        stop_writer()
        print(f"    live records.bin: {size_live} bytes and growing")
        sh(BIN / "fssconfig", "-l", "-v", "fss0", show=True, env=env)

        step("mount the snapshot read-only from its own NBD export, check it with e2fsck")
        snapfile = nbdfuse(stack, f"nbd+unix:///fss0?socket={run}/fss0.sock", base / "fuse-snap", readonly=True)
        sh("e2fsck", "-fn", snapfile, show=True)
        smnt = loop_mount(stack, snapfile, base / "snap", readonly=True)

        step("the snapshot shows the files as they were at the barrier")
        bad = [n for n, d in files.items() if digest(smnt / n) != d]
        if bad or (smnt / "added.bin").exists():
            raise SystemExit(f"demo: snapshot differs from the barrier image: {bad}")
        print(f"    all {len(files)} files have their old checksums; added.bin is not there; file1/file3 still are")
        sh(sys.executable, "-m", "examples.recordwriter", "--verify", smnt / "records.bin", show=True)

        step("full backup: nbdcopy the whole snapshot fss0 into an image file")
        full = base / "full-backup.img"
        sh("nbdcopy", f"nbd+unix:///fss0?socket={run}/fss0.sock", full, show=True)
        volume_size = full.stat().st_size
        print(f"    {full.name}: {volume_size >> 20} MiB, sha256 {sha256_of(['cat', full])[:16]}")

        step("more writes, then a second snapshot, fss1 (file system suspended around it)")
        for i in range(4):
            (mnt / f"later{i}.bin").write_bytes(os.urandom(300_000))
        (mnt / "file5.bin").write_bytes(os.urandom(100_000))
        sh("sync")
        sh(BIN / "fssconfig", "-v", "fss1", "demo", base / "backup1", show=True, env=env)

        step("what changed between fss0 and fss1: fssconfig --changes, and the export's qemu:dirty-bitmap context")
        listing = json.loads(sh(BIN / "fssconfig", "-l", "--json", env=env))
        base_id = next(x["id"] for x in listing if x.get("device") == "fss0")
        print(f"    fss0's id: {base_id}")
        changes = json.loads(sh(BIN / "fssconfig", "--changes", "fss1", "--since", base_id, "--json", env=env))
        text = sh(BIN / "fssconfig", "--changes", "fss1", "--since", base_id, env=env).splitlines()
        print("    $ fssconfig --changes fss1 --since " + base_id)
        for line in text[:5]:
            print("      " + line)
        if len(text) > 5:
            print(f"      ... ({len(text)} lines)")
        uri1 = f"nbd+unix:///fss1?socket={run}/fss1.sock"
        sh("nbdinfo", "--map=qemu:dirty-bitmap:" + base_id, "--totals", uri1, show=True)
        bitmap = dirty_ranges(json.loads(sh("nbdinfo", "--json", "--map=qemu:dirty-bitmap:" + base_id, uri1)))
        if bitmap != [(c["offset"], c["length"]) for c in changes]:
            raise SystemExit("demo: the dirty-bitmap context and fssconfig --changes disagree")
        print(f"    the same {len(changes)} extent(s) both ways")

        step("incremental backup: copy only the changed extents of fss1 onto the full backup")
        moved = sum(c["length"] for c in changes)
        counted = apply_changes(f"{run}/fss1.sock", "fss1", changes, str(full))
        print(f"    nbdcopy through nbdkit's extentlist filter; the backup image received: {counted}")
        print(f"    moved {moved} bytes ({moved / (1 << 20):.1f} MiB) of a {volume_size >> 20} MiB volume: {100 * moved / volume_size:.1f}%")

        step("the full backup + the incremental is fss1, bit for bit")
        want = sha256_of(["nbdcopy", uri1, "-"])
        got = sha256_of(["cat", full])
        print(f"    sha256 of fss1 (nbdcopy to stdout): {want}")
        print(f"    sha256 of the backup image:         {got}")
        if got != want:
            raise SystemExit("demo: the incremental backup differs from snapshot fss1")
        print("    identical")

        step("each snapshot is its own process")
        children = subprocess.run(["pgrep", "-P", str(fssd.pid)], capture_output=True, text=True).stdout.split()
        pids = [str(fssd.pid), *children]  # this demo's supervisor and its workers only
        sh("ps", "-o", "pid,ppid,etime,args", "-p", ",".join(pids), show=True)

        step("status for scripts: fssd --status (abridged)")
        st = json.loads(sh(BIN / "fssd", "--status", env=env))
        for w in st["workers"]:
            print(f"    {w['name']:<40} pid {w['pid']:<7} restarts {w['restarts']}")
        print(f"    vss: {st['vss']['state']}, freezes {', '.join(st['vss']['freeze_mounts'])}")

        step("stop everything and clean up")
    print(f"\ndemo: done in {time.monotonic() - t_start:.1f} s; nothing left mounted, no fssd running.")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TimeoutError as e:  # a step that never became ready: one line, after the cleanup ran
        sys.exit(f"demo: {e}")
