"""[[listen]] tables: NBD over TCP, who may open which export. Pure data and matching.

Shared by the config (daemon.config decodes these structs), the supervisor's
messages to the TCP front (ipc.workermsg) and the front itself. No I/O here.

Who a client is: the subject of its verified certificate (`CN=backup1`), and
its peer address. A rule's `client` is one of
  * attributes of the subject, `CN=backup1` or `O=fleet,CN=backup1`: every
    attribute given must be in the certificate's subject (others may be there
    too), keys case-insensitive, values exact; only a certificate verified
    against ca-cert.pem counts;
  * an address or network, `192.0.2.7` or `10.0.0.0/8`: the peer address;
  * `*`: any client that got through (with verify_peer, any certificate the CA signed).
Exports are shell-style patterns (fnmatch), except for live volumes: a live
volume is matched only by a pattern that is exactly its name, so `*` or
`fss*` reach snapshots alone.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
from typing import Literal

import msgspec

# Snapshot exports are fss0, fss1, ...; a volume may not be named fss* (daemon.config).
_SNAPSHOT = re.compile(r"fss[0-9]+")
# Certificate subject attribute names as Python's ssl names them, to the short forms people write.
_SHORT = {
    "commonname": "cn",
    "organizationname": "o",
    "organizationalunitname": "ou",
    "countryname": "c",
    "localityname": "l",
    "stateorprovincename": "st",
    "domaincomponent": "dc",
    "emailaddress": "emailaddress",
    "serialnumber": "serialnumber",
}


def is_snapshot(export: str) -> bool:
    return _SNAPSHOT.fullmatch(export) is not None


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` to (host, port); ValueError with the reason."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} must be host:port (\"[::1]:10809\" for IPv6)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"address {address!r}: write an IPv6 address in brackets, [{host}]:{port}")
    if not host:
        raise ValueError(f"address {address!r} has no host")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"address {address!r}: port out of range")
    return host, int(port)


def parse_subject(text: str) -> tuple[tuple[str, str], ...] | None:
    """`O=fleet,CN=backup1` to ((o, fleet), (cn, backup1)); None if it is not a subject."""
    if "=" not in text:
        return None
    out = []
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"client {text!r}: each part must be KEY=VALUE")
        out.append((key.strip().lower(), value.strip()))
    return tuple(out)


class AllowRule(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    client: str
    exports: list[str] = []

    def __post_init__(self):
        c = self.client.strip()
        if not c:
            raise ValueError("client must not be empty")
        if c != "*" and parse_subject(c) is None:
            try:
                ipaddress.ip_network(c, strict=False)
            except ValueError:
                raise ValueError(f"client {c!r} is neither a certificate subject (CN=...), an address nor '*'") from None
        for p in self.exports:
            if not p or len(p) > 4096:
                raise ValueError("export patterns must be non-empty strings")


class ListenSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    address: str
    # "require": NBD_OPT_STARTTLS before anything else; "off": plain TCP (logged as a warning).
    tls: Literal["require", "off"] = "require"
    # qemu's layout: ca-cert.pem, server-cert.pem, server-key.pem (ca-crl.pem if present).
    tls_dir: str = "/etc/fssd/tls"
    # Client certificates required and checked against ca-cert.pem.
    verify_peer: bool = True
    # Default: no export reachable.
    allow: list[AllowRule] = []
    # Connections at once on this address; more are closed at once.
    max_connections: int = 64
    # Of those, from one client (certificate subject, else peer address); more get NBD_REP_ERR_POLICY.
    max_connections_per_client: int = 16
    # Connect to NBD_OPT_GO, TLS handshake included (qemu-nbd: 10 s).
    handshake_timeout: float = 10.0
    # Seconds with no byte either way before a connection is closed; 0 = never.
    idle_timeout: float = 0.0

    def __post_init__(self):
        parse_address(self.address)
        if not os.path.isabs(self.tls_dir):
            raise ValueError("tls_dir must be an absolute path")
        if not 1 <= self.max_connections <= 100_000:
            raise ValueError("max_connections must be between 1 and 100000")
        if not 1 <= self.max_connections_per_client <= 100_000:
            raise ValueError("max_connections_per_client must be between 1 and 100000")
        if not 0 < self.handshake_timeout <= 3600:
            raise ValueError("handshake_timeout must be between 0 and 3600 seconds")
        if not 0 <= self.idle_timeout <= 86400 * 365:
            raise ValueError("idle_timeout must be 0 (none) or a positive number of seconds")

    def host_port(self) -> tuple[str, int]:
        return parse_address(self.address)


class Client(msgspec.Struct, frozen=True):
    """Who is connected: the verified certificate's subject (short keys, in order) and the address."""

    address: str
    subject: tuple[tuple[str, str], ...] | None = None

    @property
    def key(self) -> str:
        """What the per-client cap counts by."""
        return self.subject_text if self.subject is not None else f"host {self.address}"

    @property
    def subject_text(self) -> str:
        if self.subject is None:
            return "(no certificate)"
        return ",".join(f"{k.upper() if len(k) <= 2 else k}={v}" for k, v in self.subject)


def subject_from_peercert(cert: dict) -> tuple[tuple[str, str], ...]:
    """ssl.SSLSocket.getpeercert()'s 'subject' to short (key, value) pairs."""
    out = []
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            out.append((_SHORT.get(key.lower(), key.lower()), value))
    return tuple(out)


def _client_matches(rule: str, client: Client) -> bool:
    rule = rule.strip()
    if rule == "*":
        return True
    want = parse_subject(rule)
    if want is not None:
        if client.subject is None:
            return False
        have = set(client.subject)
        return all(pair in have for pair in want)
    try:
        return ipaddress.ip_address(client.address.split("%")[0]) in ipaddress.ip_network(rule, strict=False)
    except ValueError:
        return False


def export_matches(pattern: str, export: str) -> bool:
    if not is_snapshot(export):
        return pattern == export  # a live volume only by its own name, never by a wildcard
    return fnmatch.fnmatchcase(export, pattern)


def allowed(rules: list[AllowRule], client: Client, export: str) -> bool:
    return any(_client_matches(r.client, client) and any(export_matches(p, export) for p in r.exports) for r in rules)
