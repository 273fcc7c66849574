"""`fssd: vss broker`: the process around workers.vsscore.BrokerCore.

    python -m workers.broker --channel-fd N SETTINGS_JSON

SETTINGS_JSON is msgspec.json.encode(BrokerSettings(...)). The broker creates
its inbox queue, sends Ready on the channel, then VssState on every phase
change. EOF on the channel or Stop: thaw anything frozen, tell applications
THAW, remove the inbox, exit 0. SIGTERM does the same.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import selectors
import signal
import socket
import sys
import time

import msgspec

from ipc import hyperv, logfmt, mqueue, names, vssproto
from ipc.channel import Channel, FrameError
from ipc.names import broker_queue
from ipc.vssproto import ToApp, VssReply
from ipc.workermsg import Ready, Stop, ToWorker, VssState
from workers import freeze, hooks
from workers.vsscore import BrokerCore

log = logging.getLogger("vss")

HELD_MAX = 10000  # log records kept while frozen; beyond that the oldest go (and are counted)
DRAIN_MAX = 64  # inbox messages handled per wake-up before looking at the channel again
HYPERV_RETRY = 5.0
CHANNEL_TIMEOUT = 2.0  # longest the broker waits on the supervisor channel, either way


class BrokerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    prefix: str
    rundir: str
    timeout: float = 15.0
    freeze_max: float = 10.0
    freeze_mounts: list[str] = []
    hooks_dir: str | None = None
    hyperv_device: str | None = None  # /dev/vmbus/hv_vss, or unix:/path for a stand-in
    debug: bool = False


class HoldingHandler(logging.Handler):
    """While file systems are frozen, keep log records in memory (the log may live on one)."""

    def __init__(self, target: logging.Handler):
        super().__init__()
        self.target = target
        self.held: collections.deque[logging.LogRecord] = collections.deque(maxlen=HELD_MAX)
        self.holding = False
        self.overflow = 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.holding:
            if len(self.held) == HELD_MAX:
                self.overflow += 1
            self.held.append(record)
        else:
            self.target.handle(record)

    def hold(self) -> None:
        self.holding = True

    def release(self) -> None:
        self.holding = False
        while self.held:
            self.target.handle(self.held.popleft())
        if self.overflow:
            self.target.handle(logging.makeLogRecord({"name": "vss", "levelno": logging.WARNING, "levelname": "WARNING",
                                                      "msg": f"{self.overflow} log records dropped while frozen"}))
            self.overflow = 0


class HyperVChannel:
    """The kernel's VSS channel (or a stand-in on a Unix socket), bytes moved only."""

    def __init__(self, where: str):
        self.where = where
        self.sock: socket.socket | None = None
        self.fd = -1
        self.conn = hyperv.DaemonConnection()

    def open(self) -> None:
        self.conn = hyperv.DaemonConnection()
        if self.where.startswith("unix:"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(self.where[5:])
            self.fd = self.sock.fileno()
        else:
            self.fd = os.open(self.where, os.O_RDWR | os.O_CLOEXEC)
        self.write(self.conn.start())

    def write(self, data: bytes) -> None:
        if self.sock is not None:
            self.sock.sendall(data)
        else:
            os.write(self.fd, data)

    def read(self) -> bytes:
        return self.sock.recv(4096) if self.sock is not None else os.read(self.fd, 4096)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        elif self.fd >= 0:
            os.close(self.fd)
        self.sock, self.fd = None, -1


class ProcessPlatform:
    """BrokerCore's Platform: real queues, FIFREEZE, hooks, the supervisor channel."""

    def __init__(self, settings: BrokerSettings, chan: Channel | None, holder: HoldingHandler | None):
        self.s = settings
        self.chan = chan
        self.holder = holder
        self.queues: dict[str, mqueue.Queue] = {}
        self.hv: HyperVChannel | None = None

    def open_app(self, queue: str) -> str | None:
        try:
            self.queues[queue] = mqueue.open_writer(queue)
        except mqueue.NoQueue:
            return f"queue {queue} does not exist"
        except OSError as e:
            return f"cannot open queue {queue}: {e}"
        return None

    def send_app(self, queue: str, msg: ToApp) -> str | None:
        mq = self.queues.get(queue)
        if mq is None:
            err = self.open_app(queue)
            if err:
                return err
            mq = self.queues[queue]
        try:
            mqueue.send(mq, vssproto.encode(msg), timeout=0)
        except mqueue.QueueFull:
            return "its queue is full"
        except OSError as e:
            return str(e)
        return None

    def close_app(self, queue: str, unlink: bool) -> None:
        mqueue.close(self.queues.pop(queue, None))
        if unlink:
            mqueue.unlink(queue)

    def reply(self, reply_to, reply: VssReply) -> None:
        if isinstance(reply_to, hyperv.HostRequest):
            if self.hv is not None and self.hv.fd >= 0:
                code = "HV_S_OK" if reply.ok else "HV_E_FAIL"
                log.info("hyper-v %s: %s", reply_to.name, code)
                try:
                    self.hv.write(hyperv.answer(reply_to, reply.ok))
                except OSError as e:
                    log.error("hyper-v: cannot answer %s: %s", reply_to.name, e)
            return
        try:
            mq = mqueue.open_writer(reply_to)
        except mqueue.NoQueue:
            log.warning("requestor gone: no reply queue %s for %s", reply_to, reply.op)
            return
        try:
            mqueue.send(mq, vssproto.encode_reply(reply), timeout=0)
        except (mqueue.QueueFull, OSError, vssproto.ProtocolError) as e:
            log.warning("reply to %s not sent: %s", reply_to, e)
        finally:
            mqueue.close(mq)

    def pid_alive(self, pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # A zombie child of ours (tests) counts as gone.
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
        except (OSError, IndexError):
            return True

    def check_mount(self, mount: str) -> str | None:
        return freeze.check_freezable(mount)

    def freeze(self, mounts: list[str]) -> str | None:
        if not mounts:
            return None
        if self.holder:
            self.holder.hold()
        try:
            freeze.freeze_all(mounts)
        except freeze.FreezeError as e:
            self._release()
            return str(e)
        except OSError as e:
            self._release()
            return f"cannot open mount: {e}"
        return None

    def thaw(self, mounts: list[str]) -> list[str]:
        errors = freeze.thaw_all(mounts)
        self._release()
        for e in errors:
            log.error("%s", e)
        return [e.mount for e in errors]

    def run_hooks(self, action: str, timeout: float) -> str | None:
        if not self.s.hooks_dir:
            return None
        res = hooks.run_hooks(self.s.hooks_dir, action, timeout)
        for run in res.runs:
            log.info("hook %s %s: %s (%.0f ms)%s", run.path, action,
                     "timed out" if run.returncode is None else f"exit {run.returncode}", run.seconds * 1000,
                     f": {run.output}" if run.output else "")
        return None if res.ok else res.reason

    def state(self, state: str, detail: str, frozen: list[str]) -> None:
        log.debug("state %s (%s)", state, detail)
        if self.chan is not None:
            try:
                self.chan.send(VssState(state, detail, frozen))
            except TimeoutError:
                # A supervisor that does not read must not stall a freeze (freeze_max must fire).
                # The frame may be torn now, so stop reporting rather than send garbage.
                log.error("supervisor does not read its channel for %g s: no more state reports", CHANNEL_TIMEOUT)
                self.chan = None
            except OSError:
                pass  # the supervisor is gone; EOF handling stops us

    def _release(self) -> None:
        if self.holder:
            self.holder.release()


class Broker:
    def __init__(self, settings: BrokerSettings, chan: Channel | None, holder: HoldingHandler | None = None):
        self.s = settings
        self.chan = chan
        self.platform = ProcessPlatform(settings, chan, holder)
        self.core = BrokerCore(self.platform, settings.prefix, settings.freeze_mounts, settings.timeout,
                               settings.freeze_max)
        self.inbox: mqueue.Queue | None = None
        self.sel = selectors.DefaultSelector()
        self.stopping = False
        self._hv_next_try = 0.0

    def start(self) -> None:
        # Inbox writable by every local user (applications need not be root), whatever the umask.
        self.inbox = mqueue.create(broker_queue(self.s.prefix), 0o622, 10, vssproto.MAX_MESSAGE)
        self.sel.register(self.inbox.mqd, selectors.EVENT_READ, "inbox")
        if self.chan is not None:
            self.chan.sock.settimeout(CHANNEL_TIMEOUT)
            self.sel.register(self.chan.sock, selectors.EVENT_READ, "channel")
        if self.s.hyperv_device:
            self.platform.hv = HyperVChannel(self.s.hyperv_device)
            self._open_hyperv()
        log.info("VSS broker ready: queue %s, timeout %g s, freeze_max %g s, mounts %s, hooks %s",
                 broker_queue(self.s.prefix), self.s.timeout, self.s.freeze_max,
                 " ".join(self.s.freeze_mounts) or "(none)", self.s.hooks_dir or "(none)")
        if self.chan is not None:
            self.chan.send(Ready(kind="broker", pid=os.getpid()))

    def run(self) -> None:
        try:
            while not self.stopping:
                wait = min(max(self.core.next_wakeup() - time.monotonic(), 0.0), 0.5)
                for key, _ in self.sel.select(wait):
                    if key.data == "inbox":
                        self._drain_inbox()
                    elif key.data == "channel":
                        self._on_channel()
                    elif key.data == "hyperv":
                        self._on_hyperv()
                self.core.tick()
                hv = self.platform.hv
                if hv is not None and hv.fd < 0 and time.monotonic() >= self._hv_next_try:
                    self._open_hyperv()
        finally:
            self.close()

    def close(self) -> None:
        self.core.shutdown("broker stopping")
        hv = self.platform.hv
        if hv is not None and hv.fd >= 0:
            hv.close()
        if self.inbox is not None:
            mqueue.close(self.inbox, unlink_name=True)
            self.inbox = None

    def _drain_inbox(self) -> None:
        assert self.inbox is not None
        for _ in range(DRAIN_MAX):
            data = mqueue.receive(self.inbox, 0)
            if data is None:
                return
            try:
                msg = vssproto.decode_to_broker(data)
            except vssproto.ProtocolError as e:
                log.warning("dropped: %s", e)
                continue
            self.core.handle(msg)

    def _on_channel(self) -> None:
        assert self.chan is not None
        try:
            got = self.chan.recv(timeout=CHANNEL_TIMEOUT)
        except (FrameError, OSError) as e:
            log.error("supervisor channel: %s", e)
            got = None
        if got is None:
            log.info("supervisor gone: stopping")
            self.stopping = True
            return
        msg, fds = got
        for fd in fds:
            os.close(fd)
        if isinstance(msg, Stop):
            self.stopping = True

    def _open_hyperv(self) -> None:
        hv = self.platform.hv
        assert hv is not None
        try:
            hv.open()
        except OSError as e:
            self._hv_next_try = time.monotonic() + HYPERV_RETRY
            log.error("hyper-v: cannot open %s: %s (retry in %g s)", hv.where, e, HYPERV_RETRY)
            return
        self.sel.register(hv.fd, selectors.EVENT_READ, "hyperv")

    def _hyperv_lost(self, why: str) -> None:
        hv = self.platform.hv
        assert hv is not None
        log.error("hyper-v: %s: channel closed", why)
        self.sel.unregister(hv.fd)
        hv.close()
        self._hv_next_try = time.monotonic() + HYPERV_RETRY

    def _on_hyperv(self) -> None:
        hv = self.platform.hv
        assert hv is not None
        try:
            data = hv.read()
        except BlockingIOError:
            return
        except OSError as e:
            return self._hyperv_lost(str(e))
        if not data:
            return self._hyperv_lost("end of file")
        try:
            events = hv.conn.receive_data(data)
        except hyperv.HvProtocolError as e:
            return self._hyperv_lost(str(e))
        for ev in events:
            if isinstance(ev, hyperv.Registered):
                log.info("hyper-v: kernel module version: %d", ev.version)
            elif ev.op is None:
                # As hv_vss_daemon: an operation it does not serve is answered OK.
                log.info("hyper-v: %s answered HV_S_OK without a phase", ev.name)
                try:
                    hv.write(hyperv.answer(ev, True))
                except OSError as e:
                    return self._hyperv_lost(str(e))
            else:
                log.info("hyper-v: %s -> %s", ev.name, ev.op.upper())
                self.core.request(ev.op, int.from_bytes(os.urandom(8), "little"), ev)


def _setup_logging(debug: bool) -> HoldingHandler:
    logfmt.setup("vss", debug)
    root = logging.getLogger()
    target = root.handlers[0]
    holder = HoldingHandler(target)
    root.removeHandler(target)
    root.addHandler(holder)
    return holder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="workers.broker")
    ap.add_argument("--channel-fd", type=int, default=None)
    ap.add_argument("settings")
    args = ap.parse_args(argv)
    try:
        settings = msgspec.json.decode(args.settings.encode(), type=BrokerSettings)
    except msgspec.DecodeError as e:
        print(f"vss broker: bad settings: {e}", file=sys.stderr)
        return 2
    try:
        import setproctitle

        setproctitle.setproctitle(names.proc_title("vss broker", settings.rundir))
    except ImportError:
        pass
    holder = _setup_logging(settings.debug)
    chan = Channel(socket.socket(fileno=args.channel_fd), ToWorker) if args.channel_fd is not None else None
    broker = Broker(settings, chan, holder)

    def on_term(signum, frame):
        broker.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        broker.start()
    except OSError as e:
        log.error("cannot start: %s", e)
        broker.close()
        return 1
    broker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
