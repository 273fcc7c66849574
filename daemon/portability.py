"""What fssd needs from the system, checked once at start-up.

fssd is built on Linux interfaces. On a system without one of them (FreeBSD,
say) the part that needs it would fail later and obscurely, so the supervisor
asks here first and refuses to start with one line per missing part.
"""

from __future__ import annotations

import os
import sys

import msgspec


class Facts(msgspec.Struct, frozen=True):
    system: str  # sys.platform
    pidfd: bool  # os.pidfd_open: the supervisor watches workers through pidfds
    proc: bool  # /proc: the mount table (store and freeze checks), peers' groups, worker titles
    rwf_dsync: bool  # os.RWF_DSYNC: FUA writes on the volume
    mqueues: bool  # POSIX message queues compiled into posix_ipc (FreeBSD: mqueuefs)


def facts() -> Facts:
    try:
        import posix_ipc

        mq = bool(posix_ipc.MESSAGE_QUEUES_SUPPORTED)
    except ImportError:
        mq = False
    return Facts(sys.platform, hasattr(os, "pidfd_open"), os.path.isdir("/proc/self"), hasattr(os, "RWF_DSYNC"), mq)


def problems(cfg, f: Facts) -> list[str]:
    """One line for each part of this configuration that cannot work on this system."""
    out = []
    if not f.pidfd:
        out.append(f"this system ({f.system}) has no pidfd_open(2) (Linux 5.3 or later): the supervisor cannot watch its workers")
    if not f.proc:
        out.append(f"this system ({f.system}) has no Linux /proc: fssd reads the mount table and its peers' groups there")
    if not f.rwf_dsync:
        out.append(f"this system ({f.system}) has no RWF_DSYNC (Linux 4.7 or later): the volume worker cannot do FUA writes")
    linux = f.system.startswith("linux")
    if cfg.vss.enabled:
        if not f.mqueues:
            out.append("[vss] enabled: this system has no POSIX message queues (FreeBSD: kldload mqueuefs); set [vss] enabled = false")
        if not linux and cfg.freeze_mounts():
            out.append(
                f"[vss] freeze: FIFREEZE is Linux-only; on {f.system} UFS would be suspended with the UFSSUSPEND ioctl"
                " on /dev/ufssuspend, which fssd does not implement: set [vss] freeze = []"
            )
        if not linux and cfg.vss.hyperv_device:
            out.append(f"[vss] hyperv_device: the Hyper-V VSS channel {cfg.vss.hyperv_device} is Linux's hv_utils interface")
    return out
