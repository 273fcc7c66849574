"""Thin I/O around posix_ipc.MessageQueue: create, open, send, receive, remove.

No parsing here (ipc.vssproto does that). Facts this relies on
(mq_open(3), mq_overview(7)): the umask applies to the mode given at creation, so
the mode is set again with fchmod; every receive() allocates max_message_size
bytes, so queues stay small; names outlive their creator, so whoever owns a
name unlinks it, and stale ones are found by prefix under /dev/mqueue.
"""

from __future__ import annotations

import os

import posix_ipc



Queue = posix_ipc.MessageQueue


class NoQueue(Exception):
    """The named queue does not exist (its owner is not running)."""


class QueueFull(Exception):
    """The receiver does not keep up (or is gone but its queue remains)."""


def create(name: str, mode: int = 0o600, max_messages: int = 10, max_message_size: int = 1024,
           replace: bool = True) -> Queue:
    """A new queue for reading. A leftover of the same name (a dead owner, pid reuse) is replaced."""
    try:
        mq = Queue(name, posix_ipc.O_CREX, mode=mode, max_messages=max_messages, max_message_size=max_message_size)
    except posix_ipc.ExistentialError:
        if not replace:
            raise
        unlink(name)
        mq = Queue(name, posix_ipc.O_CREX, mode=mode, max_messages=max_messages, max_message_size=max_message_size)
    try:
        os.fchmod(mq.mqd, mode)  # undo the umask
    except BaseException:
        close(mq, unlink_name=True)
        raise
    return mq


def create_owned(name: str, uid: int, max_messages: int, max_message_size: int) -> Queue:
    """A new queue for exactly one uid: O_EXCL, mode 0600, then handed to `uid` with fchown.

    Created 0600 and root's until the fchown, so nobody else can open it in between; a
    name that already exists is an error (the caller picks another), never reused.
    The attributes are checked on the open queue: the kernel may not grant what was asked.
    """
    mq = Queue(name, posix_ipc.O_CREX, mode=0o600, max_messages=max_messages, max_message_size=max_message_size)
    try:
        os.fchown(mq.mqd, uid, -1)
        os.fchmod(mq.mqd, 0o600)
        if (mq.max_messages, mq.max_message_size) != (max_messages, max_message_size):
            raise OSError(f"queue {name} has {mq.max_messages} x {mq.max_message_size} bytes, "
                          f"not {max_messages} x {max_message_size}")
    except BaseException:
        close(mq, unlink_name=True)
        raise
    return mq


def open_reader(name: str) -> Queue:
    try:
        return Queue(name, read=True, write=False)
    except posix_ipc.ExistentialError:
        raise NoQueue(name) from None


def open_writer(name: str) -> Queue:
    """Open someone else's queue write-only (needs only w permission)."""
    try:
        return Queue(name, read=False, write=True)
    except posix_ipc.ExistentialError:
        raise NoQueue(name) from None


def send(mq: Queue, data: bytes, timeout: float | None = 0.0) -> None:
    """Send; timeout 0 = never block, None = block forever. Raises QueueFull."""
    while True:
        try:
            mq.send(data, timeout=timeout)
            return
        except posix_ipc.BusyError:
            raise QueueFull(mq.name) from None
        except posix_ipc.SignalError:
            continue  # a handler ran (e.g. SIGTERM sets a flag); the send still has to happen


def receive(mq: Queue, timeout: float | None = 0.0) -> bytes | None:
    """One message, or None if none came within timeout (0 = poll)."""
    try:
        data, _prio = mq.receive(timeout=timeout)
    except (posix_ipc.BusyError, posix_ipc.SignalError):
        return None  # timed out, or a signal handler ran: the caller's loop decides
    return data


def close(mq: Queue | None, unlink_name: bool = False) -> None:
    """Close, optionally remove the name; never raises (cleanup paths)."""
    if mq is None:
        return
    if unlink_name:
        unlink(mq.name)
    try:
        mq.close()
    except posix_ipc.Error:
        pass


def unlink(name: str) -> bool:
    """Remove a queue name; False if it was already gone."""
    try:
        posix_ipc.unlink_message_queue(name)
        return True
    except posix_ipc.ExistentialError:
        return False


def exists(name: str) -> bool:
    try:
        Queue(name, read=False, write=True).close()
        return True
    except posix_ipc.ExistentialError:
        return False
    except posix_ipc.PermissionsError:
        return True

