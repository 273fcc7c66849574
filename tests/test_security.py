"""Least privilege (issue 9, breaks 4-8; issue 8, items 4-5; issue 10, item 5).

Run as root, as a member of [daemon] group and as a stranger (users made here
and removed afterwards). Every refusal is a clear line, and what it refused
to touch is hashed before and after.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
import subprocess
from pathlib import Path

import pytest

from fsshelp import BIN, run, sha256_file, wait_for

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _umask():
    """Directories the tests make must be searchable by the other uids whatever CI's umask is."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def state(path) -> tuple:
    """What must not change: contents, mode, owner."""
    st = os.stat(path)
    return (sha256_file(path, 1 << 20), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size)


def mode_owner(path) -> tuple[int, str, str]:
    st = os.lstat(path)
    return stat.S_IMODE(st.st_mode), pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name


def in_use(f) -> list[str]:
    return [s["device"] for s in json.loads(f.fssconfig("-l", "--json").stdout) if s["in_use"]]


@pytest.fixture
def grouped(fssd_factory, shmdir, users):
    """fssd with [daemon] group = the test group, run directory reachable by other uids."""
    return fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "16M"}], extra=f'group = "{users.group}"', base=shmdir)


# -- the permission model ------------------------------------------------------------------


def test_permission_model_with_a_group(grouped, shmdir, users):
    f = grouped
    g = users.group
    assert mode_owner(f.rundir) == (0o750, "root", g)
    assert mode_owner(f.rundir / "control.sock") == (0o660, "root", g)
    assert mode_owner(f.sock("data")) == (0o600, "root", "root"), "the live volume is root's alone"

    # A member lists and configures with a store of their own; the snapshot export is theirs to read.
    home = users.home(shmdir, users.member)
    r = users.fssconfig(users.member, "-r", f.rundir, "fss0", "data", home / "bs0")
    assert r.returncode == 0, r.stderr
    assert mode_owner(f.sock("fss0")) == (0o660, "root", g)
    assert mode_owner(home / "bs0")[1] == users.member, "the member's store is the member's file"
    r = users.fssconfig(users.member, "-r", f.rundir, "-l")
    assert r.returncode == 0 and "fss0: data" in r.stdout
    r = users.run(users.member, "nbdinfo", "--size", f.uri("fss0"))
    assert r.returncode == 0 and r.stdout.strip() == str(16 * MiB), r.stderr
    r = users.run(users.member, "nbdinfo", "--size", f.uri("data"))
    assert r.returncode != 0, "a member can't reach the live volume"

    # A stranger can't reach the control socket or any export; nothing of theirs is created.
    shome = users.home(shmdir, users.stranger)
    for args in (("-l",), ("fss1", "data", shome / "bs1"), ("-u", "fss0")):
        r = users.fssconfig(users.stranger, "-r", f.rundir, *args)
        assert r.returncode == 1 and r.stderr.strip() == f"fssconfig: {f.rundir}/control.sock: Permission denied", r.stderr
    assert list(shome.iterdir()) == []
    r = users.run(users.stranger, "nbdinfo", "--size", f.uri("fss0"))
    assert r.returncode != 0

    # The member unconfigures; the file fssconfig made for them goes with it.
    r = users.fssconfig(users.member, "-r", f.rundir, "-u", "fss0")
    assert r.returncode == 0, r.stderr
    assert not (home / "bs0").exists()
    assert in_use(f) == []


def test_permission_model_without_a_group(fssd_factory, shmdir, users):
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "16M"}], base=shmdir)
    f.fssconfig("fss0", "data", shmdir / "bs0")
    assert mode_owner(f.rundir) == (0o700, "root", "root")
    for sock in ("control.sock", "data.sock", "fss0.sock"):
        assert mode_owner(f.rundir / sock) == (0o600, "root", "root"), sock
    r = users.fssconfig(users.member, "-r", f.rundir, "-l")
    assert r.returncode == 1 and "Permission denied" in r.stderr


