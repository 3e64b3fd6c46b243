#!/usr/bin/env bash
# A real site's size: an uploads-shaped tree of a million files on wpfs,
# against the same tree on local disk, in one run (docs/performance.md,
# "A real site's size").
#
#   benches/scale.sh [--files N] [--big-files N] [--parallel N] [--phases local,one,load,three,join] [--seed DIR]
#
# The tree: N files (default 1,000,000) in YYYY/MM directories, one of
# which holds a tenth of them (100,000 at 1M); sizes scaled down 12× from
# WordPress's (most 5-200 KB become 0.4-16 KiB, median 2 KiB) so that the
# bytes stored per node stay near 2-3 GB, plus four large files of
# 64-512 MiB (WordPress's 100 MB-2 GB, scaled down 4×). --big-files 0
# leaves those out (a join's rate is then that of small chunks, as at 1M
# files, where they are three quarters of the bytes).
#
# --parallel N: each copy runs N `cp -a` at once, one per year directory
# (what several PHP workers or rsync jobs do; four copied the 1M-file
# tree into one node in 337 s, docs/performance.md). Default 1.
#
# Phases (each prints its figures as it ends):
#   local  make the tree on local disk; cp -a of it to local disk; find,
#          du, ls -l of the big directory, a deep stat (cold kernel cache)
#   one    a one-node cluster: cp -a into the mount (a tenth first, then
#          the rest), the daemon's RSS idle and under load at a tenth and at
#          all of it, the store's size, the same reads as on local disk,
#          restart (wpfs mount of the stopped node until it serves)
#   load   (with one) after its reads, a tenth of the tree and the big
#          files copied in again: the daemon's peak RSS while copying
#          with the whole tree in the store, and idle after
#   three  a three-node cluster: cp -a into node 1; every daemon's RSS and
#          CPU time, store sizes
#   join   a fourth node joins the three (or, without three, the one
#          node): snapshot size, time until it has the namespace (its mount
#          returns), until it has every chunk, MB/s, its mount's progress
#          lines, its peak RSS
#
# --seed DIR: the one node starts from a copy of DIR, a one-node store of
# the same tree that an earlier run kept (SCALE_KEEP=1 keeps the work
# directory; its store is d0 with --phases one,join), instead of copying
# the tree in: the reads, the restart and the join at 1M files without
# the copy's half hour.
#
# Needs about 4 GB of free disk per node at 1M files. Builds nothing: run
# `make build` first (or set BIN to a release build's directory).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/benches/lib.sh"

files=1000000
phases=local,one,load,three,join
seed=
big=4
parallel=1
while [ $# -gt 0 ]; do
    case $1 in
        --files) files=$2; shift 2 ;;
        --big-files) big=$2; shift 2 ;;
        --parallel) parallel=$2; shift 2 ;;
        --phases) phases=$2; shift 2 ;;
        --seed) seed=$2; shift 2 ;;
        *) echo "unknown option $1 (see the head of $0)" >&2; exit 2 ;;
    esac
done
has() { [[ ",$phases," == *",$1,"* ]]; }

