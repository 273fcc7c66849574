"""Every global name fssd creates (shared memory, message queues) derives from here.

POSIX IPC names live in one flat namespace per host, so each fssd instance
prefixes its names with a short hash of its run directory: several instances
(tests run in parallel) never collide, and a restarted instance finds and
removes what a killed one left behind.
"""

from __future__ import annotations

import os

DEFAULT_RUNDIR = "/run/fssd"
RUNDIR_ENV = "FSSD_RUNDIR"
# Set by the supervisor in its workers' environment: which instance they belong to.
INSTANCE_ENV = "FSSD_INSTANCE"


def resolve_rundir(cli_value: str | None) -> str:
    """`-r RUNDIR`, else $FSSD_RUNDIR, else /run/fssd (every client tool)."""
    return cli_value or os.environ.get(RUNDIR_ENV) or DEFAULT_RUNDIR


def proc_title(body: str, rundir: str | None = None) -> str:
    """`fssd: BODY` for the default instance, `fssd[RUNDIR]: BODY` for any other.

    NetBSD-like titles for the instance an administrator runs, while a second
    instance never answers `pgrep -f 'fssd: fss0'` meant for the first.
    """
    rundir = rundir or os.environ.get(INSTANCE_ENV) or DEFAULT_RUNDIR
    if os.path.abspath(rundir) == DEFAULT_RUNDIR:
        return f"fssd: {body}"
    return f"fssd[{os.path.abspath(rundir)}]: {body}"


def instance_prefix(rundir: str) -> str:
    """`fssd.<8 hex>`: stable for one run directory, distinct between them."""
    import hashlib  # here: the client tools never need it, and it costs them ~3 ms at start

    real = os.path.realpath(rundir)
    return "fssd." + hashlib.sha256(real.encode()).hexdigest()[:8]


def control_socket(rundir: str) -> str:
    return os.path.join(rundir, "control.sock")


def export_socket(rundir: str, export: str) -> str:
    return os.path.join(rundir, export + ".sock")


def nbd_uri(rundir: str, export: str) -> str:
    return f"nbd+unix:///{export}?socket={export_socket(rundir, export)}"


def map_name(prefix: str, device: str) -> str:
    """Shared-memory cluster map of snapshot `device` (fss0 ...)."""
    return f"/{prefix}.{device}"


def broker_queue(prefix: str) -> str:
    """The VSS broker's inbox."""
    return f"/{prefix}.vss"


def app_queue(prefix: str, name: str, pid: int) -> str:
    """A registered VSS application's own queue (created by the application)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:32]
    return f"/{prefix}.app.{safe}.{pid}"


def reply_queue(prefix: str, pid: int) -> str:
    """A requestor's (vssadm, the supervisor) private reply queue."""
    return f"/{prefix}.req.{pid}"


def vss_socket(rundir: str) -> str:
    """The VSS broker's socket: requestors and applications connect here (SO_PEERCRED)."""
    return os.path.join(rundir, "vss.sock")


def app_queues(prefix: str, token: str) -> tuple[str, str]:
    """A registered application's requests and answers queues (created by the broker)."""
    return f"/{prefix}.app.{token}", f"/{prefix}.ans.{token}"


def owned_by(prefix: str, posix_name: str) -> bool:
    """True if a name found in /dev/shm or /dev/mqueue belongs to this instance."""
    return posix_name.lstrip("/").startswith(prefix + ".")
