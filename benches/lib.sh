# Sourced by the benchmarks (after setting $here, the checkout): the
# wpbench harness and the wpfs build they use, and wpfs nodes on 127.0.0.1.

WPBENCH=${WPBENCH:-$here/../shared/bench/wpbench}
BIN=${BIN:-/var/tmp/wpfs-target/debug}
[ -x "$WPBENCH" ] || { echo "no wpbench at $WPBENCH: set WPBENCH=path" >&2; exit 1; }
[ -x "$BIN/wpfs" ] || { echo "no wpfs in $BIN: run 'make build' or set BIN" >&2; exit 1; }

# Node N keeps its data in $work/dN, is mounted at $work/mntN and talks
# to its peers on 127.0.0.1:(7490 + N). Node 0 is a cluster of its own (the
# one-node target); nodes 1, 2, 3… form one cluster that node 1 founds.
# The functions need $work, the run's directory.

# `start_node N [FOUNDER]`: node N joins the cluster node FOUNDER (default
# 1) founded; nodes 0 and 1 found their own. A store already in $work/dN
# is mounted as it is.
start_node() {
    local n=$1 founder=${2:-1}
    mkdir -p "$work/mnt$n"
    if [ -e "$work/d$n/wpfs.json" ]; then
        : # a store made before (scale.sh --seed): mounted as it is
    elif [ "$n" = 0 ] || [ "$n" = 1 ]; then
        "$BIN/wpfs" init --data "$work/d$n" --node-id 1 --listen "127.0.0.1:$((7490 + n))" >/dev/null
    else
        "$BIN/wpfs" join --data "$work/d$n" --node-id "$n" --listen "127.0.0.1:$((7490 + n))" \
            --peer "127.0.0.1:$((7490 + founder))" \
            --token "$("$BIN/wpfs" token --data "$work/d$founder")" >/dev/null
    fi
    # What the mount prints (a join's progress lines) goes to $work/mountN.txt.
    "$BIN/wpfs" mount "$work/d$n" "$work/mnt$n" -o allow_other 2>"$work/mount$n.txt"
}

# The daemon serving node N.
daemon_of() { pgrep -f "wpfs mount $work/d$1 " | head -1; }

stop_nodes() {
    for m in "$work"/mnt*; do umount "$m" 2>/dev/null || true; done
    sleep 1
}

# Node N's status, and one field of it ("null" for none).
status() { "$BIN/wpfs" status --data "$work/d$1" --json; }
field() { python3 -c "import json,sys; v = json.load(sys.stdin)['$1']; print('null' if v is None else v)"; }

# Seconds since the epoch, with nanoseconds; seconds since T.
now() { date +%s.%N; }
since() { python3 -c "print(f'{$(now) - $1:.2f}')"; }

# CPU time (user + system) of node N's daemon so far, in seconds.
cpu() {
    awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' \
        "/proc/$(daemon_of "$1")/stat"
}

# Waits until node N holds every chunk its namespace references.
wait_replicated() {
    until [ "$(status "$1" | field replication_backlog_chunks)" = 0 ] &&
          [ "$(status "$1" | field replication_scan_percent)" = null ]; do
        sleep 0.2
    done
}
