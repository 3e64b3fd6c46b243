//! This node as a member of a cluster: what it answers its peers (the
//! transport's `Handler`), how a new node joins on its first mount, and
//! how a node leaves or removes a dead one.
//!
//! Joining: `wpfs join` only writes the config. The first `wpfs mount`
//! starts an empty store, asks the peer from the token to add it as a
//! learner, and waits (showing progress) until the leader's snapshot is
//! installed; only then is the tree mounted. Background replication then
//! brings the file contents, and the leader promotes the node to voter
//! once its log has caught up.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use raft::eraftpb::{Message as RaftMessage, MessageType};
use wpfs_consensus::namespace::Hash;
use wpfs_consensus::snapshot;
use wpfs_consensus::transport::{self, Handler};
use wpfs_consensus::{ConfChangeType, Namespace, Node, Store, Transport};
use wpfs_fs::chunks::ChunkStore;
use wpfs_fs::replication::FETCH_BATCH;
use wpfs_proto::peer_request::Kind;
use wpfs_proto::{FetchChunks, Member, Message, SnapshotPiece, SnapshotRef, StoreChunks};

/// How long a membership change may take to be applied.
const MEMBER_TIMEOUT: Duration = Duration::from_secs(10);
const PIECE_TIMEOUT: Duration = Duration::from_secs(30);
/// A joining node gives up when its peer has been unreachable this long.
const JOIN_GIVE_UP: Duration = Duration::from_secs(120);

/// Progress of a snapshot this node is receiving, for status.
#[derive(Default)]
pub struct SnapshotProgress {
    pub index: AtomicU64,
    pub received: AtomicU64,
    pub size: AtomicU64,
}

/// Answers peers: Raft messages, chunk and snapshot fetches, membership.
pub struct PeerService {
    pub node: Arc<Node>,
    pub store: Store,
    /// This node's chunks, as peers fetch and push them.
    chunks: ChunkStore,
    witness: bool,
    pub transport: Transport,
    pub snapshot: Arc<SnapshotProgress>,
    receiving: Mutex<Option<u64>>,
}

impl PeerService {
    pub fn new(
        node: Arc<Node>,
        store: Store,
        transport: Transport,
        witness: bool,
        min_free: u64,
    ) -> Arc<PeerService> {
        Arc::new(PeerService {
            node,
            chunks: ChunkStore::new(store.clone(), min_free),
            witness,
            store,
            transport,
            snapshot: Arc::new(SnapshotProgress::default()),
            receiving: Mutex::new(None),
        })
    }

    /// Fetches the snapshot a leader announced, piece by piece, then lets
    /// Raft install it. One at a time; a repeat of the same one is dropped.
    fn receive_snapshot(self: &Arc<Self>, msg: RaftMessage) {
        let Some(reference) = msg
            .snapshot
            .as_ref()
            .and_then(|s| SnapshotRef::decode(&s.data[..]).ok())
        else {
            tracing::warn!("node {} sent a snapshot without a reference", msg.from);
            return;
        };
        {
            let mut receiving = self.receiving.lock();
            if receiving.is_some() {
                return;
            }
            *receiving = Some(reference.index);
        }
        let me = self.clone();
        std::thread::spawn(move || {
            let leader = msg.from;
            match me.download(leader, &reference) {
                Ok(()) => me.node.step(msg),
                Err(e) => {
                    tracing::warn!(
                        "fetching snapshot {} from node {leader}: {e}",
                        reference.index
                    );
                    me.node.snapshot_failed(leader);
                }
            }
            *me.receiving.lock() = None;
        });
    }

