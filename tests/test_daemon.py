"""The daemon as a service: config errors, start/stop, side-by-side instances, SIGHUP, sd_notify, titles."""

import json
import os
import re
import signal
import socket
import subprocess

import posix_ipc
import pytest

from ipc import names

from fsshelp import BIN, run, wait_for


def bad_config(tmp_path, body):
    p = tmp_path / "bad.toml"
    p.write_text(body)
    return subprocess.run([str(BIN / "fssd"), "-c", str(p)], capture_output=True, text=True, timeout=30), p


@pytest.mark.parametrize(
    "body, needle",
    [
        ('[daemon]\nrundir = "/tmp/x"\nfoo = 1\n', "unknown field `foo` - at `$.daemon`"),
        ('[[volume]]\nname = "a"\npath = "/tmp/a.img"\nsize = []\n', "at `$.volume[0].size`"),
        ('[[volume]]\nname = "a"\npath = "/tmp/fssd-no-such.img"\n', "does not exist and no size is given to create it - at `$.volume[0]`.path"),
        ('[[volume]]\nname = "a"\npath = "/tmp/a1.img"\nsize = "1M"\n[[volume]]\nname = "a"\npath = "/tmp/a2.img"\nsize = "1M"\n', "duplicate volume name 'a' - at `$.volume[1]`.name"),
        ('[[volume]]\nname = "a"\npath = "/nonexistent-dir/a.img"\nsize = "1M"\n', "directory of volume image /nonexistent-dir/a.img does not exist"),
        ('[[volume]]\nname = "a"\npath = "/tmp/a.img"\nsize = "12X"\n', "bad size '12X'"),
        ('[vss]\nfreeze = ["/"]\n', "fssd never freezes /"),
        ('[[volume]]\nname = "a"\npath = "/tmp/fssd-fz.img"\nsize = "1M"\n[vss]\nfreeze = ["/tmp"]\n', "holds the image of volume 'a'"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_bad_config_stops_fssd_with_one_line(tmp_path, body, needle):
    r, path = bad_config(tmp_path, body)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"fssd: {path}: ") and needle in lines[0], lines[0]


def test_missing_config_file(tmp_path):
    r = subprocess.run([str(BIN / "fssd"), "-c", str(tmp_path / "none.toml")], capture_output=True, text=True)
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_fssconfig_without_fssd(tmp_path):
    r = subprocess.run([str(BIN / "fssconfig"), "-l"], capture_output=True, text=True, env={**os.environ, "FSSD_RUNDIR": str(tmp_path)})
    assert r.returncode == 1
    assert r.stderr.strip() == f"fssconfig: fssd is not running (no control socket at {tmp_path}/control.sock)"


def test_stop_is_clean_and_instances_run_side_by_side(fssd_factory, shmdir):
    a = fssd_factory([{"name": "data", "path": str(shmdir / "a.img"), "size": "16M"}])
    b = fssd_factory([{"name": "data", "path": str(shmdir / "b.img"), "size": "16M"}])
    assert a.prefix != b.prefix
    a.fssconfig("fss0", "data", shmdir / "bsa")
    b.fssconfig("fss0", "data", shmdir / "bsb")
    run("qemu-io", "-f", "raw", "-c", "write -P 0xa1 0 1M", a.uri("data"))
    run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0 0 1M", b.uri("data"))
    assert any(n.startswith(a.prefix) for n in os.listdir("/dev/shm"))
    # A second fssd on the same run directory is refused, the first one untouched.
    r = subprocess.run([str(BIN / "fssd"), "-c", str(a.config)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "already running" in r.stderr
    assert a.fssconfig("-l").returncode == 0

    assert a.stop() == 0
    assert not any(n.startswith(a.prefix) for n in os.listdir("/dev/shm")), "shared memory left behind"
    if os.path.isdir("/dev/mqueue"):  # not mounted everywhere; posix_ipc below checks either way
        assert not any(n.startswith(a.prefix) for n in os.listdir("/dev/mqueue"))
    with pytest.raises(posix_ipc.ExistentialError):
        posix_ipc.SharedMemory(names.map_name(a.prefix, "fss0"))
    assert sorted(os.listdir(a.rundir)) == [], os.listdir(a.rundir)
    # The snapshot outlives fssd (docs/architecture.md "Durability"): its store and its record stay.
    assert (shmdir / "bsa").exists() and (a.tmp / "state" / "snapshots" / "fss0.json").exists()
    # b is unaffected.
    run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0 0 1M", b.uri("fss0"))


def test_process_titles_and_status(fssd_factory, shmdir):
    # One volume process: its title is exactly "volume data" (tests/test_volume_processes.py: several).
    fssd = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "64M"}], extra="volume_processes = 1")
    fssd.fssconfig("fss1", "data", shmdir / "bs1")
    st = fssd.status()
    titles = {w["kind"]: w["name"] for w in st["workers"]}
    # Not the default run directory: the instance shows in every title.
    inst = f"fssd[{os.path.abspath(fssd.rundir)}]: "
    assert titles["volume"] == inst + "volume data"
    assert titles["snapshot"].startswith(inst + "fss1 data@") and titles["snapshot"].endswith("Z")
    pid = fssd.worker_pid("snapshot", "fss1")
    assert open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0].decode() == titles["snapshot"]
    r = run("pgrep", "-f", f"^{re.escape(inst)}fss1 data@")
    assert r.stdout.split() == [str(pid)]
    # `pgrep -f 'fssd: fss1'` is for the default instance only: this one never answers it.
    r = run("pgrep", "-f", "^fssd: fss1 data@", check=False)
    assert str(pid) not in r.stdout.split()
    sup = int(open(fssd.rundir / "fssd.pid").read())
    assert open(f"/proc/{sup}/cmdline", "rb").read().split(b"\0")[0].decode() == inst + "supervisor"
    assert st["snapshots"][1]["pid"] == pid and st["snapshots"][1]["state"] == "active"
    vols = json.loads(fssd.fssconfig("--volumes", "--json").stdout)
    assert vols[0]["name"] == "data" and vols[0]["size"] == 64 << 20 and vols[0]["uri"] == fssd.uri("data")


