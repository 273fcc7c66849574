"""qemu-guest-agent fsfreeze-hook.d compatible hook scripts.

As the stock qemu-ga fsfreeze-hook (qemu's scripts/qemu-guest-agent/fsfreeze-hook): every executable in
the directory, in glob (sorted) order, the same order for freeze and thaw,
skipping editor and package-manager leftovers; argv is [file, "freeze"|"thaw"]
with stdin /dev/null and stdout+stderr captured, in its own session (setsid).
Unlike the stock wrapper (which always exits 0), a hook failing on "freeze"
fails the FREEZE, and every hook has a time limit: the agent has none and a
hanging hook hangs it.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field

SKIP = ("*~", "*.bak", "*.orig", "*.rpmnew", "*.rpmorig", "*.rpmsave", "*.sample", "*.dpkg-*")
MAX_OUTPUT = 4096  # captured per hook, for the log


@dataclass
class HookRun:
    path: str
    returncode: int | None  # None: killed at the time limit
    output: str
    seconds: float


@dataclass
class HooksResult:
    ok: bool
    runs: list[HookRun] = field(default_factory=list)
    reason: str = ""


def list_hooks(hooks_dir: str | None) -> list[str]:
    if not hooks_dir or not os.path.isdir(hooks_dir):
        return []
    out = []
    for name in sorted(os.listdir(hooks_dir)):
        path = os.path.join(hooks_dir, name)
        if any(fnmatch.fnmatch(name, pat) for pat in SKIP):
            continue
        if os.path.isfile(path) and os.access(path, os.X_OK):
            out.append(path)
    return out


def _run(path: str, action: str, timeout: float) -> HookRun:
    t0 = time.monotonic()
    try:
        p = subprocess.Popen([path, action], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    except OSError as e:
        return HookRun(path, 127, f"cannot execute: {e.strerror}", 0.0)
    try:
        out, _ = p.communicate(timeout=max(timeout, 0.001))
        rc: int | None = p.returncode
    except subprocess.TimeoutExpired:
        # Kill the whole session: a hook's children must not outlive the phase.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, _ = p.communicate()
        rc = None
    text = out[-MAX_OUTPUT:].decode("utf-8", "replace").strip()
    return HookRun(path, rc, text, time.monotonic() - t0)


def run_hooks(hooks_dir: str | None, action: str, timeout: float) -> HooksResult:
    """Run every hook with `action` within `timeout` seconds in all.

    freeze: stops at the first failure (the caller then runs thaw hooks).
    thaw: runs all of them; failures are reported, not fatal to the others.
    """
    assert action in ("freeze", "thaw")
    deadline = time.monotonic() + timeout
    res = HooksResult(ok=True)
    for path in list_hooks(hooks_dir):
        run = _run(path, action, deadline - time.monotonic())
        res.runs.append(run)
        if run.returncode != 0:
            why = "timed out" if run.returncode is None else f"exit status {run.returncode}"
            res.ok = False
            msg = f"hook {path} {action}: {why}" + (f": {run.output.splitlines()[-1]}" if run.output else "")
            res.reason = res.reason or msg
            if action == "freeze":
                break
    return res
