//! The Raft log and hard state, kept in the store's `raft` column family and
//! served to raft-rs through its `Storage` trait.
//!
//! raft-rs asks the storage for entries, terms and the initial state; the
//! driver (`node`) writes new entries and hard state through `append` and
//! `set_hard_state` into a RocksDB batch it commits itself, so one Ready is
//! one write. Entries below the compaction point are gone; their last index
//! and term are remembered as the snapshot metadata, and a peer that needs
//! them gets a snapshot of the namespace instead (`snapshot`).
//!
//! The newest entries are also kept in memory (`tail`): raft-rs reads an
//! entry back right after it is written (its term to match the next
//! append, its data to apply it), and a RocksDB read per entry was a tenth
//! of a follower's CPU while a tree was copied in.
//!
//! A new cluster starts with a snapshot at index 1 (the root directory made
//! by `bootstrap`), never with entry 1: so a joining node, whose log is
//! empty, always starts from a snapshot and never applies commands to a
//! namespace that lacks the root.

use std::collections::VecDeque;

use parking_lot::Mutex;
use prost011::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use rocksdb::{IteratorMode, WriteBatch, WriteOptions};

use crate::namespace::Namespace;
use crate::snapshot;
use crate::store::{be, read_be, Store, CF_RAFT};

const KEY_HARD_STATE: &[u8] = b"hs";
const KEY_CONF_STATE: &[u8] = b"cs";
const KEY_SNAPSHOT_META: &[u8] = b"snap";
/// A snapshot being installed: set before its namespace is ingested,
/// removed with the log's new state (`apply_snapshot`).
const KEY_INSTALLING: &[u8] = b"installing";
const ENTRY_PREFIX: u8 = b'e';
/// The newest entries kept in memory: at most this many, and this many
/// bytes of data.
const TAIL_ENTRIES: usize = 1024;
const TAIL_BYTES: u64 = 16 << 20;

fn entry_key(index: u64) -> [u8; 9] {
    let mut k = [ENTRY_PREFIX; 9];
    k[1..].copy_from_slice(&be(index));
    k
}

pub struct RaftLog {
    store: Store,
    hard_state: HardState,
    conf_state: ConfState,
    /// Index and term of the last entry compacted away (0, 0 at first).
    snapshot_index: u64,
    snapshot_term: u64,
    last_index: u64,
    /// The data size of each entry appended since the log was opened and
    /// still held (oldest first), and their sum: small file contents ride
    /// in entries, so the log is bounded in bytes as well as in entries.
    sizes: VecDeque<(u64, u64)>,
    bytes: u64,
    /// The newest entries, in a row up to `last_index`, and their bytes.
    tail: VecDeque<Entry>,
    tail_bytes: u64,
    /// The last snapshot written for a peer, reused while the log still
    /// holds every entry after it.
    last_snapshot: Mutex<Option<Snapshot>>,
}

impl RaftLog {
    /// Loads the log state from the store.
    pub fn open(store: Store) -> raft::Result<RaftLog> {
        Self::finish_interrupted_install(&store)?;
        let mut hard_state: HardState = load(&store, KEY_HARD_STATE)?.unwrap_or_default();
        let (applied, _) = Namespace::new(store.clone())
            .applied()
            .map_err(storage_err)?;
        hard_state.commit = hard_state.commit.max(applied);
        let conf_state: ConfState = load(&store, KEY_CONF_STATE)?.unwrap_or_default();
        let snap: SnapshotMetadata = load(&store, KEY_SNAPSHOT_META)?.unwrap_or_default();
        let mut log = RaftLog {
            store,
            hard_state,
            conf_state,
            snapshot_index: snap.index,
            snapshot_term: snap.term,
            last_index: snap.index,
            sizes: VecDeque::new(),
            bytes: 0,
            tail: VecDeque::new(),
            tail_bytes: 0,
            last_snapshot: Mutex::new(None),
        };
        {
            let cf = log.store.cf(CF_RAFT);
            let mut iter = log.store.db().raw_iterator_cf(cf);
            iter.seek_for_prev(entry_key(u64::MAX));
            if let Some(key) = iter.key() {
                if key.len() == 9 && key[0] == ENTRY_PREFIX {
                    log.last_index = read_be(&key[1..]).max(log.snapshot_index);
                }
            }
            iter.status().map_err(storage_err)?;
        }
        Ok(log)
    }

