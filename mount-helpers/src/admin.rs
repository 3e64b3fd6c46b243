//! The node's admin endpoint, plain HTTP/1.0 on two listeners: a Unix
//! socket in the data directory (what `wpfs status` talks to; file
//! permissions guard it) and, when configured, the TCP `--admin` address
//! for load balancers and Prometheus.
//!
//! - `GET /status`: the node's state as JSON (docs/operations.md lists the fields);
//! - `GET /health`: 200 when the mount, the store and a Raft majority are
//!   usable, else 503 with the part that is not;
//! - `GET /metrics`: Prometheus text;
//! - `POST /leave`, `POST /remove/N` (Unix socket only): membership changes
//!   for `wpfs leave` and `wpfs remove`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use wpfs_consensus::Transport;
use wpfs_fs::replication::Replicator;
use wpfs_fs::FsCore;

use crate::cluster::{self, PeerService};
use crate::config::NodeConfig;

pub struct AdminState {
    pub core: Arc<FsCore>,
    pub config: NodeConfig,
    pub dir: PathBuf,
    pub mountpoint: PathBuf,
    pub mounted: AtomicBool,
    pub transport: Transport,
    pub replicator: Arc<Replicator>,
    pub service: Arc<PeerService>,
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
            "replicated_chunks": replication.fetched_chunks,
            "replicated_bytes": replication.fetched_bytes,
            "under_replicated_chunks": replication.under_replicated_chunks,
            "witness": self.config.witness,
            "snapshot_received": {
                "index": snapshot.index.load(Ordering::Relaxed),
                "bytes": snapshot.received.load(Ordering::Relaxed),
                "size": snapshot.size.load(Ordering::Relaxed),
            },
            "store_bytes": store.size_bytes(),
            "inodes": self.core.namespace().inode_count().unwrap_or(0),
            "chunks": self.core.chunk_count_estimate(),
            "mounted": self.mounted.load(Ordering::Relaxed),
            "mountpoint": self.mountpoint,
            "health": self.problem().unwrap_or_else(|| "ok".into()),
        })
    }

    fn metrics(&self) -> String {
        let raft = self.core.node().status();
        let store = self.core.namespace().store();
        let replication = self.replicator.status();
        let healthy = self.problem().is_none() as u8;
        format!(
            "# TYPE wpfs_healthy gauge\nwpfs_healthy {healthy}\n\
             # TYPE wpfs_raft_term gauge\nwpfs_raft_term {}\n\
             # TYPE wpfs_raft_is_leader gauge\nwpfs_raft_is_leader {}\n\
             # TYPE wpfs_raft_commit_index gauge\nwpfs_raft_commit_index {}\n\
             # TYPE wpfs_raft_applied_index gauge\nwpfs_raft_applied_index {}\n\
             # TYPE wpfs_store_bytes gauge\nwpfs_store_bytes {}\n\
             # TYPE wpfs_inodes gauge\nwpfs_inodes {}\n\
             # TYPE wpfs_replication_backlog_chunks gauge\nwpfs_replication_backlog_chunks {}\n\
             # TYPE wpfs_replicated_bytes_total counter\nwpfs_replicated_bytes_total {}\n\
             # TYPE wpfs_under_replicated_chunks gauge\nwpfs_under_replicated_chunks {}\n\
             # TYPE wpfs_peers_reachable gauge\nwpfs_peers_reachable {}\n",
            raft.term,
            (raft.role == "leader") as u8,
            raft.commit,
            raft.applied,
            store.size_bytes(),
            self.core.namespace().inode_count().unwrap_or(0),
            replication.backlog_chunks,
            replication.fetched_bytes,
            replication.under_replicated_chunks,
            self.transport
                .links()
                .values()
                .filter(|l| l.connected)
                .count(),
        )
    }

    /// Membership changes asked through the Unix socket, one at a time:
    /// Raft takes one membership change at once.
    fn change(&self, path: &str) -> (u16, &'static str, String) {
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
            return (
                404,
                "text/plain",
                "not found: try /leave or /remove/N\n".into(),
            );
        };
        match result {
            Ok(text) => (200, "text/plain", text),
            Err(why) => (409, "text/plain", format!("{why}\n")),
        }
    }

    fn respond(&self, path: &str) -> (u16, &'static str, String) {
        match path {
            "/status" => (200, "application/json", format!("{:#}\n", self.status())),
            "/health" => match self.problem() {
                None => (200, "text/plain", "ok\n".into()),
                Some(why) => (503, "text/plain", format!("{why}\n")),
            },
            "/metrics" => (200, "text/plain; version=0.0.4", self.metrics()),
            _ => (
                404,
                "text/plain",
                "not found: try /status, /health or /metrics\n".into(),
            ),
        }
    }
}

