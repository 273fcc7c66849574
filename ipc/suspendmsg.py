"""Messages between the supervisor and `fssd: suspend fssN` (workers.suspend).

One msgpack message per SOCK_SEQPACKET packet. The supervisor sends Thaw once
its barrier is done; the suspend process answers Frozen (or Failed) after
FIFREEZE, and Thawed after FITHAW, whoever caused it.
"""

from __future__ import annotations

import msgspec


class _Msg(msgspec.Struct, tag_field="t", frozen=True):
    pass


class Thaw(_Msg, tag="thaw"):
    pass


class Frozen(_Msg, tag="frozen"):
    sync_ms: float  # syncfs before the freeze (outside the window)
    freeze_ms: float  # FIFREEZE of every mount (inside the window)
    frozen_at: float = 0.0  # time.monotonic() once every FIFREEZE returned
    already: list[str] = []  # frozen by someone else already (EBUSY): left as they are, never thawed here


class Failed(_Msg, tag="failed"):
    reason: str  # nothing is left frozen


class Thawed(_Msg, tag="thawed"):
    window_ms: float  # first FIFREEZE to last FITHAW
    thaw_at: float  # time.monotonic() (system-wide) just before the first FITHAW
    by: str  # "request", "freeze_max", "signal", "supervisor gone"
    errors: list[str] = []
    thaw_ms: float = 0.0  # the FITHAWs


MAX_PACKET = 65536
ToSuspend = Thaw
FromSuspend = Frozen | Failed | Thawed
