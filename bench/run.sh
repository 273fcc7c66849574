#!/usr/bin/env bash
# make bench: fssd against its peers in one run, then one summary table.
#
#   bash bench/run.sh [--quick]        (--quick: 1 run each, 3 barrier runs)
#
#   bench_nbd.py   issue 2: fssd volume export vs nbdkit file (same 1 GiB image)
#   bench_clients.py  issue 15: 4 and 64 clients x QD8, fssd (1 and nproc volume processes) vs nbdkit file
#   bench_snap.py  issue 3: writes with 0/1/4 snapshots vs qemu-storage-daemon
#                  (copy-before-write + snapshot-access), snapshot reads, barrier
#   bench_vss.py   VSS freeze window and queue round trip (its own output)
#   bench_tls.py   issue 13: TLS reads vs qemu-nbd --tls-creds; plain TCP vs Unix socket
#   bench_suspend.py  issue 14: the suspend window of a plain fssconfig (its own output)
#   bench_track.py issue 12: live writes with change tracking on vs off, the barrier
#                  at 1 GiB / 1 TiB, an incremental backup (5% changed) vs a full nbdcopy
#
# Every process the bench scripts start is recorded (pid, /dev/shm names) in a
# registry; the trap below stops what is still alive by pid and removes the
# directories and shared-memory names, also on Ctrl-C or failure.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
RUNS=3 BARRIER_RUNS=10
[ "${1:-}" = "--quick" ] && RUNS=1 BARRIER_RUNS=3

# Byte code compiled once, as an installed fssd has it: with PYTHONDONTWRITEBYTECODE set
# every fssd process and every fssconfig would compile each module it imports at start.
"$PY" -m compileall -q daemon workers ipc examples >/dev/null

WORK=$(mktemp -d /tmp/fssd-bench-run.XXXXXX)
export FSSD_BENCH_REGISTRY=$WORK/registry FSSD_BENCH_RESULTS=$WORK/results.jsonl
: >"$FSSD_BENCH_REGISTRY"; : >"$FSSD_BENCH_RESULTS"
CHILD=

cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    # The running bench script first (it cleans up after itself on SIGTERM) ...
    if [ -n "$CHILD" ] && kill -0 "$CHILD" 2>/dev/null; then
        kill -TERM "$CHILD" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$CHILD" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$CHILD" 2>/dev/null
        wait "$CHILD" 2>/dev/null
    fi
    # ... then whatever it left: every recorded server and its children, by pid.
    local kind what rest pids
    while read -r kind what rest; do
        [ "$kind" = pid ] || continue
        kill -0 "$what" 2>/dev/null || continue
        # Only if it is still the program we started (pids get reused).
        grep -qa -- "${rest%% *}" "/proc/$what/cmdline" 2>/dev/null || continue
        pids="$(pgrep -P "$what" 2>/dev/null | tr '\n' ' ')"
        kill -TERM "$what" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$what" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$what" $pids 2>/dev/null
    done <"$FSSD_BENCH_REGISTRY"
    while read -r kind what rest; do
        case $kind in
            dir) case $what in /dev/shm/fssd-bench-*|/tmp/fssd-bench-*) rm -rf -- "$what";; esac;;
            shm) case $what in /dev/shm/fssd.*) rm -f -- "$what"*;; esac;;
        esac
    done <"$FSSD_BENCH_REGISTRY"
    rm -rf -- "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

step() {  # step NAME CMD...: run one bench script in the background so the trap can act at once
    echo; echo "== $1"; shift
    "$@" & CHILD=$!
    wait "$CHILD"; local rc=$?
    CHILD=
    [ $rc -eq 0 ] || { echo "bench step failed (exit $rc)" >&2; FAILED=1; }
}

FAILED=0
t0=$(date +%s)
echo "fssd bench on $(nproc) vCPUs, $(uname -r); $(nbdkit --version 2>/dev/null | head -1); $(qemu-storage-daemon --version | head -1); $(fio --version)"
step "issue 2: volume export vs nbdkit file (median of $RUNS)" \
    "$PY" bench/bench_nbd.py --runs "$RUNS"
step "issue 15: many clients vs nbdkit file, 1 and $(nproc) volume processes (median of $RUNS)" \
    "$PY" bench/bench_clients.py --runs "$RUNS"
step "issue 3: snapshots vs qemu-storage-daemon (median of $RUNS; barrier $BARRIER_RUNS)" \
    "$PY" bench/bench_snap.py --runs "$RUNS" --barrier-runs "$BARRIER_RUNS"
if [ -f bench/bench_vss.py ]; then
    # Its run directories go under $WORK (TMPDIR), so the trap removes them too.
    mkdir -p "$WORK/vss"
    step "VSS (bench_vss.py)" env TMPDIR="$WORK/vss" "$PY" bench/bench_vss.py
fi

step "issue 13: NBD over TLS vs qemu-nbd --tls-creds, plain TCP vs the Unix socket (median of $RUNS)" \
    "$PY" bench/bench_tls.py --runs "$RUNS"
step "issue 14: suspend window around the barrier, ext4 through nbdfuse + loop" \
    "$PY" bench/bench_suspend.py --rounds $((RUNS * 5))
step "issue 12: change tracking on vs off, barrier, incremental backup vs full nbdcopy (median of $RUNS)" \
    "$PY" bench/bench_track.py --runs "$RUNS"

echo
echo "== summary ($(( $(date +%s) - t0 )) s)"
"$PY" bench/peers.py summary "$FSSD_BENCH_RESULTS"
# Missed targets are figures, not failures of the bench; a step that crashed is.
exit $FAILED
