//! wpfs consensus: the Raft log (raft-rs `RawNode` over RocksDB) and the
//! namespace state machine it feeds.
//!
//! - `store`: the node's one RocksDB and its column families;
//! - `raft_log`: raft-rs `Storage` over the `raft` column family;
//! - `namespace`: the deterministic state machine (inodes, entries, chunk slots);
//! - `node`: the driver thread running the RawNode loop and taking proposals;
//! - `snapshot`: the namespace as a file, for nodes that fell behind the log;
//! - `transport`: the links between the nodes; `tls`: their mutual TLS;
//! - `mailbox`: the queues between threads;
//! - `metrics`: the driver's latency histograms, and the buckets every latency uses.

mod logger;
pub mod mailbox;
pub mod metrics;
pub mod namespace;
pub mod node;
pub mod raft_log;
pub mod snapshot;
pub mod store;
pub mod tls;
pub mod transport;

pub use namespace::{Namespace, CHUNK_SIZE, ROOT_INO};
pub use node::{ApplyObserver, Node, NodeConfig, ProposeError, RaftStatus};
pub use raft::eraftpb::ConfChangeType;
pub use store::{Store, StoreError};
pub use transport::{this_version, Transport, TransportConfig};

/// Creates the store of a brand-new one-voter cluster at `path`: the
/// Raft configuration, the first member's address and the root directory.
pub fn bootstrap(
    path: &std::path::Path,
    node_id: u64,
    addr: &str,
    now_ns: i64,
    uid: u32,
    gid: u32,
) -> Result<(), String> {
    let store = Store::open(path, true).map_err(|e| e.to_string())?;
    raft_log::RaftLog::bootstrap(&store, node_id).map_err(|e| e.to_string())?;
    let namespace = Namespace::new(store.clone());
    Namespace::bootstrap(&store, now_ns, uid, gid).map_err(|e| e.to_string())?;
    let member = wpfs_proto::Member {
        node_id,
        addr: addr.to_string(),
        witness: false,
    };
    namespace
        .apply_member(1, 1, node_id, Some(&member))
        .map_err(|e| e.to_string())?;
    store.sync().map_err(|e| e.to_string())
}
