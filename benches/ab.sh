#!/usr/bin/env bash
# Two builds of wpfs side by side: a cluster of each (one node, or three
# on 127.0.0.1 with --nodes 3), mounted at once, the same workloads alternating between them (A B B A per round,
# so neither always runs first), then medians and the B/A ratio, and each
# daemon's CPU time per run (utime+stime from /proc, in ticks of 10 ms).
# For "is this change within noise of the last one": on a shared VM two
# separate benchmark runs differ by more than most changes do.
#
#   benches/ab.sh DIR_A DIR_B [--nodes 1|3] [--rounds N] [--only W1,W4]
#
# The workloads run on node 1 (W5: node 1 to node 2); the CPU figure is
# node 1's. The other side's cluster sits idle meanwhile.
#
# DIR_A and DIR_B hold a `wpfs` binary each, e.g. copies of
# /var/tmp/wpfs-target/debug/wpfs built at two commits.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 2 ] || { echo "usage: benches/ab.sh DIR_A DIR_B [--nodes 1|3] [--rounds N] [--only W1,W4]" >&2; exit 2; }
a=$1 b=$2
shift 2
BIN=$a
. "$here/benches/lib.sh"
for d in "$a" "$b"; do [ -x "$d/wpfs" ] || { echo "no wpfs in $d" >&2; exit 1; }; done
rounds=5
only=W1,W4
nodes=1
while [ $# -gt 0 ]; do
    case $1 in
        --nodes) nodes=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
case $nodes in 1|3) ;; *) echo "--nodes must be 1 or 3" >&2; exit 2 ;; esac

work=$(mktemp -d /var/tmp/wpfs-ab-XXXX)
trap 'stop_nodes; rm -rf "$work"' EXIT
# Side A's node N listens on 127.0.0.1:758N, side B's on 759N.
for side in A B; do
    dir=$a base=7580
    [ $side = B ] && dir=$b base=7590
    for n in $(seq "$nodes"); do
        data=$work/d$side$n
        if [ "$n" = 1 ]; then
            "$dir/wpfs" init --data "$data" --node-id 1 --listen "127.0.0.1:$((base + 1))" >/dev/null
        else
            "$dir/wpfs" join --data "$data" --node-id "$n" --listen "127.0.0.1:$((base + n))" \
                --peer "127.0.0.1:$((base + 1))" --token "$("$dir/wpfs" token --data "$work/d${side}1")" \
                >/dev/null
        fi
        mkdir -p "$work/mnt$side$n"
        "$dir/wpfs" mount "$data" "$work/mnt$side$n" -o allow_other 2>/dev/null
    done
done
second() { [ "$nodes" = 3 ] && echo "$work/mnt${1}2"; }

ticks() { awk '{print $14 + $15}' "/proc/$(daemon_of "${1}1")/stat"; }
for r in $(seq "$rounds"); do
    for side in A B B A; do
        before=$(ticks "$side")
        "$WPBENCH" --label "$side" --runs 1 --only "$only" --json-out "$work/results.jsonl" \
            "$work/mnt${side}1" $(second "$side") >/dev/null
        echo "$side $(($(ticks "$side") - before))" >>"$work/cpu"
    done
    echo "round $r of $rounds done" >&2
done
"$WPBENCH" --report "$work/results.jsonl" --markdown
awk '{s[$1] += $2; n[$1]++} END {printf "daemon CPU per run: A %.0f ticks, B %.0f ticks (B/A %.3f)\n",
    s["A"] / n["A"], s["B"] / n["B"], (s["B"] / n["B"]) / (s["A"] / n["A"])}' "$work/cpu"
