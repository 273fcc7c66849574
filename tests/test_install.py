"""`make install` / `make uninstall` for real: a private venv, the unit, the config, a served volume.

Installs into a PREFIX under the test's own directory (SYSCONFDIR, UNITDIR and
UDEVDIR too), so the machine's /usr and /etc are never touched; the paths are
what an administrator would pass. The venv's interpreter is this test's base
python (not the .venv running pytest).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from fsshelp import ROOT, run, wait_for

PYTHON = getattr(sys, "_base_executable", sys.executable)
TOOLS_SBIN = ["fssd", "fssconfig", "vssadm"]
MAN_PAGES = ["man4/fssd.4", "man5/fssd.toml.5", "man8/fssd.8", "man8/fssconfig.8", "man8/vssadm.8", "man8/appvss.8"]


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) + ("/" if p.is_dir() and not p.is_symlink() else "") for p in root.rglob("*"))


def layout(root: Path) -> dict[str, str]:
    return {
        "PREFIX": f"{root}/usr",
        "SYSCONFDIR": f"{root}/etc",
        "UNITDIR": f"{root}/lib/systemd/system",
        "UDEVDIR": f"{root}/lib/udev/rules.d",
    }


def make(target: str, **variables) -> subprocess.CompletedProcess:
    args = [f"{k}={v}" for k, v in variables.items()]
    return run("make", "-C", ROOT, target, f"PYTHON={PYTHON}", *args, timeout=600)


def clean_env() -> dict[str, str]:
    """No trace of the checkout or of pytest's venv: the installed tools stand alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    return env


