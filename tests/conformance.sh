#!/usr/bin/env bash
# External conformance suites against a real wpfs mount (run by `make test`):
#   pjdfstest (the Rust port) as root, with allow_other and the dummy users
#   it switches to; failures beyond tests/pjdfstest.toml's expected list
#   (explained in docs/posix.md) fail the run;
#   fsx, 100,000 random operations on one file (FSX_OPS to change);
#   fsx on a follower of a 3-node cluster, with closes, fsyncs, fallocate,
#   copy_file_range and sendfile among its operations (FSX_CLUSTER_OPS,
#   20,000): every node must then read the same bytes.
# Usage: tests/conformance.sh BIN_DIR
set -euo pipefail
BIN=${1:?usage: tests/conformance.sh BIN_DIR (e.g. /var/tmp/wpfs-target/debug)}
here=$(cd "$(dirname "$0")" && pwd)
FSX_OPS=${FSX_OPS:-100000}
FSX_CLUSTER_OPS=${FSX_CLUSTER_OPS:-20000}
export PATH="$HOME/.cargo/bin:$PATH"

for tool in pjdfstest fsx; do
  command -v "$tool" >/dev/null || cargo install --locked "$tool"
done
# pjdfstest switches to these users for its permission tests.
id tests >/dev/null 2>&1 || echo 'tests:x:::pjdfstest dummy user:/:/usr/sbin/nologin' | newusers

work=$(mktemp -d /var/tmp/wpfs-conformance-XXXX)
cleanup() {
  for m in "$work"/mnt*; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  sleep 1
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/mnt"
chmod 0755 "$work" # pjdfstest's dummy users must reach the mount
"$BIN/wpfs" init --data "$work/data" --node-id 1 --listen 127.0.0.1:7499 >/dev/null
"$BIN/wpfs" mount "$work/data" "$work/mnt" -o allow_other
chmod 0777 "$work/mnt"

echo "== pjdfstest on $work/mnt"
mkdir "$work/mnt/pjdfstest"
(cd "$work/mnt/pjdfstest" && pjdfstest -c "$here/pjdfstest.toml" -p "$work/mnt/pjdfstest") | tee "$work/pjdfstest.log" | grep -vE ' ok$' || true
summary=$(grep '^Summary:' "$work/pjdfstest.log" || true)
[[ "$summary" == "Summary: 0 failed,"* ]] || { echo "pjdfstest: unexpected failures (see above)" >&2; exit 1; }

echo "== fsx, $FSX_OPS operations"
fsx -N "$FSX_OPS" -S 7 -P "$work" "$work/mnt/fsxfile" | tail -n 3

echo "== the store opens again after umount (no repair)"
umount "$work/mnt"
for _ in $(seq 100); do "$BIN/wpfs" status --data "$work/data" --json | grep -q '"role": "stopped"' && break; sleep 0.1; done
"$BIN/wpfs" mount "$work/data" "$work/mnt"
test -f "$work/mnt/fsxfile"

echo "== fsx on node 2 of 3, $FSX_CLUSTER_OPS operations; then every node reads the same bytes"
for n in 1 2 3; do
  mkdir -p "$work/mnt$n"
  if [ $n = 1 ]; then
    "$BIN/wpfs" init --data "$work/node1" --node-id 1 --listen 127.0.0.1:7491 >/dev/null
  else
    "$BIN/wpfs" join --data "$work/node$n" --node-id $n --listen 127.0.0.1:749$n \
      --peer 127.0.0.1:7491 --token "$("$BIN/wpfs" token --data "$work/node1")" >/dev/null
  fi
  "$BIN/wpfs" mount "$work/node$n" "$work/mnt$n"
done
fsx -N "$FSX_CLUSTER_OPS" -S 11 -f "$here/fsx-cluster.toml" -P "$work" "$work/mnt2/fsxfile" | tail -n 3
for n in 1 3; do
  for try in $(seq 100); do cmp -s "$work/mnt2/fsxfile" "$work/mnt$n/fsxfile" && break; sleep 0.2; done
  cmp "$work/mnt2/fsxfile" "$work/mnt$n/fsxfile" || { echo "node $n reads other bytes than node 2 wrote" >&2; exit 1; }
done
echo "nodes 1 and 3 read node 2's $(stat -c %s "$work/mnt2/fsxfile") bytes"
echo "conformance: all passed"
