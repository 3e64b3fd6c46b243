//! Background content replication: every chunk the namespace references
//! ends up stored on every data node.
//!
//! When a `set_content` written elsewhere is applied here, its chunks that
//! this node lacks are queued (`want`); a few workers fetch them from the
//! writer first, then from any other peer, verify their BLAKE3 hash and
//! store them. A chunk no peer can give now is retried every few seconds.
//! Nothing of the queue is persisted: at start (and after a snapshot) a
//! scan of the namespace's referenced chunks finds what is still missing.
//!
//! Reads do not wait for this: a read of a chunk not here yet fetches it
//! on demand (`ChunkSource`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use wpfs_consensus::namespace::{Hash, Namespace};
use wpfs_consensus::Transport;
use wpfs_proto::peer_request::Kind;

use crate::chunks::{hex, ChunkSource, ChunkStore};

/// Chunks fetched at once in the background.
const WORKERS: usize = 4;
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// One chunk this node lacks, and who probably has it (0: anyone).
struct Want {
    hash: Hash,
    from: u64,
}

pub struct Replicator {
    transport: Transport,
    chunks: Arc<ChunkStore>,
    queue: Sender<Want>,
    /// Chunks wanted and not stored yet: the replication backlog.
    backlog: Mutex<HashSet<Hash>>,
    /// Wants that failed, queued again by `retry`.
    failed: Mutex<Vec<Want>>,
    fetched_chunks: AtomicU64,
    fetched_bytes: AtomicU64,
}

/// What `wpfs status` shows of replication.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReplicationStatus {
    pub backlog_chunks: u64,
    pub fetched_chunks: u64,
    pub fetched_bytes: u64,
}

impl Replicator {
    pub fn start(transport: Transport, chunks: Arc<ChunkStore>) -> Arc<Replicator> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let r = Arc::new(Replicator {
            transport,
            chunks,
            queue: tx,
            backlog: Mutex::new(HashSet::new()),
            failed: Mutex::new(Vec::new()),
            fetched_chunks: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
        });
        for i in 0..WORKERS {
            let (r, rx): (Arc<Replicator>, Receiver<Want>) = (r.clone(), rx.clone());
            std::thread::Builder::new()
                .name(format!("replicate-{i}"))
                .spawn(move || {
                    while let Ok(want) = rx.recv() {
                        r.replicate(want);
                    }
                })
                .expect("spawning a thread");
        }
        r
    }

    /// Queues the chunks of `hashes` that are not here, naming their writer.
    pub fn want(&self, hashes: impl IntoIterator<Item = Hash>, from: u64) {
        for hash in hashes {
            if self.chunks.contains(&hash).unwrap_or(false) {
                continue;
            }
            if self.backlog.lock().insert(hash) {
                let _ = self.queue.send(Want { hash, from });
            }
        }
    }

    /// Queues every referenced chunk that is missing here.
    pub fn scan(&self, namespace: &Namespace) {
        match namespace.referenced_chunks() {
            Ok(all) => self.want(all, 0),
            Err(e) => tracing::warn!("cannot list referenced chunks: {e}"),
        }
    }

    /// Queues the failed wants again (called every few seconds).
    pub fn retry(&self) {
        for want in std::mem::take(&mut *self.failed.lock()) {
            let _ = self.queue.send(want);
        }
    }

    pub fn status(&self) -> ReplicationStatus {
        ReplicationStatus {
            backlog_chunks: self.backlog.lock().len() as u64,
            fetched_chunks: self.fetched_chunks.load(Ordering::Relaxed),
            fetched_bytes: self.fetched_bytes.load(Ordering::Relaxed),
        }
    }

    fn replicate(&self, want: Want) {
        if self.chunks.contains(&want.hash).unwrap_or(false) {
            self.backlog.lock().remove(&want.hash);
            return;
        }
        match self.fetch_from(&want.hash, want.from) {
            Some(data) if self.store(&want.hash, &data) => {
                self.backlog.lock().remove(&want.hash);
            }
            _ => self.failed.lock().push(want),
        }
    }

    fn store(&self, hash: &Hash, data: &[u8]) -> bool {
        match self.chunks.put_verified(hash, data) {
            Ok(true) => {
                self.fetched_chunks.fetch_add(1, Ordering::Relaxed);
                self.fetched_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                true
            }
            Ok(false) => {
                tracing::error!("a peer sent chunk {} with the wrong bytes", hex(hash));
                false
            }
            Err(e) => {
                tracing::warn!("cannot store chunk {}: {e:?}", hex(hash));
                false
            }
        }
    }

    /// Asks `first` (if known), then every other connected peer.
    fn fetch_from(&self, hash: &Hash, first: u64) -> Option<Vec<u8>> {
        let me = self.transport.node_id();
        let links = self.transport.links();
        let mut order: Vec<u64> = links
            .iter()
            .filter(|(id, l)| **id != me && **id != first && l.connected)
            .map(|(id, _)| *id)
            .collect();
        if first != 0 && first != me && links.contains_key(&first) {
            order.insert(0, first);
        }
        order.into_iter().find_map(|peer| {
            self.transport
                .call(peer, Kind::FetchChunk(hash.to_vec()), FETCH_TIMEOUT)
                .ok()
        })
    }
}

impl ChunkSource for Replicator {
    fn fetch(&self, hash: &Hash) -> Option<Vec<u8>> {
        let data = self.fetch_from(hash, 0)?;
        self.fetched_chunks.fetch_add(1, Ordering::Relaxed);
        self.fetched_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.backlog.lock().remove(hash);
        Some(data)
    }
}
