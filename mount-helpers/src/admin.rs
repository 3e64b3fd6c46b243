//! The node's admin endpoint, plain HTTP/1.0 on two listeners: a Unix
//! socket in the data directory (what `wpfs status` talks to; file
//! permissions guard it) and, when configured, the TCP `--admin` address
//! for load balancers and Prometheus.
//!
//! - `GET /status`: the node's state as JSON (docs/operations.md lists the fields);
//! - `GET /health`: 200 when the mount, the store and a Raft majority are
//!   usable, else 503 with the part that is not;
//! - `GET /metrics`: Prometheus text.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use wpfs_fs::FsCore;

use crate::config::NodeConfig;

pub struct AdminState {
    pub core: Arc<FsCore>,
    pub config: NodeConfig,
    pub mountpoint: PathBuf,
    pub mounted: AtomicBool,
}

impl AdminState {
    /// Why the node should not take traffic, or None when it is healthy.
    pub fn problem(&self) -> Option<String> {
        let raft = self.core.node().status();
        if let Some(why) = raft.failed {
            Some(format!("store failed: {why}"))
        } else if raft.leader == 0 {
            Some("no Raft leader: a majority of voters is unreachable, writes fail".into())
        } else if !self.mounted.load(Ordering::Relaxed) {
            Some("not mounted".into())
        } else {
            None
        }
    }

    pub fn status(&self) -> Value {
        let raft = self.core.node().status();
        let store = self.core.namespace().store();
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
        let healthy = self.problem().is_none() as u8;
        format!(
            "# TYPE wpfs_healthy gauge\nwpfs_healthy {healthy}\n\
             # TYPE wpfs_raft_term gauge\nwpfs_raft_term {}\n\
             # TYPE wpfs_raft_is_leader gauge\nwpfs_raft_is_leader {}\n\
             # TYPE wpfs_raft_commit_index gauge\nwpfs_raft_commit_index {}\n\
             # TYPE wpfs_raft_applied_index gauge\nwpfs_raft_applied_index {}\n\
             # TYPE wpfs_store_bytes gauge\nwpfs_store_bytes {}\n\
             # TYPE wpfs_inodes gauge\nwpfs_inodes {}\n",
            raft.term,
            (raft.role == "leader") as u8,
            raft.commit,
            raft.applied,
            store.size_bytes(),
            self.core.namespace().inode_count().unwrap_or(0),
        )
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

fn handle(state: &AdminState, stream: &mut (impl Read + Write)) {
    let mut line = String::new();
    let mut reader = BufReader::new(&mut *stream).take(8192);
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (status, kind, body) = match (parts.next(), parts.next()) {
        (Some("GET"), Some(path)) => state.respond(path),
        _ => (400, "text/plain", "bad request\n".into()),
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Bad Request",
    };
    let _ = write!(
        stream,
        "HTTP/1.0 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// A connection that may wait at most so long for its request.
trait Connection: Read + Write {
    fn limit_wait(&self);
}

impl Connection for std::os::unix::net::UnixStream {
    fn limit_wait(&self) {
        let _ = self.set_read_timeout(Some(Duration::from_secs(5)));
    }
}

impl Connection for std::net::TcpStream {
    fn limit_wait(&self) {
        let _ = self.set_read_timeout(Some(Duration::from_secs(5)));
    }
}

/// Answers the connections `accept` yields, one at a time, on a thread.
fn spawn_server<C: Connection>(
    name: &str,
    state: Arc<AdminState>,
    mut accept: impl FnMut() -> std::io::Result<C> + Send + 'static,
) -> Result<(), String> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || loop {
            if let Ok(mut conn) = accept() {
                conn.limit_wait();
                handle(&state, &mut conn);
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
    spawn_server("admin-unix", state.clone(), move || {
        unix.accept().map(|(c, _)| c)
    })?;
    if let Some(addr) = tcp {
        let listener = TcpListener::bind(addr).map_err(|e| {
            format!("cannot listen on admin address {addr}: {e} (is another node using it?)")
        })?;
        spawn_server("admin-tcp", state, move || {
            listener.accept().map(|(c, _)| c)
        })?;
    }
    Ok(())
}

/// Asks a running daemon through its socket; None when none answers.
pub fn query(socket: &Path, path: &str) -> Option<String> {
    let mut conn = std::os::unix::net::UnixStream::connect(socket).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(conn, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut response = String::new();
    conn.read_to_string(&mut response).ok()?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
}