work=${SCALE_WORK:-$(mktemp -d /var/tmp/wpfs-scale-XXXX)}
cleanup() {
    stop_nodes
    [ -n "${SCALE_KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT
tree=$work/tree
echo "work directory: $work; $files files; $parallel cp -a at once"

# Resident memory (current and peak) of node N's daemon, and what of it
# RocksDB's memtables and block cache hold, in MiB.
rss() {
    awk '/^VmRSS/{r=$2} /^VmHWM/{h=$2} END {printf "rss %d MiB, peak %d MiB", r/1024, h/1024}' \
        "/proc/$(daemon_of "$1")/status"
    status "$1" | python3 -c "import json,sys; m = json.load(sys.stdin)['memory']
print(f\" (memtables {m['rocksdb_memtables_bytes'] >> 20} MiB, block cache {m['rocksdb_block_cache_bytes'] >> 20} MiB)\", end='')"
}
cold() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# `timed LABEL CMD...`: runs CMD with a cold kernel cache, prints seconds.
timed() {
    local label=$1 t
    shift
    cold
    t=$(now)
    "$@" >/dev/null
    echo "  $label: $(since "$t") s"
}

# The tree, made once: two parts (a tenth, the rest) so that memory can
# be read at both sizes.
make_tree() {
    [ -e "$tree/.done" ] && return
    python3 - "$tree" "$files" "$big" <<'EOF'
import os, random, sys
root, files, big = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(7)
months = [f"{y}/{m:02}" for y in range(2010, 2027) for m in range(1, 13)]
big_dir = "2024/05"
for part in ("part1", "part2"):
    for d in months:
        os.makedirs(os.path.join(root, part, d), exist_ok=True)
first = files // 10
for i in range(files):
    part = "part1" if i < first else "part2"
    d = big_dir if i % 9 == 0 and part == "part2" else rng.choice(months)
    # lognormal around 2 KiB, 400 B to 16 KiB
    size = int(min(16384, max(400, rng.lognormvariate(7.6, 0.9))))
    with open(os.path.join(root, part, d, f"image-{i}-{size}.jpg"), "wb") as f:
        f.write(os.urandom(size))
for n, mib in enumerate((64, 128, 256, 512)[:big]):
    with open(os.path.join(root, "part2", "2025/01", f"video-{n}.mp4"), "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
EOF
    touch "$tree/.done"
}

# cp -a of the tree's two parts into DEST, with files/s and MiB/s; for a
# node, its RSS idle after each part and its peak while copying.
import_into() {
    local dest=$1 node=${2:-} t n bytes
    for part in part1 part2; do
        n=$(find "$tree/$part" -type f | wc -l)
        bytes=$(du -sb "$tree/$part" | cut -f1)
        t=$(now)
        if [ "$parallel" = 1 ]; then
            cp -a "$tree/$part" "$dest/"
        else
            mkdir -p "$dest/$part"
            ls "$tree/$part" | xargs -P "$parallel" -I{} cp -a "$tree/$part/{}" "$dest/$part/"
        fi
        sync
        python3 -c "
t = $(since "$t"); print(f'  cp -a $part: {$n} files, {$bytes / 2**20:.0f} MiB in {t:.1f} s = {$n / t:.0f} files/s, {$bytes / 2**20 / t:.1f} MiB/s')"
        if [ -n "$node" ]; then
            echo "  node $node after $part: $(rss "$node") (peak: under load), CPU $(cpu "$node") s"
            sleep 10
            echo "  node $node idle 10 s later: $(rss "$node")"
        fi
    done
}

# find, du, ls -l of the big directory, a deep stat: under ROOT.
reads() {
    local root=$1
    timed "find . | wc -l" sh -c "cd '$root' && find . | wc -l"
    timed "du -s" du -s "$root"
    timed "ls -l of a $(ls -f "$root/part2/2024/05" | wc -l)-entry directory" ls -l "$root/part2/2024/05"
    local deep
    deep=$(ls "$root/part1/2017/03" | sed -n 1p) # not head: ls would die of SIGPIPE
    timed "stat of one deep file" stat "$root/part1/2017/03/$deep"
}

make_tree
if has local; then
    echo "== local disk"
    mkdir -p "$work/local"
    import_into "$work/local"
    reads "$work/local"
    rm -rf "$work/local" # room for the nodes' stores
fi

if has one; then
    echo "== one node"
    if [ -n "$seed" ]; then
        echo "  from a copy of $seed (no copy of the tree)"
        rm -rf "$work/d0"
        cp -a "$seed" "$work/d0"
    fi
    start_node 0
    [ -n "$seed" ] || import_into "$work/mnt0" 0
    echo "  store: $(du -sm "$work/d0/db" | cut -f1) MiB on disk for $(du -sm --apparent-size "$tree/" | cut -f1) MiB of files"
    wait_replicated 0 # the start's scan for missing chunks (a seed's) ends first
    reads "$work/mnt0"
    if has load; then
        # Memory under load with the whole tree in the store: a tenth of it
        # and the big files copied in again beside it. The peak counts from
        # here (clear_refs 5 resets the kernel's VmHWM).
        echo "  before copying more in: $(rss 0)"
        echo 5 >"/proc/$(daemon_of 0)/clear_refs"
        t=$(now)
        mkdir -p "$work/mnt0/again"
        cp -a "$tree/part1" "$tree/part2/2025/01" "$work/mnt0/again/"
        sync
        echo "  cp -a of a tenth again, with the big files: $(since "$t") s; $(rss 0) (peak: while copying)"
        sleep 10
        echo "  idle 10 s later: $(rss 0)"
    fi
    umount "$work/mnt0"
    while [ -n "$(daemon_of 0)" ]; do sleep 0.2; done
    t=$(now)
    if "$BIN/wpfs" mount "$work/d0" "$work/mnt0" -o allow_other 2>"$work/restart.txt"; then
        echo "  restart: wpfs mount to serving in $(since "$t") s; then $(rss 0)"
    else
        echo "  restart: wpfs mount failed after $(since "$t") s:"
        sed 's/^/    /' "$work/restart.txt"
        tail -5 "$work/d0/wpfs.log" | sed 's/^/    log: /'
    fi
    if has three || ! has join; then
        umount "$work/mnt0" 2>/dev/null || true
        [ -n "${SCALE_KEEP:-}" ] || rm -rf "$work/d0"
    fi
fi

if has three; then
    echo "== three nodes"
    for n in 1 2 3; do start_node "$n"; done
    import_into "$work/mnt1" 1
    wait_replicated 2
    wait_replicated 3
    for n in 1 2 3; do
        echo "  node $n: $(rss "$n"), CPU $(cpu "$n") s, store $(du -sm "$work/d$n/db" | cut -f1) MiB"
    done
fi

if has join; then
    founder=1
    has three || founder=0
    echo "== a new node (4) joins the cluster of node $founder"
    founder_cpu=$(cpu "$founder")
    t=$(now)
    start_node 4 "$founder"
    echo "  namespace here (its mount returned) after $(since "$t") s; snapshot $(status 4 |
        python3 -c "import json,sys; print(json.load(sys.stdin)['snapshot_received']['size'])") bytes"
    echo "  the mount's progress lines (first and last three):"
    { head -3; echo "  ..."; tail -3; } <"$work/mount4.txt" | sed 's/^/    /'
    wait_replicated 4
    bytes=$(status 4 | field replicated_bytes)
    python3 -c "
t = $(since "$t"); print(f'  every chunk after {t:.1f} s: {$bytes / 1e6:.0f} MB, {$bytes / 1e6 / t:.1f} MB/s')"
    echo "  node 4: $(rss 4), CPU $(cpu 4) s; node $founder's CPU meanwhile $(python3 -c "print(f'{$(cpu "$founder") - $founder_cpu:.2f}')") s"
    grep -h "installed the snapshot" "$work/d4/wpfs.log" | sed 's/^/  log: /'
fi
