"""Test users for the permission model: a member of fssd's group and a stranger.

Both are created with unique names and removed afterwards, also when a test
fails (conftest's session fixture `users`). They run our code from a
world-readable copy of the sources and of msgspec and posix_ipc, with a Python
outside the checkout: the checkout (and its .venv, whose python may live under
/root) can sit in a 0700 directory another uid cannot enter.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class Users:
    def __init__(self):
        tag = secrets.token_hex(3)
        self.group = f"fsg{tag}"
        self.member = f"fsm{tag}"
        self.stranger = f"fss{tag}"
        self._made: list[tuple[str, str]] = []
        self._started: list[subprocess.Popen] = []
        self.code = ""
        self.python = ""

    def create(self) -> "Users":
        subprocess.run(["groupadd", self.group], check=True, capture_output=True)
        self._made.append(("group", self.group))
        for name, extra in ((self.member, ["-G", self.group]), (self.stranger, [])):
            subprocess.run(["useradd", "-M", "-N", "-g", "nogroup", "-s", "/usr/sbin/nologin", *extra, name], check=True, capture_output=True)
            self._made.append(("user", name))
        self.code = _portable_code()
        self.python = self._find_python()
        return self

    def remove(self) -> None:
        for p in self._started:
            if p.poll() is None:
                p.kill()
            p.wait()
        self._started.clear()
        for kind, name in reversed(self._made):
            subprocess.run(["userdel" if kind == "user" else "groupdel", name], capture_output=True)
        self._made.clear()
        if self.code:
            shutil.rmtree(self.code, ignore_errors=True)

    def uid(self, name: str) -> int:
        import pwd

        return pwd.getpwnam(name).pw_uid

    def gid(self) -> int:
        import grp

        return grp.getgrnam(self.group).gr_gid

    def home(self, base: Path, name: str) -> Path:
        """A directory of the user's own under `base` (0700), for stores they create."""
        d = base / f"home-{name}"
        d.mkdir(exist_ok=True)
        os.chown(d, self.uid(name), 65534)
        d.chmod(0o700)
        return d

    def argv(self, name: str, *argv) -> list[str]:
        return ["setpriv", f"--reuid={name}", "--regid=nogroup", "--init-groups", *map(str, argv)]

    def run(self, name: str, *argv, timeout: float = 60, wait: bool = True, ipc_of: int | None = None):
        """Run argv as `name` (in process ipc_of's IPC namespace if given, for its queues).

        wait: the CompletedProcess; else the running Popen (pipes on stdin and stdout),
        killed at remove() if still running."""
        full = self.argv(name, *argv)
        if ipc_of is not None:
            full = ["nsenter", f"--ipc=/proc/{ipc_of}/ns/ipc", *full]
        env = {"PATH": ENV_PATH, "PYTHONPATH": self.code, "LC_ALL": "C.UTF-8"}
        if wait:
            return subprocess.run(full, capture_output=True, text=True, timeout=timeout, env=env, cwd="/")
        p = subprocess.Popen(full, env=env, cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._started.append(p)
        return p

    def py(self, name: str, *args, code: str | None = None, **kw):
        """Our Python code as `name`: `py(user, "-m", "daemon.cli.vssadm", ...)` or `py(user, code=...)`."""
        return self.run(name, self.python, "-s", *(["-c", code] if code is not None else []), *args, **kw)

    def fssconfig(self, name: str, *args, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.py(name, "-m", "daemon.cli.fssconfig", *args, timeout=timeout)

    def _find_python(self) -> str:
        """A Python of this version that the member can run with the copied packages."""
        ver = f"{sys.version_info.major}.{sys.version_info.minor}"
        tried = []
        for py in (f"/usr/bin/python{ver}", os.path.realpath(sys.executable), f"/usr/local/bin/python{ver}"):
            r = self.run(self.member, py, "-s", "-c", "import msgspec, posix_ipc, ipc.vss_client, daemon.cli.fssconfig", timeout=30)
            if r.returncode == 0:
                return py
            tried.append(f"{py}: {r.stderr.strip().splitlines()[-1:] or r.returncode}")
        raise AssertionError(f"no Python {ver} that user {self.member} can run with msgspec and posix_ipc: {tried}")


def _portable_code() -> str:
    d = tempfile.mkdtemp(prefix="fssd-code-")
    os.chmod(d, 0o755)
    for pkg in ("daemon", "ipc", "workers"):
        shutil.copytree(ROOT / pkg, Path(d) / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    import msgspec
    import posix_ipc

    shutil.copytree(Path(msgspec.__file__).parent, Path(d) / "msgspec", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(posix_ipc.__file__, Path(d) / Path(posix_ipc.__file__).name)
    for p in Path(d).rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    assert sysconfig.get_config_var("SOABI")  # the copied extensions are built for this python's ABI
    return d
