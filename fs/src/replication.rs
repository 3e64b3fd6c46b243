//! Background content replication: every chunk the namespace references
//! ends up stored on every data node.
//!
//! When a `set_content` written elsewhere is applied here, its chunks that
//! this node lacks are queued (`want`); a few workers fetch them from the
//! writer first, then from any other peer, verify their BLAKE3 hash and
//! store them. A worker takes up to `FETCH_BATCH` wants at once, asks a
//! peer for them in one request and stores them in one write: a node
//! joining a million-file cluster fetches a million small chunks, and a
//! round trip and a write each held it to 27 MB/s. A chunk no peer can
//! give now is retried every few seconds.
//! Nothing of the queue is persisted: at start (and after a snapshot) a
//! scan of the namespace's referenced chunks finds what is still missing.
//!
//! The backlog is bounded (`BACKLOG_MAX`): a node that joins a million-file
//! cluster lacks a million chunks, and a list of them all (hash, writer,
//! queue slot) would take over 100 MB. The scan walks the namespace's
//! references a step at a time, in hash order, and steps on only while the
//! backlog is short; a want that finds the backlog full is dropped and a
//! later scan pass finds it.
//!
//! Reads do not wait for this: a read of a chunk not here yet fetches it
//! on demand (`ChunkSource`).
//!
//! Small writes skip all of that: new chunks of up to `CARRY_MAX` bytes
//! ride in the `set_content` command itself (`carried`), and every data
//! node stores them as it applies the command. Most of a WordPress tree is
//! such files; each would otherwise cost a push and its answer on the
//! writer and a store on every peer, outside the Raft messages that carry
//! the command anyway.
//!
//! Copies: before a writer commits new contents, it pushes the new chunks
//! to `copies - 1` other data nodes (`place`), so a close() that returned
//! never depends on the writer's disk alone. Carried chunks need no push
//! when any majority of voters holds `copies` data nodes
//! (`must_push`): the commit itself then puts them there. When
//! too few data nodes are reachable the commit goes ahead (a write must
//! not hang on a dead peer) and the chunks are counted as under-replicated
//! until a later push succeeds. A witness neither stores nor serves
//! contents.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rocksdb::WriteBatch;
use wpfs_consensus::mailbox::{self, Receiver, Sender};
use wpfs_consensus::namespace::{Hash, Namespace};
use wpfs_consensus::Transport;
use wpfs_proto::peer_request::Kind;
use wpfs_proto::{FetchChunks, Member, Message, SetContent, StoreChunks};

use crate::chunks::{hex, ChunkSource, ChunkStore};
use crate::metrics::ChunkMetrics;
use crate::throttle::{held_back, Throttle};

/// Chunks fetched at once in the background.
const WORKERS: usize = 4;
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Chunks asked of a peer in one request (peer protocol 2), and so the
/// most a peer answers at once: 64 chunks of up to 64 KiB, 4 MiB.
pub const FETCH_BATCH: usize = 64;
/// A batch of up to 4 MiB arrives within this over a link of 3 Mbit/s.
const BATCH_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the list of data members is trusted.
const MEMBERS_FRESH: Duration = Duration::from_secs(1);
/// Chunks pushed in one request (64 KiB each: 4 MiB).
const PUSH_BATCH: usize = 64;
/// Chunks wanted at most at once (about 100 bytes each).
const BACKLOG_MAX: usize = 16_384;
/// References the scan reads from the namespace in one step.
const SCAN_STEP: usize = 1024;
/// New chunks up to this many bytes in all ride in their command. The Raft
/// log keeps them until it is compacted (bounded in bytes too, see
/// `consensus::node`).
pub const CARRY_MAX: usize = 64 * 1024;

/// One chunk this node lacks, and who probably has it (0: anyone).
struct Want {
    hash: Hash,
    from: u64,
}

pub struct Replicator {
    transport: Transport,
    chunks: Arc<ChunkStore>,
    namespace: Namespace,
    /// Nodes that must hold a chunk before its commit (this one included).
    copies: usize,
    /// This node is a witness: it fetches nothing in the background.
    witness: bool,
    /// Chunks written here that are on fewer than `copies` nodes, and
    /// their sizes.
    under_replicated: Mutex<HashMap<Hash, u64>>,
    /// Members other than this node, and when they were read.
    members: Mutex<(Option<Instant>, Arc<[Member]>)>,
    queue: Sender<Want>,
    /// Chunks wanted and not stored yet (the replication backlog), and
    /// the node that wrote each (0: not known).
    backlog: Mutex<HashMap<Hash, u64>>,
    /// Wants that failed, queued again by `retry`.
    failed: Mutex<Vec<Want>>,
    scan: Mutex<Scan>,
    metrics: ChunkMetrics,
    /// The "cannot store" warning (a full disk: one per chunk), throttled.
    store_failed_logged: Throttle,
}

