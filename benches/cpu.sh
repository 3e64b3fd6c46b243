#!/usr/bin/env bash
# Where the CPU goes while the WordPress tree is extracted (wpbench's W1:
# mkdir + create/write/close of every file, then the tree's deletion), on
# one node and on a 3-node cluster: the seconds of each extraction, the
# CPU seconds of each daemon by thread name and of the benchmark itself,
# and what the host stole from this VM meanwhile.
#
# On a 2-vCPU machine three daemons are CPU-bound during W1, and the wall
# time of a run varies by half with the host's load: CPU seconds say more
# reliably what a change saved (docs/performance.md).
#
#   benches/cpu.sh [--runs N] [--min-size BYTES] [--max-size BYTES]
#
# --min-size/--max-size keep the fixture's files of those sizes only
# (files up to 64 KiB ride in their Raft entry; bigger ones are pushed).
# Needs wpbench (WPBENCH=path) and a build ($BIN), like run.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/benches/lib.sh"
runs=3 min_size=0 max_size=$((1 << 40))
while [ $# -gt 0 ]; do
    case $1 in
        --runs) runs=$2; shift 2 ;;
        --min-size) min_size=$2; shift 2 ;;
        --max-size) max_size=$2; shift 2 ;;
        *) echo "unknown option $1 (--runs N, --min-size B, --max-size B)" >&2; exit 2 ;;
    esac
done

work=$(mktemp -d /var/tmp/wpfs-cpu-XXXX)
trap 'stop_nodes; rm -rf "$work"' EXIT

# Extracts the tree $runs times into $1 (deleting it after each run) and
# prints the seconds of each, the CPU of the daemons ${@:2} and its own.
measure() {
    python3 - "$WPBENCH" "$1" "$runs" "$min_size" "$max_size" "${@:2}" <<'PY'
import collections, importlib.machinery, importlib.util, os, shutil, sys, time
wpbench, mount, runs, lo, hi, pids = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6:]
loader = importlib.machinery.SourceFileLoader("wpbench", wpbench)
wp = importlib.util.module_from_spec(importlib.util.spec_from_loader("wpbench", loader))
loader.exec_module(wp)
fx = wp.Fixture(wp.ensure_fixture(wp.resolve_source(None), os.path.join(wp.FIXTURE_DIR, "wordpress.zip")))
fx.files = [(n, d) for n, d in fx.files if lo <= len(d) <= hi]
hz = os.sysconf("SC_CLK_TCK")

def cpu(pid):
    """CPU seconds of each thread name of process `pid`."""
    by_name = collections.Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
        except FileNotFoundError:
            continue  # the thread ended
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        by_name[name] += (int(fields[11]) + int(fields[12])) / hz
    return by_name

def steal():
    return int(open("/proc/stat").readline().split()[8]) / hz

before, steal0, self0 = {p: cpu(p) for p in pids}, steal(), os.times()
seconds = []
for run in range(runs):
    dest = os.path.join(mount, f"cpu-run{run}")
    t0 = time.perf_counter()
    fx.extract(dest)
    seconds.append(time.perf_counter() - t0)
    shutil.rmtree(dest)
    time.sleep(1)
own = os.times()
print(f"  {len(fx.files)} files; extraction s: " + " ".join(f"{s:.2f}" for s in seconds))
print(f"  benchmark: {own.user - self0.user + own.system - self0.system:.2f} CPU-s; "
      f"stolen by the host: {steal() - steal0:.2f} s")
for n, pid in enumerate(pids, 1):
    used = cpu(pid) - before[pid]
    print(f"  node {n}: {sum(used.values()):.2f} CPU-s: " +
          ", ".join(f"{name} {s:.2f}" for name, s in used.most_common() if s >= 0.01))
PY
}

echo "one node ($runs runs, files of $min_size-$max_size bytes):"
start_node 0
measure "$work/mnt0" "$(daemon_of 0)"
stop_nodes
echo "three nodes, written on node 1:"
for n in 1 2 3; do start_node $n; done
sleep 2 # the joins' snapshots and promotions settle
measure "$work/mnt1" "$(daemon_of 1)" "$(daemon_of 2)" "$(daemon_of 3)"
