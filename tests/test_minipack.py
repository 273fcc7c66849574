"""fssconfig's configure path without msgspec (ipc/minipack.py, daemon/cli/lightclient.py):
the same bytes as msgspec, the same answers, the same one-line errors and exit codes."""

import getopt
import itertools
import os
import random
import socket
import struct
import subprocess
import sys
import threading

import msgspec
import pytest

from daemon.cli import fssconfig, lightclient
from ipc import control, framing, minipack

FSSCONFIG = os.path.join(os.path.dirname(sys.executable), "fssconfig")

INTS = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1,
        -1, -31, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1, -2**63]
STRS = ["", "a", "x" * 31, "x" * 32, "é" * 20, "y" * 255, "y" * 256, "z" * 65535, "z" * 65536]
FLOATS = [0.0, 1.5, -2.25, 1e300, 3.0]


@pytest.mark.parametrize("value", INTS + STRS + FLOATS + [None, True, False, [], [1] * 15, [1] * 16, ["a"] * 70000,
                                                           {}, {f"k{i}": i for i in range(15)}, {f"k{i}": i for i in range(16)},
                                                           {"a": [1, {"b": None}], "c": 2.5}])
def test_encode_is_msgspecs_bytes_and_decode_reads_them(value):
    data = msgspec.msgpack.encode(value)
    assert minipack.encode(value) == data
    assert minipack.decode(data) == value


CONFIGURES = [
    dict(device="fss0", path="data", backup="/srv/b"),
    dict(device="fss3", path="/srv/data.img", backup="/tmp/ü/bs", cluster=131072, size=2**40, unconfig_on_close=True),
    dict(device="fss1", path="db", backup="/b/", unlink=True, consistent=True, timeout=2.5),
    dict(device="fss2", path="db", backup="/b/x", no_suspend=True, name="x", nfds=2, size=0, cluster=0),
    dict(device="fss0", path="v", backup="/b", timeout=3600.0, size=2**63 - 1),
]


@pytest.mark.parametrize("kw", CONFIGURES)
def test_the_configure_request_is_byte_for_byte_msgspecs(kw):
    """What fssd decodes with msgspec against control.Configure: identical bytes."""
    assert minipack.encode(lightclient.configure_request(**kw)) == msgspec.msgpack.encode(control.Configure(**kw))
    assert msgspec.msgpack.decode(minipack.encode(lightclient.configure_request(**kw)), type=control.Request) == control.Configure(**kw)


def _info(**kw):
    return control.SnapshotInfo(device="fss0", in_use=True, volume="data", state="active", taken=1764543600.25, cluster_size=65536,
                                cluster_count=16384, suspended=["/srv/data", "/srv/x"], window_ms=4.1, note="n", set_members=["a"], **kw)


REPLIES = [
    control.Configured(_info(), 52, None, 4.1),
    control.Configured(_info(mountpoint="/m"), 2**31, 6.2),
    control.ConfiguredSet([_info(), _info()], "3f2a9c1b0d4e", 230),
    control.Error(16, "fss0: Device busy"),
    control.Unconfigured("fss0"),
    control.ChangedExtents("fss0", "s", "i", extents=[(0, 65536), (2**40, 2**20)], more=True),
]


@pytest.mark.parametrize("reply", REPLIES)
def test_answers_decode_as_msgspec_reads_them(reply):
    data = msgspec.msgpack.encode(reply)
    assert msgspec.msgpack.decode(data, type=control.Reply) == reply
    assert minipack.decode(data) == msgspec.msgpack.decode(data)


def test_the_copies_of_protocol_constants_agree():
    tags = {c.__struct_config__.tag: c.__name__ for c in control.Reply.__args__}
    assert lightclient.REPLY_NAMES == tags
    assert lightclient.MAX_FRAME == framing.MAX_FRAME


def test_malformed_input_is_a_value_error_and_nothing_else():
    rng = random.Random(15)
    valid = [msgspec.msgpack.encode(r) for r in REPLIES]
    for data in valid:
        for cut in range(len(data)):  # every truncation
            with pytest.raises(ValueError):
                minipack.decode(data[:cut])
        with pytest.raises(ValueError, match="after the value"):
            minipack.decode(data + b"\x00")
    for _ in range(3000):  # random bytes, and valid frames with random bytes flipped
        if rng.random() < 0.5:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        else:
            data = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data)
        try:
            minipack.decode(data)
        except ValueError:
            pass
    with pytest.raises(ValueError, match="truncated"):
        minipack.decode(b"\xdd\xff\xff\xff\xff")  # 4 G elements announced in 5 bytes: refused at once
    with pytest.raises(ValueError, match="nested too deeply"):
        minipack.decode(b"\x91" * 100 + b"\xc0")
    for bad in (b"\xc1", b"\xc4\x01a", b"\xd4\x01\x00", b"\xa1\xff", b"\x81\x01\x02"):  # never used, bin, ext, not UTF-8, int key
        with pytest.raises(ValueError):
            minipack.decode(bad)
    with pytest.raises(ValueError):
        minipack.encode({"a": b"bytes"})


def _argvs():
    words = ["-C", "-c", "-x", "-v", "-Ccxv", "-t", "5", "-t5", "-r", "/r", "-r/r", "--rundir", "--rundir=/r", "--no-suspend",
             "--json", "-l", "-u", "--volumes", "--changes", "fss0", "--since=ab", "--", "-", "fss0", "data", "/b", "--vol",
             "--no", "-z", "--rundir=", "--json=1", "-Cz", "-t"]
    rng = random.Random(3)
    yield []
    for n in (1, 2, 3):
        yield from (list(p) for p in itertools.islice(itertools.permutations(words, n), 0, None, 7))
    for _ in range(2000):
        yield [rng.choice(words) for _ in range(rng.randrange(1, 7))]