/// Where the scan of referenced chunks is (`Replicator::scan`).
#[derive(Default)]
struct Scan {
    running: bool,
    /// The last reference looked at; None: the pass starts at the first.
    after: Option<Hash>,
    /// A want was dropped (the backlog was full) during this pass, where
    /// the pass may already have gone by: another pass follows.
    again: bool,
}

/// What `wpfs status` shows of replication.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReplicationStatus {
    pub backlog_chunks: u64,
    pub fetched_chunks: u64,
    pub fetched_bytes: u64,
    pub under_replicated_chunks: u64,
    pub under_replicated_bytes: u64,
    /// How far the running scan for missing chunks is, in percent of the
    /// hash space (None: no scan runs).
    pub scan_percent: Option<u8>,
}

/// How a node replicates contents.
pub struct ReplicationConfig {
    pub copies: usize,
    pub witness: bool,
}

impl Replicator {
    pub fn start(
        transport: Transport,
        chunks: Arc<ChunkStore>,
        namespace: Namespace,
        config: ReplicationConfig,
    ) -> Arc<Replicator> {
        let (tx, rx) = mailbox::unbounded();
        let r = Arc::new(Replicator {
            transport,
            chunks,
            namespace,
            copies: config.copies.max(1),
            witness: config.witness,
            under_replicated: Mutex::new(HashMap::new()),
            members: Mutex::new((None, Arc::from([]))),
            queue: tx,
            backlog: Mutex::new(HashMap::new()),
            failed: Mutex::new(Vec::new()),
            scan: Mutex::new(Scan::default()),
            metrics: ChunkMetrics::default(),
            store_failed_logged: Throttle::new(Duration::from_secs(10)),
        });
        for i in 0..WORKERS {
            let (r, rx): (Arc<Replicator>, Receiver<Want>) = (r.clone(), rx.clone());
            std::thread::Builder::new()
                .name(format!("replicate-{i}"))
                .spawn(move || {
                    while let Some(first) = rx.recv() {
                        let mut wants = vec![first];
                        while wants.len() < FETCH_BATCH {
                            let Some(want) = rx.try_recv() else { break };
                            wants.push(want);
                        }
                        r.replicate(wants);
                        r.scan_on();
                    }
                })
                .expect("spawning a thread");
        }
        r
    }

    /// Queues the chunks of `hashes` that are not here, naming their
    /// writer. Past `BACKLOG_MAX` they are left to a scan pass.
    pub fn want(&self, hashes: impl IntoIterator<Item = Hash>, from: u64) {
        if self.witness || !self.queue_missing(hashes, from) {
            return;
        }
        let mut scan = self.scan.lock();
        if scan.running {
            scan.again = true;
        } else {
            *scan = Scan {
                running: true,
                ..Scan::default()
            };
        }
    }

    /// Queues the chunks of `hashes` that are not here while the backlog
    /// has room; whether any had to be dropped.
    fn queue_missing(&self, hashes: impl IntoIterator<Item = Hash>, from: u64) -> bool {
        let hashes: Vec<Hash> = hashes.into_iter().collect();
        // A failed read (logged) counts them all absent: fetching a chunk
        // that is here already stores nothing.
        let absent = self.chunks.absent(&hashes).unwrap_or(hashes);
        let mut dropped = false;
        for hash in absent {
            let mut backlog = self.backlog.lock();
            if backlog.len() >= BACKLOG_MAX {
                dropped = true;
            } else if backlog.insert(hash, from).is_none() {
                let _ = self.queue.send(Want { hash, from });
            }
        }
        dropped
    }

    /// New contents written on node `writer` are being applied here: puts
    /// the chunks the command carries into its write (`batch`), and queues
    /// the others this node lacks.
    pub fn received(&self, content: &SetContent, writer: u64, batch: &mut WriteBatch) {
        if self.witness {
            return;
        }
        // The chunks here once the batch is written: `want` need not look
        // them up again.
        let mut here = Vec::with_capacity(content.carried.len());
        for data in &content.carried {
            let hash = *blake3::hash(data).as_bytes();
            let here_once_written = self.chunks.contains(&hash).unwrap_or(false) || {
                // A failure (a full disk) leaves it to the fetch below.
                let put = self.chunks.put_carried(batch, &hash, data);
                self.stored(1, data.len() as u64, put)
            };
            if here_once_written {
                here.push(hash);
            }
        }
        let hashes = content
            .chunks
            .iter()
            .filter_map(|c| Hash::try_from(&c.hash[..]).ok())
            .filter(|h| !here.contains(h));
        self.want(hashes, writer);
    }

