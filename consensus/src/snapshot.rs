//! Snapshots: the namespace at one applied index, as a file, so a node that
//! is missing log entries the leader has compacted away (a new node, or one
//! that was down for long) catches up from the state instead of the log.
//!
//! The leader writes the file when raft-rs asks for a snapshot; the Raft
//! message carries only a `SnapshotRef` (index, size, hash). The receiving
//! node fetches the file in pieces over the peer transport, checks its
//! hash, and only then hands the message to its Raft node, which installs
//! it (`install`). File contents (chunks) are not in it: the node pulls the
//! chunks the new namespace references like any others.
//!
//! File format: records `u32 key length, key, u32 value length, value` for
//! every key of the `meta` column family except node-local ones (`g`
//! garbage hints), in key order.

use std::fs;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use rocksdb::{IteratorMode, WriteBatch};
use wpfs_proto::SnapshotRef;

use crate::store::{Store, CF_META};

/// Pieces in which a snapshot file travels.
pub const PIECE_SIZE: u64 = 1 << 20;
/// Keys of the meta column family that only make sense on this node.
const LOCAL_TAGS: &[u8] = b"g";
/// Marks a store whose snapshot install was interrupted (see `Node::start`).
pub const KEY_INSTALLING: &[u8] = b"installing";
const BATCH_KEYS: usize = 10_000;

pub fn dir(store: &Store) -> PathBuf {
    let db = store.path();
    db.parent().unwrap_or(db).join("snapshots")
}

pub fn outgoing(store: &Store, index: u64) -> PathBuf {
    dir(store).join(format!("snap-{index}.bin"))
}

pub fn incoming(store: &Store, index: u64) -> PathBuf {
    dir(store).join(format!("incoming-{index}.bin"))
}

/// The newest outgoing snapshot file, if one exists: its index and path.
pub fn latest(store: &Store) -> Option<(u64, PathBuf)> {
    fs::read_dir(dir(store))
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let index = name
                .strip_prefix("snap-")?
                .strip_suffix(".bin")?
                .parse()
                .ok()?;
            Some((index, e.path()))
        })
        .max_by_key(|(i, _)| *i)
}

/// Writes the namespace as it is now (applied up to `index`) to a file and
/// returns its reference. Older snapshot files are removed.
pub fn build(store: &Store, index: u64) -> std::io::Result<SnapshotRef> {
    fs::create_dir_all(dir(store))?;
    let path = outgoing(store, index);
    let tmp = path.with_extension("tmp");
    let mut out = BufWriter::new(HashingWriter::new(fs::File::create(&tmp)?));
    let iter = store
        .db()
        .iterator_cf(store.cf(CF_META), IteratorMode::Start);
    for item in iter {
        let (k, v) = item.map_err(std::io::Error::other)?;
        if LOCAL_TAGS.contains(&k[0]) || &*k == KEY_INSTALLING {
            continue;
        }
        out.write_all(&(k.len() as u32).to_be_bytes())?;
        out.write_all(&k)?;
        out.write_all(&(v.len() as u32).to_be_bytes())?;
        out.write_all(&v)?;
    }
    let hashing = out.into_inner().map_err(|e| e.into_error())?;
    let (file, size, hash) = hashing.finish();
    file.sync_all()?;
    fs::rename(&tmp, &path)?;
    for entry in fs::read_dir(dir(store))?.flatten() {
        if entry.path() != path && entry.file_name().to_string_lossy().starts_with("snap-") {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(SnapshotRef {
        index,
        size,
        hash: hash.to_vec(),
    })
}

/// The piece of outgoing snapshot `index` starting at `offset`.
pub fn read_piece(store: &Store, index: u64, offset: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Seek, SeekFrom};
    let mut f = fs::File::open(outgoing(store, index))?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::with_capacity(PIECE_SIZE as usize);
    f.take(PIECE_SIZE).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Checks that `path` holds exactly the snapshot `want` describes.
pub fn verify(path: &Path, want: &SnapshotRef) -> std::io::Result<bool> {
    let mut f = fs::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let size = std::io::copy(&mut f, &mut hasher)?;
    Ok(size == want.size && hasher.finalize().as_bytes()[..] == want.hash[..])
}

/// Replaces the namespace with the snapshot in `path`. The store is marked
/// while this runs, so a crash halfway is noticed at the next start
/// (`clear_interrupted`) instead of leaving a half-old, half-new namespace.
pub fn install(store: &Store, path: &Path) -> std::io::Result<()> {
    let db = store.db();
    let cf = store.cf(CF_META);
    db.put_cf(cf, KEY_INSTALLING, b"")
        .map_err(std::io::Error::other)?;
    clear_namespace(store)?;
    let mut input = BufReader::new(fs::File::open(path)?);
    let mut batch = WriteBatch::default();
    while let Some(key) = read_field(&mut input)? {
        let value = read_field(&mut input)?.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "snapshot cut short")
        })?;
        batch.put_cf(cf, key, value);
        if batch.len() >= BATCH_KEYS {
            db.write(std::mem::take(&mut batch))
                .map_err(std::io::Error::other)?;
        }
    }
    batch.delete_cf(cf, KEY_INSTALLING);
    db.write(batch).map_err(std::io::Error::other)?;
    let _ = fs::remove_file(path);
    Ok(())
}

/// Whether a snapshot install was interrupted by a crash.
pub fn interrupted(store: &Store) -> bool {
    matches!(
        store.db().get_cf(store.cf(CF_META), KEY_INSTALLING),
        Ok(Some(_))
    )
}

/// Empties the namespace (keeping node-local keys), key by key: a range
/// delete would slow every later read of the namespace.
pub fn clear_namespace(store: &Store) -> std::io::Result<()> {
    let db = store.db();
    let cf = store.cf(CF_META);
    let mut batch = WriteBatch::default();
    for item in db.iterator_cf(cf, IteratorMode::Start) {
        let (k, _) = item.map_err(std::io::Error::other)?;
        if LOCAL_TAGS.contains(&k[0]) || &*k == KEY_INSTALLING {
            continue;
        }
        batch.delete_cf(cf, k);
        if batch.len() >= BATCH_KEYS {
            db.write(std::mem::take(&mut batch))
                .map_err(std::io::Error::other)?;
        }
    }
    db.write(batch).map_err(std::io::Error::other)
}

fn read_field(input: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    input.read_exact(&mut buf)?;
    Ok(Some(buf))
}

/// A writer that hashes and counts what passes through it.
struct HashingWriter {
    file: fs::File,
    hasher: blake3::Hasher,
    size: u64,
}

impl HashingWriter {
    fn new(file: fs::File) -> Self {
        HashingWriter {
            file,
            hasher: blake3::Hasher::new(),
            size: 0,
        }
    }

    fn finish(self) -> (fs::File, u64, [u8; 32]) {
        (self.file, self.size, *self.hasher.finalize().as_bytes())
    }
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}