# -- break 5: the run directory ---------------------------------------------------------------


def test_untrusted_run_directory_is_refused(fssd_factory, shmdir, users):
    victim = shmdir / "victim"
    victim.write_bytes(b"root's secret\n")
    victim.chmod(0o600)
    before = state(victim)
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "16M"}], start=False, base=shmdir)
    uid = users.uid(users.stranger)

    def fssd_with(rundir: Path) -> subprocess.CompletedProcess:
        return run(BIN / "fssd", "-c", f.config, "-r", rundir, check=False, timeout=30)

    # The stranger's own directory, fssd.pid a symlink to root's file.
    att = shmdir / "att"
    att.mkdir()
    os.symlink(victim, att / "fssd.pid")
    os.lchown(att / "fssd.pid", uid, -1)
    os.chown(att, uid, -1)
    r = fssd_with(att)
    assert r.returncode == 2 and r.stderr.strip() == f"fssd: refusing run directory {att}: {att} is owned by uid {uid}, not root", r.stderr
    # Root's directory, but inside one the stranger owns (they could swap it).
    (att / "run").mkdir()
    r = fssd_with(att / "run")
    assert r.returncode == 2 and f"{att} is owned by uid {uid}, not root" in r.stderr
    # Root's, but writable by others.
    wide = shmdir / "wide"
    wide.mkdir()
    wide.chmod(0o777)
    r = fssd_with(wide)
    assert r.returncode == 2 and r.stderr.strip() == f"fssd: refusing run directory {wide}: {wide} is writable by others (mode 0777)"
    # Root's and trusted, but fssd.pid a symlink: never followed.
    safe = shmdir / "safe"
    safe.mkdir()
    os.symlink(victim, safe / "fssd.pid")
    r = fssd_with(safe)
    assert r.returncode == 2 and r.stderr.strip() == f"fssd: {safe}/fssd.pid: Too many levels of symbolic links", r.stderr
    assert state(victim) == before
    assert not (att / "control.sock").exists() and not (wide / "control.sock").exists()
    assert stat.S_IMODE(os.stat(wide).st_mode) == 0o777, "a refused directory is left as it was"


# -- breaks 6-8: backing stores ---------------------------------------------------------------


@pytest.fixture
def loops():
    made = []

    def attach(path, *opts):
        dev = run("losetup", "-f", "--show", *opts, path).stdout.strip()
        made.append(dev)
        return dev

    yield attach
    for dev in reversed(made):
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def test_store_symlink_is_not_followed(grouped, shmdir, users):
    """Break 6: a symlink at the store path, to a root-owned file, as root and as a member."""
    f = grouped
    target = shmdir / "rootfile"
    target.write_bytes(os.urandom(200_000))
    target.chmod(0o600)
    before = state(target)
    home = users.home(shmdir, users.member)
    link = home / "bs"
    os.symlink(target, link)
    os.lchown(link, users.uid(users.member), -1)
    r = f.fssconfig("fss0", "data", link, check=False)
    assert r.returncode == 1 and r.stderr.strip() == f"fssconfig: {link}: is a symbolic link; give the backing store's own path"
    r = users.fssconfig(users.member, "-r", f.rundir, "fss0", "data", link)
    assert r.returncode == 1 and "is a symbolic link" in r.stderr
    assert state(target) == before and in_use(f) == []