    /// Starts a pass over every referenced chunk, queueing those missing
    /// here (at start, and when a snapshot replaced the namespace). A
    /// running pass starts over.
    pub fn scan(&self) {
        if self.witness {
            return;
        }
        *self.scan.lock() = Scan {
            running: true,
            ..Scan::default()
        };
        self.scan_on();
    }

    /// Steps the running scan on while the backlog has room for a step.
    fn scan_on(&self) {
        loop {
            // Another thread stepping the scan steps it on.
            let Some(mut scan) = self.scan.try_lock() else {
                return;
            };
            if !scan.running || self.backlog.lock().len() + SCAN_STEP > BACKLOG_MAX {
                return;
            }
            let step = match self
                .namespace
                .referenced_chunks_after(scan.after.as_ref(), SCAN_STEP)
            {
                Ok(step) => step,
                Err(e) => {
                    // `retry` steps on again in a few seconds.
                    tracing::warn!("cannot list referenced chunks: {e}");
                    return;
                }
            };
            let Some(last) = step.last() else {
                let again = scan.again;
                *scan = Scan {
                    running: again,
                    ..Scan::default()
                };
                continue;
            };
            scan.after = Some(*last);
            // Wants of applied commands may have filled the backlog since
            // the check above.
            scan.again |= self.queue_missing(step, 0);
        }
    }

    /// Queues the failed wants again and pushes under-replicated chunks
    /// (called every few seconds).
    pub fn retry(self: &Arc<Self>) {
        for want in std::mem::take(&mut *self.failed.lock()) {
            let _ = self.queue.send(want);
        }
        self.scan_on();
        let pending: Vec<Hash> = self.under_replicated.lock().keys().copied().collect();
        if !pending.is_empty() {
            // Chunks collected meanwhile (overwritten files) need no copies.
            let live: Vec<Hash> = pending
                .iter()
                .copied()
                .filter(|h| self.chunks.contains(h).unwrap_or(false))
                .collect();
            self.under_replicated.lock().retain(|h, _| live.contains(h));
            self.place(&live);
        }
    }

    /// Pushes chunks written here to every connected data node at once and
    /// returns when `copies - 1` of them have stored them (or all have
    /// answered): a peer that is frozen rather than dead cannot hold up a
    /// close(). What cannot be placed now is remembered and retried.
    pub fn place(&self, hashes: &[Hash]) {
        let wanted = self.copies_wanted();
        if wanted <= 1 || hashes.is_empty() {
            return; // a one-node cluster has nowhere to copy to
        }
        // `ask_all` skips members without a connection.
        let peers = self.data_members();
        let mut sizes = Vec::with_capacity(hashes.len());
        let placed = hashes.chunks(PUSH_BATCH).all(|batch| {
            let Ok(chunks) = batch
                .iter()
                .map(|h| self.chunks.get(h, None))
                .collect::<crate::error::Result<Vec<_>>>()
            else {
                return false; // collected meanwhile: retry() drops it
            };
            sizes.extend(chunks.iter().map(|c| c.len() as u64));
            let bytes = chunks.iter().map(|c| c.len() as u64).sum();
            let started = Instant::now();
            let calls = self
                .transport
                .ask_all(&peers, &Kind::StoreChunks(StoreChunks { chunks }));
            let ok = calls.wait(wanted - 1, FETCH_TIMEOUT) >= wanted - 1;
            self.metrics.pushed(started, bytes, ok);
            ok
        });
        let mut under = self.under_replicated.lock();
        if placed {
            for h in hashes {
                under.remove(h);
            }
        } else {
            // A chunk not read (the push stopped first) keeps the size it
            // was counted with, or none yet.
            for (i, h) in hashes.iter().enumerate() {
                let size = sizes.get(i).copied();
                let known = under.entry(*h).or_insert(0);
                *known = size.unwrap_or(*known);
            }
        }
    }

    /// How many nodes should hold new contents: `copies`, or fewer when
    /// the cluster has fewer data nodes.
    pub fn copies_wanted(&self) -> usize {
        self.wanted(&self.others())
    }

    fn wanted(&self, others: &[Member]) -> usize {
        self.copies
            .min(others.iter().filter(|m| !m.witness).count() + 1)
    }

