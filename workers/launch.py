"""How the supervisor starts every worker: tie its life to the supervisor's, then run it.

    python -m workers.launch --supervisor-pid P --pdeathsig SIG [--hold-fd N] MODULE ARGS...

PR_SET_PDEATHSIG makes the kernel signal the worker the moment the supervisor
dies (SIGKILL for the data workers: an orphan must never execute a request a
client queued, because a new instance may already be serving the volume;
SIGTERM for the VSS broker, which thaws before it exits). It is set before
anything else and getppid() is checked afterwards: a supervisor that died in
between has already reparented us, and we exit without serving anything.

--hold-fd is the run directory's locked pid file, inherited: flock belongs to
the open file description, so the lock stays held while any worker of this
instance lives, and a new fssd waits for all of them. It is made close-on-exec
again here so nothing the worker spawns (hook scripts) holds it too.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1
EXIT_ORPHANED = 70  # EX_SOFTWARE: started after the supervisor was already gone


def set_parent_death_signal(sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")


def main(argv: list[str]) -> int:
    sup_pid, sig, hold_fd = 0, signal.SIGKILL, -1
    while argv and argv[0].startswith("--"):
        opt, value, argv = argv[0], argv[1], argv[2:]
        if opt == "--supervisor-pid":
            sup_pid = int(value)
        elif opt == "--pdeathsig":
            sig = signal.Signals["SIG" + value]
        elif opt == "--hold-fd":
            hold_fd = int(value)
        else:
            print(f"workers.launch: unknown option {opt}", file=sys.stderr)
            return 2
    if not argv or not sup_pid:
        print("workers.launch: usage: --supervisor-pid P [--pdeathsig SIG] [--hold-fd N] MODULE ARGS...", file=sys.stderr)
        return 2
    set_parent_death_signal(sig)
    if os.getppid() != sup_pid:
        return EXIT_ORPHANED  # the supervisor died before the line above could take effect
    if hold_fd >= 0:
        os.set_inheritable(hold_fd, False)
    module, sys.argv = argv[0], argv
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
