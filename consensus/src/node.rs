//! The Raft driver: one thread owns the `raft::RawNode` and runs the
//! canonical loop of raft-rs's `five_mem_node` example, with the apply
//! moved after the answers (it is off the leader's path then):
//!
//! ```text
//! propose / tick → ready → send messages → persist entries and hard
//! state → send persisted messages → apply committed entries → advance →
//! apply newly committed → advance_apply
//! ```
//!
//! Whoever has something for Raft runs the loop itself: a proposal on the
//! filesystem thread that makes it, a peer's message on the connection
//! thread that read it (`Node::submit`). The request is queued, and the
//! thread takes the driver's lock if it is free (it only tries), handles
//! everything queued in order and runs the Ready. If the lock is taken,
//! the holder finds the request in the queue when it looks again after
//! letting go. No driver thread wakes on either side of a round trip, nor
//! for a proposal: on this project's 2-vCPU VMs a wakeup across threads
//! costs ~45 µs (a TCP ping-pong between processes takes 90 µs). The
//! driver thread keeps the clock (ticks, the commit announcement, syncs).
//!
//! Filesystem threads call `Node::propose` and block until their command is
//! applied here. Proposals that arrive together are appended in one Ready,
//! so many FUSE threads share one log write. On a follower, raft-rs
//! forwards the proposal to the leader; the command comes back through the
//! log, and since every node computes the same outcome, the proposer takes
//! its result from its own apply.
//!
//! A proposal can be lost (the leader it went to died or lost its term) or
//! have nowhere to go (an election is running). It stays pending and is
//! proposed again every `RETRY_AFTER` until it is applied or its caller's
//! deadline passes; the state machine drops the copies of a command it has
//! already applied, so a repeat is harmless.
//!
//! Membership: a new node is added as a learner (`AddLearnerNode`, its
//! peer address in the change's context) and the leader promotes it to
//! voter (`AddNode`) once it has caught up, while voters are fewer than
//! `MAX_VOTERS`; later nodes stay full-replica learners.
//!
//! Durability: a log write reaches the kernel's page cache at once (it
//! survives the process being killed) and the disk when it carries a
//! `durable` entry (an `fsync()`), when the term or vote changes (Raft's
//! safety needs that on disk), or at the latest `sync_interval` after it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::mailbox::{self, Receiver, RecvError, Sender};
use parking_lot::Mutex;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfChangeV2, Entry, EntryType, Message as RaftMessage,
    MessageType, Snapshot,
};
use raft::{ProgressState, RawNode, SnapshotStatus, StateRole};
use rocksdb::{WriteBatch, WriteOptions};
use wpfs_proto::{Command, Member, Message, Op, Outcome, SnapshotRef};

use crate::metrics::{self, RaftMetrics};
use crate::namespace::Namespace;
use crate::raft_log::RaftLog;
use crate::snapshot;
use crate::store::Store;
use crate::transport::Transport;

/// Entry context marking an entry whose write must reach the disk.
const DURABLE: &[u8] = b"d";
/// Log entries kept behind the applied index when the log is compacted,
/// once it holds twice as many.
const LOG_KEEP: u64 = 10_000;
/// Bytes of entries kept likewise: small files' contents ride in entries.
const LOG_KEEP_BYTES: u64 = 64 << 20;
/// Learners are promoted to voters while there are fewer voters than this.
const MAX_VOTERS: usize = 5;
/// A proposal not applied this long after it was sent is sent again.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// A read-index request unanswered this long was dropped (no leader).
const READ_INDEX_KEPT: Duration = Duration::from_secs(60);
/// The caller waits this much longer than its deadline, so that the
/// driver, which knows why nothing happened, gives the answer.
const ANSWER_GRACE: Duration = Duration::from_secs(1);
/// How long the leader waits for an append to carry a new commit index to
/// the followers before it sends one for that alone (`announce_commit`).
const ANNOUNCE_DELAY: Duration = Duration::from_millis(2);
/// A peer sent a snapshot that has fetched no piece of it for this long
/// is given up on, and sent one again. raft-rs waits for a report on every
/// snapshot it sends; a receiver killed mid-download never makes one, and
/// its progress would stay paused for good. A piece (1 MiB) takes this
/// long over a link of about 0.5 Mbit/s.
const SNAPSHOT_STALL: Duration = Duration::from_secs(15);

