"""NBD over TCP with TLS and client-certificate authorization (issue 13).

One fssd serves the module, with three [[listen]] tables on free loopback ports:
  main    tls require, client certificates: backup1 may open fss* and the live
          volume `data` (named explicitly); snaponly has "*" (snapshots only:
          a wildcard never reaches a live volume)
  tight   small limits: 4 connections, 2 per client, 1 s handshake, 1.5 s idle
  plain   tls = "off", clients by address
Certificates are made here with openssl: a CA, the server's, and clients
backup1, snaponly, stranger (unlisted), an expired backup1, a backup1 from
another CA. Real clients (nbdinfo, nbdcopy, qemu-img) do the work; a raw
client (Python's ssl) only where a stall or an exact reply code is needed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from fsshelp import BIN, Fssd, run, sha256_file, wait_for, running

from ipc import listenpolicy, nbd
from ipc.listenpolicy import AllowRule, Client
from ipc.nbdclient import ClientHandshake

MiB = 1 << 20
SIZE = 64 * MiB


# -- certificates ---------------------------------------------------------------------------

SERVER_EXT = "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n"
CLIENT_EXT = "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n"


def _key_and_csr(d: Path, stem: str, subject: str) -> Path:
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", d / f"{stem}-key.pem", "-out", d / f"{stem}.csr", "-subj", subject)
    return d / f"{stem}.csr"


def make_ca(d: Path, name: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", d / "ca-key.pem", "-out", d / "ca-cert.pem", "-subj", f"/CN={name}", "-days", "3")
    return d


def sign(ca: Path, out: Path, stem: str, subject: str, ext: str, days: int = 3) -> None:
    """out/{stem}-cert.pem and out/{stem}-key.pem, signed by `ca`, plus out/ca-cert.pem (qemu's layout)."""
    out.mkdir(parents=True, exist_ok=True)
    csr = _key_and_csr(out, stem, subject)
    extfile = out / f"{stem}.ext"
    extfile.write_text(ext)
    run("openssl", "x509", "-req", "-in", csr, "-CA", ca / "ca-cert.pem", "-CAkey", ca / "ca-key.pem", "-CAcreateserial", "-days", str(days), "-extfile", extfile, "-out", out / f"{stem}-cert.pem")
    csr.unlink()
    extfile.unlink()
    shutil.copy(ca / "ca-cert.pem", out / "ca-cert.pem")


def free_port(family: int = socket.AF_INET) -> int:
    with socket.socket(family) as s:
        s.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
        return s.getsockname()[1]


# -- the module's fssd ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    base = tmp_path_factory.mktemp("pki")
    ca = make_ca(base / "ca", "fssd test CA")
    other = make_ca(base / "otherca", "some other CA")
    sign(ca, base / "server", "server", "/O=fssd test/CN=localhost", SERVER_EXT)
    sign(ca, base / "backup1", "client", "/O=fssd test/CN=backup1", CLIENT_EXT)
    sign(ca, base / "snaponly", "client", "/O=fssd test/CN=snaponly", CLIENT_EXT)
    sign(ca, base / "stranger", "client", "/O=fssd test/CN=stranger", CLIENT_EXT)
    sign(ca, base / "expired", "client", "/O=fssd test/CN=backup1", CLIENT_EXT, days=-1)
    sign(other, base / "otherca-client", "client", "/O=fssd test/CN=backup1", CLIENT_EXT)
    shutil.copy(ca / "ca-cert.pem", base / "otherca-client" / "ca-cert.pem")  # it trusts our server: the server must refuse it
    return base


@pytest.fixture(scope="module")
def srv(tmp_path_factory, pki):
    shm = Path(tempfile.mkdtemp(prefix="fssd-test-tls-", dir="/dev/shm"))
    img = shm / "data.img"
    with open(img, "wb") as f:
        f.write(os.urandom(SIZE))
    shutil.copy(img, shm / "instant.img")  # the snapshot's instant
    f = Fssd(tmp_path_factory.mktemp("tls") / "i0", [{"name": "data", "path": str(img)}])
    f.shm = shm
    f.ports = {"main": free_port(), "tight": free_port(), "plain": free_port(), "v6": free_port(family=socket.AF_INET6), "anon": free_port()}
    srvdir = pki / "server"
    f.config.write_text(
        f.config.read_text()
        + f"""
[[listen]]
address = "127.0.0.1:{f.ports['main']}"
tls_dir = "{srvdir}"
allow = [{{ client = "CN=backup1", exports = ["fss*", "data"] }},
         {{ client = "O=fssd test,CN=snaponly", exports = ["*"] }}]

[[listen]]
address = "127.0.0.1:{f.ports['tight']}"
tls_dir = "{srvdir}"
allow = [{{ client = "CN=backup1", exports = ["fss*"] }}, {{ client = "CN=snaponly", exports = ["fss*"] }}]
max_connections = 4
max_connections_per_client = 2
handshake_timeout = 1
idle_timeout = 1.5

[[listen]]
address = "[::1]:{f.ports['v6']}"
tls_dir = "{srvdir}"
allow = [{{ client = "CN=backup1", exports = ["fss*"] }}]

[[listen]]
address = "127.0.0.1:{f.ports['anon']}"
tls_dir = "{srvdir}"
verify_peer = false
allow = [{{ client = "127.0.0.0/8", exports = ["fss*"] }}]

[[listen]]
address = "127.0.0.1:{f.ports['plain']}"
tls = "off"
allow = [{{ client = "127.0.0.1", exports = ["fss*"] }}]
"""
    )
    with running(f, shm):
        f.fssconfig("fss0", "data", str(shm / "bs0"))
        # The live volume moves on after the snapshot: 1 MiB of new bytes at 4 MiB.
        run("qemu-io", "-f", "raw", "-c", "write -P 0x77 4M 1M", f.uri("data"))
        yield f


def nbds(srv, pki, who: str, export: str = "", port: str = "main") -> str:
    return f"nbds://127.0.0.1:{srv.ports[port]}/{export}?tls-certificates={pki / who}"


def qemu_json(srv, export: str, port: str = "main") -> str:
    return 'json:{"driver":"nbd","server":{"type":"inet","host":"127.0.0.1","port":"%d"},"export":"%s","tls-creds":"tls0"}' % (srv.ports[port], export)


def tls_object(pki, who: str) -> str:
    return f"tls-creds-x509,id=tls0,dir={pki / who},endpoint=client"


def listed(uri: str) -> list[str]:
    p = run("nbdinfo", "--list", "--json", uri)
    import json

    return sorted(e["export-name"] for e in json.loads(p.stdout)["exports"])


def log_text(srv) -> str:
    return srv.log.read_text(errors="replace")


# -- a raw client, for exact reply codes and stalls ------------------------------------------


class Raw:
    def __init__(self, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.sock.close()

    def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            got = self.sock.recv(n - len(buf))
            if not got:
                raise EOFError(f"closed after {len(buf)} of {n} bytes")
            buf += got
        return buf

    def hello(self) -> None:
        magic, opt, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == nbd.NBDMAGIC and opt == nbd.IHAVEOPT
        self.sock.sendall(struct.pack(">I", nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES))

    def option(self, code: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.sock.sendall(struct.pack(">QII", nbd.IHAVEOPT, code, len(data)) + data)
        out = []
        while True:
            _m, opt, rep, n = struct.unpack(">QIII", self.recv_exact(20))
            assert opt == code
            out.append((rep, self.recv_exact(n)))
            if rep == nbd.REP_ACK or rep & 0x80000000:
                return out

    def starttls(self, certdir: Path) -> ssl.SSLSocket:
        assert [r for r, _ in self.option(nbd.OPT_STARTTLS)] == [nbd.REP_ACK]
        ctx = ssl.create_default_context(cafile=str(certdir / "ca-cert.pem"))
        ctx.load_cert_chain(str(certdir / "client-cert.pem"), str(certdir / "client-key.pem"))
        self.sock = ctx.wrap_socket(self.sock, server_hostname="127.0.0.1")
        return self.sock

    def go(self, export: str) -> list[tuple[int, bytes]]:
        name = export.encode()
        return self.option(nbd.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))

    def pread(self, cookie: int, offset: int, length: int) -> bytes:
        self.sock.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, cookie, offset, length))
        magic, err, got = struct.unpack(">IIQ", self.recv_exact(16))
        assert (magic, err, got) == (nbd.SIMPLE_REPLY_MAGIC, 0, cookie)
        return self.recv_exact(length)

    def pwrite(self, cookie: int, offset: int, data: bytes) -> int:
        self.sock.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, cookie, offset, len(data)) + data)
        magic, err, got = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == nbd.SIMPLE_REPLY_MAGIC and got == cookie
        return err

    def closed_by_server(self, within: float) -> bool:
        """True if the server closes this connection within `within` seconds (reading what it sends)."""
        end = time.monotonic() + within
        try:
            while time.monotonic() < end:
                self.sock.settimeout(max(0.01, end - time.monotonic()))
                if not self.sock.recv(65536):
                    return True
        except socket.timeout:
            return False
        except (ConnectionResetError, ssl.SSLError):
            return True
        return False