    /// Writes the Raft state of a brand-new cluster whose only voter is
    /// `node_id`: a snapshot at index 1, term 1 (see the module comment).
    pub fn bootstrap(store: &Store, node_id: u64) -> raft::Result<()> {
        let cs = ConfState {
            voters: vec![node_id],
            ..Default::default()
        };
        let meta = SnapshotMetadata {
            index: 1,
            term: 1,
            conf_state: Some(cs.clone()),
        };
        let hs = HardState {
            term: 1,
            vote: 0,
            commit: 1,
        };
        let cf = store.cf(CF_RAFT);
        let mut batch = WriteBatch::default();
        batch.put_cf(cf, KEY_CONF_STATE, cs.encode_to_vec());
        batch.put_cf(cf, KEY_SNAPSHOT_META, meta.encode_to_vec());
        batch.put_cf(cf, KEY_HARD_STATE, hs.encode_to_vec());
        store.db().write(batch).map_err(storage_err)
    }

    /// Takes the state of snapshot `meta`: `install` replaces the
    /// namespace (one atomic ingest, `snapshot::install`), then the log
    /// restarts after its index (every older or conflicting entry is
    /// dropped) in one synced write. The two are not one write, so the
    /// snapshot is marked as being installed first; `open` finishes or
    /// forgets an install a crash interrupted, and the node is wholly
    /// before or wholly after the snapshot. Returns `install`'s count.
    pub fn apply_snapshot(
        &mut self,
        meta: &SnapshotMetadata,
        install: impl FnOnce() -> std::io::Result<usize>,
    ) -> raft::Result<usize> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        let cf = self.store.cf(CF_RAFT);
        self.store
            .db()
            .put_cf_opt(cf, KEY_INSTALLING, meta.encode_to_vec(), &opts)
            .map_err(storage_err)?;
        let changed = install().map_err(storage_err)?;
        Self::take_snapshot_state(&self.store, meta, &mut self.hard_state)?;
        self.conf_state = meta.conf_state.clone().unwrap_or_default();
        self.snapshot_index = meta.index;
        self.snapshot_term = meta.term;
        self.last_index = meta.index;
        self.forget_sizes_upto(u64::MAX);
        self.tail.clear();
        self.tail_bytes = 0;
        Ok(changed)
    }

    /// Writes the log state of snapshot `meta` over `hs` (synced), and
    /// clears the mark of its install.
    fn take_snapshot_state(
        store: &Store,
        meta: &SnapshotMetadata,
        hs: &mut HardState,
    ) -> raft::Result<()> {
        let cs = meta.conf_state.clone().unwrap_or_default();
        hs.commit = hs.commit.max(meta.index);
        hs.term = hs.term.max(meta.term);
        let cf = store.cf(CF_RAFT);
        let mut batch = WriteBatch::default();
        batch.put_cf(cf, KEY_SNAPSHOT_META, meta.encode_to_vec());
        batch.put_cf(cf, KEY_CONF_STATE, cs.encode_to_vec());
        batch.put_cf(cf, KEY_HARD_STATE, hs.encode_to_vec());
        batch.delete_range_cf(cf, entry_key(0), entry_key(u64::MAX));
        batch.delete_cf(cf, KEY_INSTALLING);
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        store.db().write_opt(batch, &opts).map_err(storage_err)
    }

    /// After a crash during `apply_snapshot`: the ingest is atomic, so the
    /// namespace is wholly the old one or the snapshot's, which its
    /// applied index tells apart (a snapshot is built at its applied
    /// index). The snapshot's log state is taken, or the mark dropped and
    /// the leader sends the snapshot again.
    fn finish_interrupted_install(store: &Store) -> raft::Result<()> {
        let Some(meta) = load::<SnapshotMetadata>(store, KEY_INSTALLING)? else {
            return Ok(());
        };
        let (applied, _) = Namespace::new(store.clone())
            .applied()
            .map_err(storage_err)?;
        if applied == meta.index {
            tracing::info!(
                "finishing the install of snapshot {} a crash interrupted",
                meta.index
            );
            let mut hs: HardState = load(store, KEY_HARD_STATE)?.unwrap_or_default();
            Self::take_snapshot_state(store, &meta, &mut hs)
        } else {
            tracing::info!(
                "snapshot {} was not installed before a crash; the leader sends it again",
                meta.index
            );
            store
                .db()
                .delete_cf(store.cf(CF_RAFT), KEY_INSTALLING)
                .map_err(storage_err)
        }
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    pub fn first_index_now(&self) -> u64 {
        self.snapshot_index + 1
    }

    pub fn last_index_now(&self) -> u64 {
        self.last_index
    }

    /// Bytes of entry data in the log (of the entries appended since it
    /// was opened).
    pub fn bytes_now(&self) -> u64 {
        self.bytes
    }

    /// The lowest index the log can be compacted up to so that what
    /// remains holds at most `bytes` of entry data.
    pub fn index_keeping(&self, bytes: u64) -> u64 {
        let mut excess = self.bytes.saturating_sub(bytes);
        let mut index = self.snapshot_index;
        for &(i, size) in &self.sizes {
            if excess == 0 {
                break;
            }
            excess = excess.saturating_sub(size);
            index = i;
        }
        index
    }

    /// Forgets the sizes of the entries from `first` on (replaced).
    fn forget_sizes_from(&mut self, first: u64) {
        while let Some(&(_, size)) = self.sizes.back().filter(|(i, _)| *i >= first) {
            self.sizes.pop_back();
            self.bytes -= size;
        }
    }

    /// Forgets the sizes of the entries up to `last` (compacted).
    fn forget_sizes_upto(&mut self, last: u64) {
        while let Some(&(_, size)) = self.sizes.front().filter(|(i, _)| *i <= last) {
            self.sizes.pop_front();
            self.bytes -= size;
        }
    }

    /// Adds entries to the batch, replacing any conflicting tail.
    pub fn append(&mut self, batch: &mut WriteBatch, entries: &[Entry]) {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return;
        };
        self.forget_sizes_from(first.index);
        let cf = self.store.cf(CF_RAFT);
        for e in entries {
            batch.put_cf(cf, entry_key(e.index), e.encode_to_vec());
            self.sizes.push_back((e.index, e.data.len() as u64));
            self.bytes += e.data.len() as u64;
        }
        if last.index < self.last_index {
            batch.delete_range_cf(
                cf,
                entry_key(last.index + 1),
                entry_key(self.last_index + 1),
            );
        }
        debug_assert!(first.index <= self.last_index + 1);
        self.last_index = last.index;
        self.keep_in_tail(entries);
    }

    /// Puts appended entries at the end of the tail (dropping the ones
    /// they replace) and trims it to its bounds.
    fn keep_in_tail(&mut self, entries: &[Entry]) {
        let first = entries[0].index;
        while self.tail.back().is_some_and(|e| e.index >= first) {
            let e = self.tail.pop_back().expect("checked");
            self.tail_bytes -= e.data.len() as u64;
        }
        if self.tail.back().is_some_and(|e| e.index + 1 != first) {
            self.tail.clear();
            self.tail_bytes = 0;
        }
        for e in entries {
            self.tail_bytes += e.data.len() as u64;
            self.tail.push_back(e.clone());
        }
        while self.tail.len() > TAIL_ENTRIES || self.tail_bytes > TAIL_BYTES {
            let e = self.tail.pop_front().expect("over a bound, so not empty");
            self.tail_bytes -= e.data.len() as u64;
        }
    }

    /// Entry `index` if the tail holds it.
    fn in_tail(&self, index: u64) -> Option<&Entry> {
        let first = self.tail.front()?.index;
        self.tail
            .get(usize::try_from(index.checked_sub(first)?).ok()?)
    }

    /// Takes `hs`, writing it into `batch` when its term or vote changed.
    /// A moved commit index alone is not worth a write per entry on the
    /// leader's path: whatever this node applied was committed, and `open`
    /// takes the applied index as the least commit index.
    pub fn set_hard_state(&mut self, batch: &mut WriteBatch, hs: &HardState) {
        if hs.term != self.hard_state.term || hs.vote != self.hard_state.vote {
            batch.put_cf(self.store.cf(CF_RAFT), KEY_HARD_STATE, hs.encode_to_vec());
        }
        self.hard_state = hs.clone();
    }

    /// The commit index moved: kept in memory only (see `set_hard_state`).
    pub fn commit_to(&mut self, commit: u64) {
        self.hard_state.commit = commit;
    }

    pub fn set_conf_state(&mut self, batch: &mut WriteBatch, cs: &ConfState) {
        batch.put_cf(self.store.cf(CF_RAFT), KEY_CONF_STATE, cs.encode_to_vec());
        self.conf_state = cs.clone();
    }

    /// Drops the entries up to and including `index` (already applied).
    pub fn compact(&mut self, index: u64) -> raft::Result<()> {
        if index <= self.snapshot_index || index > self.last_index {
            return Ok(());
        }
        let term = self.entry_term(index)?;
        let meta = SnapshotMetadata {
            index,
            term,
            conf_state: Some(self.conf_state.clone()),
        };
        let cf = self.store.cf(CF_RAFT);
        let mut batch = WriteBatch::default();
        batch.put_cf(cf, KEY_SNAPSHOT_META, meta.encode_to_vec());
        batch.delete_range_cf(cf, entry_key(0), entry_key(index + 1));
        self.store.db().write(batch).map_err(storage_err)?;
        self.snapshot_index = index;
        self.snapshot_term = term;
        self.forget_sizes_upto(index);
        while self.tail.front().is_some_and(|e| e.index <= index) {
            let e = self.tail.pop_front().expect("checked");
            self.tail_bytes -= e.data.len() as u64;
        }
        Ok(())
    }

    fn entry_term(&self, index: u64) -> raft::Result<u64> {
        if let Some(e) = self.in_tail(index) {
            return Ok(e.term);
        }
        let bytes = self
            .store
            .db()
            .get_pinned_cf(self.store.cf(CF_RAFT), entry_key(index))
            .map_err(storage_err)?
            .ok_or(raft::Error::Store(StorageError::Unavailable))?;
        let e = Entry::decode(&*bytes).map_err(|e| storage_err(format!("entry {index}: {e}")))?;
        Ok(e.term)
    }
}