/// What the filesystem layer learns from the driver as the log is applied.
/// Called under the driver's lock, by whichever thread runs the loop
/// (`Node::submit`): implementations hand work off and return.
pub trait ApplyObserver: Send + Sync {
    /// Before the command's changes are written: what this node stores
    /// because of it goes into `batch`, written with them. `freed` are the
    /// inodes it deletes, still readable in the store until then.
    fn storing(&self, cmd: &Command, outcome: &Outcome, freed: &[u64], batch: &mut WriteBatch);
    /// After they are written.
    fn applied(&self, cmd: &Command, outcome: &Outcome);
    /// The whole namespace was replaced by a snapshot.
    fn snapshot_installed(&self);
}

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
    /// Replication progress of each peer (known on the leader only).
    pub progress: Vec<PeerProgress>,
    /// This node was removed from the cluster.
    pub removed: bool,
    pub failed: Option<String>,
}

#[derive(Clone, Debug)]
pub struct PeerProgress {
    pub id: u64,
    pub matched: u64,
    pub state: String,
}

type Reply<T> = Sender<Result<T, ProposeError>>;

enum Request {
    Propose {
        cmd: Command,
        durable: bool,
        proposed: Instant,
        deadline: Instant,
        reply: Reply<Outcome>,
    },
    Step(RaftMessage),
    /// What the leader has committed, confirmed as still the leader's.
    ReadIndex(Reply<u64>),
    ChangeMember {
        change: ConfChangeType,
        member: Member,
        reply: Reply<()>,
    },
    TransferLeader(u64),
    /// A snapshot this node was sent could not be fetched.
    SnapshotFailed {
        leader: u64,
    },
    /// Peer `from` fetched a piece of the snapshot this node sent it.
    SnapshotFetching {
        from: u64,
    },
    Stop,
    /// The driver thread sleeps past something now due (see `submit`).
    Wake,
}

struct Shared {
    status: Mutex<RaftStatus>,
    observer: Mutex<Option<Arc<dyn ApplyObserver>>>,
}

/// A running Raft node. Dropping it (or `stop`) ends the driver thread.
pub struct Node {
    id: u64,
    requests: Sender<Request>,
    driver: Arc<Mutex<Driver>>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    next_request: std::sync::atomic::AtomicU64,
    metrics: RaftMetrics,
}