    fn download(&self, from: u64, reference: &SnapshotRef) -> Result<(), String> {
        let path = snapshot::incoming(&self.store, reference.index);
        snapshot::clear_incoming(&self.store);
        fs::create_dir_all(snapshot::dir(&self.store)).map_err(|e| e.to_string())?;
        let mut file = fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let progress = &self.snapshot;
        progress.index.store(reference.index, Ordering::Relaxed);
        progress.size.store(reference.size, Ordering::Relaxed);
        progress.received.store(0, Ordering::Relaxed);
        let started = Instant::now();
        let mut offset = 0;
        while offset < reference.size {
            let piece = self.transport.call(
                from,
                Kind::SnapshotPiece(SnapshotPiece {
                    index: reference.index,
                    offset,
                }),
                PIECE_TIMEOUT,
            )?;
            if piece.is_empty() {
                return Err(format!("the snapshot ends early at byte {offset}"));
            }
            file.write_all(&piece)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            offset += piece.len() as u64;
            progress.received.store(offset, Ordering::Relaxed);
        }
        file.sync_all().map_err(|e| e.to_string())?;
        if !snapshot::verify(&path, reference).map_err(|e| e.to_string())? {
            return Err("the snapshot fails its hash check".into());
        }
        tracing::info!(
            "received snapshot {} ({} bytes) from node {from} in {:?}",
            reference.index,
            reference.size,
            started.elapsed()
        );
        Ok(())
    }
}

/// The handler is registered as an `Arc<PeerService>`.
pub struct PeerHandler(pub Arc<PeerService>);

impl Handler for PeerHandler {
    fn raft_message(&self, msg: RaftMessage) {
        if msg.msg_type == MessageType::MsgSnapshot as i32 {
            self.0.receive_snapshot(msg);
        } else {
            self.0.node.step(msg);
        }
    }

    fn request(&self, from: u64, kind: Kind) -> Result<Vec<u8>, String> {
        let s = &self.0;
        match kind {
            Kind::FetchChunk(hash) => {
                // Verified on the way out too: never serve a corrupt copy.
                s.chunks
                    .get(&hash, None)
                    .map_err(|_| "chunk not here".to_string())
            }
            Kind::FetchChunks(_) if transport::spoken_protocol() < 2 => {
                Err(transport::UNKNOWN_REQUEST.into())
            }
            Kind::FetchChunks(FetchChunks { hashes }) if hashes.len() <= FETCH_BATCH => {
                let hashes = (hashes.iter())
                    .map(|h| Hash::try_from(&h[..]))
                    .collect::<Result<Vec<Hash>, _>>()
                    .map_err(|_| "a chunk hash that is not 32 bytes".to_string())?;
                let chunks = s.chunks.here_of(&hashes);
                Ok(StoreChunks { chunks }.encode_to_vec())
            }
            Kind::FetchChunks(f) => Err(format!(
                "{} chunks asked at once, over the limit of {FETCH_BATCH}",
                f.hashes.len()
            )),
            Kind::StoreChunks(batch) if !s.witness => {
                let hashes: Vec<Hash> = (batch.chunks.iter())
                    .map(|data| *blake3::hash(data).as_bytes())
                    .collect();
                let chunks = hashes.iter().zip(batch.chunks.iter().map(Vec::as_slice));
                s.chunks.put_hashed(chunks).map_err(|e| format!("{e:?}"))?;
                Ok(vec![])
            }
            Kind::StoreChunks(_) => Err("a witness stores no file contents".into()),
            Kind::SnapshotPiece(p) => {
                s.node.snapshot_fetching(from);
                snapshot::read_piece(&s.store, p.index, p.offset).map_err(|e| e.to_string())
            }
            Kind::Join(member) => {
                let status = s.node.status();
                if status.voters.contains(&member.node_id)
                    || status.learners.contains(&member.node_id)
                {
                    return Ok(vec![]); // a retry after the change went through
                }
                tracing::info!("node {} at {} asks to join", member.node_id, member.addr);
                s.node
                    .change_member(ConfChangeType::AddLearnerNode, member, MEMBER_TIMEOUT)
                    .map(|_| vec![])
                    .map_err(|e| e.to_string())
            }
            Kind::Remove(id) => {
                tracing::info!("node {from} asks to remove node {id}");
                s.node
                    .change_member(ConfChangeType::RemoveNode, gone(id), MEMBER_TIMEOUT)
                    .map(|_| vec![])
                    .map_err(|e| e.to_string())
            }
        }
    }
}

