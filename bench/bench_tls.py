"""Issue 13 benchmark: NBD over TLS on loopback, fssd's TCP front against qemu-nbd --tls-creds.

    python bench/bench_tls.py [--runs 3] [--fio-runtime 5] [--results FILE]

A 1 GiB image of incompressible data in /dev/shm, taken as snapshot fss0 by
fssd and served through a [[listen]] table (tls = "require", client
certificates), and served read-only by `qemu-nbd --tls-creds` (x509, verify-peer)
from the same certificate directory, at the same time. Runs alternate between
the servers. Figures (median of --runs):
  sequential read    nbdcopy -C 4 -T 4 nbds://... null:     MiB/s
  4k random read     fio --ioengine=nbd --iodepth=32        IOPS
Target: fssd / qemu-nbd >= 1.0. Also fssd's plain TCP listener (tls = "off")
against fssd's own Unix socket: what the relay through the front costs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peers import GiB, Fssd, Scratch, _register, _stop_pid, emit, fio_nbd, fmt_runs, install_signal_handlers, make_random_image, median, nbdcopy, row, run, wait_for  # noqa: E402

TARGET = 1.0
SERVER_EXT = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n"
CLIENT_EXT = "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n"


def make_pki(d: Path) -> tuple[Path, Path]:
    """A CA, a server directory and a client directory in qemu's layout."""
    ca, srv, cli = d / "ca", d / "server", d / "client"
    for x in (ca, srv, cli):
        x.mkdir(parents=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run("openssl", "req", "-x509", *ec, "-keyout", ca / "ca-key.pem", "-out", ca / "ca-cert.pem", "-subj", "/CN=bench CA", "-days", "2")
    for out, stem, subj, ext in ((srv, "server", "/CN=localhost", SERVER_EXT), (cli, "client", "/CN=backup1", CLIENT_EXT)):
        (out / "ext").write_text(ext)
        run("openssl", "req", *ec, "-keyout", out / f"{stem}-key.pem", "-out", out / "csr", "-subj", subj)
        run("openssl", "x509", "-req", "-in", out / "csr", "-CA", ca / "ca-cert.pem", "-CAkey", ca / "ca-key.pem", "-CAcreateserial",
            "-days", "2", "-extfile", out / "ext", "-out", out / f"{stem}-cert.pem")
        (out / "csr").unlink()
        (out / "ext").unlink()
        shutil.copy(ca / "ca-cert.pem", out / "ca-cert.pem")
    return srv, cli


def libnbd_home(clidir: Path, home: Path) -> Path:
    """fio's nbd engine may not name local files in a URI (tls-certificates=), so libnbd
    must find the client's certificates in its default place: $HOME/.pki/libnbd for a
    user other than root. fio runs as nobody with this HOME (the files are nobody's)."""
    d = home / ".pki" / "libnbd"
    d.parent.mkdir(parents=True)
    shutil.copytree(clidir, d)
    for p in [home, home / ".pki", d, *d.iterdir()]:
        os.chown(p, 65534, 65534)
    os.chmod(home.parent, 0o711)  # the scratch directory: nobody may pass through it
    return home


def fio_as_nobody(uri: str, home: Path, rw: str, runtime: float) -> float:
    """IOPS of fio's nbd engine (as peers.fio_nbd), run as nobody with HOME=home."""
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "env", f"HOME={home}",
            "fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k", "--iodepth=32", "--size=1G",
            "--output-format=json", "--time_based", f"--runtime={runtime}", "--ramp_time=1"]
    p = run(*argv, cwd=str(home))
    out = p.stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio error {job['error']}: {p.stderr}")
    return job["read"]["iops"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QemuNbd:
    def __init__(self, image: Path, port: int, tls_dir: Path):
        self.proc = subprocess.Popen(
            ["qemu-nbd", "--object", f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=server,verify-peer=on", "--tls-creds", "tls0",
             "-r", "-f", "raw", "-b", "127.0.0.1", "-p", str(port), "-x", "fss0", "--persistent", "--shared=16", str(image)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _register(f"pid {self.proc.pid} qemu-nbd")

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"qemu-nbd exited: {self.proc.stderr.read().decode()}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(up, 10, "qemu-nbd to listen")

    def stop(self) -> None:
        _stop_pid(self.proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--fio-runtime", type=float, default=5)
    ap.add_argument("--results", default=os.environ.get("FSSD_BENCH_RESULTS"))
    args = ap.parse_args()
    install_signal_handlers()

    scratch = Scratch("tls")
    fssd = qemu = None
    try:
        srvdir, clidir = make_pki(scratch.tmp / "pki")
        home = libnbd_home(clidir, scratch.tmp / "home")
        img = scratch.shm / "volume.img"
        make_random_image(img, GiB)
        tls_port, plain_port, qemu_port = free_port(), free_port(), free_port()
        fssd = Fssd(scratch, [("vol", str(img), None)])
        fssd.config.write_text(fssd.config.read_text() + f"""
[[listen]]
address = "127.0.0.1:{tls_port}"
tls_dir = "{srvdir}"
allow = [{{ client = "CN=backup1", exports = ["fss*"] }}]

[[listen]]
address = "127.0.0.1:{plain_port}"
tls = "off"
allow = [{{ client = "127.0.0.1", exports = ["fss*"] }}]
""")
        fssd.start()
        fssd.fssconfig("fss0", "vol", str(scratch.shm / "bs0"))
        qemu = QemuNbd(img, qemu_port, srvdir)
        q = f"?tls-certificates={clidir}"
        pairs = [
            ("TLS", "fssd", f"nbds://127.0.0.1:{tls_port}/fss0{q}", "qemu-nbd", f"nbds://127.0.0.1:{qemu_port}/fss0{q}"),
            ("plain TCP vs Unix", "fssd tcp", f"nbd://127.0.0.1:{plain_port}/fss0", "fssd unix", fssd.uri("fss0")),
        ]
        tests = [
            ("seq read (nbdcopy -C4 -T4)", "MiB/s", lambda u: nbdcopy(u, "null:", GiB)),
            ("4k randread QD32 (fio nbd)", "IOPS", lambda u: fio_as_nobody(u.split("?")[0], home, "randread", args.fio_runtime) if u.startswith("nbds:") else fio_nbd(u, "randread", runtime=args.fio_runtime)),
        ]
        rows = []
        print(f"{'figure':44} {'fssd':>9} {'peer':>9} {'ratio':>6}  runs fssd | peer")
        for label, a_name, a_uri, b_name, b_uri in pairs:
            for name, unit, fn in tests:
                got = {a_name: [], b_name: []}
                for _ in range(args.runs):
                    got[a_name].append(fn(a_uri))
                    got[b_name].append(fn(b_uri))
                a, b = median(got[a_name]), median(got[b_name])
                ratio = a / b
                fig = f"{label}: {name}"
                print(f"{fig:44} {a:9.0f} {b:9.0f} {ratio:5.2f}x  {fmt_runs(got[a_name])} | {fmt_runs(got[b_name])}  {unit} ({a_name} vs {b_name})", flush=True)
                is_tls = label == "TLS"
                rows.append(row(f"{a_name} {fig}", a, unit, got[a_name], b_name, b, got[b_name], ratio,
                                f">= {TARGET:.2f}x" if is_tls else "", (ratio >= TARGET) if is_tls else None))
        emit(args.results, rows)
        return 0
    finally:
        if qemu:
            qemu.stop()
        if fssd:
            fssd.stop()
        scratch.cleanup()


if __name__ == "__main__":
    sys.exit(main())
