"""One barrier across several volume workers: every one drained before any resumes.

A snapshot set (several volumes, one instant) and a volume served by several
processes both need it. In three phases over the workers' channels:

1. Hold, all at once: each worker closes its write gate and drains the writes
   in flight (Held);
2. Attach, each snapshot inside its worker's hold (no second gate close),
   every map stamped with one instant;
3. Release, all at once: the gates open (Released, with the µs each held).

All or none: if any worker refuses or does not answer, the snapshots attached
so far are detached while the gates are still held, and every gate is
released; a worker whose hold opened by itself before the Release (it never
stays held longer than workers.cow.HOLD_MAX) makes the whole barrier fail the
same way, since writes went on there after its instant. One member alone
takes the one-message barrier (AttachSnapshot without a hold: the worker
holds, attaches and releases by itself), the shortest possible hold.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from typing import Callable, NamedTuple

import msgspec

from daemon.errors import ControlError
from daemon.procs import Worker, WorkerGone
from ipc import workermsg

log = logging.getLogger("supervisor")

TIMEOUT = 30.0  # one phase's answer from one worker


class Member(NamedTuple):
    worker: Worker
    attach: workermsg.AttachSnapshot  # req, hold and when_ns are filled in here
    fds: list[int]  # travel with the attach (the backing store's descriptor)
    # Told how this member's attach went, whatever then happens to the barrier: the worker's
    # Attached or Refused, or None when the outcome is unknown (no answer, worker gone).
    on_attach: Callable[[workermsg.Attached | workermsg.Refused | None], None] | None = None


class Result(NamedTuple):
    held_us: int  # the longest any worker held its writes
    instant_ns: int  # the instant stamped on every map (0: one member, stamped by its worker)


async def _call(worker: Worker, msg, fds: list[int], what: str, timeout: float, told=None):
    """One answer, or ControlError. A worker that does not answer is restarted: whether it
    acted is unknown, and a restarted one re-attaches only snapshots that are ACTIVE.
    `told`: a Member's on_attach, given the outcome."""
    try:
        reply = await worker.call(msg, fds, timeout)
    except asyncio.TimeoutError:
        if told:
            told(None)
        log.error("%s: volume worker %s did not answer the barrier in %.0f s; restarting it", what, worker.key, timeout)
        worker.kill()
        raise ControlError(errno.EIO, f"{what}: volume worker {worker.key} did not answer in time") from None
    except WorkerGone as e:
        if told:
            told(None)
        raise ControlError(errno.EIO, f"{what}: volume worker {worker.key} is gone: {e}") from None
    if told and isinstance(reply, (workermsg.Attached, workermsg.Refused)):
        told(reply)
    if isinstance(reply, workermsg.Refused):
        raise ControlError(reply.errno, f"{what}: {reply.reason}")
    return reply


async def _gather(calls) -> tuple[list, ControlError | None]:
    """Every call's answer (None where it failed) and the first failure."""
    got = await asyncio.gather(*calls, return_exceptions=True)
    first = next((g for g in got if isinstance(g, BaseException)), None)
    if first is not None and not isinstance(first, ControlError):
        raise first
    return [None if isinstance(g, BaseException) else g for g in got], first


async def run(members: list[Member], sync: bool = False, timeout: float = TIMEOUT) -> Result:
    """The barrier across `members` (at least one). `sync`: fdatasync each volume at the hold
    (durability "power"). Raises ControlError with nothing attached and every gate open."""
    if len(members) == 1:  # the worker stamps the instant inside its own barrier
        m = members[0]
        msg = msgspec.structs.replace(m.attach, req=m.worker.next_req())
        reply = await _call(m.worker, msg, m.fds, m.attach.device, timeout, m.on_attach)
        if not isinstance(reply, workermsg.Attached):
            raise ControlError(errno.EIO, f"{m.attach.device}: unexpected answer {type(reply).__name__} to the barrier")
        return Result(reply.barrier_us, 0)
    workers = list({id(m.worker): m.worker for m in members}.values())  # one hold per process
    label = ", ".join(m.attach.device for m in members)
    held, failed = await _gather(_call(w, workermsg.Hold(sync, w.next_req()), [], label, timeout) for w in workers)
    tokens = {id(w): h.token for w, h in zip(workers, held) if isinstance(h, workermsg.Held)}
    attached: list[Member] = []
    when = time.time_ns()  # every worker is drained: this is the set's instant
    try:
        if failed is None:
            replies, failed = await _gather(
                _call(m.worker, msgspec.structs.replace(m.attach, req=m.worker.next_req(), hold=tokens[id(m.worker)], when_ns=when),
                      m.fds, m.attach.device, timeout, m.on_attach)
                for m in members)
            attached = [m for m, r in zip(members, replies) if isinstance(r, workermsg.Attached)]
        if failed is not None:
            await _detach(attached)  # while still held: not one write was copied for them
            attached = []
    finally:
        released, release_failed = await _gather(
            _call(w, workermsg.Release(tokens[id(w)], w.next_req()), [], label, timeout) for w in workers if id(w) in tokens)
    if failed is not None:
        raise failed
    expired = [w.key for w, r in zip([w for w in workers if id(w) in tokens], released)
               if not isinstance(r, workermsg.Released) or r.expired]
    if release_failed is not None or expired:
        await _detach(attached)
        if release_failed is not None:
            raise release_failed
        raise ControlError(errno.ETIMEDOUT, f"{label}: the write gate of {', '.join(expired)} opened by itself before the barrier "
                                            "was complete; snapshots not taken, try again")
    held_us = max(r.held_us for r in released)
    log.debug("%s: barrier across %d volume worker(s): drains took up to %d us, writes held up to %d us", label, len(workers),
              max(h.drain_us for h in held), held_us)
    return Result(held_us, when)


async def _detach(members: list[Member]) -> None:
    for m in members:
        try:
            await m.worker.call(workermsg.DetachSnapshot(m.attach.device, m.worker.next_req()), timeout=TIMEOUT)
        except asyncio.TimeoutError:
            log.error("%s: volume worker %s did not confirm the detach; restarting it", m.attach.device, m.worker.key)
            m.worker.kill()  # it must not go on copying into a store that is about to close
        except WorkerGone as e:
            log.warning("%s: volume worker did not confirm the detach: %s", m.attach.device, e)
