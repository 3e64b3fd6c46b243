//! The text of `GET /metrics` (OpenMetrics, which Prometheus scrapes):
//! the histograms and counters the parts of the node keep (FUSE
//! operations, Raft latencies, chunk transfers), and gauges read from the
//! node's state at each scrape. docs/operations.md lists every metric.
//!
//! A registry is built per scrape: the recorded metrics are shared
//! handles, so that costs a few allocations, and the gauges need no
//! bookkeeping between scrapes (a removed peer simply stops appearing).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::admin::AdminState;

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: u64,
}

pub fn text(state: &AdminState) -> String {
    let mut registry = Registry::with_prefix("wpfs");
    node_gauges(state, &mut registry);
    peer_gauges(state, &mut registry);
    state.core.node().metrics().register(&mut registry);
    state.fuse_metrics.register(&mut registry);
    state.replicator.metrics().register(&mut registry);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

fn gauge(registry: &mut Registry, name: &str, help: &str, unit: Option<Unit>, value: u64) {
    let gauge = Gauge::<i64>::default();
    gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, gauge),
        None => registry.register(name, help, gauge),
    }
}

fn node_gauges(state: &AdminState, r: &mut Registry) {
    let raft = state.core.node().status();
    let replication = state.replicator.status();
    let space = state.core.chunks().space();
    let healthy = state.problem().is_none();
    gauge(
        r,
        "healthy",
        "1 when /health answers 200 (mounted, store usable, a Raft leader known)",
        None,
        healthy as u64,
    );
    gauge(
        r,
        "raft_term",
        "The Raft term this node is in",
        None,
        raft.term,
    );
    gauge(
        r,
        "raft_is_leader",
        "1 on the Raft leader",
        None,
        (raft.role == "leader") as u64,
    );
    gauge(
        r,
        "raft_commit_index",
        "The highest log index this node knows is committed",
        None,
        raft.commit,
    );
    gauge(
        r,
        "raft_applied_index",
        "The highest log index applied to this node's namespace",
        None,
        raft.applied,
    );
    gauge(
        r,
        "raft_log_entries",
        "Entries in this node's Raft log (compacted as they are applied)",
        None,
        (raft.last_index + 1).saturating_sub(raft.first_index),
    );
    gauge(
        r,
        "store",
        "Size of this node's RocksDB store on disk",
        Some(Unit::Bytes),
        state.core.namespace().store().size_bytes(),
    );
    let memory = state.core.namespace().store().memory();
    gauge(
        r,
        "rocksdb_memtables",
        "Memory of RocksDB's memtables, all column families",
        Some(Unit::Bytes),
        memory.memtables,
    );
    gauge(
        r,
        "rocksdb_block_cache",
        "Memory of RocksDB's block cache",
        Some(Unit::Bytes),
        memory.block_cache,
    );
    gauge(
        r,
        "inodes",
        "Files, directories and links in the namespace",
        None,
        state.core.namespace().inode_count().unwrap_or(0),
    );
    gauge(
        r,
        "replication_backlog_chunks",
        "Chunks written elsewhere that this node still has to fetch",
        None,
        replication.backlog_chunks,
    );
    gauge(r, "under_replicated_chunks", "Chunks written here that are on fewer nodes than copies= asks (pushed again every few seconds)", None, replication.under_replicated_chunks);
    gauge(
        r,
        "under_replicated",
        "Bytes of the under-replicated chunks",
        Some(Unit::Bytes),
        replication.under_replicated_bytes,
    );
    gauge(
        r,
        "peers_reachable",
        "Other members this node has a connection to",
        None,
        state
            .transport
            .links()
            .values()
            .filter(|l| l.connected)
            .count() as u64,
    );
    if let Ok(u) = space.usage() {
        gauge(
            r,
            "disk_free",
            "Space available on the store's filesystem",
            Some(Unit::Bytes),
            u.available * u.block_size,
        );
    }
    gauge(
        r,
        "disk_min_free",
        "The reserve (min_free=) below which new file contents are refused with ENOSPC",
        Some(Unit::Bytes),
        space.min_free(),
    );
}

/// Gauges by peer: what this node sees of each other member.
fn peer_gauges(state: &AdminState, r: &mut Registry) {
    let me = state.config.node_id;
    let raft = state.core.node().status();
    let reachable = Family::<PeerLabel, Gauge>::default();
    for (id, link) in state.transport.links() {
        if id != me {
            reachable
                .get_or_create(&PeerLabel { peer: id })
                .set(link.connected as i64);
        }
    }
    r.register(
        "peer_reachable",
        "1 while this node has a connection to the peer",
        reachable,
    );

    // The leader knows how far each follower's log matches its own.
    let lag = Family::<PeerLabel, Gauge>::default();
    for p in raft.progress.iter().filter(|p| p.id != me) {
        let behind = raft.last_index.saturating_sub(p.matched);
        lag.get_or_create(&PeerLabel { peer: p.id })
            .set(i64::try_from(behind).unwrap_or(i64::MAX));
    }
    r.register_with_unit(
        "peer_match_lag",
        "Leader only: log entries the peer's log is behind the leader's",
        Unit::Other("entries".into()),
        lag,
    );

    let backlog = Family::<PeerLabel, Gauge>::default();
    for (writer, chunks) in state.replicator.backlog_by_writer() {
        // Chunks a scan found missing have no known writer: they are in
        // wpfs_replication_backlog_chunks only.
        if writer != 0 {
            backlog
                .get_or_create(&PeerLabel { peer: writer })
                .set(i64::try_from(chunks).unwrap_or(i64::MAX));
        }
    }
    r.register(
        "peer_chunk_backlog",
        "Chunks the peer wrote that this node still has to fetch",
        backlog,
    );
}