def test_title_of_the_default_instance_is_netbsd_like():
    assert names.proc_title("fss0 data@2026-11-22T01:02:03Z", names.DEFAULT_RUNDIR) == "fssd: fss0 data@2026-11-22T01:02:03Z"
    assert names.proc_title("volume data", "/run/fssd/") == "fssd: volume data"
    assert names.proc_title("volume data", "/tmp/x/run") == "fssd[/tmp/x/run]: volume data"


def test_sighup_reload_good_and_bad(fssd_factory, shmdir):
    f = fssd_factory([{"name": "data", "path": str(shmdir / "data.img"), "size": "16M"}])
    f.fssconfig("fss0", "data", shmdir / "bs0")
    sup = f.proc.pid
    # Good: add a volume; "data" has a snapshot, so removing it is refused.
    f.write_config(volumes=[{"name": "more", "path": str(shmdir / "more.img"), "size": "8M"}])
    os.kill(sup, signal.SIGHUP)
    wait_for(lambda: {v["name"] for v in json.loads(f.fssconfig("--volumes", "--json").stdout)} == {"data", "more"}, 20, "reload")
    assert "volume data has snapshots (fss0); not removed" in f.log.read_text()
    # Without the snapshot, the removal goes through on the next reload.
    f.fssconfig("-u", "fss0")
    os.kill(sup, signal.SIGHUP)
    wait_for(lambda: [v["name"] for v in json.loads(f.fssconfig("--volumes", "--json").stdout)] == ["more"], 20, "volume removal")
    assert not os.path.exists(f.sock("data"))
    # Bad: logged, old config kept.
    f.write_config(raw="[daemon]\nbogus = 1\n")
    os.kill(sup, signal.SIGHUP)
    wait_for(lambda: "reload refused, keeping the running configuration" in f.log.read_text(), 20, "refusal")
    assert [v["name"] for v in json.loads(f.fssconfig("--volumes", "--json").stdout)] == ["more"]
    run("qemu-io", "-f", "raw", "-c", "write -P 1 0 64k", f.uri("more"))


def test_sd_notify_ready_status_stopping(fssd_factory, shmdir, tmp_path):
    path = tmp_path / "notify.sock"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(path))
    rx.settimeout(30)
    try:
        f = fssd_factory(
            [{"name": "data", "path": str(shmdir / "data.img"), "size": "16M"}],
            env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"},
        )
        got = []

        def until(word):
            while True:
                msg = rx.recv(4096).decode()
                got.append(msg)
                if word in msg:
                    return msg

        until("READY=1")
        assert os.path.exists(f.sock("data")), "READY only once the exports listen"
        until("WATCHDOG=1")  # WatchdogSec= set: the main loop pings at half the interval
        f.fssconfig("fss0", "data", shmdir / "bs0")
        assert "1 snapshot(s)" in until("1 snapshot(s)")
        f.stop()
        until("STOPPING=1")
        assert any(m.startswith("STATUS=1 volume(s)") for m in got)
    finally:
        rx.close()


def test_status_finds_the_instance_of_the_config_it_is_given(fssd):
    env = {k: v for k, v in os.environ.items() if k != names.RUNDIR_ENV}
    r = subprocess.run([str(BIN / "fssd"), "-c", str(fssd.config), "--status"], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 0, r.stderr
    assert [v["name"] for v in json.loads(r.stdout)["volumes"]] == ["data"]
    # -r still wins over the config's run directory.
    r = subprocess.run([str(BIN / "fssd"), "-c", str(fssd.config), "-r", str(fssd.tmp / "elsewhere"), "--status"],
                       capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 1 and "not running" in r.stderr and "Traceback" not in r.stderr


def test_a_closed_pipe_is_no_traceback(fssd, shmdir):
    """`fssconfig -l -v | head -1`: the reader goes away; the tool stops quietly."""
    for i in range(3):
        fssd.fssconfig(f"fss{i}", "data", shmdir / f"bs{i}")
    for argv in ([str(BIN / "fssconfig"), "-r", str(fssd.rundir), "-l", "-v"],
                 [str(BIN / "fssconfig"), "-r", str(fssd.rundir), "--volumes", "--json"],
                 [str(BIN / "fssd"), "-r", str(fssd.rundir), "--status"],
                 [str(BIN / "fssconfig"), "--help"], [str(BIN / "vssadm"), "--help"], [str(BIN / "appvss"), "--help"]):
        for _ in range(5):
            # A pipe whose reader is already gone: every write fails with EPIPE.
            r_fd, w_fd = os.pipe()
            os.close(r_fd)
            p = subprocess.run(argv, stdout=w_fd, stderr=subprocess.PIPE, text=True, timeout=30)
            os.close(w_fd)
            assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, (argv, p.stderr)