def test_make_install_serves_a_volume_and_uninstall_removes_exactly_what_it_added(tmp_path):
    root = tmp_path / "root"
    # Something that was there before and is not fssd's: it must survive.
    (root / "usr/share/man/man8").mkdir(parents=True)
    (root / "usr/share/man/man8/other.8").write_text(".Dd x\n")
    before = listing(root)
    v = layout(root)
    make("install", **v)
    prefix = Path(v["PREFIX"])
    venv = prefix / "lib/fssd/venv"

    # Console scripts are links into the private venv; nothing in the system python.
    for t in TOOLS_SBIN:
        assert os.readlink(prefix / "sbin" / t) == f"{venv}/bin/{t}"
    assert os.readlink(prefix / "bin/appvss") == f"{venv}/bin/appvss"
    r = run(PYTHON, "-c", "import importlib.metadata as m; m.version('fssd')", check=False, cwd="/", env=clean_env())
    assert r.returncode == 1 and "PackageNotFoundError" in r.stderr
    where = run(venv / "bin/python", "-c", "import daemon, msgspec; print(daemon.__file__)", cwd="/", env=clean_env()).stdout
    assert where.startswith(f"{venv}/lib/"), where
    assert run(prefix / "sbin/fssd", "--version", cwd="/", env=clean_env()).stdout == f"fssd {metadata.version('fssd')}\n"

    # The unit runs this fssd on this config, and systemd accepts it as installed.
    unit = root / "lib/systemd/system/fssd.service"
    assert f"\nExecStart={prefix}/sbin/fssd -c {root}/etc/fssd/fssd.toml\n" in unit.read_text()
    r = run("systemd-analyze", "verify", "--man=no", unit, check=False)
    ours = [l for l in (r.stdout + r.stderr).splitlines() if "fssd.service" in l]
    assert r.returncode == 0 and ours == [], r.stdout + r.stderr
    assert (root / "lib/udev/rules.d/90-fssd.rules").read_text() == (ROOT / "etc/udev/90-fssd.rules").read_text()
    for page in MAN_PAGES:
        assert (prefix / "share/man" / page).read_text() == (ROOT / "man" / Path(page).name).read_text()

    # The installed fssd on the installed config (its run directory and image moved
    # into the test's directory, as an administrator would edit them) serves the volume.
    conf = root / "etc/fssd/fssd.toml"
    original = conf.read_bytes()
    rundir, state = tmp_path / "run", tmp_path / "state"
    state.mkdir()
    # The state directory too: never this machine's own /var/lib/fssd.
    edited = (original.decode().replace('"/run/fssd"', f'"{rundir}"').replace('"/var/lib/fssd/data.img"', f'"{state}/data.img"')
              .replace('statedir = "/var/lib/fssd"', f'statedir = "{state}"'))
    assert edited.count(str(tmp_path)) == 3 and "/var/lib/fssd" not in edited
    conf.write_text(edited)
    log = open(tmp_path / "fssd.log", "wb")
    proc = subprocess.Popen([prefix / "sbin/fssd", "-c", conf], stdout=log, stderr=subprocess.STDOUT, cwd="/", env=clean_env())
    try:
        def ready():
            assert proc.poll() is None, (tmp_path / "fssd.log").read_text()
            return run(prefix / "sbin/fssconfig", "-r", rundir, "-l", check=False, env=clean_env()).returncode == 0

        wait_for(ready, 30, "the installed fssd to answer")
        size = run("nbdinfo", "--size", f"nbd+unix:///data?socket={rundir}/data.sock").stdout.strip()
        assert size == str(1 << 30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()

    # Installing again keeps the config and still knows what the first install made;
    # with the config unchanged, uninstall takes everything install added, and nothing else.
    conf.write_bytes(original)
    assert "keeping existing" in make("install", **v).stdout
    make("uninstall", **v)
    assert listing(root) == before


def test_uninstall_keeps_a_configuration_the_administrator_changed(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    v = layout(root)
    make("install", NO_PY="1", **v)
    conf = root / "etc/fssd/fssd.toml"
    conf.write_text("# mine\n")
    out = make("uninstall", NO_PY="1", **v).stdout
    assert "keeping" in out and conf.read_text() == "# mine\n"
    assert listing(root) == ["etc/", "etc/fssd/", "etc/fssd/fssd.toml"]


def test_staged_install_runs_once_copied_to_its_final_place(tmp_path):
    stage, final = tmp_path / "stage", tmp_path / "final"
    v = layout(final)
    make("install", DESTDIR=stage, **v)
    staged = stage / str(final).lstrip("/")
    # No file (scripts, activate, pyvenv.cfg, byte code) still names the staging tree.
    mentions = [str(p) for p in stage.rglob("*") if p.is_file() and not p.is_symlink() and str(stage).encode() in p.read_bytes()]
    assert mentions == []
    # What a package manager does: the staged tree, unpacked at /.
    run("cp", "-a", staged, tmp_path)
    run("rm", "-rf", stage)
    prefix = final / "usr"
    assert run(prefix / "sbin/fssconfig", "--version", cwd="/", env=clean_env()).stdout == f"fssconfig {metadata.version('fssd')}\n"
    where = run(prefix / "lib/fssd/venv/bin/python", "-c", "import workers.volume as w; print(w.__file__, w.__cached__)", cwd="/", env=clean_env()).stdout
    assert where.split() == [f"{prefix}/lib/fssd/venv/lib/python3.{sys.version_info.minor}/site-packages/workers/volume.py",
                             f"{prefix}/lib/fssd/venv/lib/python3.{sys.version_info.minor}/site-packages/workers/__pycache__/volume.cpython-3{sys.version_info.minor}.pyc"]
    # Byte code compiled for the final path: tracebacks name the installed file.
    r = run(prefix / "lib/fssd/venv/bin/python", "-c", "import workers.volume as w; print(w.main.__code__.co_filename)", cwd="/", env=clean_env())
    assert r.stdout.strip() == f"{prefix}/lib/fssd/venv/lib/python3.{sys.version_info.minor}/site-packages/workers/volume.py"


def test_building_the_package_gives_no_deprecation_warning(tmp_path):
    r = run(sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", tmp_path, ROOT, timeout=300)
    assert "Successfully built fssd" in r.stdout + r.stderr
    warnings = [l for l in (r.stdout + r.stderr).splitlines() if "Warning" in l and "setuptools" in l or "deprecated" in l]
    assert warnings == []