def test_member_cannot_make_root_overwrite_files_or_devices(grouped, shmdir, users, loops):
    """Break 7: the member's fssconfig opens the store with the member's rights."""
    f = grouped
    secret = shmdir / "secret"
    secret.write_bytes(os.urandom(100_000))
    secret.chmod(0o600)
    devimg = shmdir / "dev.img"
    devimg.write_bytes(os.urandom(4 * MiB))
    dev = loops(devimg)
    before = (state(secret), state(devimg))
    r = users.fssconfig(users.member, "-r", f.rundir, "fss0", "data", secret)
    assert r.returncode == 1 and r.stderr.strip() == f"fssconfig: {secret}: owned by uid 0, not by you; refusing to overwrite another user's file"
    r = users.fssconfig(users.member, "-r", f.rundir, "fss0", "data", dev)
    assert r.returncode == 1 and r.stderr.strip() == f"fssconfig: {dev}: backing store not writable: Permission denied"
    # Root, too, keeps off a file that is not root's (it could be someone's trap).
    home = users.home(shmdir, users.member)
    theirs = home / "theirs"
    theirs.write_bytes(b"x" * 1000)
    os.chown(theirs, users.uid(users.member), -1)
    r = f.fssconfig("fss0", "data", theirs, check=False)
    assert r.returncode == 1 and "not by you; refusing to overwrite another user's file" in r.stderr
    assert (state(secret), state(devimg)) == before and theirs.read_bytes() == b"x" * 1000
    assert in_use(f) == []


def test_loop_device_over_a_volume_image_is_refused(grouped, shmdir, loops):
    """Break 8: a loop device over the volume's image, and a loop over that loop."""
    f = grouped
    run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 2M", f.uri("data"))
    before = state(shmdir / "data.img")
    first = loops(shmdir / "data.img")
    second = loops(first)
    for dev in (first, second):
        r = f.fssconfig("fss0", "data", dev, check=False)
        assert r.returncode == 1 and "is the image of volume data (through the devices it is made of); refusing to use it as a backing store" in r.stderr, r.stderr
    assert state(shmdir / "data.img") == before and in_use(f) == []
    run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x3c 0 2M", f.uri("data"))
    # A loop device over another snapshot's store is that store.
    f.fssconfig("fss0", "data", shmdir / "bs0")
    r = f.fssconfig("fss1", "data", loops(shmdir / "bs0"), check=False)
    assert r.returncode == 1 and "is the backing store of fss0" in r.stderr


def test_store_on_the_volumes_own_nbdfuse_export_is_refused(grouped, shmdir, mounts, loops):
    """The export seen through nbdfuse: a store there would copy into itself."""
    f = grouped
    before = state(shmdir / "data.img")
    exported = mounts.nbdfuse(f.uri("data"), shmdir / "fuse")
    r = f.fssconfig("fss0", "data", exported, check=False)
    assert r.returncode == 1 and f"backing store on a FUSE file system ({shmdir / 'fuse'}): it may be fssd's own export through nbdfuse" in r.stderr, r.stderr
    r = f.fssconfig("fss0", "data", loops(exported), check=False)
    assert r.returncode == 1 and ("FUSE file system" in r.stderr or "image of volume data" in r.stderr), r.stderr
    assert state(shmdir / "data.img") == before and in_use(f) == []


# -- issue 8, items 4 and 5 -----------------------------------------------------------------


def test_store_paths_mean_what_they_say(fssd, shmdir):
    missing_dev = "/dev/fssd-test-no-such-disk"
    r = fssd.fssconfig("fss0", "data", missing_dev, check=False)
    assert r.returncode == 1 and r.stderr.strip() == f"fssconfig: {missing_dev}: no such block device (a backing store under /dev must be an existing block device)"
    assert not os.path.lexists(missing_dev)
    os.symlink("/dev", shmdir / "devlink")
    r = fssd.fssconfig("fss0", "data", shmdir / "devlink" / "fssd-test-no-such-disk", check=False)
    assert r.returncode == 1 and "no such block device" in r.stderr and not os.path.lexists(missing_dev)
    (shmdir / "devlink").unlink()
    r = fssd.fssconfig("fss0", "data", "/dev/null", check=False)
    assert r.returncode == 1 and "/dev/null: not a block device" in r.stderr
    r = fssd.fssconfig("fss0", "data", f"{shmdir}/nodir/", check=False)
    assert r.returncode == 1 and r.stderr.strip() == f"fssconfig: {shmdir}/nodir/: no such directory (a trailing slash names a directory that must exist)"
    (shmdir / "plain").write_bytes(b"keep")
    r = fssd.fssconfig("fss0", "data", f"{shmdir}/plain/", check=False)
    assert r.returncode == 1 and "plain/: not a directory" in r.stderr
    assert sorted(p.name for p in shmdir.iterdir()) == ["data.img", "plain"]
    (shmdir / "dir").mkdir()
    fssd.fssconfig("fss0", "data", f"{shmdir}/dir/")
    assert list((shmdir / "dir").iterdir()) == []
    assert json.loads(fssd.fssconfig("-l", "--json", "fss0").stdout)[0]["backup"] == "(unlinked)"


