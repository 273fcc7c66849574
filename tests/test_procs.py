"""A Worker on its own (no fssd): it settles replies by request id, restarts itself, gives up.

A real volume worker over a 1 MiB image; the test is its supervisor."""

import asyncio
import os
import signal
import socket

import msgspec

from daemon.procs import RestartPolicy, Worker
from ipc import workermsg
from workers.volume import VolumeSettings


async def until(cond, timeout: float, what: str):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def volume_worker(tmp_path, policy, told):
    img = tmp_path / "v.img"
    img.write_bytes(b"")
    os.truncate(img, 1 << 20)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "v.sock"))
    listener.listen(4)

    def spawn_args(chan_fd):
        s = VolumeSettings(name="v", path=str(img), size=1 << 20, listen_fd=listener.fileno())
        return "workers.volume", msgspec.json.encode(s).decode(), [listener.fileno()]

    w = Worker("volume", "v", spawn_args, lambda w, m, fds: told.append(m), lambda w, status: told.append(("exit", status)), dict(os.environ), policy)
    return w, listener


def test_worker_settles_replies_and_restarts_itself(tmp_path):
    told, restarted = [], []
    policy = RestartPolicy(max_restarts=3, on_restarted=restarted.append)
    w, listener = volume_worker(tmp_path, policy, told)

    async def main():
        await w.start()
        try:
            r = await w.call(workermsg.DetachSnapshot("fss0", w.next_req()), timeout=20)
            assert r == workermsg.Detached("fss0", 1)
            w.send(workermsg.DetachSnapshot("fss1", w.next_req()))  # nobody waits: its reply is dropped
            r = await w.call(workermsg.DetachSnapshot("fss2", w.next_req()), timeout=20)
            assert r == workermsg.Detached("fss2", 3) and w.pending == {}
            first = w.pid
            os.kill(first, signal.SIGKILL)
            await until(lambda: restarted and w.alive, 30, "the worker to restart itself")
            assert w.pid != first and w.restarts == 1 and w.last_error == "killed by SIGKILL"
            r = await w.call(workermsg.DetachSnapshot("fss0", w.next_req()), timeout=20)
            assert r.req == 4
        finally:
            await w.stop(10)

    try:
        asyncio.run(main())
    finally:
        listener.close()
    # Replies and Ready never reach the owner; only the exits do (the last one asked for).
    assert told == [("exit", -signal.SIGKILL), ("exit", 0)]


def test_worker_gives_up_and_says_so(tmp_path):
    told, gave_up = [], []
    policy = RestartPolicy(max_restarts=0, on_gave_up=gave_up.append)
    w, listener = volume_worker(tmp_path, policy, told)

    async def main():
        await w.start()
        try:
            os.kill(w.pid, signal.SIGKILL)
            await until(lambda: gave_up, 20, "the worker to give up")
            assert not w.alive and w.restart_handle is None
        finally:
            await w.stop(10)

    try:
        asyncio.run(main())
    finally:
        listener.close()
    assert gave_up == [w] and told == [("exit", -signal.SIGKILL)]
