#!/usr/bin/env bash
# WordPress-shaped benchmark: the same workloads on a one-node wpfs mount
# and on a local directory of the same disk, in one run; prints medians and
# the wpfs/local ratios (docs/performance.md).
#
#   benches/run.sh [--runs N] [--only W1,W2,W3,W4]
#
# Needs the wpbench harness: WPBENCH=path, default ../shared/bench/wpbench.
# Builds nothing: run `make build` first (uses $BIN, default the dev build).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
WPBENCH=${WPBENCH:-$here/../shared/bench/wpbench}
BIN=${BIN:-/var/tmp/wpfs-target/debug}
[ -x "$WPBENCH" ] || { echo "no wpbench at $WPBENCH: set WPBENCH=path" >&2; exit 1; }
[ -x "$BIN/wpfs" ] || { echo "no wpfs in $BIN: run 'make build' or set BIN" >&2; exit 1; }

work=$(mktemp -d /var/tmp/wpfs-bench-XXXX)
cleanup() { umount "$work/mnt" 2>/dev/null || true; sleep 1; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/mnt" "$work/local"
"$BIN/wpfs" init --data "$work/data" --node-id 1 --listen 127.0.0.1:7490 >/dev/null
"$BIN/wpfs" mount "$work/data" "$work/mnt" -o allow_other

"$WPBENCH" --label local "$@" --json-out "$work/results.jsonl" "$work/local" >/dev/null
"$WPBENCH" --label wpfs "$@" --json-out "$work/results.jsonl" "$work/mnt" >/dev/null
"$WPBENCH" --report "$work/results.jsonl" --baseline local --markdown
