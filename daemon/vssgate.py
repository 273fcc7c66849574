"""The supervisor's way to its own VSS broker for `fssconfig -C`: CHECK, FREEZE, THAW.

Over the channel it already has to the broker (VssAsk / VssAnswer, settled by
the broker's Worker like any reply), not over the broker's public socket: the
event loop never waits on it, and no thread is needed.
"""

from __future__ import annotations

import asyncio

from daemon.procs import Worker, WorkerGone
from ipc import workermsg


class ChannelVssGate:
    def __init__(self, broker: Worker, mounts: list[str], timeout: float):
        self.broker = broker
        self.mounts = list(mounts)
        self.timeout = timeout

    async def request(self, op: str, timeout: float) -> tuple[bool, str, bool]:
        """(ok, reason, unknown): unknown = no answer, the broker may have acted."""
        # As long as a socket requestor waits: every phase of a failing FREEZE may time out.
        wait = 3 * timeout + 5.0
        try:
            r = await self.broker.call(workermsg.VssAsk(op, timeout, self.broker.next_req()), timeout=wait)
        except asyncio.TimeoutError:
            return False, f"no reply from the broker to {op} within {wait:g} s", True
        except WorkerGone as e:
            return False, f"VSS broker gone: {e}", False
        if not isinstance(r, workermsg.VssAnswer):
            return False, f"broker answered {op} with a {type(r).__name__}", False
        return r.ok, r.reason, False
