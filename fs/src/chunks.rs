//! The chunk store: file contents as chunks addressed by their BLAKE3 hash,
//! in the store's `chunks` column family.
//!
//! A chunk is immutable and shared by every slot of every file that holds
//! the same bytes. Reads verify the hash, so a reader never gets torn or
//! foreign bytes: a mismatch is EIO and a log line, never wrong data.
//!
//! Collection: the namespace counts references and flags a chunk whose
//! count falls to zero (`g` keys). A writer stores its chunks *before* the
//! command that references them is committed, so it pins them meanwhile,
//! and flags them too: if the writer dies first, the collector finds them
//! unreferenced and unpinned and deletes them. The pin lock orders a
//! writer's "pin, then check/put" against the collector's "check pin, then
//! delete", so a chunk about to be referenced is never deleted.
//!
//! A chunk referenced here but not stored yet (its writer is another node
//! and background replication has not brought it) is fetched from a peer
//! through the `ChunkSource` at the moment a read needs it, which checks
//! it against its hash.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use rocksdb::WriteBatch;
use wpfs_consensus::namespace::{Hash, Namespace};
use wpfs_consensus::store::{CF_CHUNKS, CF_META};
use wpfs_consensus::Store;

use crate::error::{err, Errno, Result};
use crate::space::Space;
use crate::throttle::{held_back, Throttle};

pub struct ChunkStore {
    store: Store,
    /// New chunks are refused (ENOSPC) below the disk's reserve.
    space: Space,
    pins: Mutex<HashMap<Hash, u32>>,
    source: OnceLock<Arc<dyn ChunkSource>>,
    /// Whether chunks fetched for a read are kept (not on a witness).
    keep_fetched: std::sync::atomic::AtomicBool,
    /// The "missing chunk" error, once a second at most.
    missing_logged: Throttle,
}

/// A chunk that arrived before anything referenced it here (a writer's
/// copy, ahead of the command) is left alone this long by the collector.
const ARRIVAL_GRACE_SECS: u64 = 300;
/// Garbage candidates looked at per step of `collect`.
const COLLECT_STEP: usize = 1024;
/// Chunks one read fetches from peers at a time.
const FETCHES_AT_ONCE: usize = 8;

/// Where missing chunks come from: the peers.
pub trait ChunkSource: Send + Sync {
    /// The chunk's bytes from some peer, checked against `hash` (the
    /// source can then ask another peer for a damaged copy); `None` when
    /// no reachable peer has it.
    fn fetch(&self, hash: &Hash) -> Option<Vec<u8>>;
}

/// Chunks pinned by one pending write; unpinned when dropped.
pub struct Pinned {
    chunks: Arc<ChunkStore>,
    hashes: Vec<Hash>,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let mut pins = self.chunks.pins.lock();
        for h in &self.hashes {
            if let Some(n) = pins.get_mut(h) {
                *n -= 1;
                if *n == 0 {
                    pins.remove(h);
                }
            }
        }
    }
}

impl Pinned {
    pub fn new(chunks: Arc<ChunkStore>) -> Self {
        Pinned {
            chunks,
            hashes: Vec::new(),
        }
    }

    /// Pins a chunk already referenced here, whether stored yet or not.
    pub fn hold(&mut self, hash: Hash) {
        *self.chunks.pins.lock().entry(hash).or_default() += 1;
        self.hashes.push(hash);
    }

    /// Stores `data` (if no chunk with its hash exists) and pins it.
    pub fn put(&mut self, data: &[u8]) -> Result<Hash> {
        let hash: Hash = *blake3::hash(data).as_bytes();
        self.hold(hash);
        let store = &self.chunks.store;
        let exists = store
            .db()
            .get_pinned_cf(store.cf(CF_CHUNKS), hash)?
            .is_some();
        if !exists {
            self.chunks.space.check(data.len())?;
            let mut batch = WriteBatch::default();
            batch.put_cf(store.cf(CF_CHUNKS), hash, data);
            // Flag it for collection in case the write is never committed.
            batch.put_cf(store.cf(CF_META), garbage_key(&hash), b"");
            store.db().write(batch)?;
        }
        Ok(hash)
    }
}

fn garbage_key(hash: &Hash) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(b'g');
    k.extend_from_slice(hash);
    k
}

impl ChunkStore {
    /// Over `store`, keeping `min_free` bytes of its disk free.
    pub fn new(store: Store, min_free: u64) -> Self {
        ChunkStore {
            space: Space::new(store.path(), min_free),
            store,
            pins: Mutex::new(HashMap::new()),
            source: OnceLock::new(),
            keep_fetched: std::sync::atomic::AtomicBool::new(true),
            missing_logged: Throttle::new(std::time::Duration::from_secs(1)),
        }
    }

