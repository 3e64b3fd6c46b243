//! What the node's admin endpoint answers (`http` serves it on two
//! listeners: a Unix socket in the data directory, what `wpfs status`
//! talks to, guarded by file permissions; and, when configured, the TCP
//! `--admin` address for load balancers and Prometheus):
//!
//! - `GET /status`: the node's state as JSON (docs/operations.md lists the fields);
//! - `GET /health`: 200 when the mount, the store and a Raft majority are
//!   usable, else 503 with the part that is not;
//! - `GET /metrics`: Prometheus (OpenMetrics) text, see `metrics`;
//! - `POST /leave`, `POST /remove/N` (Unix socket only): membership changes
//!   for `wpfs leave` and `wpfs remove`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use wpfs_consensus::Transport;
use wpfs_fs::metrics::FuseMetrics;
use wpfs_fs::replication::Replicator;
use wpfs_fs::FsCore;

use crate::cluster::{self, PeerService};
use crate::config::NodeConfig;
use crate::metrics;

pub struct AdminState {
    pub core: Arc<FsCore>,
    pub config: NodeConfig,
    pub dir: PathBuf,
    pub mountpoint: PathBuf,
    pub mounted: AtomicBool,
    pub transport: Transport,
    pub replicator: Arc<Replicator>,
    pub service: Arc<PeerService>,
    pub fuse_metrics: FuseMetrics,
}

impl AdminState {
    /// Why the node should not take traffic ("degraded: …"), or None when
    /// it is healthy.
    pub fn problem(&self) -> Option<String> {
        let raft = self.core.node().status();
        let why = if let Some(why) = raft.failed {
            format!("store failed: {why}")
        } else if raft.removed {
            "removed from the cluster".into()
        } else if raft.leader == 0 {
            "no Raft leader: a majority of voters is unreachable, so writes fail \
             (reads are served from this node's copy)"
                .into()
        } else if !self.mounted.load(Ordering::Relaxed) {
            "not mounted".into()
        } else {
            return None;
        };
        Some(format!("degraded: {why}"))
    }

    /// Every member as this node sees it.
    fn members(&self) -> Vec<Value> {
        let raft = self.core.node().status();
        let links = self.transport.links();
        let me = self.config.node_id;
        let witnesses: Vec<u64> = self
            .core
            .namespace()
            .members()
            .unwrap_or_default()
            .iter()
            .filter(|m| m.witness)
            .map(|m| m.node_id)
            .collect();
        let roles = raft
            .voters
            .iter()
            .map(|id| (*id, "voter"))
            .chain(raft.learners.iter().map(|id| (*id, "learner")));
        roles
            .map(|(id, role)| {
                let link = links.get(&id);
                let progress = raft.progress.iter().find(|p| p.id == id);
                json!({
                    "id": id,
                    "address": if id == me { Some(self.config.listen.clone()) } else { link.map(|l| l.addr.clone()) },
                    "role": if id == raft.leader { "leader" } else { role },
                    "witness": witnesses.contains(&id),
                    "reachable": id == me || link.is_some_and(|l| l.connected),
                    "match_index": progress.map(|p| p.matched),
                    "replication": progress.map(|p| p.state.clone()),
                    "last_error": link.and_then(|l| l.last_error.clone()),
                    "version": if id == me { Some(wpfs_consensus::this_version()) } else { link.and_then(|l| l.version.clone()) },
                })
            })
            .collect()
    }

    pub fn status(&self) -> Value {
        let raft = self.core.node().status();
        let store = self.core.namespace().store();
        let memory = store.memory();
        let replication = self.replicator.status();
        let snapshot = &self.service.snapshot;
        json!({
            "node_id": self.config.node_id,
            "cluster_id": self.config.cluster_id,
            "listen": self.config.listen,
            "running": true,
            "pid": std::process::id(),
            "role": raft.role,
            "leader": raft.leader,
            "term": raft.term,
            "commit_index": raft.commit,
            "applied_index": raft.applied,
            "first_log_index": raft.first_index,
            "last_log_index": raft.last_index,
            "voters": raft.voters,
            "learners": raft.learners,
            "members": self.members(),
            "replication_backlog_chunks": replication.backlog_chunks,
            "replication_scan_percent": replication.scan_percent,
            "replicated_chunks": replication.fetched_chunks,
            "replicated_bytes": replication.fetched_bytes,
            "under_replicated_chunks": replication.under_replicated_chunks,
            "under_replicated_bytes": replication.under_replicated_bytes,
            "witness": self.config.witness,
            "snapshot_received": {
                "index": snapshot.index.load(Ordering::Relaxed),
                "bytes": snapshot.received.load(Ordering::Relaxed),
                "size": snapshot.size.load(Ordering::Relaxed),
            },
            "store_bytes": store.size_bytes(),
            "memory": {
                "rocksdb_memtables_bytes": memory.memtables,
                "rocksdb_block_cache_bytes": memory.block_cache,
            },
            "inodes": self.core.namespace().inode_count().unwrap_or(0),
            "chunks": self.core.chunk_count_estimate(),
            "mounted": self.mounted.load(Ordering::Relaxed),
            "mountpoint": self.mountpoint,
            "health": self.problem().unwrap_or_else(|| "ok".into()),
        })
    }

    /// Membership changes asked through the Unix socket, one at a time:
    /// Raft takes one membership change at once.
    fn change(&self, path: &str) -> Reply {
        static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let node = self.core.node();
        let result = if path == "/leave" {
            cluster::leave(node, &self.transport).map(|()| {
                let _ = cluster::mark_left(&self.dir);
                // SAFETY: signals our own process; the signal thread unmounts.
                unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
                format!(
                    "node {} left the cluster; unmounting\n",
                    self.config.node_id
                )
            })
        } else if let Some(id) = path.strip_prefix("/remove/").and_then(|n| n.parse().ok()) {
            cluster::remove(node, &self.transport, id).map(|()| format!("node {id} removed\n"))
        } else {
            return Reply::text(404, "not found: try /leave or /remove/N\n".into());
        };
        match result {
            Ok(text) => Reply::text(200, text),
            Err(why) => Reply::text(409, format!("{why}\n")),
        }
    }

    /// The answer to `method path`, asked by `from`.
    pub fn answer(&self, method: &str, path: &str, from: Caller) -> Reply {
        match (method, path) {
            ("GET", "/status") => Reply::json(&self.status()),
            ("GET", "/health") => match self.problem() {
                None => Reply::text(200, "ok\n".into()),
                Some(why) => Reply::text(503, format!("{why}\n")),
            },
            ("GET", "/metrics") => Reply {
                status: 200,
                content_type: metrics::CONTENT_TYPE,
                body: metrics::text(self),
            },
            ("GET", _) => Reply::text(404, "not found: try /status, /health or /metrics\n".into()),
            ("POST", _) if from == Caller::Local => self.change(path),
            ("POST", _) => Reply::text(
                403,
                "membership changes are taken only on the node's Unix socket: run \
                 `wpfs leave` or `wpfs remove` on a node of the cluster\n"
                    .into(),
            ),
            _ => Reply::text(405, "only GET is answered here\n".into()),
        }
    }
}

/// Who asks: someone on this machine who may open the data directory's
/// socket, or anyone who reaches the `--admin` address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    Local,
    Network,
}

/// One answer of the endpoint.
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: u16, body: String) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body,
        }
    }

    fn json(value: &Value) -> Reply {
        Reply {
            status: 200,
            content_type: "application/json",
            body: format!("{value:#}\n"),
        }
    }
}
