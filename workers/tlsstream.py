"""The TCP front's byte streams: plain, or TLS through memory BIOs.

TLS runs on ssl.SSLObject with two MemoryBIOs instead of an SSLSocket: the
socket is read in large chunks (many small TLS records per system call; an
SSLSocket reads each record's header and body with two calls) and decryption
is plain CPU work, which is what lets the relay keep up with small pipelined
requests. During the handshake phase both streams are used with blocking
calls under one deadline (socket.timeout when it passes).
"""

from __future__ import annotations

import socket
import ssl
import time

# Ciphertext read from the socket at once.
RAW_CHUNK = 256 * 1024


class Timeout(Exception):
    """The deadline passed."""


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise Timeout()
    return left


class PlainStream:
    tls = False

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def recv(self, n: int, deadline: float) -> bytes:
        self.sock.settimeout(_left(deadline))
        try:
            return self.sock.recv(n)
        except socket.timeout:
            raise Timeout() from None

    def sendall(self, data: bytes, deadline: float) -> None:
        self.sock.settimeout(_left(deadline))
        try:
            self.sock.sendall(data)
        except socket.timeout:
            raise Timeout() from None


class TLSStream:
    """A server-side TLS session over `sock` (ssl.SSLError when the peer or its certificate fails)."""

    tls = True

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext):
        self.sock = sock
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_side=True)

    # -- blocking use, under a deadline ----------------------------------------------------

    def _flush(self, deadline: float) -> None:
        data = self.out.read()
        if data:
            self.sock.settimeout(_left(deadline))
            try:
                self.sock.sendall(data)
            except socket.timeout:
                raise Timeout() from None

    def _fill(self, deadline: float) -> bool:
        self.sock.settimeout(_left(deadline))
        try:
            data = self.sock.recv(RAW_CHUNK)
        except socket.timeout:
            raise Timeout() from None
        if not data:
            self.inc.write_eof()
            return False
        self.inc.write(data)
        return True

    def handshake(self, deadline: float) -> None:
        while True:
            try:
                self.obj.do_handshake()
                self._flush(deadline)
                return
            except ssl.SSLWantReadError:
                self._flush(deadline)
                if not self._fill(deadline):
                    raise ConnectionError("the client closed the connection during the TLS handshake") from None
            except ssl.SSLError:
                try:  # the alert says why, to the client too
                    self._flush(min(deadline, time.monotonic() + 1))
                except (OSError, Timeout):
                    pass
                raise

    def recv(self, n: int, deadline: float) -> bytes:
        while True:
            try:
                return self.obj.read(n)
            except ssl.SSLWantReadError:
                self._flush(deadline)
                if not self._fill(deadline):
                    return b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    def sendall(self, data: bytes, deadline: float) -> None:
        self.obj.write(data)
        self._flush(deadline)

    def close_notify(self) -> None:
        """Best effort, never blocking: tell the client the session ends (a TLS close_notify)."""
        try:
            self.obj.unwrap()
        except (ssl.SSLError, ValueError):
            pass  # SSLWantReadError: the client's close_notify is not awaited
        data = self.out.read()
        if data:
            try:
                self.sock.send(data, socket.MSG_DONTWAIT)
            except OSError:
                pass

    def getpeercert(self):
        return self.obj.getpeercert()

    def version(self) -> str | None:
        return self.obj.version()

    def fingerprint(self) -> bytes | None:
        return self.obj.getpeercert(binary_form=True)
