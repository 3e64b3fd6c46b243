//! The Raft driver: one thread owns the `raft::RawNode` and runs the
//! canonical loop of raft-rs's `five_mem_node` example:
//!
//! ```text
//! propose / tick → ready → send messages → apply committed entries →
//! persist entries and hard state → send persisted messages → advance →
//! apply newly committed → advance_apply
//! ```
//!
//! Filesystem threads call `Node::propose` and block until their command is
//! applied here. Proposals that arrive together are appended in one Ready,
//! so many FUSE threads share one log write.
//!
//! Durability: a log write reaches the kernel's page cache at once (it
//! survives the process being killed) and the disk when it carries a
//! `durable` entry (an `fsync()`), when the term or vote changes (Raft's
//! safety needs that on disk), or at the latest `sync_interval` after it.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use raft::eraftpb::{ConfChange, ConfChangeV2, Entry, EntryType};
use raft::{RawNode, StateRole};
use rocksdb::{WriteBatch, WriteOptions};
use wpfs_proto::{Command, Message, Op, Outcome};

use crate::namespace::Namespace;
use crate::raft_log::RaftLog;
use crate::store::Store;

/// Entry context marking an entry whose write must reach the disk.
const DURABLE: &[u8] = b"d";
/// Log entries kept behind the applied index when the log is compacted.
const LOG_KEEP: u64 = 10_000;

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: u64,
    pub tick: Duration,
    pub election_ticks: usize,
    pub sync_interval: Duration,
}

impl NodeConfig {
    pub fn new(id: u64) -> Self {
        NodeConfig {
            id,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            sync_interval: Duration::from_millis(200),
        }
    }
}

/// Why a proposal produced no outcome.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    #[error("no Raft leader is reachable: this node cannot write now")]
    NoLeader,
    #[error("the node is shutting down")]
    Stopped,
    #[error("the change was not committed within {0:?}")]
    Timeout(Duration),
    #[error("the store failed: {0}")]
    Store(String),
}

/// What `wpfs status` shows of Raft.
#[derive(Clone, Debug, Default)]
pub struct RaftStatus {
    pub id: u64,
    pub role: String,
    pub leader: u64,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub first_index: u64,
    pub last_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub failed: Option<String>,
}

enum Request {
    Propose {
        cmd: Command,
        durable: bool,
        reply: Sender<Result<Outcome, ProposeError>>,
    },
    Stop,
}

struct Shared {
    status: Mutex<RaftStatus>,
}

/// A running Raft node. Dropping it (or `stop`) ends the driver thread.
pub struct Node {
    id: u64,
    requests: Sender<Request>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    next_request: std::sync::atomic::AtomicU64,
}