    /// Where missing chunks come from; `keep` stores what it brings.
    pub fn set_source(&self, source: Arc<dyn ChunkSource>, keep: bool) {
        self.keep_fetched
            .store(keep, std::sync::atomic::Ordering::Relaxed);
        let _ = self.source.set(source);
    }

    pub fn space(&self) -> &Space {
        &self.space
    }

    /// Which of `hashes` are not stored here. Unlike `contains`, it reads
    /// no chunk's bytes (`KeyProbe`), so it is the one for many hashes.
    pub fn absent(&self, hashes: &[Hash]) -> Result<Vec<Hash>> {
        // Most applied writes carry all their chunks and ask about none:
        // they need no iterator.
        if hashes.is_empty() {
            return Ok(Vec::new());
        }
        let mut probe = self.store.key_probe(CF_CHUNKS);
        let mut absent = Vec::new();
        for hash in hashes {
            if !probe.contains(hash)? {
                absent.push(*hash);
            }
        }
        Ok(absent)
    }

    pub fn contains(&self, hash: &Hash) -> Result<bool> {
        Ok(self
            .store
            .db()
            .get_pinned_cf(self.store.cf(CF_CHUNKS), hash)?
            .is_some())
    }

    /// Stores chunks that came from elsewhere, whose hashes the caller
    /// has computed or checked, in one write. Each is flagged with its
    /// arrival time, like a fresh write: if nothing references it any more
    /// by the time it arrives, the collector removes it (see `collect`).
    pub fn put_hashed<'a>(
        &self,
        chunks: impl IntoIterator<Item = (&'a Hash, &'a [u8])>,
    ) -> Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut batch = WriteBatch::default();
        for (hash, data) in chunks {
            // A carried chunk's put, plus the arrival flag it does not need.
            self.put_carried(&mut batch, hash, data)?;
            batch.put_cf(self.store.cf(CF_META), garbage_key(hash), now.to_be_bytes());
        }
        self.store.db().write(batch)?;
        Ok(())
    }

    /// The chunks of `hashes` stored here, verified, in their order; an
    /// empty one for each that is not here or fails its check. What a peer
    /// fetching many at once is answered.
    pub fn here_of(&self, hashes: &[Hash]) -> Vec<Vec<u8>> {
        let values =
            (self.store.db()).batched_multi_get_cf(self.store.cf(CF_CHUNKS), hashes, false);
        hashes
            .iter()
            .zip(values)
            .map(|(hash, value)| match value {
                Ok(Some(data)) if intact(hash, &data) => data.to_vec(),
                Ok(_) => Vec::new(),
                Err(e) => {
                    tracing::warn!("reading chunk {} for a peer: {e}", hex(hash));
                    Vec::new()
                }
            })
            .collect()
    }

    /// Adds a chunk carried in the command being applied (its `hash`
    /// computed by the caller) to that command's write. The command's
    /// reference already counts it, and losing the reference flags it, so
    /// it needs no arrival flag: flags would make the collector look at
    /// every small file written elsewhere, every run, for five minutes.
    pub fn put_carried(&self, batch: &mut WriteBatch, hash: &Hash, data: &[u8]) -> Result<()> {
        self.space.check(data.len())?;
        batch.put_cf(self.store.cf(CF_CHUNKS), hash, data);
        Ok(())
    }

    /// The chunk with `hash`, verified; `snapshot` gives a consistent view.
    /// One that is not here is brought from a peer.
    pub fn get(&self, hash: &[u8], snapshot: Option<&rocksdb::Snapshot<'_>>) -> Result<Vec<u8>> {
        let hash: Hash = hash.try_into().map_err(|_| Errno(libc::EIO))?;
        self.get_or_bring(&hash, snapshot, &mut HashMap::new(), Vec::new)
    }

    /// The chunk with `hash`, verified: from `brought` (chunks this read
    /// fetched already), from this node's store, or else brought from
    /// peers together with `others` (the rest of the read), which go into
    /// `brought` for the chunks to come.
    pub fn get_or_bring(
        &self,
        hash: &Hash,
        snapshot: Option<&rocksdb::Snapshot<'_>>,
        brought: &mut HashMap<Hash, Vec<u8>>,
        others: impl FnOnce() -> Vec<Hash>,
    ) -> Result<Vec<u8>> {
        if let Some(data) = (!brought.is_empty())
            .then(|| brought.remove(hash))
            .flatten()
        {
            return Ok(data);
        }
        if let Some(data) = self.get_here(hash, snapshot)? {
            return Ok(data);
        }
        let wanted: Vec<Hash> = std::iter::once(*hash).chain(others()).collect();
        *brought = self.bring(&wanted)?;
        brought.remove(hash).ok_or_else(|| self.missing(hash))
    }

    /// The chunk with `hash` if this node has it (as `snapshot` sees the
    /// store), verified.
    pub fn get_here(
        &self,
        hash: &[u8],
        snapshot: Option<&rocksdb::Snapshot<'_>>,
    ) -> Result<Option<Vec<u8>>> {
        let cf = self.store.cf(CF_CHUNKS);
        let data = match snapshot {
            Some(s) => s.get_cf(cf, hash)?,
            None => self.store.db().get_cf(cf, hash)?,
        };
        let Some(data) = data else {
            return Ok(None);
        };
        if !intact(hash, &data) {
            return err(libc::EIO);
        }
        Ok(Some(data))
    }

    /// The chunks of `hashes`, verified: from this node's store as it is
    /// now (one may have arrived since a reader's snapshot), the others
    /// from peers, up to `FETCHES_AT_ONCE` at a time rather than a round
    /// trip each. Those that no reachable peer has are left out.
    fn bring(&self, hashes: &[Hash]) -> Result<HashMap<Hash, Vec<u8>>> {
        let mut found = HashMap::new();
        let mut wanted = Vec::new();
        for hash in hashes {
            match self.get_here(hash, None)? {
                Some(data) => {
                    found.insert(*hash, data);
                }
                None if !wanted.contains(hash) => wanted.push(*hash),
                None => {}
            }
        }
        for group in wanted.chunks(FETCHES_AT_ONCE) {
            let fetched: Vec<(Hash, Option<Vec<u8>>)> = match group {
                [one] => vec![(*one, self.fetch(one))],
                _ => std::thread::scope(|scope| {
                    let calls: Vec<_> = (group.iter())
                        .map(|h| scope.spawn(move || (*h, self.fetch(h))))
                        .collect();
                    calls.into_iter().filter_map(|c| c.join().ok()).collect()
                }),
            };
            found.extend(fetched.into_iter().filter_map(|(h, d)| Some((h, d?))));
        }
        Ok(found)
    }

    /// The error of a read that needs a chunk no one can give it, logged.
    fn missing(&self, hash: &Hash) -> Errno {
        if let Some(held) = self.missing_logged.admit() {
            tracing::error!(
                "chunk {} is missing here and no reachable peer has it: reads of it fail \
                 with EIO until a node that has it is back{}",
                hex(hash),
                held_back(held)
            );
        }
        Errno(libc::EIO)
    }

    /// A missing chunk from a peer (verified by the source), stored unless
    /// this node keeps no contents (a witness).
    fn fetch(&self, hash: &Hash) -> Option<Vec<u8>> {
        let data = self.source.get()?.fetch(hash)?;
        if self.keep_fetched.load(std::sync::atomic::Ordering::Relaxed) {
            if let Err(e) = self.put_hashed([(hash, &data[..])]) {
                tracing::warn!("storing fetched chunk {}: {e:?}", hex(hash));
            }
        }
        Some(data)
    }

    /// Deletes the flagged chunks that no file references and no pending
    /// write holds; returns how many were deleted.
    pub fn collect(&self, namespace: &Namespace) -> Result<usize> {
        let mut deleted = 0;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut after = None;
        loop {
            // In steps: an `rm -rf` of a big tree flags a million chunks.
            let step = namespace.garbage_chunks_after(after.as_ref(), COLLECT_STEP)?;
            let Some((last, _)) = step.last() else {
                return Ok(deleted);
            };
            after = Some(*last);
            for (hash, flagged) in step {
                if flagged + ARRIVAL_GRACE_SECS > now {
                    continue;
                }
                let pins = self.pins.lock();
                if pins.contains_key(&hash) {
                    continue;
                }
                if namespace.chunk_refcount(&hash)? == 0 {
                    self.store.db().delete_cf(self.store.cf(CF_CHUNKS), hash)?;
                    deleted += 1;
                }
                namespace.clear_garbage(&hash)?;
                drop(pins);
            }
        }
    }

    /// Number of chunks stored (an estimate from RocksDB).
    pub fn count_estimate(&self) -> u64 {
        self.store
            .db()
            .property_int_value_cf(self.store.cf(CF_CHUNKS), "rocksdb.estimate-num-keys")
            .ok()
            .flatten()
            .unwrap_or(0)
    }
}

/// Whether a chunk read from this node's store has the bytes its `hash`
/// names; one that does not is logged.
fn intact(hash: &[u8], data: &[u8]) -> bool {
    let ok = blake3::hash(data).as_bytes() == hash;
    if !ok {
        tracing::error!(
            "chunk {} fails its hash check: the store is corrupt here",
            hex(hash)
        );
    }
    ok
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
