#!/usr/bin/env bash
# Twenty web nodes on 127.0.0.1: five voters and fifteen learners of one
# cluster (docs/performance.md, "A real site's size").
#
#   benches/twenty.sh [--nodes N] [--writes N] [--runs N]
#
# Prints, each as its phase ends:
#   - the time to start and join the N nodes (--nodes, default 20);
#   - idle CPU per daemon over 30 s (% of one core: the leader, the most
#     and the median of the others);
#   - the leader's CPU time per write: --writes (default 2,000) files of
#     4 KiB created one after another on the leader's mount, beside a
#     voter's and a learner's CPU per write once every node has them;
#   - W5 cross-node visibility from node 1 to node 2 and to node N
#     (wpbench, --runs rounds, default 3): p50, p99, max;
#   - the leader's daemon killed with -9 while a writer on node N and a
#     reader on node N-1 go on (wpbench W6): the longest operation, failed
#     operations, and how long the restarted node takes to catch up.
#
# On a machine with fewer cores than nodes the daemons share the CPUs: the
# CPU time per daemon is what carries over to nodes with CPUs of their own.
# Builds nothing: run `make build` first (or set BIN).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/benches/lib.sh"

nodes=20
writes=2000
runs=3
while [ $# -gt 0 ]; do
    case $1 in
        --nodes) nodes=$2; shift 2 ;;
        --writes) writes=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        *) echo "unknown option $1 (see the head of $0)" >&2; exit 2 ;;
    esac
done
[ "$nodes" -ge 3 ] || { echo "--nodes must be 3 or more" >&2; exit 2; }

work=$(mktemp -d /var/tmp/wpfs-twenty-XXXX)
cleanup() {
    stop_nodes
    rm -rf "$work"
}
trap cleanup EXIT
all=$(seq "$nodes")
members() { status 1 | python3 -c "import json,sys; s = json.load(sys.stdin); print(len(s['$1']))"; }
# Every daemon's CPU time now, kept in $work/cpu.before; `cpu_since N
# SCALE` prints node N's CPU seconds since then, times SCALE.
take_cpu() { for n in $all; do echo "$n $(cpu "$n")"; done >"$work/cpu.before"; }
cpu_since() {
    python3 -c "print(f'{($(cpu "$1") - $(grep "^$1 " "$work/cpu.before" | cut -d' ' -f2)) * $2:.2f}')"
}
# "median max" of the second column of stdin.
median_max() { sort -g -k2 | awk '{v[NR] = $2} END {printf "median %s, max %s", v[int((NR + 1) / 2)], v[NR]}'; }

echo "== $nodes nodes (work directory $work)"
t=$(now)
for n in $all; do start_node "$n"; done
until [ "$(members voters)" = 5 ] || [ "$(members voters)" = "$nodes" ]; do sleep 0.5; done
echo "  started and joined in $(since "$t") s: $(members voters) voters, $(members learners) learners"
leader=$(status 1 | field leader)
echo "  leader: node $leader"

echo "== idle CPU (30 s, % of one core)"
sleep 5
take_cpu
sleep 30
for n in $all; do echo "$n $(cpu_since "$n" "100 / 30")"; done >"$work/idle"
echo "  leader: $(grep "^$leader " "$work/idle" | cut -d' ' -f2) %"
echo "  others: $(grep -v "^$leader " "$work/idle" | median_max) %"

echo "== $writes writes of 4 KiB on the leader's mount, one after another"
voter=$(status 1 | python3 -c "import json,sys; print([v for v in json.load(sys.stdin)['voters'] if v != $leader][0])")
learner=$(status 1 | python3 -c "import json,sys; l = json.load(sys.stdin)['learners']; print(l[-1] if l else '')")
mkdir "$work/mnt$leader/writes"
take_cpu
t=$(now)
python3 - "$work/mnt$leader/writes" "$writes" <<'EOF'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
block = os.urandom(4096)
for i in range(n):
    with open(os.path.join(root, f"w{i}"), "wb") as f:
        f.write(block)
EOF
wall=$(since "$t")
# Every node has the last file (its namespace and contents) before the
# CPU times are read.
for n in $all; do
    until [ -e "$work/mnt$n/writes/w$((writes - 1))" ]; do sleep 0.1; done
    wait_replicated "$n"
done
per_write() { cpu_since "$1" "1e6 / $writes"; }
echo "  wall: $(python3 -c "print(f'{$wall / $writes * 1e6:.0f}')") µs per write"
echo "  CPU per write: leader $(per_write "$leader") µs, voter (node $voter) $(per_write "$voter") µs${learner:+, learner (node $learner) $(per_write "$learner") µs}"

echo "== W5 visibility (wpbench, $runs rounds)"
for _ in $(seq "$runs"); do
    for b in 2 "$nodes"; do
        "$WPBENCH" --label "node 1 to node $b" --runs 1 --only W5 \
            --json-out "$work/w5.jsonl" "$work/mnt1" "$work/mnt$b" >/dev/null 2>>"$work/wpbench.log"
    done
done
"$WPBENCH" --report "$work/w5.jsonl" --markdown | sed 's/^/  /'

echo "== the leader (node $leader) killed with -9 under load (wpbench W6)"
reader=$((nodes - 1))
[ "$reader" != "$leader" ] || reader=2
"$WPBENCH" --only W6 --w6-before 5 --w6-outage 10 --w6-after 10 \
    --w6-reader-mount 0 --w6-writer-mount 1 "$work/mnt$reader" "$work/mnt$nodes" \
    --kill-cmd "kill -9 $(daemon_of "$leader")" \
    --restart-cmd "'$BIN/wpfs' mount '$work/d$leader' '$work/mnt$leader' -o allow_other" \
    --caught-up-cmd "diff -rq \"$work/mnt$reader/\$WPBENCH_DIR\" \"$work/mnt$leader/\$WPBENCH_DIR\"" \
    >"$work/w6.txt" 2>>"$work/wpbench.log"
grep -v '^{' "$work/w6.txt" | sed 's/^/  /'
echo "  new leader: node $(status "$reader" | field leader)"
