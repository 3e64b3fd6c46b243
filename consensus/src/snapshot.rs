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
//! Installing one writes the difference to what the node has (keys
//! deleted, written, rewritten; a node back from a short outage changes
//! little) into an SST file, walking the snapshot file and the node's
//! namespace side by side, and ingests that file into RocksDB in one step.
//! Readers (FUSE lookups on this node go straight to the store) see the
//! old namespace or the new one, never a half-written mix (the fault suite
//! caught an install in several batches answering ENOENT for files that
//! existed). Memory stays flat whatever the namespace's size: the walk
//! holds two records, the SST writer one block and its index, where a
//! write batch held every changed key, and then the memtable held them
//! again. `raft_log::apply_snapshot` ties the ingest to the log's new
//! state so that a crash leaves the node wholly before or after it.
//!
//! File format: records `u32 key length, key, u32 value length, value` for
//! every key of the `meta` column family except node-local ones (`g`
//! garbage hints), in key order.

use std::fs;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use std::cmp::Ordering;

use rocksdb::{IngestExternalFileOptions, IteratorMode, SstFileWriter};
use wpfs_proto::SnapshotRef;

use crate::store::{self, Store, CF_META};

/// Pieces in which a snapshot file travels.
pub const PIECE_SIZE: u64 = 1 << 20;
/// Keys of the meta column family that only make sense on this node.
const LOCAL_TAGS: &[u8] = b"g";

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

/// Removes the incoming files that interrupted downloads left behind (a
/// node killed mid-download). One download runs at a time, so when one
/// starts, every incoming file is such a leftover.
pub fn clear_incoming(store: &Store) {
    for entry in fs::read_dir(dir(store)).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with("incoming-") {
            let _ = fs::remove_file(entry.path());
        }
    }
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
        if is_local(&k) {
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

/// Turns this node's namespace into the snapshot in `path` (see the
/// module comment); returns how many keys changed.
pub fn install(store: &Store, path: &Path) -> std::io::Result<usize> {
    let sst = dir(store).join("install.sst");
    let changed = changes(store, path, &sst)?;
    if changed > 0 {
        let mut opts = IngestExternalFileOptions::default();
        // Same file system: RocksDB links the file in, no copy.
        opts.set_move_files(true);
        store
            .db()
            .ingest_external_file_cf_opts(store.cf(CF_META), &opts, vec![&sst])
            .map_err(std::io::Error::other)?;
    }
    let _ = fs::remove_file(&sst);
    Ok(changed)
}

/// Writes into the SST file `sst` what turns this node's namespace into
/// the snapshot in `path`, and returns how many keys that changes: the two
/// sorted sequences (store and file) are walked side by side; keys only
/// here become deletions, keys new or different in the file are written.
/// No file is written when nothing changes (RocksDB refuses an empty one).
fn changes(store: &Store, path: &Path, sst: &Path) -> std::io::Result<usize> {
    let mut file = BufReader::new(fs::File::open(path)?);
    let mut here = store
        .db()
        .iterator_cf(store.cf(CF_META), IteratorMode::Start)
        .filter(|item| item.as_ref().map_or(true, |(k, _)| !is_local(k)));
    let mut next_here = || here.next().transpose().map_err(std::io::Error::other);
    let mut have = next_here()?;
    let mut want = read_record(&mut file)?;
    let options = store::sst_options();
    let mut out = LazySst {
        writer: SstFileWriter::create(&options),
        path: sst,
        opened: false,
    };
    let mut changed = 0;
    loop {
        let order = match (&have, &want) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((k, _)), Some((w, _))) => (**k).cmp(&w[..]),
        };
        match order {
            Ordering::Less => {
                out.get()?
                    .delete(&have.as_ref().expect("ordered").0)
                    .map_err(std::io::Error::other)?;
                changed += 1;
                have = next_here()?;
            }
            Ordering::Greater => {
                let (k, v) = want.take().expect("ordered");
                out.get()?.put(k, v).map_err(std::io::Error::other)?;
                changed += 1;
                want = read_record(&mut file)?;
            }
            Ordering::Equal => {
                let ((_, old), (k, new)) =
                    (have.take().expect("ordered"), want.take().expect("ordered"));
                if *old != new[..] {
                    out.get()?.put(k, new).map_err(std::io::Error::other)?;
                    changed += 1;
                }
                have = next_here()?;
                want = read_record(&mut file)?;
            }
        }
    }
    if out.opened {
        out.writer.finish().map_err(std::io::Error::other)?;
    }
    Ok(changed)
}

/// An SST writer whose file is created at the first key.
struct LazySst<'a> {
    writer: SstFileWriter<'a>,
    path: &'a Path,
    opened: bool,
}

impl<'a> LazySst<'a> {
    fn get(&mut self) -> std::io::Result<&mut SstFileWriter<'a>> {
        if !self.opened {
            self.writer
                .open(self.path)
                .map_err(|e| std::io::Error::other(format!("{}: {e}", self.path.display())))?;
            self.opened = true;
        }
        Ok(&mut self.writer)
    }
}

/// Keys that only make sense on this node: never in a snapshot, never
/// replaced by one.
fn is_local(key: &[u8]) -> bool {
    key.first().is_some_and(|tag| LOCAL_TAGS.contains(tag))
}

/// The next `(key, value)` record of a snapshot file.
fn read_record(input: &mut impl Read) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let Some(key) = read_field(input)? else {
        return Ok(None);
    };
    let value = read_field(input)?.ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "snapshot cut short")
    })?;
    Ok(Some((key, value)))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `meta` key and value, as text.
    fn keys(store: &Store) -> Vec<(String, String)> {
        store
            .db()
            .iterator_cf(store.cf(CF_META), IteratorMode::Start)
            .map(|kv| {
                let (k, v) = kv.unwrap();
                (
                    String::from_utf8_lossy(&k).into(),
                    String::from_utf8_lossy(&v).into(),
                )
            })
            .collect()
    }

    fn store_with(dir: &Path, pairs: &[(&str, &str)]) -> Store {
        let store = Store::open(dir, true).unwrap();
        for (k, v) in pairs {
            store.db().put_cf(store.cf(CF_META), k, v).unwrap();
        }
        store
    }

    #[test]
    fn installing_writes_only_the_difference_and_keeps_local_keys() {
        let dir = tempfile::tempdir().unwrap();
        let leader = store_with(
            &dir.path().join("leader/db"),
            &[
                ("a", "1"),
                ("c", "3"),
                ("d", "new"),
                ("f", "6"),
                ("g1", "leader's"),
            ],
        );
        let snap = build(&leader, 7).unwrap();
        let follower = store_with(
            &dir.path().join("follower/db"),
            &[
                ("b", "gone"),
                ("c", "3"),
                ("d", "old"),
                ("e", "gone"),
                ("g2", "mine"),
            ],
        );
        fs::create_dir_all(super::dir(&follower)).unwrap();
        let changed = install(&follower, &outgoing(&leader, snap.index)).unwrap();
        // a and f written, d rewritten, b and e deleted; c untouched.
        assert_eq!(changed, 5);
        let want: Vec<(String, String)> = [
            ("a", "1"),
            ("c", "3"),
            ("d", "new"),
            ("f", "6"),
            ("g2", "mine"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let got = keys(&follower);
        assert_eq!(got, want);
    }
}