    /// How many bytes of new chunks a command may carry: `CARRY_MAX`, or
    /// none when there is no other data node to carry them to.
    pub fn carry_max(&self) -> usize {
        if self.others().iter().any(|m| !m.witness) {
            CARRY_MAX
        } else {
            0
        }
    }

    /// Whether a writer must push its new chunks before the commit:
    /// unless `copies_wanted` is one, or the command carries them and the
    /// commit itself puts them on that many data nodes. A commit is on some
    /// majority of `voters`; the writer holds the chunks too, so the worst
    /// majority (the writer outside it, witnesses inside) must still hold
    /// that many.
    pub fn must_push(&self, carried: bool, voters: impl FnOnce() -> Vec<u64>) -> bool {
        let others = self.others();
        let wanted = self.wanted(&others);
        if wanted <= 1 {
            return false;
        }
        if !carried {
            return true;
        }
        let voters = voters();
        let witnesses = others
            .iter()
            .filter(|m| m.witness && voters.contains(&m.node_id))
            .count();
        voters.len() / 2 + 1 < wanted + witnesses
    }

    /// The other members that store contents.
    fn data_members(&self) -> Vec<u64> {
        self.others()
            .iter()
            .filter(|m| !m.witness)
            .map(|m| m.node_id)
            .collect()
    }

    /// The members other than this node (re-read at most once a second:
    /// every close() asks).
    fn others(&self) -> Arc<[Member]> {
        let mut cache = self.members.lock();
        if cache.0.is_none_or(|at| at.elapsed() > MEMBERS_FRESH) {
            let me = self.transport.node_id();
            let mut members = self.namespace.members().unwrap_or_default();
            members.retain(|m| m.node_id != me);
            *cache = (Some(Instant::now()), members.into());
        }
        cache.1.clone()
    }

    /// Connected members that store contents, and the peer protocol
    /// each speaks; `first` (if one) first.
    fn data_peers(&self, first: u64) -> Vec<(u64, u32)> {
        let links = self.transport.links();
        let mut peers: Vec<(u64, u32)> = (self.data_members().into_iter())
            .filter_map(|id| {
                let link = links.get(&id).filter(|l| l.connected)?;
                Some((id, link.protocol))
            })
            .collect();
        if let Some(pos) = peers.iter().position(|(id, _)| *id == first) {
            peers.swap(0, pos);
        }
        peers
    }

    pub fn status(&self) -> ReplicationStatus {
        // One lock at a time: `scan_on` takes the scan's, then the backlog's.
        let scan_percent = self.scan_percent();
        let backlog_chunks = self.backlog.lock().len() as u64;
        let (under_replicated_chunks, under_replicated_bytes) = {
            let under = self.under_replicated.lock();
            (under.len() as u64, under.values().sum())
        };
        ReplicationStatus {
            backlog_chunks,
            fetched_chunks: self.metrics.replicated_chunks.get(),
            fetched_bytes: self.metrics.replicated_bytes.get(),
            under_replicated_chunks,
            under_replicated_bytes,
            scan_percent,
        }
    }

    fn scan_percent(&self) -> Option<u8> {
        let scan = self.scan.lock();
        scan.running.then(|| {
            scan.after
                .map_or(0, |h| (u32::from(h[0]) * 100 / 256) as u8)
        })
    }

    /// The backlog by the node that wrote the chunks (0: found by a scan,
    /// writer not known).
    pub fn backlog_by_writer(&self) -> BTreeMap<u64, u64> {
        let mut by = BTreeMap::new();
        for from in self.backlog.lock().values() {
            *by.entry(*from).or_insert(0) += 1;
        }
        by
    }

    pub fn metrics(&self) -> &ChunkMetrics {
        &self.metrics
    }

    /// Fetches and stores the chunks of `wants`, those of one writer
    /// asked of that writer first; the ones no peer gave are retried.
    fn replicate(&self, wants: Vec<Want>) {
        let hashes: Vec<Hash> = wants.iter().map(|w| w.hash).collect();
        // A failed read (logged) counts them all absent, as in `queue_missing`.
        let absent: HashSet<Hash> = (self.chunks.absent(&hashes).unwrap_or(hashes))
            .into_iter()
            .collect();
        let mut by_writer: BTreeMap<u64, Vec<Hash>> = BTreeMap::new();
        let mut done = Vec::new();
        for want in wants {
            if absent.contains(&want.hash) {
                by_writer.entry(want.from).or_default().push(want.hash);
            } else {
                done.push(want.hash);
            }
        }
        let mut failed = Vec::new();
        for (from, hashes) in by_writer {
            let fetched = self.fetch_all(&hashes, from);
            let bytes = fetched.values().map(|d| d.len() as u64).sum();
            let put = (self.chunks).put_hashed(fetched.iter().map(|(h, d)| (h, &d[..])));
            let stored = self.stored(fetched.len(), bytes, put);
            for hash in hashes {
                if stored && fetched.contains_key(&hash) {
                    done.push(hash);
                } else {
                    failed.push(Want { hash, from });
                }
            }
        }
        let mut backlog = self.backlog.lock();
        for hash in &done {
            backlog.remove(hash);
        }
        drop(backlog);
        self.failed.lock().extend(failed);
    }