impl raft::Storage for RaftLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.snapshot_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max_size = max_size.into().unwrap_or(u64::MAX);
        if self.in_tail(low).is_some() {
            let mut size = 0u64;
            let from_tail = (low..high).map_while(|i| self.in_tail(i)).take_while(|e| {
                size += e.encoded_len() as u64;
                // Like raft's limit_size: always at least one entry.
                e.index == low || size <= max_size
            });
            return Ok(from_tail.cloned().collect());
        }
        let cf = self.store.cf(CF_RAFT);
        let start = entry_key(low);
        let iter = self
            .store
            .db()
            .iterator_cf(cf, IteratorMode::From(&start, rocksdb::Direction::Forward));
        let mut out = Vec::with_capacity((high - low) as usize);
        let mut size = 0u64;
        for item in iter {
            let (key, value) = item.map_err(storage_err)?;
            if key.len() != 9 || key[0] != ENTRY_PREFIX || read_be(&key[1..]) >= high {
                break;
            }
            if read_be(&key[1..]) != low + out.len() as u64 {
                return Err(storage_err(format!(
                    "raft log has a gap before entry {}",
                    read_be(&key[1..])
                )));
            }
            size += value.len() as u64;
            // Like raft's limit_size: always at least one entry.
            if !out.is_empty() && size > max_size {
                break;
            }
            out.push(Entry::decode(&*value).map_err(|e| storage_err(e.to_string()))?);
        }
        if out.is_empty() && high > low {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snapshot_index {
            return Ok(self.snapshot_term);
        }
        if idx < self.snapshot_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        self.entry_term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.snapshot_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    /// A snapshot of the namespace as applied now (this runs on the Raft
    /// driver thread, between two applied entries), or the last one made
    /// if the log still holds every entry after it.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let mut last = self.last_snapshot.lock();
        if let Some(s) = last.as_ref() {
            let meta = s.get_metadata();
            let cs = meta.get_conf_state();
            // A snapshot older than the peer's membership would be refused by it.
            let knows_peer = cs.voters.contains(&to) || cs.learners.contains(&to);
            if meta.index >= self.snapshot_index && meta.index >= request_index && knows_peer {
                return Ok(s.clone());
            }
        }
        let (index, term) = Namespace::new(self.store.clone())
            .applied()
            .map_err(storage_err)?;
        let started = std::time::Instant::now();
        let reference = snapshot::build(&self.store, index).map_err(storage_err)?;
        tracing::info!(
            "wrote snapshot at index {index} for node {to} ({} bytes) in {:?}",
            reference.size,
            started.elapsed()
        );
        let snap = Snapshot {
            data: wpfs_proto::Message::encode_to_vec(&reference),
            metadata: Some(SnapshotMetadata {
                index,
                term,
                conf_state: Some(self.conf_state.clone()),
            }),
        };
        *last = Some(snap.clone());
        Ok(snap)
    }
}

