"""Logging for every fssd process: one line per event, journal friendly.

Under systemd (stderr is the journal, $JOURNAL_STREAM set) each line starts
with the sd-daemon priority prefix `<N>` so journald files it at the right
level; elsewhere lines carry a time stamp. `-s` sends to syslog instead.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import threading
import time

# sd-daemon(3) priorities: <3> err, <4> warning, <5> notice, <6> info, <7> debug.
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    def __init__(self, with_prefix: bool):
        fmt = "%(name)s: %(message)s" if with_prefix else "%(asctime)s %(name)s: %(levelname)s: %(message)s"
        super().__init__(fmt)
        self.with_prefix = with_prefix

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\n", " | ")
        if self.with_prefix:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{text}"
        return text


def setup(name: str, debug: bool = False, use_syslog: bool = False) -> logging.Logger:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if use_syslog and os.path.exists("/dev/log"):
        handler: logging.Handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("fssd[%(process)d]: %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JournalFormatter(with_prefix="JOURNAL_STREAM" in os.environ))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    return logging.getLogger(name)


class RateLimited:
    """A line a peer can cause, logged at most once per `every` seconds, with how many
    were held back: whoever may connect can't fill the log (or the disk under it)."""

    def __init__(self, logger: logging.Logger, every: float = 60.0):
        self.logger = logger
        self.every = every
        self._next = 0.0
        self._held = 0
        self._lock = threading.Lock()

    def __call__(self, level: int, msg: str, *args) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._held += 1
                return
            held, self._held = self._held, 0
            self._next = now + self.every
        if held:
            msg += f" ({held} more since the last such message)"
        self.logger.log(level, msg, *args)

    def warning(self, msg: str, *args) -> None:
        self(logging.WARNING, msg, *args)

    def info(self, msg: str, *args) -> None:
        self(logging.INFO, msg, *args)
