"""Every worker kind starts the same way (spawned.bootstrap) from one settings contract (workers.settings)."""

import importlib
import socket
import subprocess
import sys

import msgspec
import pytest
import setproctitle

from workers import logfmt
from workers import settings as ws
from workers import spawned

KINDS = {
    "workers.volume": (ws.VolumeSettings, ws.VolumeSettings(name="v", path="/nonexistent", size=4096, listen_fd=-1)),
    "workers.snapshot": (ws.SnapshotSettings, ws.SnapshotSettings("fss0", "v", "/nonexistent", "/m", -1, -1, "t")),
    "workers.suspend": (ws.SuspendSettings, ws.SuspendSettings("fss0", [], [], 1.0)),
    "workers.broker": (ws.BrokerSettings, ws.BrokerSettings(prefix="p", rundir="/nonexistent")),
    "workers.spare": (ws.SpareSettings, ws.SpareSettings()),
}


@pytest.mark.parametrize("cls", [c for c, _ in KINDS.values()])
def test_every_settings_type_ends_with_debug_and_use_syslog(cls):
    assert cls.__struct_fields__[-2:] == ("debug", "use_syslog")
    assert cls.__struct_defaults__[-2:] == (False, False)


class _Started(Exception):
    pass


@pytest.mark.parametrize("module", sorted(KINDS))
def test_every_worker_starts_through_the_one_bootstrap(module, monkeypatch):
    cls, _ = KINDS[module]
    seen = {}

    def fake(prog, settings_type, argv, **kw):
        seen.update(prog=prog, type=settings_type, argv=argv)
        raise _Started

    monkeypatch.setattr(spawned, "bootstrap", fake)
    mod = importlib.import_module(module)
    with pytest.raises(_Started):
        mod.main(["--channel-fd", "99", "{}"])
    assert seen == {"prog": module, "type": cls, "argv": ["--channel-fd", "99", "{}"]}


@pytest.mark.parametrize("module", sorted(KINDS))
def test_bootstrap_sets_title_logging_with_syslog_and_channel(module, monkeypatch):
    cls, sample = KINDS[module]
    calls = {}
    monkeypatch.setattr(logfmt, "setup", lambda name, debug=False, use_syslog=False: calls.update(log=(name, debug, use_syslog)))
    monkeypatch.setattr(setproctitle, "setproctitle", lambda t: calls.update(title=t))
    a, b = socket.socketpair()
    try:
        text = msgspec.json.encode(msgspec.structs.replace(sample, debug=True, use_syslog=True)).decode()
        s, chan = spawned.bootstrap(module, cls, ["--channel-fd", str(a.fileno()), text], title=lambda s: "T", log_name=lambda s: "L")
        assert s.use_syslog and s.debug
        assert calls["log"] == ("L", True, True)
        assert calls["title"].endswith(": T")
        sock = chan if isinstance(chan, socket.socket) else chan.sock  # "socket" kind: the bare socket
        assert sock.fileno() == a.fileno()
        sock.detach()  # the descriptor stays a's
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("module", sorted(KINDS))
def test_bad_settings_are_one_line_and_exit_2(module):
    r = subprocess.run([sys.executable, "-m", module, "--channel-fd", "0", '{"no_such_field": 1}'],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "bad settings" in r.stderr and "Traceback" not in r.stderr, r.stderr