fn load<M: prost011::Message + Default>(store: &Store, key: &[u8]) -> raft::Result<Option<M>> {
    let Some(bytes) = store
        .db()
        .get_pinned_cf(store.cf(CF_RAFT), key)
        .map_err(storage_err)?
    else {
        return Ok(None);
    };
    M::decode(&*bytes)
        .map(Some)
        .map_err(|e| storage_err(format!("{}: {e}", String::from_utf8_lossy(key))))
}

fn storage_err(e: impl ToString) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.to_string().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, bytes: usize) -> Entry {
        Entry {
            index,
            term: 1,
            data: vec![7; bytes],
            ..Default::default()
        }
    }

    /// A bootstrapped log in a new store (the directory lives as long as
    /// the returned guard).
    fn new_log() -> (tempfile::TempDir, Store, RaftLog) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), true).unwrap();
        RaftLog::bootstrap(&store, 1).unwrap();
        let log = RaftLog::open(store.clone()).unwrap();
        (dir, store, log)
    }

    fn append(log: &mut RaftLog, entries: &[Entry]) {
        let mut batch = WriteBatch::default();
        log.append(&mut batch, entries);
        log.store.db().write(batch).unwrap();
    }

    #[test]
    fn the_log_counts_its_bytes_through_appends_conflicts_and_compactions() {
        let (_dir, _store, mut log) = new_log();
        append(
            &mut log,
            &(2..=5).map(|i| entry(i, 100)).collect::<Vec<_>>(),
        );
        assert_eq!(log.bytes_now(), 400);
        // Keeping 250 bytes means dropping entries 2 and 3 (200 bytes).
        assert_eq!(log.index_keeping(250), 3);
        assert_eq!(log.index_keeping(400), 1, "nothing to drop");
        // A new leader replaces entries 4 and 5 with one of 1000 bytes.
        append(&mut log, &[entry(4, 1000)]);
        assert_eq!(log.bytes_now(), 1200);
        assert_eq!(log.last_index_now(), 4);
        log.compact(3).unwrap();
        assert_eq!(log.bytes_now(), 1000);
        assert_eq!(log.first_index_now(), 4);
        assert_eq!(log.index_keeping(0), 4);
    }

    #[test]
    fn a_commit_index_not_written_comes_back_as_the_applied_index() {
        let (_dir, store, mut log) = new_log();
        append(&mut log, &(2..=5).map(|i| entry(i, 10)).collect::<Vec<_>>());
        let mut hs = log.hard_state().clone();
        hs.commit = 5;
        let mut batch = WriteBatch::default();
        log.set_hard_state(&mut batch, &hs);
        assert!(
            batch.is_empty(),
            "a moved commit index alone is not written"
        );
        let namespace = Namespace::new(store.clone());
        for index in 2..=4 {
            namespace.apply_nothing(index, 1).unwrap();
        }
        assert_eq!(RaftLog::open(store.clone()).unwrap().hard_state().commit, 4);
        // A new term is written, with the commit index it came with.
        hs.term = 2;
        let mut batch = WriteBatch::default();
        log.set_hard_state(&mut batch, &hs);
        store.db().write(batch).unwrap();
        assert_eq!(RaftLog::open(store).unwrap().hard_state(), &hs);
    }

    #[test]
    fn the_tail_in_memory_answers_as_the_store_does() {
        use raft::Storage;
        let (_dir, store, mut log) = new_log();
        let big = (TAIL_BYTES / 4) as usize;
        append(
            &mut log,
            &(2..=40).map(|i| entry(i, 10)).collect::<Vec<_>>(),
        );
        append(
            &mut log,
            &(30..=33).map(|i| entry(i, big)).collect::<Vec<_>>(),
        );
        append(&mut log, &[entry(34, 10), entry(35, 10)]);
        log.compact(10).unwrap();
        // Over its byte bound, the tail dropped the oldest big entry.
        assert_eq!(log.tail.front().map(|e| e.index), Some(31));
        let from_store = RaftLog::open(store).unwrap();
        assert!(from_store.tail.is_empty());
        let ctx = || GetEntriesContext::empty(false);
        for (low, high, max) in [
            (11, 36, None),
            (31, 36, None),
            (32, 36, Some(1)),
            (34, 36, Some(50)),
        ] {
            let tail = log.entries(low, high, max, ctx()).unwrap();
            let disk = from_store.entries(low, high, max, ctx()).unwrap();
            assert_eq!(tail, disk, "entries {low}..{high} max {max:?}");
        }
        for i in 10..=35 {
            assert_eq!(
                log.term(i).unwrap(),
                from_store.term(i).unwrap(),
                "term of {i}"
            );
        }
        assert!(log.entries(36, 37, None, ctx()).is_err());
    }

    #[test]
    fn a_snapshot_install_a_crash_cut_is_finished_or_forgotten_at_open() {
        let meta = SnapshotMetadata {
            index: 9,
            term: 2,
            conf_state: Some(ConfState {
                voters: vec![1],
                ..Default::default()
            }),
        };
        let crash = || std::io::Error::other("killed");

        // Killed after the ingest (the namespace is the snapshot's, at its
        // index), before the log's new state was written.
        let (_dir, store, mut log) = new_log();
        append(&mut log, &(2..=5).map(|i| entry(i, 10)).collect::<Vec<_>>());
        let namespace = Namespace::new(store.clone());
        let cut = log.apply_snapshot(&meta, || {
            namespace.apply_nothing(meta.index, meta.term).unwrap();
            Err(crash())
        });
        assert!(cut.is_err());
        let log = RaftLog::open(store.clone()).unwrap();
        assert_eq!((log.snapshot_index, log.snapshot_term), (9, 2));
        assert_eq!(log.first_index_now(), 10);
        assert!(log.hard_state().commit >= 9);
        assert!(load::<SnapshotMetadata>(&store, KEY_INSTALLING)
            .unwrap()
            .is_none());

        // Killed before the ingest: the node keeps its log and namespace,
        // and the leader sends the snapshot again.
        let (_dir, store, mut log) = new_log();
        append(&mut log, &(2..=5).map(|i| entry(i, 10)).collect::<Vec<_>>());
        assert!(log.apply_snapshot(&meta, || Err(crash())).is_err());
        let log = RaftLog::open(store.clone()).unwrap();
        assert_eq!(log.snapshot_index, 1);
        assert_eq!(log.last_index_now(), 5);
        assert!(load::<SnapshotMetadata>(&store, KEY_INSTALLING)
            .unwrap()
            .is_none());
    }
}