def test_sizes_are_refused_in_the_users_terms(fssd, shmdir):
    r = fssd.fssconfig("fss0", "data", shmdir / "bk", "1g", check=False)
    assert r.returncode == 1 and r.stderr.strip() == "fssconfig: cluster size 1073741824 (1G) is larger than the volume (67108864 bytes, 64M)", r.stderr
    r = fssd.fssconfig("fss0", "data", shmdir / "bk", "64K", "10", check=False)
    assert r.returncode == 1 and "backing store size 10 (10B) is too small" in r.stderr and "0 bytes" not in r.stderr, r.stderr
    assert not (shmdir / "bk").exists(), "the file fssconfig made for the refused configure is gone"
    assert in_use(fssd) == []


# -- break 4: bounded control socket ----------------------------------------------------------

# Opens N connections as whoever runs it, starts a request on each and never finishes it;
# reports how many fssd refused at once, then how long each held one lived.
FLOOD = r"""
import json, select, socket, struct, sys, time
path, n = sys.argv[1], int(sys.argv[2])
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    try:
        s.sendall(struct.pack(">I", 4000) + b"\x81" * 100)  # 100 of 4000 bytes
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused (and closed) before we got to write: its reason is still there to read
    socks.append(s)
t0 = time.monotonic()
refused, held = 0, []
deadline = time.monotonic() + 3.0
pending = list(socks)
while pending and time.monotonic() < deadline:
    r, _, _ = select.select(pending, [], [], 0.1)
    for s in r:
        data = s.recv(65536)
        refused += 1
        pending.remove(s)
        s.close()
        if b"too many connections" not in data:
            print(json.dumps({"unexpected": data.decode(errors="replace")}), flush=True)
print(json.dumps({"refused": refused, "held": len(pending)}), flush=True)
sys.stdin.readline()
gone = []
while pending and time.monotonic() - t0 < 30:
    r, _, _ = select.select(pending, [], [], 0.2)
    for s in r:
        if not s.recv(65536):
            gone.append(time.monotonic() - t0)
            pending.remove(s)
print(json.dumps({"dropped_after": gone, "still_open": len(pending)}), flush=True)
"""


def timed_list(f) -> float:
    import time

    t = time.monotonic()
    r = f.fssconfig("-l", check=False)
    took = time.monotonic() - t
    assert r.returncode == 0, r.stderr
    return took