fn handle(state: &AdminState, stream: &mut (impl Read + Write), local: bool) {
    let mut line = String::new();
    let mut reader = BufReader::new(&mut *stream).take(8192);
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (status, kind, body) = match (parts.next(), parts.next()) {
        (Some("GET"), Some(path)) => state.respond(path),
        (Some("POST"), Some(path)) if local => state.change(path),
        _ => (400, "text/plain", "bad request\n".into()),
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        409 => "Conflict",
        503 => "Service Unavailable",
        _ => "Bad Request",
    };
    let _ = write!(
        stream,
        "HTTP/1.0 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// How long a client may take to send its request or read the answer.
const CLIENT_WAIT: Duration = Duration::from_secs(5);
/// Connections answered at once on one listener; more wait to be accepted.
const MAX_CONNECTIONS: usize = 16;

/// A connection whose reads and writes wait at most `CLIENT_WAIT`.
trait Connection: Read + Write + Send + 'static {
    fn limit_wait(&self);
}

impl Connection for std::os::unix::net::UnixStream {
    fn limit_wait(&self) {
        let _ = self.set_read_timeout(Some(CLIENT_WAIT));
        let _ = self.set_write_timeout(Some(CLIENT_WAIT));
    }
}

impl Connection for std::net::TcpStream {
    fn limit_wait(&self) {
        let _ = self.set_read_timeout(Some(CLIENT_WAIT));
        let _ = self.set_write_timeout(Some(CLIENT_WAIT));
    }
}

/// Answers the connections `accept` yields, each on a thread of its own:
/// a client that connects and says nothing (or a `wpfs leave` waiting for
/// its membership change) must not hold up a load balancer's health check.
fn spawn_server<C: Connection>(
    name: &str,
    local: bool,
    state: Arc<AdminState>,
    mut accept: impl FnMut() -> std::io::Result<C> + Send + 'static,
) -> Result<(), String> {
    let active = Arc::new(AtomicUsize::new(0));
    let name = name.to_string();
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || loop {
            while active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
                std::thread::sleep(Duration::from_millis(10));
            }
            let mut conn = match accept() {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors, say: do not spin on it.
                    tracing::warn!("admin endpoint: accepting a connection failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            conn.limit_wait();
            active.fetch_add(1, Ordering::AcqRel);
            let (state, done) = (state.clone(), active.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-conn"))
                .spawn(move || {
                    handle(&state, &mut conn, local);
                    done.fetch_sub(1, Ordering::AcqRel);
                });
            if let Err(e) = spawned {
                tracing::warn!("admin endpoint: no thread for a connection: {e}");
                active.fetch_sub(1, Ordering::AcqRel);
            }
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Starts the listeners on background threads.
pub fn serve(state: Arc<AdminState>, socket: &Path, tcp: Option<&str>) -> Result<(), String> {
    let _ = std::fs::remove_file(socket); // left by a killed daemon
    let unix = UnixListener::bind(socket)
        .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
    spawn_server("admin-unix", true, state.clone(), move || {
        unix.accept().map(|(c, _)| c)
    })?;
    if let Some(addr) = tcp {
        let listener = TcpListener::bind(addr).map_err(|e| {
            format!("cannot listen on admin address {addr}: {e} (is another node using it?)")
        })?;
        spawn_server("admin-tcp", false, state, move || {
            listener.accept().map(|(c, _)| c)
        })?;
    }
    Ok(())
}

/// Asks a running daemon through its socket; None when none answers.
pub fn query(socket: &Path, path: &str) -> Option<String> {
    request(socket, "GET", path).map(|(_, body)| body)
}

/// Sends `method path` to a running daemon: its HTTP status and body, or
/// None when no daemon answers.
pub fn request(socket: &Path, method: &str, path: &str) -> Option<(u16, String)> {
    let mut conn = std::os::unix::net::UnixStream::connect(socket).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    write!(conn, "{method} {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut response = String::new();
    conn.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}