    /// Counts `chunks` chunks of `bytes` in all that came from elsewhere
    /// and were stored, or says why they were not.
    fn stored(&self, chunks: usize, bytes: u64, stored: crate::error::Result<()>) -> bool {
        match stored {
            Ok(()) => {
                self.metrics.replicated_chunks.inc_by(chunks as u64);
                self.metrics.replicated_bytes.inc_by(bytes);
                true
            }
            Err(e) => {
                if let Some(held) = self.store_failed_logged.admit() {
                    tracing::warn!(
                        "cannot store {chunks} chunk(s) from peers: {}; they are fetched again \
                         later{}",
                        std::io::Error::from_raw_os_error(e.0),
                        held_back(held)
                    );
                }
                false
            }
        }
    }

    /// The chunks of `hashes` that connected data nodes have, verified:
    /// asks `first` (if it is one), then the others for what is still
    /// missing: a batch per request of those that speak protocol 2.
    fn fetch_all(&self, hashes: &[Hash], first: u64) -> HashMap<Hash, Vec<u8>> {
        let mut got = HashMap::new();
        for (peer, protocol) in self.data_peers(first) {
            let missing: Vec<Hash> = (hashes.iter())
                .filter(|h| !got.contains_key(*h))
                .copied()
                .collect();
            if missing.is_empty() {
                break;
            }
            // One chunk (most reads) goes as `FetchChunk`, which a peer
            // answers on the connection's reader without a thread hop.
            let answers: Vec<Option<Vec<u8>>> = if protocol >= 2 && missing.len() > 1 {
                (missing.chunks(FETCH_BATCH))
                    .flat_map(|batch| self.ask_many(peer, batch))
                    .collect()
            } else {
                missing.iter().map(|h| self.ask_one(peer, h)).collect()
            };
            for (hash, answer) in missing.into_iter().zip(answers) {
                match answer {
                    Some(data) if blake3::hash(&data).as_bytes() == &hash => {
                        got.insert(hash, data);
                    }
                    Some(_) => tracing::error!(
                        "node {peer} sent chunk {} with the wrong bytes",
                        hex(&hash)
                    ),
                    None => {}
                }
            }
        }
        got
    }

    /// Asks `peer` for the chunks of `hashes` in one request: each one's
    /// bytes, or None where the peer lacks it or did not answer.
    fn ask_many(&self, peer: u64, hashes: &[Hash]) -> Vec<Option<Vec<u8>>> {
        let started = Instant::now();
        let request = Kind::FetchChunks(FetchChunks {
            hashes: hashes.iter().map(|h| h.to_vec()).collect(),
        });
        let answer = (self.transport.call(peer, request, BATCH_TIMEOUT).ok())
            .and_then(|bytes| StoreChunks::decode(&bytes[..]).ok())
            .filter(|answer| answer.chunks.len() == hashes.len());
        let chunks = match answer {
            // An empty chunk is never stored (files of no bytes have none),
            // so empty means "not here".
            Some(answer) => (answer.chunks.into_iter())
                .map(|data| (!data.is_empty()).then_some(data))
                .collect(),
            None => vec![None; hashes.len()],
        };
        self.metrics.fetched(started, &chunks);
        chunks
    }

    /// Asks `peer` for one chunk (all a protocol 1 peer answers).
    fn ask_one(&self, peer: u64, hash: &Hash) -> Option<Vec<u8>> {
        let started = Instant::now();
        let answer = (self.transport)
            .call(peer, Kind::FetchChunk(hash.to_vec()), FETCH_TIMEOUT)
            .ok();
        self.metrics.fetched(started, std::slice::from_ref(&answer));
        answer
    }
}

impl ChunkSource for Replicator {
    fn fetch(&self, hash: &Hash) -> Option<Vec<u8>> {
        let data = self.fetch_all(&[*hash], 0).remove(hash)?;
        self.metrics.replicated_chunks.inc();
        self.metrics.replicated_bytes.inc_by(data.len() as u64);
        self.backlog.lock().remove(hash);
        Some(data)
    }
}