def test_connection_caps_and_half_sent_requests(grouped, users):
    from daemon.control_server import FRAME_TIMEOUT, MAX_PER_UID

    f = grouped
    env = {"PATH": "/usr/bin:/bin"}
    idle = timed_list(f)  # what a Python tool's start costs on this machine right now
    flood = subprocess.Popen(
        users.argv(users.member, "/usr/bin/python3", "-c", FLOOD, f.rundir / "control.sock", 40),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd="/",
    )
    try:
        got = json.loads(flood.stdout.readline())
        assert got == {"refused": 40 - MAX_PER_UID, "held": MAX_PER_UID}, got
        took = timed_list(f)
        print(f"member holding its cap: root fssconfig -l {took * 1000:.0f} ms (idle {idle * 1000:.0f} ms)")
        assert took < idle + 1.0, "root's fssconfig -l answers within a second while a member holds its cap"
        r = users.fssconfig(users.member, "-r", f.rundir, "-l")
        assert r.returncode == 1 and f"too many connections to fssd: uid {users.uid(users.member)} has {MAX_PER_UID} connections open" in r.stderr, r.stderr
        flood.stdin.write("\n")
        flood.stdin.flush()
        out = json.loads(flood.stdout.readline())
    finally:
        flood.kill()
        flood.wait()
    # Each half-sent request was dropped at the frame timeout (counted from its connect), none later.
    assert out["still_open"] == 0 and len(out["dropped_after"]) == MAX_PER_UID
    assert all(t < FRAME_TIMEOUT + 3 for t in out["dropped_after"]), out
    assert "dropped: a request arrived only in part in time" in f.log.read_text()
    assert users.fssconfig(users.member, "-r", f.rundir, "-l").returncode == 0
    refusals = f.log.read_text().count("refused a connection from uid")
    assert 1 <= refusals <= 2, f"refusals are logged once a minute, not per connection ({refusals})"


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_big_frames_cost_no_memory(grouped):
    """600 connections each announcing a 1 MiB request and sending 1 MiB - 1 of it (issue 9's recipe)."""
    import socket
    import struct

    f = grouped
    pid = f.proc.pid
    idle = timed_list(f)
    before = rss_kib(pid)
    socks = []
    try:
        for _ in range(600):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(0.5)
            s.connect(str(f.rundir / "control.sock"))
            try:
                s.sendall(struct.pack(">I", 1 << 20) + bytes((1 << 20) - 1))
            except (BrokenPipeError, ConnectionResetError, socket.timeout):
                pass  # refused on the length, before the body was wanted
            socks.append(s)
        took = timed_list(f)
        assert took < idle + 1.0, "root's fssconfig -l answers within a second of its usual time"
        grown = rss_kib(pid) - before
        print(f"600 x 1 MiB frames: supervisor RSS {before} KiB -> +{grown} KiB; root fssconfig -l {took * 1000:.0f} ms")
    finally:
        for s in socks:
            s.close()
    assert grown < 16 * 1024, f"supervisor RSS grew {grown} KiB (bound: 16 MiB)"
    assert "frame of 1048576 bytes exceeds the limit 65536" in f.log.read_text()


LOGFLOOD = r"""
import socket, struct, sys
n = 0
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    try:
        s.sendall(struct.pack(">I", 1 << 20))  # refused on its length, closed at once
        n += 1
    except OSError:
        pass
    s.close()
print(n)
"""


def test_bad_requests_from_one_member_cannot_fill_the_log(grouped, users):
    f = grouped
    r = subprocess.run(users.argv(users.member, "/usr/bin/python3", "-c", LOGFLOOD, f.rundir / "control.sock", 1500),
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, cwd="/", timeout=120)
    assert int(r.stdout) > 1000, r.stderr
    wait_for(lambda: "malformed control request" in f.log.read_text(), 10, "the first refusal logged")
    assert f.fssconfig("-l", check=False).returncode == 0
    lines = f.log.read_text().count("malformed control request")
    assert lines <= 2, f"{lines} log lines for 1500 bad requests: one member can fill the log"