def test_the_quick_option_parser_is_getopt():
    """Same options and arguments as getopt.getopt for every command line; getopt's own
    message for every one it refuses."""
    for argv in _argvs():
        try:
            want = getopt.getopt(argv, fssconfig.SHORT_OPTS, fssconfig.LONG_OPTS)
        except getopt.GetoptError as e:
            with pytest.raises(fssconfig.Usage) as got:
                fssconfig._getopt(argv)
            assert str(got.value) == str(e), argv
            continue
        assert fssconfig._getopt(argv) == want, argv


def test_fssconfig_loads_no_msgspec_typing_socket_or_getopt_to_configure():
    """The console script's module and what a configure needs: a snapshot's creation is
    mostly fssconfig starting."""
    def modules(code):
        err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True).stderr
        return {line.rsplit("|", 1)[-1].strip() for line in err.splitlines() if line.startswith("import time:")}

    imported = modules("import daemon.cli.fssconfig") - modules("pass")  # less what site loads (an editable install's finder)
    heavy = {"msgspec", "typing", "socket", "getopt", "gettext", "signal", "select", "functools", "ipc.control", "ipc.framing",
             "daemon.cli.client", "daemon.cli.fssquery", "threading"}
    assert "daemon.cli.lightclient" in imported and not imported & heavy, imported & heavy


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


class FakeFssd:
    """A control socket that answers every request with `answer` (bytes of a whole frame, or a
    Struct), keeping what it got and the descriptors that came with it."""

    def __init__(self, rundir, answer):
        self.path = os.path.join(rundir, "control.sock")
        self.answer = answer
        self.got: list = []
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.srv.accept()
        with conn:
            conn.settimeout(10)
            data, fds, _f, _a = socket.recv_fds(conn, 65536, 4)
            for fd in fds:
                os.close(fd)
            self.got.append((data, len(fds)))
            a = self.answer
            if not isinstance(a, bytes):
                body = msgspec.msgpack.encode(a)
                a = struct.pack(">I", len(body)) + body
            conn.sendall(a)

    def close(self):
        self.srv.close()
        self.thread.join(10)


def _fssconfig(rundir, *args):
    return subprocess.run([FSSCONFIG, "-r", str(rundir), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("answer, out, err", [
    (control.Configured(_info(), 52, None, 4.1), "fss0: file-system-consistent snapshot, suspended /srv/data, /srv/x for 4.1 ms, barrier 52 us\n", ""),
    (control.Configured(_info(), 52), "", ""),
    (control.Error(16, "fss0: Device busy"), "", "fssconfig: fss0: Device busy\n"),
    (control.Error(1, "Operation not permitted"), "", "fssconfig: fss0: Operation not permitted\n"),
    (control.Unconfigured("fss0"), "", "fssconfig: unexpected answer from fssd: Unconfigured\n"),
    (b"\x00\x00\x00\x02\x91\xc0", "", "fssconfig: bad answer from fssd: not a control reply\n"),
    (b"\x00\x00\x00\x03\x81\xa1t", "", "fssconfig: bad answer from fssd: truncated\n"),
    (b"\x7f\xff\xff\xff", "", "fssconfig: bad answer from fssd: frame of 2147483647 bytes exceeds the limit 1048576\n"),
    (b"", "", "fssconfig: fssd closed the connection without answering\n"),
    (_frame(msgspec.msgpack.encode({"t": "configured", "barrier_us": "52", "snapshot": {}})), "", "fssconfig: bad answer from fssd: barrier_us is str\n"),
    (_frame(msgspec.msgpack.encode({"t": "error", "errno": 5})), "", "fssconfig: bad answer from fssd: no message\n"),
])
def test_the_installed_fssconfig_answers_as_before(tmp_path, answer, out, err):
    """The console script against a fake fssd: the request is msgspec's Configure with the
    store's descriptor; each answer gives the line fssconfig always printed, exit 0 or 1."""
    fake = FakeFssd(str(tmp_path), answer)
    try:
        p = _fssconfig(tmp_path, "fss0", "data", tmp_path / "bs0")
    finally:
        fake.close()
    assert (p.stdout, p.stderr, p.returncode) == (out, err, 0 if not err else 1)
    data, nfds = fake.got[0]
    req = msgspec.msgpack.decode(data[4:], type=control.Request)
    assert req == control.Configure("fss0", "data", str(tmp_path / "bs0"), name="bs0", nfds=2) and nfds == 2
    # A store fssconfig made for a configure that failed is removed again.
    assert (tmp_path / "bs0").exists() == (not err)


def test_the_installed_fssconfig_without_fssd_says_so_in_one_line(tmp_path):
    p = _fssconfig(tmp_path, "fss0", "data", tmp_path / "bs0")
    assert (p.stdout, p.stderr, p.returncode) == ("", f"fssconfig: fssd is not running (no control socket at {tmp_path}/control.sock)\n", 1)
    assert not (tmp_path / "bs0").exists()
    p = _fssconfig(tmp_path, "-z")
    assert p.returncode == 1 and p.stderr.startswith("fssconfig: option -z not recognized\nusage: fssconfig")


def test_verbose_prints_the_whole_snapshot_decoded_by_msgspec(tmp_path):
    fake = FakeFssd(str(tmp_path), control.Configured(_info(backup="/b", uri="nbd+unix:///fss0"), 52))
    try:
        p = _fssconfig(tmp_path, "-v", "fss0", "data", tmp_path / "bs0")
    finally:
        fake.close()
    assert p.returncode == 0 and p.stderr == ""
    assert p.stdout.splitlines()[0] == "fss0: n"
    assert p.stdout.splitlines()[1].startswith("fss0: data, taken ") and "nbd+unix:///fss0" in p.stdout
