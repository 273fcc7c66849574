"""Polling a real condition until it holds: the one wait the tests, the benches and the demo share.

A bare sleep standing in for readiness is either too short on a loaded machine or
wastes time on an idle one; this asks the condition itself, often, up to a deadline.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(pred: Callable[[], T], timeout: float = 20.0, what: str = "condition", interval: float = 0.02) -> T:
    """pred()'s first true value; TimeoutError naming `what` once `timeout` seconds pass without one."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
