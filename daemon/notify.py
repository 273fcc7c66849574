"""sd_notify(3) for the supervisor, with no dependency.

The protocol is one datagram per call to the AF_UNIX socket named by
$NOTIFY_SOCKET, a payload of newline-separated KEY=VALUE lines. systemd
documents it as stable, so the ~15 lines of its own reference example are all
it takes (sdnotify encodes latin-1; systemd-python needs a compiler).

Only the supervisor notifies: the unit says NotifyAccess=main, so anything a
worker sent would be dropped. Workers are started with `child_env()` and a
Notifier inherited across fork() stays silent in the child.

Sending never raises: a lost status line must not take the daemon down.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

log = logging.getLogger("fssd.notify")

# What systemd hands the main process; none of it is meant for workers.
NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of `env` without the notify variables, for spawning workers.

    A worker that saw NOTIFY_SOCKET could send READY=1 early, and one that saw
    WATCHDOG_USEC would ping on behalf of a supervisor that may be hung.
    """
    return {k: v for k, v in env.items() if k not in NOTIFY_ENV}


def _address(value: str) -> str | None:
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]  # Linux abstract namespace
    return None  # vsock:… and anything else: not supported here


class Notifier:
    """Talks to the service manager; a no-op when there is none.

    `address` is a socket path or an abstract name with a leading NUL (use
    `from_env()` to get it from $NOTIFY_SOCKET).
    """

    def __init__(self, address: str | None = None, watchdog_usec: str | None = None, watchdog_pid: str | None = None):
        self.address = address
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        # The process that owns the notifier; a forked child must not speak for it.
        self._pid = os.getpid()
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None, unset_environment: bool = False) -> "Notifier":
        """From $NOTIFY_SOCKET / $WATCHDOG_USEC / $WATCHDOG_PID.

        With `unset_environment` the variables are removed from `environ`
        (default os.environ) afterwards, as sd_notify(3)'s flag of that name.
        """
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET") or ""
        address = _address(raw) if raw else None
        if raw and address is None:
            log.warning("NOTIFY_SOCKET=%r is not a path or an abstract name; not notifying", raw)
        notifier = cls(address, env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID"))
        if unset_environment:
            for key in NOTIFY_ENV:
                env.pop(key, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: object) -> bool:
        """One datagram of KEY=VALUE lines, in the order given.

        Returns whether it was sent; failures are logged at debug level only.
        """
        if self.address is None or os.getpid() != self._pid or not fields:
            return False
        lines = []
        for key, value in fields.items():
            # A newline in a value would start a bogus assignment.
            text = str(value).replace("\r", " ").replace("\n", " ")
            lines.append(f"{key}={text}")
        payload = "\n".join(lines).encode("utf-8", "replace")
        try:
            if self._sock is None:
                # CLOEXEC: workers must not inherit it. Unconnected + sendto so
                # a manager that re-binds its socket (daemon-reexec) still hears us.
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, self.address)
        except OSError as e:
            log.debug("sd_notify %s failed: %s", " ".join(fields), e)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete: every export listens."""
        if status is None:
            return self.send(READY=1)
        return self.send(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """One line for `systemctl status`; send it when it changes, not per I/O."""
        return self.send(STATUS=text)

    def stopping(self, status: str | None = None) -> bool:
        if status is None:
            return self.send(STOPPING=1)
        return self.send(STOPPING=1, STATUS=status)

    def reloading(self, status: str | None = None) -> bool:
        """Reload begins; send ready() when it is done.

        MONOTONIC_USEC is what Type=notify-reload (systemd >= 253) requires;
        older managers ignore it.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        if status is None:
            return self.send(RELOADING=1, MONOTONIC_USEC=usec)
        return self.send(RELOADING=1, MONOTONIC_USEC=usec, STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def watchdog_interval(self) -> float | None:
        """WatchdogSec= in seconds if it applies to this process, else None.

        As sd_watchdog_enabled(3): WATCHDOG_PID, when set, must be our pid.
        Ping at half this interval.
        """
        if self._watchdog_usec is None:
            return None
        if self._watchdog_pid is not None:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 1_000_000

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