fn gone(id: u64) -> Member {
    Member {
        node_id: id,
        ..Default::default()
    }
}

/// First mount of a joined node: asks `peer` to add this node, then waits
/// for the snapshot that fills the empty store, telling `progress` how far.
pub fn join(
    service: &PeerService,
    member: Member,
    peer: &str,
    progress: &mut dyn FnMut(String),
) -> Result<(), String> {
    let namespace = Namespace::new(service.store.clone());
    let started = Instant::now();
    progress(format!(
        "asking {peer} to add node {} to the cluster",
        member.node_id
    ));
    loop {
        match service
            .transport
            .call_addr(peer, Kind::Join(member.clone()), MEMBER_TIMEOUT)
        {
            Ok(_) => break,
            Err(e) if e.contains(transport::REFUSED) || started.elapsed() > JOIN_GIVE_UP => {
                return Err(format!(
                    "cannot join through {peer}: {e}. Check that the peer is mounted and \
                     reachable, and that the token is this cluster's (`wpfs token` on a member)"
                ))
            }
            Err(e) => {
                tracing::info!("join through {peer} not yet accepted: {e}");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    progress("added as a learner; receiving the namespace snapshot".into());
    let mut shown = String::new();
    while namespace.applied().map_err(|e| e.to_string())?.0 == 0 {
        if let Some(why) = service.node.status().failed {
            return Err(why);
        }
        let p = &service.snapshot;
        let line = format!(
            "snapshot {}: {} of {} bytes",
            p.index.load(Ordering::Relaxed),
            p.received.load(Ordering::Relaxed),
            p.size.load(Ordering::Relaxed)
        );
        if line != shown && p.size.load(Ordering::Relaxed) > 0 {
            progress(line.clone());
            shown = line;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    progress(format!(
        "namespace received in {:.1}s; file contents follow in the background",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Asks the leader to remove node `id`. The leader applies it and answers.
pub fn remove(node: &Node, transport: &Transport, id: u64) -> Result<(), String> {
    let status = node.status();
    if !status.voters.contains(&id) && !status.learners.contains(&id) {
        return Err(format!(
            "node {id} is not a member (members: voters {:?}, learners {:?})",
            status.voters, status.learners
        ));
    }
    if status.voters == [id] {
        return Err(format!(
            "node {id} is the only voter: the cluster cannot remove its last voter"
        ));
    }
    if status.leader == 0 {
        return Err(
            "no Raft leader: a majority of voters is unreachable, so membership cannot change now"
                .into(),
        );
    }
    if status.leader == node.id() {
        return node
            .change_member(ConfChangeType::RemoveNode, gone(id), MEMBER_TIMEOUT)
            .map_err(|e| e.to_string());
    }
    transport
        .call(status.leader, Kind::Remove(id), MEMBER_TIMEOUT)
        .map(|_| ())
}

/// This node leaves: leadership goes elsewhere first, then the leader
/// removes it. The caller unmounts afterwards.
pub fn leave(node: &Node, transport: &Transport) -> Result<(), String> {
    let status = node.status();
    if status.voters == [node.id()] {
        return Err("this node is the cluster's only voter: it cannot leave (just unmount it, or remove the other nodes first)".into());
    }
    if status.leader == node.id() {
        let successor = status
            .progress
            .iter()
            .filter(|p| p.id != node.id() && status.voters.contains(&p.id))
            .max_by_key(|p| p.matched)
            .map(|p| p.id)
            .ok_or("no other voter to hand leadership to")?;
        node.transfer_leader(successor);
        let deadline = Instant::now() + MEMBER_TIMEOUT;
        while node.status().leader == node.id() || node.status().leader == 0 {
            if Instant::now() > deadline {
                return Err(format!(
                    "node {successor} did not take over leadership; try again"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    remove(node, transport, node.id())
}

/// Marks a data directory whose node left, so it is not mounted again.
pub const LEFT_FILE: &str = "LEFT";

pub fn mark_left(dir: &Path) -> Result<(), String> {
    fs::write(dir.join(LEFT_FILE), b"this node left its cluster\n").map_err(|e| e.to_string())
}