impl Node {
    /// Starts the driver over `store`, whose namespace must be bootstrapped.
    pub fn start(config: NodeConfig, store: Store) -> Result<Node, String> {
        let namespace = Namespace::new(store.clone());
        let (applied, _) = namespace.applied().map_err(|e| e.to_string())?;
        let log = RaftLog::open(store.clone()).map_err(|e| e.to_string())?;
        let sole_voter =
            log.conf_state().voters == [config.id] && log.conf_state().learners.is_empty();
        let raft_config = raft::Config {
            id: config.id,
            election_tick: config.election_ticks,
            heartbeat_tick: 1,
            applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        raft_config.validate().map_err(|e| e.to_string())?;
        let logger = slog::Logger::root(crate::logger::TracingDrain, slog::o!());
        let mut raw = RawNode::new(&raft_config, log, &logger).map_err(|e| e.to_string())?;
        if sole_voter {
            // Nobody else can win an election: take the lead at once.
            raw.campaign().map_err(|e| e.to_string())?;
        }
        let shared = Arc::new(Shared {
            status: Mutex::new(RaftStatus {
                id: config.id,
                ..Default::default()
            }),
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        let driver = Driver {
            id: config.id,
            raw,
            namespace,
            store,
            pending: HashMap::new(),
            shared: shared.clone(),
            unsynced_since: None,
            config: config.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("raft".into())
            .spawn(move || driver.run(rx))
            .map_err(|e| e.to_string())?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Ok(Node {
            id: config.id,
            requests: tx,
            shared,
            thread: Mutex::new(Some(thread)),
            next_request: std::sync::atomic::AtomicU64::new(seed),
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Proposes `op` and waits until it is applied on this node, at most
    /// `timeout`. `durable` makes the log write reach the disk first.
    pub fn propose(
        &self,
        op: Op,
        now_ns: i64,
        durable: bool,
        timeout: Duration,
    ) -> Result<Outcome, ProposeError> {
        let request_id = self
            .next_request
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cmd = Command {
            node_id: self.id,
            request_id,
            now_ns,
            op: Some(op),
        };
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.requests
            .send(Request::Propose {
                cmd,
                durable,
                reply,
            })
            .map_err(|_| ProposeError::Stopped)?;
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(ProposeError::Timeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(ProposeError::Stopped),
        }
    }

    pub fn status(&self) -> RaftStatus {
        self.shared.status.lock().clone()
    }

    /// Stops the driver after it has synced the log to disk.
    pub fn stop(&self) {
        let _ = self.requests.send(Request::Stop);
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }

    /// Waits until some node leads (this one, when it is the only voter).
    pub fn wait_for_leader(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.status().leader != 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Driver {
    id: u64,
    raw: RawNode<RaftLog>,
    namespace: Namespace,
    store: Store,
    /// Proposals of this node waiting for their entry to be applied.
    pending: HashMap<u64, Sender<Result<Outcome, ProposeError>>>,
    shared: Arc<Shared>,
    unsynced_since: Option<Instant>,
    config: NodeConfig,
}

impl Driver {
    fn run(mut self, requests: Receiver<Request>) {
        let mut last_tick = Instant::now();
        loop {
            let wait = self.config.tick.saturating_sub(last_tick.elapsed());
            match requests.recv_timeout(wait) {
                Ok(Request::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(Request::Propose {
                    cmd,
                    durable,
                    reply,
                }) => {
                    self.propose(cmd, durable, reply);
                    // Take everything already queued into the same Ready.
                    while let Ok(req) = requests.try_recv() {
                        match req {
                            Request::Propose {
                                cmd,
                                durable,
                                reply,
                            } => self.propose(cmd, durable, reply),
                            Request::Stop => {
                                self.finish();
                                return;
                            }
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if last_tick.elapsed() >= self.config.tick {
                self.raw.tick();
                last_tick = Instant::now();
            }
            if let Err(e) = self.on_ready() {
                self.fail(e);
                break;
            }
            if self
                .unsynced_since
                .is_some_and(|t| t.elapsed() >= self.config.sync_interval)
            {
                if let Err(e) = self.store.sync() {
                    self.fail(e.to_string());
                    break;
                }
                self.unsynced_since = None;
            }
        }
        self.finish();
    }

    fn finish(&mut self) {
        if let Err(e) = self.store.sync() {
            tracing::error!("final sync of the Raft log failed: {e}");
        }
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(ProposeError::Stopped));
        }
    }

    /// The store failed: nothing more can be applied safely. Fail every
    /// waiting proposal and remember why, for status and health.
    fn fail(&mut self, why: String) {
        tracing::error!("Raft driver stopped: {why}");
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(ProposeError::Store(why.clone())));
        }
        self.shared.status.lock().failed = Some(why);
    }

    fn propose(
        &mut self,
        cmd: Command,
        durable: bool,
        reply: Sender<Result<Outcome, ProposeError>>,
    ) {
        if self.raw.raft.state != StateRole::Leader {
            // Forwarding to the leader comes with peers.
            let _ = reply.send(Err(ProposeError::NoLeader));
            return;
        }
        let context = if durable { DURABLE.to_vec() } else { vec![] };
        let request_id = cmd.request_id;
        match self.raw.propose(context, cmd.encode_to_vec()) {
            Ok(()) => {
                self.pending.insert(request_id, reply);
            }
            Err(_) => {
                let _ = reply.send(Err(ProposeError::NoLeader));
            }
        }
    }

    fn on_ready(&mut self) -> Result<(), String> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        // Messages to peers go out here once there are peers.
        if !ready.snapshot().is_empty() {
            return Err("received a snapshot, which this build cannot install".into());
        }
        self.apply(ready.take_committed_entries())?;

        let mut batch = WriteBatch::default();
        let mut sync = false;
        let old = self.raw.store().hard_state().clone();
        if !ready.entries().is_empty() {
            sync |= ready.entries().iter().any(|e| e.context == DURABLE);
            let entries = ready.take_entries();
            self.raw.mut_store().append(&mut batch, &entries);
        }
        if let Some(hs) = ready.hs() {
            sync |= hs.term != old.term || hs.vote != old.vote;
            let hs = hs.clone();
            self.raw.mut_store().set_hard_state(&mut batch, &hs);
        }
        self.write(batch, sync)?;

        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            let mut hs = self.raw.store().hard_state().clone();
            hs.commit = commit;
            let mut batch = WriteBatch::default();
            self.raw.mut_store().set_hard_state(&mut batch, &hs);
            self.write(batch, false)?;
        }
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.compact_log()?;
        self.publish_status();
        Ok(())
    }

    fn write(&mut self, batch: WriteBatch, sync: bool) -> Result<(), String> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        self.store
            .db()
            .write_opt(batch, &opts)
            .map_err(|e| format!("writing the Raft log: {e}"))?;
        if sync {
            self.unsynced_since = None;
        } else if self.unsynced_since.is_none() {
            self.unsynced_since = Some(Instant::now());
        }
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), String> {
        for entry in entries {
            let (index, term) = (entry.index, entry.term);
            let result = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {
                    self.namespace.apply_nothing(index, term)
                }
                EntryType::EntryNormal => self.apply_command(&entry),
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.apply_conf_change(&entry)?;
                    self.namespace.apply_nothing(index, term)
                }
            };
            result.map_err(|e| format!("applying log entry {index}: {e}"))?;
        }
        Ok(())
    }

    fn apply_command(&mut self, entry: &Entry) -> crate::namespace::Result<()> {
        let cmd = match Command::decode(&entry.data[..]) {
            Ok(cmd) => cmd,
            Err(e) => {
                // Every node rejects the same bad entry the same way.
                tracing::error!("log entry {} is not a command ({e}); skipped", entry.index);
                return self.namespace.apply_nothing(entry.index, entry.term);
            }
        };
        let outcome = self.namespace.apply(entry.index, entry.term, &cmd)?;
        if cmd.node_id == self.id {
            if let Some(reply) = self.pending.remove(&cmd.request_id) {
                let _ = reply.send(Ok(outcome));
            }
        }
        Ok(())
    }

    fn apply_conf_change(&mut self, entry: &Entry) -> Result<(), String> {
        let cs = if entry.get_entry_type() == EntryType::EntryConfChange {
            let cc = <ConfChange as prost011::Message>::decode(&entry.data[..])
                .map_err(|e| e.to_string())?;
            self.raw.apply_conf_change(&cc)
        } else {
            let cc = <ConfChangeV2 as prost011::Message>::decode(&entry.data[..])
                .map_err(|e| e.to_string())?;
            self.raw.apply_conf_change(&cc)
        }
        .map_err(|e| e.to_string())?;
        let mut batch = WriteBatch::default();
        self.raw.mut_store().set_conf_state(&mut batch, &cs);
        self.write(batch, true)
    }

    fn compact_log(&mut self) -> Result<(), String> {
        let applied = self.raw.raft.raft_log.applied;
        let first = self.raw.store().first_index_now();
        if applied > first + 2 * LOG_KEEP {
            self.raw
                .mut_store()
                .compact(applied - LOG_KEEP)
                .map_err(|e| format!("compacting the Raft log: {e}"))?;
        }
        Ok(())
    }

    fn publish_status(&self) {
        let raft = &self.raw.raft;
        let store = self.raw.store();
        let mut s = self.shared.status.lock();
        s.role = match raft.state {
            StateRole::Leader => "leader",
            StateRole::Follower => "follower",
            StateRole::Candidate => "candidate",
            StateRole::PreCandidate => "pre-candidate",
        }
        .into();
        s.leader = raft.leader_id;
        s.term = raft.term;
        s.commit = raft.raft_log.committed;
        s.applied = raft.raft_log.applied;
        s.first_index = store.first_index_now();
        s.last_index = store.last_index_now();
        s.voters = store.conf_state().voters.clone();
        s.learners = store.conf_state().learners.clone();
    }
}