impl Node {
    /// Starts the driver over `store`: a bootstrapped one, or an empty one
    /// that a leader will fill with a snapshot once this node is a member.
    /// Without a transport the node has no peers (tests, one-node tools).
    pub fn start(
        config: NodeConfig,
        store: Store,
        transport: Option<Transport>,
    ) -> Result<Node, String> {
        let namespace = Namespace::new(store.clone());
        if let Some(t) = &transport {
            for m in namespace.members().map_err(|e| e.to_string())? {
                t.set_address(m.node_id, Some(&m.addr));
            }
        }
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
            // Commits are announced by `announce_commit`, not by an extra
            // append per entry.
            skip_bcast_commit: true,
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
            observer: Mutex::new(None),
        });
        let (tx, rx) = mailbox::unbounded();
        let metrics = RaftMetrics::default();
        let driver = Driver {
            inbox: Some(rx.clone()),
            asleep_until: None,
            stopping: false,
            failed: false,
            last_tick: Instant::now(),
            commit_moved_at: None,
            seen_commit: 0,
            id: config.id,
            raw,
            namespace,
            store,
            pending: BTreeMap::new(),
            pending_members: Vec::new(),
            promoting: None,
            transport,
            shared: shared.clone(),
            unsynced_since: None,
            told_commit: HashMap::new(),
            reads: HashMap::new(),
            next_read: 0,
            snapshot_sent: HashMap::new(),
            known_leader: 0,
            untold_since: None,
            announce_now: false,
            config: config.clone(),
            metrics: metrics.clone(),
        };
        let driver = Arc::new(Mutex::new(driver));
        let thread = {
            let driver = driver.clone();
            std::thread::Builder::new()
                .name("raft".into())
                .spawn(move || Driver::run(&driver, rx))
                .map_err(|e| e.to_string())?
        };
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Ok(Node {
            id: config.id,
            requests: tx,
            driver,
            shared,
            thread: Mutex::new(Some(thread)),
            next_request: std::sync::atomic::AtomicU64::new(seed),
            metrics,
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The driver's latency histograms (shared handles).
    pub fn metrics(&self) -> &RaftMetrics {
        &self.metrics
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
            oldest_pending: 0, // set by the driver, which knows what waits
            op: Some(op),
        };
        let (reply, rx) = mailbox::bounded(1);
        let now = Instant::now();
        self.submit(Request::Propose {
            cmd,
            durable,
            proposed: now,
            deadline: now + timeout,
            reply,
        })?;
        wait(&rx, timeout + ANSWER_GRACE)
    }

    /// The index the leader had committed when it answered, once it has
    /// confirmed it still leads: everything this node must apply to be as
    /// current as the cluster was at the call.
    pub fn read_index(&self, timeout: Duration) -> Result<u64, ProposeError> {
        let (reply, rx) = mailbox::bounded(1);
        self.submit(Request::ReadIndex(reply))?;
        wait(&rx, timeout)
    }

    pub fn status(&self) -> RaftStatus {
        self.shared.status.lock().clone()
    }

    /// The voters, as the last Ready left them.
    pub fn voters(&self) -> Vec<u64> {
        self.shared.status.lock().voters.clone()
    }

    /// Hands a message from a peer to Raft.
    pub fn step(&self, msg: RaftMessage) {
        let _ = self.submit(Request::Step(msg));
    }

    /// Queues `req`, then runs the driver loop on this thread while the
    /// driver is free and requests wait (see the module comment). Every
    /// holder looks at the queue after letting go of the lock (the driver
    /// thread by receiving from it), so a request queued while the lock
    /// was taken never waits for a tick.
    fn submit(&self, req: Request) -> Result<(), ProposeError> {
        self.requests
            .queue(req)
            .map_err(|_| ProposeError::Stopped)?;
        while let Some(mut driver) = self.driver.try_lock() {
            if driver.inbox.is_none() {
                break; // stopped: the queue goes with it
            }
            driver.drain();
            driver.process();
            let wake = driver.sleeps_too_long();
            drop(driver);
            if wake {
                // A commit to announce is due before the driver thread's
                // next look: it must look sooner.
                let _ = self.requests.send(Request::Wake);
            }
            if self.requests.is_empty() {
                break;
            }
        }
        Ok(())
    }

    /// Tells the leader that the snapshot it sent could not be fetched.
    pub fn snapshot_failed(&self, leader: u64) {
        let _ = self.requests.send(Request::SnapshotFailed { leader });
    }

    /// Peer `from` is fetching the snapshot this node sent it (a piece was
    /// served): it is not to be given up on yet.
    pub fn snapshot_fetching(&self, from: u64) {
        let _ = self.requests.send(Request::SnapshotFetching { from });
    }

    pub fn set_observer(&self, observer: Arc<dyn ApplyObserver>) {
        *self.shared.observer.lock() = Some(observer);
    }

    /// Adds `member` as a learner, or removes it (only its id matters),
    /// and waits until the change is applied here.
    pub fn change_member(
        &self,
        change: ConfChangeType,
        member: Member,
        timeout: Duration,
    ) -> Result<(), ProposeError> {
        let (reply, rx) = mailbox::bounded(1);
        self.requests
            .send(Request::ChangeMember {
                change,
                member,
                reply,
            })
            .map_err(|_| ProposeError::Stopped)?;
        wait(&rx, timeout)
    }

    /// Asks the leader (this node) to hand leadership to `to`.
    pub fn transfer_leader(&self, to: u64) {
        let _ = self.requests.send(Request::TransferLeader(to));
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

fn wait<T>(rx: &Receiver<Result<T, ProposeError>>, timeout: Duration) -> Result<T, ProposeError> {
    match rx.recv_timeout(timeout) {
        Ok(r) => r,
        Err(RecvError::Timeout) => Err(ProposeError::Timeout(timeout)),
        Err(RecvError::Closed) => Err(ProposeError::Stopped),
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A proposal of this node, until it is applied or its deadline passes.
struct Pending {
    cmd: Command,
    durable: bool,
    /// When `Node::propose` was called.
    proposed: Instant,
    deadline: Instant,
    /// When it last went to Raft; `None` while there was no leader.
    sent: Option<Instant>,
    reply: Reply<Outcome>,
}

struct Driver {
    id: u64,
    /// The driver thread's mailbox, for whichever thread runs the loop to
    /// take what is queued; `None` once the driver has stopped.
    inbox: Option<Receiver<Request>>,
    /// Until when the driver thread sleeps, while it does.
    asleep_until: Option<Instant>,
    /// A stop was asked for, or the store failed: the driver thread ends.
    stopping: bool,
    failed: bool,
    last_tick: Instant,
    /// Leader: when the commit index last moved, and the index it
    /// moved to (see `wait`).
    commit_moved_at: Option<Instant>,
    seen_commit: u64,
    raw: RawNode<RaftLog>,
    namespace: Namespace,
    store: Store,
    /// Proposals of this node waiting for their entry to be applied, by
    /// request id (oldest first).
    pending: BTreeMap<u64, Pending>,
    /// Membership changes waiting to be applied.
    pending_members: Vec<(ConfChangeType, u64, Reply<()>)>,
    /// The learner being promoted (leader only), and since when.
    promoting: Option<(u64, Instant)>,
    transport: Option<Transport>,
    shared: Arc<Shared>,
    unsynced_since: Option<Instant>,
    /// Leader: the highest commit index sent to each peer.
    told_commit: HashMap<u64, u64>,
    /// Read-index requests waiting for the leader's answer, by context,
    /// with when they were asked.
    reads: HashMap<Vec<u8>, (Instant, Reply<u64>)>,
    next_read: u64,
    /// Leader: since when some peer holds committed entries it has not
    /// been told are committed.
    untold_since: Option<Instant>,
    /// Leader: a follower's proposal committed; it waits to hear so.
    announce_now: bool,
    /// The leader as this node last knew it (0: none).
    known_leader: u64,
    /// Leader: peers sent a snapshot, and when they last fetched a piece
    /// of it (or were sent it).
    snapshot_sent: HashMap<u64, Instant>,
    config: NodeConfig,
    metrics: RaftMetrics,
}

impl Driver {
    /// The driver thread: waits for requests or the clock, then runs the
    /// loop under the lock, until a stop or a store failure.
    fn run(driver: &Mutex<Driver>, requests: Receiver<Request>) {
        loop {
            let wait = {
                let mut d = driver.lock();
                let wait = d.wait();
                d.asleep_until = Some(Instant::now() + wait);
                wait
            };
            let first = match requests.recv_timeout(wait) {
                Ok(req) => Some(req),
                Err(RecvError::Timeout) => None,
                Err(RecvError::Closed) => break,
            };
            let mut d = driver.lock();
            d.asleep_until = None;
            if let Some(req) = first {
                d.handle(req);
            }
            // Take everything already queued into the same Ready.
            d.drain();
            if d.last_tick.elapsed() >= d.config.tick {
                d.raw.tick();
                d.last_tick = Instant::now();
                d.housekeeping();
            }
            d.process();
            if d.stopping {
                break;
            }
        }
        driver.lock().finish();
    }

    /// How long the driver thread may sleep: until the next tick, or the
    /// commit announcement that may be due. A leader whose commit index
    /// moved lately looks every `ANNOUNCE_DELAY`: commits are now also made
    /// by connection threads, which do not wake this one.
    fn wait(&self) -> Duration {
        let mut wait = self.config.tick.saturating_sub(self.last_tick.elapsed());
        if let Some(since) = self.untold_since {
            wait = wait.min(ANNOUNCE_DELAY.saturating_sub(since.elapsed()));
        }
        if self
            .commit_moved_at
            .is_some_and(|at| at.elapsed() < self.config.tick)
        {
            wait = wait.min(ANNOUNCE_DELAY);
        }
        wait
    }

    /// Whether the driver thread sleeps past what is now due, by more
    /// than an announcement may wait: a thread that ran the loop may have
    /// left a commit to announce, and nothing else wakes the driver thread
    /// (see `submit`). Its usual sleep, until the next tick, is due anyway.
    fn sleeps_too_long(&self) -> bool {
        self.asleep_until
            .is_some_and(|until| until > Instant::now() + self.wait() + ANNOUNCE_DELAY)
    }

    /// Handles the requests queued in the mailbox.
    fn drain(&mut self) {
        while let Some(req) = self.inbox.as_ref().and_then(|i| i.try_recv()) {
            self.handle(req);
        }
    }

    /// Everything after requests: the Ready, the commit announcement, the
    /// periodic sync. A store failure stops the driver.
    fn process(&mut self) {
        if self.failed {
            return;
        }
        if let Err(e) = self.on_ready().and_then(|_| self.announce_commit()) {
            return self.fail(e);
        }
        if self
            .unsynced_since
            .is_some_and(|t| t.elapsed() >= self.config.sync_interval)
        {
            if let Err(e) = self.store.sync() {
                return self.fail(e.to_string());
            }
            self.unsynced_since = None;
        }
    }

    fn handle(&mut self, req: Request) {
        match req {
            Request::Propose {
                cmd,
                durable,
                proposed,
                deadline,
                reply,
            } => {
                let id = cmd.request_id;
                self.pending.insert(
                    id,
                    Pending {
                        cmd,
                        durable,
                        proposed,
                        deadline,
                        sent: None,
                        reply,
                    },
                );
                self.send_proposal(id);
            }
            Request::Step(msg) => {
                if let Err(e) = self.raw.step(msg) {
                    tracing::debug!("dropped a Raft message: {e}");
                }
            }
            Request::ReadIndex(reply) => {
                // Without a leader raft-rs drops the request: the caller's
                // wait ends it, and housekeeping forgets it.
                self.next_read += 1;
                let context = self.next_read.to_be_bytes().to_vec();
                self.raw.read_index(context.clone());
                self.reads.insert(context, (Instant::now(), reply));
            }
            Request::ChangeMember {
                change,
                member,
                reply,
            } => self.propose_member(change, member, reply),
            Request::TransferLeader(to) => self.raw.transfer_leader(to),
            Request::SnapshotFailed { leader } => {
                // Tell the leader, which then retries from a probe.
                let msg = RaftMessage {
                    msg_type: MessageType::MsgSnapStatus as i32,
                    from: self.id,
                    to: leader,
                    reject: true,
                    ..Default::default()
                };
                self.send(vec![msg]);
            }
            Request::SnapshotFetching { from } => {
                if let Some(at) = self.snapshot_sent.get_mut(&from) {
                    *at = Instant::now();
                }
            }
            Request::Stop => self.stopping = true,
            Request::Wake => {}
        }
    }

    fn propose_member(&mut self, change: ConfChangeType, member: Member, reply: Reply<()>) {
        let cc = ConfChange {
            change_type: change as i32,
            node_id: member.node_id,
            context: member.encode_to_vec(),
            ..Default::default()
        };
        match self.raw.propose_conf_change(vec![], cc) {
            Ok(()) => self.pending_members.push((change, member.node_id, reply)),
            Err(e) => {
                tracing::warn!("membership change for node {} refused: {e}", member.node_id);
                let _ = reply.send(Err(ProposeError::NoLeader));
            }
        }
    }

    /// Leader: a peer still waiting for a snapshot that it has not fetched
    /// from for `SNAPSHOT_STALL` (it died, or restarted and forgot) is
    /// reported failed, so raft-rs probes it and sends a new one.
    fn resend_stalled_snapshots(&mut self) {
        if self.raw.raft.state != StateRole::Leader {
            self.snapshot_sent.clear();
            return;
        }
        let prs = self.raw.raft.prs();
        self.snapshot_sent.retain(|id, _| {
            prs.get(*id)
                .is_some_and(|p| p.state == ProgressState::Snapshot)
        });
        let stalled: Vec<u64> = self
            .snapshot_sent
            .iter()
            .filter(|(_, at)| at.elapsed() >= SNAPSHOT_STALL)
            .map(|(id, _)| *id)
            .collect();
        for id in stalled {
            tracing::warn!(
                "node {id} fetched nothing of its snapshot for {SNAPSHOT_STALL:?}: sending it again"
            );
            self.snapshot_sent.remove(&id);
            self.raw.report_snapshot(id, SnapshotStatus::Failure);
        }
    }

    /// Once per tick: answer proposals whose deadline passed, send again
    /// those that may have been lost; on the leader, give up stalled
    /// snapshot sends and promote a caught-up learner.
    fn housekeeping(&mut self) {
        let now = Instant::now();
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let p = self.pending.remove(&id).expect("listed above");
            let why = if p.sent.is_none() || self.raw.raft.leader_id == 0 {
                ProposeError::NoLeader
            } else {
                ProposeError::Timeout(p.deadline.saturating_duration_since(now))
            };
            tracing::warn!("a change was not applied before its deadline: {why}");
            let _ = p.reply.send(Err(why));
        }
        self.propose_again(|p| p.sent.is_none_or(|at| now - at >= RETRY_AFTER));
        self.reads
            .retain(|_, (asked, _)| now - *asked < READ_INDEX_KEPT);
        self.resend_stalled_snapshots();
        if self.raw.raft.state != StateRole::Leader || self.raw.raft.has_pending_conf() {
            return;
        }
        if self
            .promoting
            .is_some_and(|(_, since)| since.elapsed() < Duration::from_secs(10))
        {
            return;
        }
        let conf = self.raw.store().conf_state().clone();
        if conf.voters.len() >= MAX_VOTERS {
            return;
        }
        let committed = self.raw.raft.raft_log.committed;
        let prs = self.raw.raft.prs();
        let caught_up = conf
            .learners
            .iter()
            .copied()
            .find(|l| prs.get(*l).is_some_and(|p| p.matched >= committed));
        if let Some(learner) = caught_up {
            tracing::info!("node {learner} has caught up: promoting it to voter");
            let cc = ConfChange {
                change_type: ConfChangeType::AddNode as i32,
                node_id: learner,
                ..Default::default()
            };
            if self.raw.propose_conf_change(vec![], cc).is_ok() {
                self.promoting = Some((learner, Instant::now()));
            }
        }
    }

    /// The driver stops: nothing is taken from the mailbox any more, so
    /// callers learn at once that it has stopped.
    fn finish(&mut self) {
        self.inbox = None;
        if let Err(e) = self.store.sync() {
            tracing::error!("final sync of the Raft log failed: {e}");
        }
        for (_, p) in std::mem::take(&mut self.pending) {
            let _ = p.reply.send(Err(ProposeError::Stopped));
        }
    }

    /// The store failed: nothing more can be applied safely. Fail every
    /// waiting proposal and remember why, for status and health.
    fn fail(&mut self, why: String) {
        self.failed = true;
        self.stopping = true;
        tracing::error!("Raft driver stopped: {why}");
        for (_, p) in std::mem::take(&mut self.pending) {
            let _ = p.reply.send(Err(ProposeError::Store(why.clone())));
        }
        self.shared.status.lock().failed = Some(why);
    }

    /// Hands pending proposal `id` to Raft (on a follower, raft-rs
    /// forwards it to the leader). Without a leader it stays pending and
    /// the next tick tries again.
    fn send_proposal(&mut self, id: u64) {
        let oldest = *self.pending.keys().next().unwrap_or(&id);
        let Some(p) = self.pending.get_mut(&id) else {
            return;
        };
        p.cmd.oldest_pending = oldest;
        let context = if p.durable { DURABLE.to_vec() } else { vec![] };
        if p.sent.is_some() {
            tracing::info!(
                "proposing request {id} again: it may have been lost in a leader change"
            );
        }
        if self.raw.propose(context, p.cmd.encode_to_vec()).is_ok() {
            p.sent = Some(Instant::now());
        }
    }

    fn on_ready(&mut self) -> Result<(), String> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        // A new leader: what was proposed to the old one may be lost with
        // it; propose it again now rather than at the next retry (up to
        // RETRY_AFTER later), so a write waits one election, not more.
        let new_leader = ready
            .ss()
            .is_some_and(|ss| ss.leader_id != 0 && ss.leader_id != self.known_leader);
        if let Some(ss) = ready.ss() {
            self.known_leader = ss.leader_id;
        }
        self.send(ready.take_messages());
        for read in ready.take_read_states() {
            if let Some((_, reply)) = self.reads.remove(&read.request_ctx) {
                let _ = reply.send(Ok(read.index));
            }
        }
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            self.install_snapshot(&snap)?;
        }
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
        self.send(ready.take_persisted_messages());
        // Applying comes after the answer to the leader: a follower learns
        // that entry N committed with the append of N+1, and N's apply
        // (namespace, carried chunks) would otherwise delay N+1's commit.
        self.apply(ready.take_committed_entries())?;

        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().commit_to(commit);
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.compact_log()?;
        self.publish_status();
        if new_leader {
            self.propose_again(|p| p.sent.is_some());
        }
        Ok(())
    }

    /// Proposes again the pending commands `which` picks.
    fn propose_again(&mut self, which: impl Fn(&Pending) -> bool) {
        let ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| which(p))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.send_proposal(id);
        }
    }

    /// Tells followers the commit index when no append carried it.
    ///
    /// raft-rs would follow every commit with an empty append to each peer
    /// (and each peer answers it): half of all Raft traffic while a tar is
    /// extracted one file at a time. Instead the next append carries the
    /// new commit index, and only when none went out within
    /// `ANNOUNCE_DELAY` (the writer paused) is the commit broadcast; at
    /// once when a follower proposed the entry, as it waits for its own
    /// apply to answer its caller.
    fn announce_commit(&mut self) -> Result<(), String> {
        let raft = &self.raw.raft;
        let at_once = std::mem::take(&mut self.announce_now);
        if raft.state != StateRole::Leader {
            self.untold_since = None;
            return Ok(());
        }
        let committed = raft.raft_log.committed;
        if committed != self.seen_commit {
            self.seen_commit = committed;
            self.commit_moved_at = Some(Instant::now());
        }
        let untold = raft.prs().iter().any(|(id, p)| {
            *id != self.id
                && self.told_commit.get(id).copied().unwrap_or(0) < committed.min(p.matched)
        });
        if !untold {
            self.untold_since = None;
            return Ok(());
        }
        let since = *self.untold_since.get_or_insert_with(Instant::now);
        if at_once || since.elapsed() >= ANNOUNCE_DELAY {
            self.untold_since = None;
            self.raw.raft.bcast_append();
            self.on_ready()?;
        }
        Ok(())
    }

    fn send(&mut self, msgs: Vec<RaftMessage>) {
        let Some(transport) = &self.transport else {
            return;
        };
        for msg in msgs {
            if msg.msg_type == MessageType::MsgAppend as i32 {
                let told = self.told_commit.entry(msg.to).or_default();
                *told = (*told).max(msg.commit);
            }
            let (to, is_snapshot) = (msg.to, msg.msg_type == MessageType::MsgSnapshot as i32);
            if !transport.send_raft(&msg) {
                if is_snapshot {
                    self.raw.report_snapshot(to, SnapshotStatus::Failure);
                }
                self.raw.report_unreachable(to);
            } else if is_snapshot {
                self.snapshot_sent.insert(to, Instant::now());
            }
        }
    }

    /// Replaces the namespace with the snapshot the leader sent, which the
    /// peer handler has fetched and verified before stepping the message.
    fn install_snapshot(&mut self, snap: &Snapshot) -> Result<(), String> {
        let meta = snap.get_metadata();
        let reference = SnapshotRef::decode(&snap.data[..])
            .map_err(|e| format!("snapshot {} reference is garbage: {e}", meta.index))?;
        let path = snapshot::incoming(&self.store, reference.index);
        let started = Instant::now();
        let failed = |e: &dyn std::fmt::Display| format!("installing snapshot {}: {e}", meta.index);
        let store = self.store.clone();
        let changed = self
            .raw
            .mut_store()
            .apply_snapshot(meta, || snapshot::install(&store, &path))
            .map_err(|e| failed(&e))?;
        let _ = std::fs::remove_file(&path);
        tracing::info!(
            "installed the snapshot at index {} ({} bytes, {changed} keys changed) in {:?}",
            meta.index,
            reference.size,
            started.elapsed()
        );
        if let Some(t) = &self.transport {
            for m in self.namespace.members().map_err(|e| e.to_string())? {
                t.set_address(m.node_id, Some(&m.addr));
            }
        }
        if let Some(o) = self.shared.observer.lock().clone() {
            o.snapshot_installed();
        }
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
        let committed_at = Instant::now();
        for entry in entries {
            let (index, term) = (entry.index, entry.term);
            let result = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {
                    self.namespace.apply_nothing(index, term)
                }
                EntryType::EntryNormal => self.apply_command(&entry, committed_at),
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.apply_conf_change(&entry)?;
                    Ok(())
                }
            };
            result.map_err(|e| format!("applying log entry {index}: {e}"))?;
            metrics::observe(&self.metrics.commit_to_apply, committed_at.elapsed());
        }
        Ok(())
    }

    fn apply_command(
        &mut self,
        entry: &Entry,
        committed_at: Instant,
    ) -> crate::namespace::Result<()> {
        let cmd = match Command::decode(&entry.data[..]) {
            Ok(cmd) => cmd,
            Err(e) => {
                // Every node rejects the same bad entry the same way.
                tracing::error!("log entry {} is not a command ({e}); skipped", entry.index);
                return self.namespace.apply_nothing(entry.index, entry.term);
            }
        };
        let observer = self.shared.observer.lock().clone();
        let also = |outcome: &Outcome, freed: &[u64], batch: &mut WriteBatch| {
            if let Some(o) = &observer {
                o.storing(&cmd, outcome, freed, batch);
            }
        };
        let Some(outcome) = self
            .namespace
            .apply_with(entry.index, entry.term, &cmd, also)?
        else {
            return Ok(()); // a repeat of a command already applied
        };
        if let Some(o) = observer {
            o.applied(&cmd, &outcome);
        }
        if cmd.node_id == self.id {
            if let Some(p) = self.pending.remove(&cmd.request_id) {
                let waited = committed_at.saturating_duration_since(p.proposed);
                metrics::observe(&self.metrics.propose_to_commit, waited);
                let _ = p.reply.send(Ok(outcome));
            }
        } else {
            self.announce_now = true;
        }
        Ok(())
    }

    /// Applies a membership change: Raft's configuration, the member's
    /// address in the namespace (so snapshots carry it), the transport.
    fn apply_conf_change(&mut self, entry: &Entry) -> Result<(), String> {
        if entry.get_entry_type() == EntryType::EntryConfChangeV2 {
            // This build proposes only single changes; a joint one would be
            // from a newer wpfs.
            let cc = <ConfChangeV2 as prost011::Message>::decode(&entry.data[..])
                .map_err(|e| e.to_string())?;
            let cs = self.raw.apply_conf_change(&cc).map_err(|e| e.to_string())?;
            let mut batch = WriteBatch::default();
            self.raw.mut_store().set_conf_state(&mut batch, &cs);
            self.write(batch, true)?;
            return self
                .namespace
                .apply_nothing(entry.index, entry.term)
                .map_err(|e| e.to_string());
        }
        let cc = <ConfChange as prost011::Message>::decode(&entry.data[..])
            .map_err(|e| e.to_string())?;
        let change = cc.get_change_type();
        let cs = self.raw.apply_conf_change(&cc).map_err(|e| e.to_string())?;
        let mut batch = WriteBatch::default();
        self.raw.mut_store().set_conf_state(&mut batch, &cs);
        self.write(batch, true)?;
        // Only the entry decides what the namespace records (a promotion
        // carries no address and keeps the one recorded at the join).
        let member = Member::decode(&cc.context[..]).unwrap_or_default();
        let removed = change == ConfChangeType::RemoveNode;
        if removed {
            self.namespace
                .apply_member(entry.index, entry.term, cc.node_id, None)
        } else if !member.addr.is_empty() {
            if let Some(t) = &self.transport {
                t.set_address(cc.node_id, Some(&member.addr));
            }
            self.namespace
                .apply_member(entry.index, entry.term, cc.node_id, Some(&member))
        } else {
            self.namespace.apply_nothing(entry.index, entry.term)
        }
        .map_err(|e| e.to_string())?;
        if removed {
            if let Some(t) = &self.transport {
                t.set_address(cc.node_id, None);
            }
        }
        tracing::info!(
            "membership: {change:?} node {}; voters {:?}, learners {:?}",
            cc.node_id,
            cs.voters,
            cs.learners
        );
        if removed && cc.node_id == self.id {
            self.shared.status.lock().removed = true;
        }
        if self.promoting.is_some_and(|(id, _)| id == cc.node_id) {
            self.promoting = None;
        }
        let (done, waiting) = std::mem::take(&mut self.pending_members)
            .into_iter()
            .partition(|(c, id, _)| *c == change && *id == cc.node_id);
        self.pending_members = waiting;
        for (_, _, reply) in done {
            let _ = reply.send(Ok(()));
        }
        Ok(())
    }

    fn compact_log(&mut self) -> Result<(), String> {
        let applied = self.raw.raft.raft_log.applied;
        let log = self.raw.store();
        let mut upto = 0;
        if applied > log.first_index_now() + 2 * LOG_KEEP {
            upto = applied - LOG_KEEP;
        }
        if log.bytes_now() > 2 * LOG_KEEP_BYTES {
            upto = upto.max(log.index_keeping(LOG_KEEP_BYTES).min(applied));
        }
        if upto >= log.first_index_now() {
            self.raw
                .mut_store()
                .compact(upto)
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
        s.progress = if raft.state == StateRole::Leader {
            raft.prs()
                .iter()
                .map(|(id, p)| PeerProgress {
                    id: *id,
                    matched: p.matched,
                    state: format!("{:?}", p.state).to_lowercase(),
                })
                .collect()
        } else {
            Vec::new()
        };
    }
}