def opened(srv, pki, who: str, export: str, port: str = "main") -> Raw:
    r = Raw(srv.ports[port])
    r.hello()
    r.starttls(pki / who)
    reps = r.go(export)
    assert reps[-1][0] == nbd.REP_ACK, reps
    return r


def instant(srv, offset: int, length: int) -> bytes:
    with open(srv.shm / "instant.img", "rb") as f:
        f.seek(offset)
        return f.read(length)


# -- sans-IO units -------------------------------------------------------------------------------


def _opt(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", nbd.IHAVEOPT, code, len(data)) + data


def _replies(data: bytes) -> list[tuple[int, int]]:
    out, pos = [], 0
    while pos < len(data):
        _m, opt, rep, n = struct.unpack_from(">QIII", data, pos)
        out.append((opt, rep))
        pos += 20 + n
    return out


def test_starttls_required_before_anything_but_abort():
    c = nbd.ServerConnection([], tls=True, allowed=lambda n: n == "fss0")
    c.greeting()
    c.receive_data(struct.pack(">I", 3) + _opt(nbd.OPT_LIST) + _opt(nbd.OPT_STRUCTURED_REPLY) + _opt(nbd.OPT_INFO, struct.pack(">I", 4) + b"fss0" + b"\0\0"))
    assert c.events() == []
    assert _replies(c.data_to_send()) == [(nbd.OPT_LIST, nbd.REP_ERR_TLS_REQD), (nbd.OPT_STRUCTURED_REPLY, nbd.REP_ERR_TLS_REQD), (nbd.OPT_INFO, nbd.REP_ERR_TLS_REQD)]
    assert not c.structured
    c.receive_data(_opt(nbd.OPT_STARTTLS))
    assert c.events() == [nbd.StartTLS()]
    assert _replies(c.data_to_send()) == [(nbd.OPT_STARTTLS, nbd.REP_ACK)]
    c.tls_started()
    c.set_exports([nbd.Export("fss0", 0, True)])
    c.receive_data(_opt(nbd.OPT_STARTTLS) + _opt(nbd.OPT_LIST))
    assert c.events() == []
    assert _replies(c.data_to_send()) == [(nbd.OPT_STARTTLS, nbd.REP_ERR_INVALID), (nbd.OPT_LIST, nbd.REP_SERVER), (nbd.OPT_LIST, nbd.REP_ACK)]


def test_plaintext_after_starttls_is_refused():
    """Bytes pipelined after STARTTLS would be read as if they came over TLS: the connection ends."""
    c = nbd.ServerConnection([], tls=True, allowed=lambda n: True)
    c.receive_data(struct.pack(">I", 3) + _opt(nbd.OPT_STARTTLS) + _opt(nbd.OPT_LIST))
    evs = c.events()
    assert [type(e) for e in evs] == [nbd.ProtocolError] and "after NBD_OPT_STARTTLS" in evs[0].reason


def test_proxy_mode_policy_and_export_wanted():
    c = nbd.ServerConnection([], allowed=lambda n: n.startswith("fss"))
    c.set_exports([nbd.Export("fss0", 0, True)])
    info = lambda n: struct.pack(">I", len(n)) + n + struct.pack(">HH", 1, nbd.INFO_BLOCK_SIZE)  # noqa: E731
    c.receive_data(struct.pack(">I", 3) + _opt(nbd.OPT_GO, info(b"data")) + _opt(nbd.OPT_GO, info(b"fss1")) + _opt(nbd.OPT_GO, info(b"fss0")) + _opt(nbd.OPT_LIST))
    evs = c.events()
    assert evs == [nbd.PolicyRefused(nbd.OPT_GO, "data"), nbd.ExportWanted(nbd.OPT_GO, "fss0", (nbd.INFO_BLOCK_SIZE,))]
    # Allowed but absent: UNKNOWN; not allowed: POLICY whether it exists or not.
    assert _replies(c.data_to_send()) == [(nbd.OPT_GO, nbd.REP_ERR_POLICY), (nbd.OPT_GO, nbd.REP_ERR_UNKNOWN)]
    assert c.events() == []  # waits for the answer
    ready = c.export_answered(nbd.OPT_GO, nbd.option_reply(nbd.OPT_GO, nbd.REP_ACK), nbd.Export("fss0", 5, True))
    assert ready == nbd.Ready(nbd.Export("fss0", 5, True)) and c.state is nbd.State.TRANSMISSION
    assert c.take_buffered() == _opt(nbd.OPT_LIST)  # relayed as it came


def test_client_handshake_replays_and_forces_read_only():
    hs = ClientHandshake("fss0", nbd.OPT_GO, (nbd.INFO_BLOCK_SIZE,), structured=True, meta=[nbd.BASE_ALLOCATION], read_only=True)
    # The other side is a real ServerConnection serving a writable export: the replayed bytes must satisfy it.
    srv = nbd.ServerConnection([nbd.Export("fss0", 1 << 20, False)])
    hs.receive_data(srv.greeting())
    srv.receive_data(hs.data_to_send())
    evs = srv.events()
    assert [type(e) for e in evs] == [nbd.Ready] and srv.structured and srv.meta_base_allocation
    hs.receive_data(srv.data_to_send())
    res = hs.result
    assert res.ok and res.size == 1 << 20 and res.meta_ids == {nbd.BASE_ALLOCATION: nbd.BASE_ALLOCATION_ID}
    assert res.flags & nbd.TF_READ_ONLY and not res.flags & (nbd.TF_SEND_TRIM | nbd.TF_SEND_WRITE_ZEROES | nbd.TF_SEND_FUA)
    assert _replies(res.replies)[-1] == (nbd.OPT_GO, nbd.REP_ACK)


def test_client_handshake_forwards_the_workers_refusal():
    hs = ClientHandshake("fss0", nbd.OPT_GO, (), structured=False, meta=[], read_only=True)
    srv = nbd.ServerConnection([nbd.Export("fss0", 4096, True)], refusal="too many connections to fss0 (at most 1)")
    hs.receive_data(srv.greeting())
    srv.receive_data(hs.data_to_send())
    assert srv.events() == []
    hs.receive_data(srv.data_to_send())
    assert not hs.result.ok
    assert _replies(hs.result.replies) == [(nbd.OPT_GO, nbd.REP_ERR_POLICY)]
    assert b"too many connections" in hs.result.replies


def test_wildcards_never_reach_a_live_volume():
    b1 = Client("192.0.2.1", (("o", "fleet"), ("cn", "backup1")))
    rules = [AllowRule("CN=backup1", ["*", "fss*", "d*", "[d]ata"])]
    assert listenpolicy.allowed(rules, b1, "fss3")
    assert not listenpolicy.allowed(rules, b1, "data")
    assert listenpolicy.allowed([AllowRule("cn=backup1,O=fleet", ["data"])], b1, "data")
    assert not listenpolicy.allowed([AllowRule("CN=backup2", ["*"])], b1, "fss0")
    assert not listenpolicy.allowed([AllowRule("CN=backup1,O=other", ["*"])], b1, "fss0")
    assert listenpolicy.allowed([AllowRule("192.0.2.0/24", ["fss*"])], b1, "fss0")
    assert not listenpolicy.allowed([AllowRule("198.51.100.1", ["fss*"])], b1, "fss0")
    assert not listenpolicy.allowed([], b1, "fss0")  # default: nothing


# -- real clients ----------------------------------------------------------------------------------


def test_real_clients_read_snapshot_and_live_volume_bit_identical(srv, pki):
    out = srv.shm / "out.img"
    # Snapshot over nbds:// with four connections: its instant, not the volume as it is now.
    run("nbdcopy", "-C", "4", nbds(srv, pki, "backup1", "fss0"), out)
    assert sha256_file(out) == sha256_file(srv.shm / "instant.img")
    run("qemu-img", "compare", "--object", tls_object(pki, "backup1"), qemu_json(srv, "fss0"), srv.shm / "instant.img")
    # The live volume, named explicitly in backup1's rule: as it is now.
    out.unlink()
    run("nbdcopy", "-C", "4", nbds(srv, pki, "backup1", "data"), out)
    assert sha256_file(out) == sha256_file(srv.shm / "data.img")
    assert sha256_file(out) != sha256_file(srv.shm / "instant.img")
    out.unlink()
    run("qemu-img", "convert", "--object", tls_object(pki, "backup1"), "-O", "raw", qemu_json(srv, "fss0"), out)
    assert sha256_file(out) == sha256_file(srv.shm / "instant.img")
    out.unlink()
    info = run("nbdinfo", "--json", nbds(srv, pki, "backup1", "fss0")).stdout
    assert '"is_read_only": true' in info and '"can_trim": false' in info


def test_write_to_the_live_volume_over_tls_lands(srv, pki):
    """qemu-img convert into the live volume over nbds://, read back through the Unix socket."""
    src = srv.shm / "src.img"
    with open(src, "wb") as f:
        f.write(b"\x5c" * (2 * MiB))
    run("qemu-img", "convert", "-n", "--object", tls_object(pki, "backup1"), "--target-image-opts", "-f", "raw", src,
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=%d,export=data,tls-creds=tls0" % srv.ports["main"])
    # And 32 MiB WRITEs (the protocol's largest) through the relay.
    big = srv.shm / "big.img"
    with open(big, "wb") as f:
        f.write(b"\x5c" * (2 * MiB) + os.urandom(30 * MiB))
    run("nbdcopy", "--request-size=33554432", big, nbds(srv, pki, "backup1", "data"))
    big.unlink()
    got = run("nbdcopy", srv.uri("data"), "-", capture_output=True, text=False).stdout
    assert got[: 2 * MiB] == b"\x5c" * (2 * MiB)
    with open(srv.shm / "data.img", "rb") as f:
        assert got == f.read()
    # The snapshot still holds its instant where the volume was overwritten.
    r = opened(srv, pki, "backup1", "fss0")
    assert r.pread(1, 0, 4096) == instant(srv, 0, 4096)
    r.close()


def test_listing_shows_only_what_the_client_may_open(srv, pki):
    assert listed(nbds(srv, pki, "backup1")) == ["data", "fss0"]
    assert listed(nbds(srv, pki, "snaponly")) == ["fss0"]  # "*" does not reach the live volume
    assert listed(nbds(srv, pki, "stranger")) == []
    assert listed(f"nbd://127.0.0.1:{srv.ports['plain']}") == ["fss0"]


# -- refusals ----------------------------------------------------------------------------------------


def test_refusals_each_with_the_spec_reply_and_others_unaffected(srv, pki):
    before = sha256_file(srv.shm / "data.img")
    keeper = opened(srv, pki, "backup1", "fss0")  # another client, mid-session throughout
    assert keeper.pread(1, 0, 65536) == instant(srv, 0, 65536)

    # No TLS where it is required: every option but STARTTLS/ABORT is NBD_REP_ERR_TLS_REQD.
    r = Raw(srv.ports["main"])
    r.hello()
    assert [t for t, _ in r.option(nbd.OPT_LIST)] == [nbd.REP_ERR_TLS_REQD]
    assert [t for t, _ in r.go("fss0")] == [nbd.REP_ERR_TLS_REQD]
    assert [t for t, _ in r.option(nbd.OPT_ABORT)] == [nbd.REP_ACK]
    r.close()
    p = run("nbdinfo", f"nbd://127.0.0.1:{srv.ports['main']}/fss0", check=False)
    assert p.returncode != 0

    # Certificates the server must not accept: TLS fails with the server's alert, nothing is served.
    for who, alert in (("otherca-client", "UNKNOWN_CA"), ("expired", "CERTIFICATE_EXPIRED")):
        p = run("nbdinfo", nbds(srv, pki, who, "fss0"), check=False)
        assert p.returncode != 0, who
        assert "export-size" not in p.stdout
        r = Raw(srv.ports["main"])
        r.hello()
        with pytest.raises(ssl.SSLError) as e:
            r.starttls(pki / who)
            r.go("fss0")  # TLS 1.3: the client's certificate is judged after the client's side is done
        assert alert in str(e.value), (who, e.value)
        r.close()

    # A valid but unlisted certificate, and a snapshot-only client asking for the live volume: POLICY.
    for who, export in (("stranger", "fss0"), ("snaponly", "data")):
        r = Raw(srv.ports["main"])
        r.hello()
        r.starttls(pki / who)
        assert [t for t, _ in r.go(export)] == [nbd.REP_ERR_POLICY], who
        info = struct.pack(">I", len(export)) + export.encode() + b"\0\0"
        assert [t for t, _ in r.option(nbd.OPT_INFO, info)] == [nbd.REP_ERR_POLICY]
        r.close()
        p = run("nbdinfo", nbds(srv, pki, who, export), check=False)
        assert p.returncode != 0 and "export-size" not in p.stdout
    wait_for(lambda: "CN=snaponly" in log_text(srv) and "'data'" in log_text(srv), 10, "the refusal logged with the subject")
    assert re.search(r"refused 127\.0\.0\.1:\d+ O=fssd test,CN=snaponly export 'data'", log_text(srv))

    # A write to a snapshot: read-only advertised, EPERM, nothing changed.
    r = opened(srv, pki, "backup1", "fss0")
    assert r.pwrite(7, 0, b"\xff" * 4096) == nbd.EPERM
    assert r.pread(8, 0, 4096) == instant(srv, 0, 4096)
    r.close()
    p = subprocess.run(["nbdcopy", str(srv.shm / "instant.img"), nbds(srv, pki, "backup1", "fss0")], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0

    assert sha256_file(srv.shm / "data.img") == before
    assert keeper.pread(2, 32 * MiB, 65536) == instant(srv, 32 * MiB, 65536)
    keeper.close()


# -- limits -------------------------------------------------------------------------------------------


def test_handshake_timeout_holds_against_stalls_and_trickles(srv, pki):
    port = srv.ports["tight"]
    silent = Raw(port)
    t0 = time.monotonic()
    assert silent.closed_by_server(6)
    assert 0.7 < time.monotonic() - t0 < 4
    # A TLS ClientHello begun and never finished, and an option trickled byte by byte.
    hello = Raw(port)
    hello.hello()
    assert [t for t, _ in hello.option(nbd.OPT_STARTTLS)] == [nbd.REP_ACK]
    hello.sock.sendall(b"\x16\x03\x01\x02\x00\x01")
    trickle = Raw(port)
    trickle.hello()
    t0 = time.monotonic()
    with pytest.raises(OSError):
        for b in _opt(nbd.OPT_LIST) * 20:
            trickle.sock.sendall(bytes([b]))
            time.sleep(0.05)  # pacing the trickle, not waiting for readiness
    assert time.monotonic() - t0 < 4
    assert hello.closed_by_server(4)
    for r in (silent, hello, trickle):
        r.close()
    # The listener serves on.
    assert listed(nbds(srv, pki, "backup1", port="tight")) == ["fss0"]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


def test_sixty_stalled_handshakes_cost_little_and_leave_room(srv, pki):
    pid = srv.worker_pid("listen", f"127.0.0.1:{srv.ports['main']}")
    before = rss_kib(pid)
    stalled = []
    try:
        for i in range(60):
            r = Raw(srv.ports["main"])
            r.hello()
            if i % 4 == 0:  # 15 inside TLS (under snaponly's cap of 16), the rest before it
                r.starttls(pki / "snaponly")
            stalled.append(r)
        grown = rss_kib(pid) - before
        assert grown < 16 * 1024, f"front grew by {grown} KiB for 60 stalled handshakes"
        # The other 4 of the 64 slots still serve.
        assert listed(nbds(srv, pki, "backup1")) == ["data", "fss0"]
    finally:
        for r in stalled:
            r.close()
    print(f"60 stalled handshakes: front RSS +{grown} KiB")


def test_idle_timeout_closes_a_quiet_session(srv, pki):
    r = opened(srv, pki, "backup1", "fss0", port="tight")
    assert r.pread(1, 0, 512) == instant(srv, 0, 512)
    t0 = time.monotonic()
    assert r.closed_by_server(8)
    assert 1.2 < time.monotonic() - t0 < 5
    r.close()


def test_connection_caps(srv, pki):
    port = srv.ports["tight"]
    # Per client: backup1's third session is refused with POLICY; snaponly still gets in.
    a = opened(srv, pki, "backup1", "fss0", port="tight")
    b = opened(srv, pki, "backup1", "fss0", port="tight")
    c = Raw(port)
    c.hello()
    c.starttls(pki / "backup1")
    assert [t for t, _ in c.go("fss0")] == [nbd.REP_ERR_POLICY]
    c.close()
    d = opened(srv, pki, "snaponly", "fss0", port="tight")
    # Per listener (4): a, b, d and one stalled raw socket; the fifth is closed before a greeting.
    stall = Raw(port)
    stall.recv_exact(18)
    over = Raw(port)
    assert over.closed_by_server(3)
    with pytest.raises((EOFError, OSError)):
        over.recv_exact(18)
    for r in (a, b, d):
        assert r.pread(3, 0, 4096) == instant(srv, 0, 4096)  # the served ones are unaffected
    for r in (a, b, d, stall, over):
        r.close()
    # Slots come back.
    wait_for(lambda: listed(nbds(srv, pki, "backup1", port="tight")) == ["fss0"], 10, "a free slot")


# -- certificate rotation ---------------------------------------------------------------------------------


def test_sighup_rotates_the_server_certificate_and_keeps_open_sessions(srv, pki):
    old_der = ssl.PEM_cert_to_DER_cert((pki / "server" / "server-cert.pem").read_text())
    r = opened(srv, pki, "backup1", "fss0")
    assert r.sock.getpeercert(binary_form=True) == old_der
    assert r.pread(1, 0, MiB) == instant(srv, 0, MiB)
    # A new server certificate (same CA) in place, then SIGHUP.
    staging = pki / "server-new"
    sign(pki / "ca", staging, "server", "/O=fssd test/CN=localhost rotated", SERVER_EXT)
    for f in ("server-cert.pem", "server-key.pem"):
        os.replace(staging / f, pki / "server" / f)
    new_der = ssl.PEM_cert_to_DER_cert((pki / "server" / "server-cert.pem").read_text())
    sighup_and_wait(srv)
    # The open session reads on, with the certificate it started with.
    assert r.pread(2, MiB, 8 * MiB) == instant(srv, MiB, 8 * MiB)
    assert r.sock.getpeercert(binary_form=True) == old_der
    # New sessions get the new certificate, and real clients accept it.
    n = opened(srv, pki, "backup1", "fss0")
    assert n.sock.getpeercert(binary_form=True) == new_der != old_der
    n.close()
    r.close()
    assert listed(nbds(srv, pki, "backup1")) == ["data", "fss0"]


def sighup_and_wait(srv) -> None:
    line = "listen: INFO: 127.0.0.1:%d: reloaded" % srv.ports["main"]
    before = log_text(srv).count(line)
    srv.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: log_text(srv).count(line) > before, 20, "the front to reload")


def test_a_revoked_certificate_is_refused_once_ca_crl_pem_is_there(srv, pki):
    ca = pki / "ca"
    sign(ca, pki / "revoked", "client", "/O=fssd test/CN=backup1", CLIENT_EXT)
    assert listed(nbds(srv, pki, "revoked")) == ["data", "fss0"]
    (ca / "index.txt").write_text("")
    (ca / "crlnumber").write_text("01\n")
    (ca / "ca.cnf").write_text(f"[ca]\ndefault_ca = d\n[d]\ndatabase = {ca}/index.txt\ncrlnumber = {ca}/crlnumber\ndefault_md = sha256\ndefault_crl_days = 2\n")
    common = ["-config", ca / "ca.cnf", "-keyfile", ca / "ca-key.pem", "-cert", ca / "ca-cert.pem"]
    run("openssl", "ca", *common, "-revoke", pki / "revoked" / "client-cert.pem")
    run("openssl", "ca", *common, "-gencrl", "-out", pki / "server" / "ca-crl.pem")
    sighup_and_wait(srv)
    p = run("nbdinfo", nbds(srv, pki, "revoked", "fss0"), check=False)
    assert p.returncode != 0 and "export-size" not in p.stdout
    assert listed(nbds(srv, pki, "backup1")) == ["data", "fss0"]


def test_tls_without_client_certificates_goes_by_address(srv, pki, tmp_path):
    cadir = tmp_path / "ca-only"
    cadir.mkdir()
    shutil.copy(pki / "ca" / "ca-cert.pem", cadir / "ca-cert.pem")
    uri = f"nbds://127.0.0.1:{srv.ports['anon']}/fss0?tls-certificates={cadir}"
    out = srv.shm / "anon.img"
    run("nbdcopy", uri, out)
    assert sha256_file(out) == sha256_file(srv.shm / "instant.img")
    out.unlink()
    # Still TLS only.
    r = Raw(srv.ports["anon"])
    r.hello()
    assert [t for t, _ in r.go("fss0")] == [nbd.REP_ERR_TLS_REQD]
    r.close()


def test_plain_tcp_is_a_logged_warning(srv):
    assert re.search(r"127\.0\.0\.1:%d: plain TCP" % srv.ports["plain"], log_text(srv))
    out = srv.shm / "plain.img"
    run("nbdcopy", f"nbd://127.0.0.1:{srv.ports['plain']}/fss0", out)
    assert sha256_file(out) == sha256_file(srv.shm / "instant.img")
    out.unlink()


def test_front_is_a_titled_worker_restarted_after_a_kill_over_ipv6_too(srv, pki):
    key = f"listen [::1]:{srv.ports['v6']}"
    pid = srv.worker_pid("listen", key)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert f.read().split(b"\0")[0].decode() == f"fssd[{srv.rundir}]: {key}"
    uri = f"nbds://[::1]:{srv.ports['v6']}/fss0?tls-certificates={pki / 'backup1'}"
    os.kill(pid, signal.SIGKILL)
    # The supervisor holds the listening socket: a client connecting meanwhile queues and is served.
    out = srv.shm / "v6.img"
    run("nbdcopy", uri, out)
    assert sha256_file(out) == sha256_file(srv.shm / "instant.img")
    out.unlink()
    new = wait_for(lambda: srv.alive_pid("listen", key), 20, "the front to restart")
    assert new != pid
    assert listed(f"nbds://[::1]:{srv.ports['v6']}/?tls-certificates={pki / 'backup1'}") == ["fss0"]


def test_front_settings_follow_the_worker_contract():
    from workers.tcpfront import FrontSettings

    assert FrontSettings.__struct_fields__[-2:] == ("debug", "use_syslog")
    r = subprocess.run([sys.executable, "-m", "workers.tcpfront", "--channel-fd", "0", '{"no_such_field": 1}'],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "bad settings" in r.stderr, r.stderr


def test_bad_listen_config_is_one_line(tmp_path, fssd_factory, shmdir):
    f = fssd_factory([{"name": "data", "path": str(shmdir / "d.img"), "size": "4M"}], start=False)
    f.config.write_text(f.config.read_text() + f'\n[[listen]]\naddress = "127.0.0.1:{free_port()}"\ntls_dir = "{tmp_path}"\n')
    p = run(BIN / "fssd", "-c", f.config, check=False)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "server-cert.pem is missing" in p.stderr and "$.listen[0].tls_dir" in p.stderr
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        (tmp_path / name).write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    p = run(BIN / "fssd", "-c", f.config, check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "cannot load the TLS files" in p.stderr, p.stderr
    f.config.write_text(f.config.read_text().replace("[[listen]]", "[[listen]]\nallow = [{ client = \"CN=x\", exports = [\"*\"], bogus = 1 }]"))
    p = run(BIN / "fssd", "-c", f.config, check=False)
    assert p.returncode == 2 and "bogus" in p.stderr
    f.config.write_text(f.config.read_text().replace(", bogus = 1", "").replace("[[listen]]", '[[listen]]\ntls = "off"'))
    p = run(BIN / "fssd", "-c", f.config, check=False)
    assert p.returncode == 2 and "can never match" in p.stderr and "$.listen[0].allow[0]" in p.stderr
