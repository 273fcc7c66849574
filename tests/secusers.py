"""Test users for the permission model: a member of fssd's group and a stranger.

Both are created with unique names and removed afterwards, also when a test
fails. They run fssconfig from a world-readable copy of the sources and of
msgspec, with the system python: the checkout (and its .venv, whose python
may live under /root) can sit in a 0700 directory another uid cannot enter.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Users:
    def __init__(self):
        tag = secrets.token_hex(3)
        self.group = f"fsg{tag}"
        self.member = f"fsm{tag}"
        self.stranger = f"fss{tag}"
        self._made: list[tuple[str, str]] = []
        self.code = ""

    def create(self) -> "Users":
        subprocess.run(["groupadd", self.group], check=True, capture_output=True)
        self._made.append(("group", self.group))
        for name, extra in ((self.member, ["-G", self.group]), (self.stranger, [])):
            subprocess.run(["useradd", "-M", "-N", "-g", "nogroup", "-s", "/usr/sbin/nologin", *extra, name], check=True, capture_output=True)
            self._made.append(("user", name))
        self.code = _portable_code()
        return self

    def remove(self) -> None:
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

    def run(self, name: str, *argv, timeout: float = 60) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": self.code, "LC_ALL": "C.UTF-8"}
        return subprocess.run(self.argv(name, *argv), capture_output=True, text=True, timeout=timeout, env=env, cwd="/")

    def fssconfig(self, name: str, *args, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run(name, "/usr/bin/python3", "-s", "-m", "daemon.fssconfig", *args, timeout=timeout)


def _portable_code() -> str:
    d = tempfile.mkdtemp(prefix="fssd-code-")
    os.chmod(d, 0o755)
    for pkg in ("daemon", "ipc", "workers"):
        shutil.copytree(ROOT / pkg, Path(d) / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    import msgspec

    shutil.copytree(Path(msgspec.__file__).parent, Path(d) / "msgspec", ignore=shutil.ignore_patterns("__pycache__"))
    for p in Path(d).rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    assert sysconfig.get_config_var("SOABI")  # the copied msgspec is built for this python's ABI
    return d
