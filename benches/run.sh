#!/usr/bin/env bash
# WordPress-shaped benchmark: the same workloads on wpfs and on a local
# directory of the same disk, in one run; prints medians and the
# wpfs/local ratios (docs/performance.md).
#
#   benches/run.sh [--nodes 1|3] [wpbench options: --runs N, --only W1,...]
#
# --nodes 1 (default): one-node wpfs against local disk (W1-W5; W5 reads
#   back on the same mount).
# --nodes 3: additionally a 3-node cluster on 127.0.0.1: W1-W4 on node 1,
#   the include storm (W2) on a follower, W5 from node 1 to node 2 (real
#   cross-node visibility), and the catch-up rate of a fourth node that
#   joins the populated cluster.
#
# Runs alternate between the targets (local disk, one node, three nodes),
# one run of each per round, rather than taking all of one target's runs
# in a row: on a shared VM a slow spell then slows every target of that
# round instead of one target's medians, so the ratios stay meaningful.
#
# Needs the wpbench harness: WPBENCH=path, default ../shared/bench/wpbench.
# Builds nothing: run `make build` first (uses $BIN, default the dev build).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/benches/lib.sh"

nodes=1
if [ "${1:-}" = "--nodes" ]; then nodes=$2; shift 2; fi
case $nodes in 1|3) ;; *) echo "--nodes must be 1 or 3" >&2; exit 2 ;; esac
# --runs is taken here (the rounds); --only is kept apart for the follower.
runs=3
args=()
only=()
while [ $# -gt 0 ]; do
    case $1 in
        --runs) runs=$2; shift 2 ;;
        --only) only=(--only "$2"); shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done

work=$(mktemp -d /var/tmp/wpfs-bench-XXXX)
cleanup() {
    stop_nodes
    rm -rf "$work"
}
trap cleanup EXIT
results=$work/results.jsonl
mkdir -p "$work/local"

# CPU time the host took from this VM (/proc/stat "steal"), in ticks.
steal() { awk '/^cpu /{print $9}' /proc/stat; }

bench() {
    local label=$1
    shift
    local before
    before=$(steal)
    "$WPBENCH" --label "$label" --runs 1 "${only[@]}" "${args[@]}" --json-out "$results" "$@" \
        >/dev/null
    echo "$label $(($(steal) - before))" >>"$work/steal"
}

start_node 0
if [ "$nodes" = 3 ]; then
    start_node 1
    start_node 2
    start_node 3
fi
for _ in $(seq "$runs"); do
    bench local "$work/local"
    bench wpfs-1node "$work/mnt0"
    if [ "$nodes" = 3 ]; then
        bench wpfs-3node "$work/mnt1" "$work/mnt2"
    fi
done

if [ "$nodes" = 3 ]; then
    # Reads stay local: the include storm on a follower.
    "$WPBENCH" --label wpfs-3node-follower --runs "$runs" "${args[@]}" --only W2 \
        --json-out "$results" "$work/mnt2" >/dev/null

    # Catch-up of a fourth node: the WordPress tree plus 256 MiB of media.
    mkdir -p "$work/mnt1/catchup"
    cp -a /usr/share/wordpress "$work/mnt1/catchup/wp"
    head -c $((256 << 20)) /dev/urandom > "$work/mnt1/catchup/media.bin"
    started=$(date +%s.%N)
    start_node 4
    until [ "$(status 4 | field replicated_bytes)" -gt $((256 << 20)) ]; do sleep 0.2; done
    wait_replicated 4
    ended=$(date +%s.%N)
    bytes=$(status 4 | field replicated_bytes)
    python3 -c "
s, e, b = $started, $ended, $bytes
print(f'catch-up of a new node: {b / 2**20:.0f} MiB in {e - s:.1f} s = {b / 2**20 / (e - s):.0f} MiB/s '
      '(join, snapshot, then every chunk)')"
fi

"$WPBENCH" --report "$results" --baseline local --markdown
# On a shared VM a slow spell is the host taking CPU time away: runs that
# lost much of it measure the neighbours, not wpfs.
hz=$(getconf CLK_TCK)
awk -v hz="$hz" '{t[$1] += $2; n[$1]++; if ($2 > m[$1]) m[$1] = $2}
    END {printf "CPU time stolen by the host during the runs (s, all runs / worst run):"
         for (l in t) printf "  %s %.1f / %.1f", l, t[l] / hz, m[l] / hz; print ""}' "$work/steal"