def test_out_of_descriptors_backs_off_with_one_warning(grouped):
    """EMFILE in accept: no log line per attempt, no busy loop, service again once descriptors free up."""
    import socket
    import time

    f = grouped
    pid = f.proc.pid
    nfds = len(os.listdir(f"/proc/{pid}/fd"))
    old = run("prlimit", "--pid", pid, "--nofile", "--raw", "--noheadings", "--output", "SOFT,HARD").stdout.split()
    run("prlimit", "--pid", pid, f"--nofile={nfds + 4}:{old[1]}")
    socks = []
    try:
        for _ in range(30):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(f.rundir / "control.sock"))
            socks.append(s)
        wait_for(lambda: "not accepting for" in f.log.read_text(), 10, "the EMFILE warning")
        cpu0 = _cpu_seconds(pid)
        t0 = time.monotonic()
        wait_for(lambda: time.monotonic() - t0 > 2, 5, "two seconds of exhaustion", interval=0.2)
        busy = _cpu_seconds(pid) - cpu0
        assert busy < 0.5, f"supervisor used {busy:.2f} s of CPU in 2 s while out of descriptors"
    finally:
        for s in socks:
            s.close()
        run("prlimit", "--pid", pid, f"--nofile={old[0]}:{old[1]}")
    assert f.log.read_text().count("not accepting for") == 1
    wait_for(lambda: f.fssconfig("-l", check=False).returncode == 0, 10, "fssd to accept again")


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_systemd_made_run_directory_gets_the_models_modes_and_fd_limit(fssd_factory, shmdir, users):
    """As under systemd (RuntimeDirectoryMode=0700 root:root, LimitNOFILE=): fssd sets the group's modes itself."""
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "16M"}], extra=f'group = "{users.group}"', base=shmdir, start=False)
    f.rundir.mkdir(mode=0o700)
    unit = (Path(__file__).resolve().parent.parent / "etc/systemd/fssd.service").read_text()
    assert "\nRuntimeDirectoryMode=0700\n" in unit and "\nLimitNOFILE=65536\n" in unit
    f.start()
    assert mode_owner(f.rundir) == (0o750, "root", users.group)
    limits = open(f"/proc/{f.proc.pid}/limits").read()
    soft, hard = next(line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files"))
    assert soft == hard, "the soft descriptor limit is raised to the hard one"
    assert users.fssconfig(users.member, "-r", f.rundir, "-l").returncode == 0


def test_run_directory_path_through_a_strangers_symlink_is_refused(fssd_factory, shmdir, users):
    """A root-owned, trusted target reached through a symlink the stranger could re-point later."""
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "16M"}], start=False, base=shmdir)
    target = shmdir / "realrun"
    target.mkdir(mode=0o755)
    link = shmdir / "linkrun"
    os.symlink(target, link)
    os.lchown(link, users.uid(users.stranger), -1)
    r = run(BIN / "fssd", "-c", f.config, "-r", link, check=False, timeout=30)
    assert r.returncode == 2 and r.stderr.strip() == f"fssd: refusing run directory {link}: {link} is a symlink owned by uid {users.uid(users.stranger)}, not root", r.stderr
    # Missing parents are made root's and 0755 whatever the umask; the directory itself per the model.
    deep = shmdir / "a" / "b" / "run"
    os.umask(0o077)
    f2 = fssd_factory([{"name": "data", "path": str(shmdir / "data2.img"), "size": "16M"}], start=False, base=shmdir)
    f2.rundir = deep
    f2.write_config()
    f2.start()
    assert [mode_owner(p) for p in (shmdir / "a", shmdir / "a" / "b", deep)] == [(0o755, "root", "root")] * 2 + [(0o700, "root", "root")]


def test_existing_store_untouched_by_a_refused_configure_and_unlinked_by_x(fssd, shmdir):
    mine = shmdir / "mine"
    mine.write_bytes(os.urandom(300_000))
    before = state(mine)
    for args in (("fss0", "nosuchvol", mine), ("fss0", "data", mine, "1g"), ("fss9", "data", mine)):
        r = fssd.fssconfig(*args, check=False)
        assert r.returncode == 1, r
    assert state(mine) == before, "a refused configure truncates nothing"
    fssd.fssconfig("-x", "fss0", "data", mine)
    assert not mine.exists()
    assert json.loads(fssd.fssconfig("-l", "--json", "fss0").stdout)[0]["backup"] == "(unlinked)"
    run("qemu-io", "-f", "raw", "-c", "write -P 7 0 1M", fssd.uri("data"))
    assert json.loads(fssd.fssconfig("-l", "--json", "fss0").stdout)[0]["copies"] == 16
