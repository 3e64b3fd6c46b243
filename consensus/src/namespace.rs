//! The namespace state machine: inodes, directory entries and the chunk
//! slots of every file, in the store's `meta` column family.
//!
//! Every node applies the same Raft log to it, so it must be deterministic:
//! a command carries everything it needs (names, modes, owners, the
//! writer's clock) and the state machine allocates inode numbers itself,
//! in order, to commands and to `Reserve`s (a range a node then hands to
//! the files it creates without waiting: they are born with their first
//! contents, in one command).
//! An illegal command (rmdir of a non-empty directory, a rename into its
//! own subtree…) changes nothing and returns the errno as its outcome,
//! which the proposing node hands back to the syscall.
//!
//! Each command is applied as one RocksDB batch that also records the
//! applied index, so a crash leaves the namespace at an entry boundary and
//! replay resumes exactly after it.
//!
//! Key layout (all integers big-endian, so scans are in numeric order):
//!
//! | key                          | value                               |
//! |------------------------------|-------------------------------------|
//! | `i` ino                      | `Inode`                             |
//! | `d` parent name              | `DirEntry` (ino, cookie, kind)      |
//! | `c` parent cookie            | name: readdir order, stable offsets |
//! | `k` ino index                | chunk slot: hash (32) + len (4)     |
//! | `r` hash                     | reference count of a chunk          |
//! | `g` hash                     | chunk whose count fell to zero      |
//! | `o` ino                      | orphan: unlinked but still open     |
//! | `m` node id                  | `Member`: peer address, witness     |
//! | `q` node id                  | ids of that node's recent commands: repeats are dropped |
//! | `sapplied` / `snext_ino` / `sinodes` | counters                    |

use std::collections::HashMap;

use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};
use wpfs_proto::{
    ChunkRef, Command, DirEntry, FileKind, Inode, Member, Message, Op, Outcome, Xattr,
};

use crate::store::{be, read_be, Store, CF_META};

pub const ROOT_INO: u64 = 1;
/// Files are cut into chunks of this size; slot `i` holds bytes
/// `[i*CHUNK_SIZE, (i+1)*CHUNK_SIZE)`.
pub const CHUNK_SIZE: u64 = 64 * 1024;
pub const NAME_MAX: usize = 255;
/// First readdir cookie of a directory's entries; 1 and 2 are "." and "..".
const FIRST_COOKIE: u64 = 3;
const LINK_MAX: u32 = 65_000;
/// Directory entries `read_dir` reads in its first batch, and at most.
const READ_DIR_FIRST_BATCH: usize = 8;
const READ_DIR_MAX_BATCH: usize = 256;
/// The most numbers one `Reserve` hands out.
pub const RESERVE_MAX: u64 = 1 << 20;

const KEY_APPLIED: &[u8] = b"sapplied";
const KEY_NEXT_INO: &[u8] = b"snext_ino";
const KEY_INODES: &[u8] = b"sinodes";

/// A chunk's BLAKE3 hash.
pub type Hash = [u8; 32];

/// Why a command or a read failed: an errno for the caller, or the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("errno {0}")]
    Errno(i32),
    #[error("store: {0}")]
    Store(#[from] rocksdb::Error),
    #[error("corrupt record {key:?}: {reason}")]
    Corrupt { key: Vec<u8>, reason: String },
}

pub type Result<T> = std::result::Result<T, Error>;

fn errno<T>(e: i32) -> Result<T> {
    Err(Error::Errno(e))
}

pub fn inode_key(ino: u64) -> Vec<u8> {
    key(b'i', &[&be(ino)])
}
fn dentry_key(parent: u64, name: &[u8]) -> Vec<u8> {
    key(b'd', &[&be(parent), name])
}
fn cookie_key(parent: u64, cookie: u64) -> Vec<u8> {
    key(b'c', &[&be(parent), &be(cookie)])
}
fn slot_key(ino: u64, index: u64) -> Vec<u8> {
    key(b'k', &[&be(ino), &be(index)])
}
fn ref_key(hash: &[u8]) -> Vec<u8> {
    key(b'r', &[hash])
}
fn garbage_key(hash: &[u8]) -> Vec<u8> {
    key(b'g', &[hash])
}
fn orphan_key(ino: u64) -> Vec<u8> {
    key(b'o', &[&be(ino)])
}
/// The chunk hash in a `g` or `r` key.
fn hash_in(key: &[u8]) -> Hash {
    let mut h = [0u8; 32];
    h.copy_from_slice(&key[1..33]);
    h
}

fn requests_key(node: u64) -> Vec<u8> {
    key(b'q', &[&be(node)])
}
fn member_key(id: u64) -> Vec<u8> {
    key(b'm', &[&be(id)])
}
fn key(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len()).sum::<usize>());
    k.push(tag);
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

/// A chunk slot as stored: the hash and how many bytes of the slot it holds.
fn encode_slot(hash: &[u8], len: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(36);
    v.extend_from_slice(hash);
    v.extend_from_slice(&len.to_be_bytes());
    v
}

fn decode_slot(index: u64, v: &[u8]) -> ChunkRef {
    let len = u32::from_be_bytes([v[32], v[33], v[34], v[35]]);
    ChunkRef {
        index,
        hash: v[..32].to_vec(),
        len,
    }
}

fn decode<M: Message + Default>(key: &[u8], bytes: &[u8]) -> Result<M> {
    M::decode(bytes).map_err(|e| Error::Corrupt {
        key: key.to_vec(),
        reason: e.to_string(),
    })
}

/// The namespace of one node, read by the filesystem and written only by
/// the Raft driver's apply loop.
#[derive(Clone)]
pub struct Namespace {
    store: Store,
}

impl Namespace {
    pub fn new(store: Store) -> Namespace {
        Namespace { store }
    }

    /// Creates the root directory of a new filesystem.
    pub fn bootstrap(store: &Store, now_ns: i64, uid: u32, gid: u32) -> Result<()> {
        let root = Inode {
            ino: ROOT_INO,
            kind: FileKind::Directory as i32,
            mode: 0o755,
            uid,
            gid,
            atime_ns: now_ns,
            mtime_ns: now_ns,
            ctime_ns: now_ns,
            crtime_ns: now_ns,
            nlink: 2,
            parent: ROOT_INO,
            next_cookie: FIRST_COOKIE,
            ..Default::default()
        };
        let cf = store.cf(CF_META);
        let mut batch = WriteBatch::default();
        batch.put_cf(cf, inode_key(ROOT_INO), root.encode_to_vec());
        batch.put_cf(cf, KEY_NEXT_INO, be(ROOT_INO + 1));
        batch.put_cf(cf, KEY_INODES, be(1));
        // The bootstrap is the snapshot at index 1 (see `raft_log`).
        batch.put_cf(cf, KEY_APPLIED, applied_value(1, 1));
        store.db().write(batch)?;
        Ok(())
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn get(&self, key: &[u8]) -> Result<Option<rocksdb::DBPinnableSlice<'_>>> {
        Ok(self.store.db().get_pinned_cf(self.store.cf(CF_META), key)?)
    }

    fn counter(&self, key: &[u8]) -> Result<u64> {
        Ok(self.get(key)?.map(|v| read_be(&v)).unwrap_or(0))
    }

    /// The index and term of the last applied log entry.
    pub fn applied(&self) -> Result<(u64, u64)> {
        Ok(match self.get(KEY_APPLIED)? {
            Some(v) => (read_be(&v[..8]), read_be(&v[8..16])),
            None => (0, 0),
        })
    }

    pub fn inode_count(&self) -> Result<u64> {
        self.counter(KEY_INODES)
    }

    pub fn inode(&self, ino: u64) -> Result<Option<Inode>> {
        let key = inode_key(ino);
        self.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<DirEntry>> {
        if name.len() > NAME_MAX {
            return errno(libc::ENAMETOOLONG);
        }
        let key = dentry_key(parent, name);
        self.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    /// Calls `f(cookie, name, entry)` for the entries of `dir` whose cookie
    /// is above `after`, in cookie order, until `f` returns false.
    ///
    /// The cookie records give the names; their directory entries are read
    /// in batches with one sorted `MultiGet` each, which shares the index
    /// and filter lookups a point read per name repeats (`find` of 1M files:
    /// most of the daemon's CPU was those reads). Batches start small, as a
    /// caller often wants one entry (is the directory empty?), and grow.
    pub fn read_dir(
        &self,
        dir: u64,
        after: u64,
        mut f: impl FnMut(u64, &[u8], DirEntry) -> bool,
    ) -> Result<()> {
        let prefix = key(b'c', &[&be(dir)]);
        let start = cookie_key(dir, after.saturating_add(1).max(FIRST_COOKIE));
        let cf = self.store.cf(CF_META);
        let mut iter = self
            .store
            .db()
            .iterator_cf(cf, IteratorMode::From(&start, Direction::Forward));
        let (mut batch, mut size, mut last) = (Vec::new(), READ_DIR_FIRST_BATCH, false);
        while !last {
            batch.clear();
            while batch.len() < size {
                match iter.next().transpose()? {
                    Some((k, name)) if k.starts_with(&prefix) => {
                        batch.push((read_be(&k[9..]), name))
                    }
                    _ => {
                        last = true;
                        break;
                    }
                }
            }
            if batch.is_empty() {
                break;
            }
            size = (size * 2).min(READ_DIR_MAX_BATCH);
            for (cookie, name, entry) in self.entries_named(dir, &batch)? {
                if !f(cookie, name, entry) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// The directory entries of `names` (cookie, name) in `dir`, in the
    /// order given, without those removed since their cookie was read.
    fn entries_named<'a>(
        &self,
        dir: u64,
        names: &'a [(u64, Box<[u8]>)],
    ) -> Result<Vec<(u64, &'a [u8], DirEntry)>> {
        let mut order: Vec<usize> = (0..names.len()).collect();
        order.sort_by(|&a, &b| names[a].1.cmp(&names[b].1));
        let keys: Vec<Vec<u8>> = order
            .iter()
            .map(|&i| dentry_key(dir, &names[i].1))
            .collect();
        let values = (self.store.db()).batched_multi_get_cf(self.store.cf(CF_META), &keys, true);
        let mut found = vec![None; names.len()];
        for ((&i, key), value) in order.iter().zip(&keys).zip(values) {
            if let Some(v) = value? {
                found[i] = Some(decode::<DirEntry>(key, &v)?);
            }
        }
        Ok((names.iter().zip(found))
            .filter_map(|((cookie, name), entry)| Some((*cookie, &name[..], entry?)))
            .collect())
    }

    /// The chunk slots of `ino` with index in `[first, last]`, read from
    /// `snapshot` (a consistent view) when given.
    pub fn chunk_slots(
        &self,
        ino: u64,
        first: u64,
        last: u64,
        snapshot: Option<&rocksdb::Snapshot<'_>>,
    ) -> Result<Vec<ChunkRef>> {
        let mut opts = ReadOptions::default();
        if let Some(s) = snapshot {
            opts.set_snapshot(s);
        }
        opts.set_iterate_upper_bound(slot_key(ino, last.saturating_add(1)));
        let start = slot_key(ino, first);
        let cf = self.store.cf(CF_META);
        let iter = self.store.db().iterator_cf_opt(
            cf,
            opts,
            IteratorMode::From(&start, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item?;
            if k.len() != 17 || k[0] != b'k' || read_be(&k[1..9]) != ino {
                break;
            }
            out.push(decode_slot(read_be(&k[9..]), &v));
        }
        Ok(out)
    }

    pub fn chunk_refcount(&self, hash: &[u8]) -> Result<u64> {
        self.counter(&ref_key(hash))
    }

    /// Inodes unlinked while open, to be reaped once no handle holds them.
    pub fn orphans(&self) -> Result<Vec<u64>> {
        self.scan_tag(b'o', |k, _| Ok(read_be(&k[1..])))
    }

    /// Up to `limit` of the chunks whose reference count fell to zero (or
    /// that arrived before anything referenced them) and may be collected,
    /// in hash order after `after`, each with the time it was flagged
    /// (seconds since the epoch; 0 when unknown).
    pub fn garbage_chunks_after(
        &self,
        after: Option<&Hash>,
        limit: usize,
    ) -> Result<Vec<(Hash, u64)>> {
        self.scan_tag_after(b'g', after.map(|h| garbage_key(h)), limit, |k, v| {
            Ok((hash_in(k), if v.len() == 8 { read_be(v) } else { 0 }))
        })
    }

    /// Forgets a garbage candidate once it has been collected or revived.
    pub fn clear_garbage(&self, hash: &[u8]) -> Result<()> {
        Ok(self
            .store
            .db()
            .delete_cf(self.store.cf(CF_META), garbage_key(hash))?)
    }

    /// The keys with one tag, bounded above: without the bound the
    /// iterator would walk every deleted key after the last live one (a
    /// long run after many chunks are freed) just to find the end.
    fn tag_iter(&self, tag: u8) -> rocksdb::DBIteratorWithThreadMode<'_, rocksdb::DB> {
        self.tag_iter_from(tag, &[tag])
    }

    /// The keys with `tag` from key `from` on.
    fn tag_iter_from(
        &self,
        tag: u8,
        from: &[u8],
    ) -> rocksdb::DBIteratorWithThreadMode<'_, rocksdb::DB> {
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(vec![tag + 1]);
        self.store.db().iterator_cf_opt(
            self.store.cf(CF_META),
            opts,
            IteratorMode::From(from, Direction::Forward),
        )
    }

    /// `f(key, value)` for up to `limit` keys with `tag` past key `after`
    /// (from the first when None), in key order: a scan a step at a time,
    /// where one of every key could be millions.
    fn scan_tag_after<T>(
        &self,
        tag: u8,
        after: Option<Vec<u8>>,
        limit: usize,
        f: impl Fn(&[u8], &[u8]) -> Result<T>,
    ) -> Result<Vec<T>> {
        let from = match after {
            Some(mut key) => {
                key.push(0); // the first key past `after`
                key
            }
            None => vec![tag],
        };
        self.tag_iter_from(tag, &from)
            .take(limit)
            .map(|item| {
                let (k, v) = item?;
                f(&k, &v)
            })
            .collect()
    }

    /// `f(key, value)` for every key with `tag`, in key order.
    fn scan_tag<T>(&self, tag: u8, f: impl Fn(&[u8], &[u8]) -> Result<T>) -> Result<Vec<T>> {
        let mut out = Vec::new();
        for item in self.tag_iter(tag) {
            let (k, v) = item?;
            out.push(f(&k, &v)?);
        }
        Ok(out)
    }

    /// Records that log entry `index` carried no namespace change (an empty
    /// entry after an election, a membership change).
    pub fn apply_nothing(&self, index: u64, term: u64) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.store.cf(CF_META),
            KEY_APPLIED,
            applied_value(index, term),
        );
        self.store.db().write(batch)?;
        Ok(())
    }

    /// Records a membership change at log entry `index`: node `id` is
    /// `member` now, or gone (`None`).
    pub fn apply_member(
        &self,
        index: u64,
        term: u64,
        id: u64,
        member: Option<&Member>,
    ) -> Result<()> {
        let cf = self.store.cf(CF_META);
        let mut batch = WriteBatch::default();
        match member {
            Some(m) => batch.put_cf(cf, member_key(id), m.encode_to_vec()),
            None => batch.delete_cf(cf, member_key(id)),
        }
        batch.put_cf(cf, KEY_APPLIED, applied_value(index, term));
        self.store.db().write(batch)?;
        Ok(())
    }

    /// Every member: id, peer address, whether it is a witness.
    pub fn members(&self) -> Result<Vec<Member>> {
        self.scan_tag(b'm', decode)
    }

    /// Up to `limit` of the chunks the namespace references (the `r`
    /// counts), in hash order after `after` (from the first when None):
    /// a node checks which of them it holds a step at a time, never
    /// listing a million at once.
    pub fn referenced_chunks_after(&self, after: Option<&Hash>, limit: usize) -> Result<Vec<Hash>> {
        self.scan_tag_after(b'r', after.map(|h| ref_key(h)), limit, |k, _| {
            Ok(hash_in(k))
        })
    }

    /// Applies one command; the returned outcome is what the proposer's
    /// syscall gets. Only a store failure is an `Err`.
    /// A command applied twice (proposed again after a leader change that
    /// had in fact kept it) changes nothing the second time; its outcome
    /// is `None` and nobody waits for it.
    pub fn apply(&self, index: u64, term: u64, cmd: &Command) -> Result<Option<Outcome>> {
        self.apply_with(index, term, cmd, |_, _, _| {})
    }

    /// `apply`, with `also` adding to the command's write what the node
    /// stores along with it (one write instead of two). It is called before
    /// that write, with the inodes the command frees: until then the store
    /// still holds them.
    pub fn apply_with(
        &self,
        index: u64,
        term: u64,
        cmd: &Command,
        also: impl FnOnce(&Outcome, &[u64], &mut WriteBatch),
    ) -> Result<Option<Outcome>> {
        // The proposer's recent request ids, sorted; those below its oldest
        // waiting one cannot come again and are forgotten. One small value
        // per node: deleting a key per command would leave a trail of
        // tombstones for every later scan to walk.
        let seen_key = requests_key(cmd.node_id);
        let mut seen: Vec<u64> = self
            .get(&seen_key)?
            .map(|v| v.chunks_exact(8).map(read_be).collect())
            .unwrap_or_default();
        if seen.binary_search(&cmd.request_id).is_ok() {
            self.apply_nothing(index, term)?;
            return Ok(None);
        }
        seen.retain(|id| *id >= cmd.oldest_pending.min(cmd.request_id));
        let at = seen.partition_point(|id| *id < cmd.request_id);
        seen.insert(at, cmd.request_id);
        let mut txn = Txn::new(self, cmd.now_ns);
        let mut reserved = 0;
        let result = match &cmd.op {
            Some(Op::Create(c)) => txn.create(c),
            Some(Op::Link(l)) => txn.link(l),
            Some(Op::Unlink(u)) => txn.unlink(u).map(|_| None),
            Some(Op::Rename(r)) => txn.rename(r).map(|_| None),
            Some(Op::SetAttr(s)) => txn.set_attr(s),
            Some(Op::SetContent(s)) => txn.set_content(s),
            Some(Op::SetXattr(x)) => txn.set_xattr(x),
            Some(Op::RemoveXattr(x)) => txn.remove_xattr(x),
            Some(Op::Reap(r)) => txn.reap(r.ino).map(|_| None),
            Some(Op::Reserve(r)) => txn.reserve(r.count).map(|first| {
                reserved = first;
                None
            }),
            None => errno(libc::EINVAL),
        };
        let outcome = match result {
            Ok(inode) => {
                txn.finish()?;
                Outcome {
                    errno: 0,
                    inode,
                    reserved,
                }
            }
            Err(Error::Errno(e)) => Outcome {
                errno: e,
                inode: None,
                reserved: 0,
            },
            Err(other) => return Err(other),
        };
        // A failed command still consumes its log entry.
        let freed = if txn.ok {
            std::mem::take(&mut txn.freed)
        } else {
            Vec::new()
        };
        let mut batch = txn.batch_or_empty();
        let cf = self.store.cf(CF_META);
        batch.put_cf(cf, KEY_APPLIED, applied_value(index, term));
        let value: Vec<u8> = seen.iter().flat_map(|id| be(*id)).collect();
        batch.put_cf(cf, &seen_key, value);
        also(&outcome, &freed, &mut batch);
        self.store.db().write(batch)?;
        Ok(Some(outcome))
    }
}

fn applied_value(index: u64, term: u64) -> Vec<u8> {
    let mut v = be(index).to_vec();
    v.extend_from_slice(&be(term));
    v
}

fn is_kind(inode: &Inode, kind: FileKind) -> bool {
    inode.kind == kind as i32
}

/// The inode `c` creates in directory `parent`, numbered `ino`, at `now`.
/// Also how a node shows a file it has created but not yet proposed.
pub fn new_inode(c: &wpfs_proto::Create, parent: &Inode, ino: u64, now: i64) -> Inode {
    let is_dir = c.kind == FileKind::Directory as i32;
    let mut mode = c.mode & 0o7777;
    let mut gid = c.gid;
    // A setgid directory hands its group down, and its setgid bit to
    // subdirectories (as ext4 does).
    if parent.mode & libc::S_ISGID != 0 {
        gid = parent.gid;
        if is_dir {
            mode |= libc::S_ISGID;
        }
    }
    Inode {
        ino,
        kind: c.kind,
        mode,
        uid: c.uid,
        gid,
        size: if c.kind == FileKind::Symlink as i32 {
            c.symlink_target.len() as u64
        } else {
            0
        },
        atime_ns: now,
        mtime_ns: now,
        ctime_ns: now,
        crtime_ns: now,
        nlink: if is_dir { 2 } else { 1 },
        rdev: c.rdev,
        symlink_target: c.symlink_target.clone(),
        xattrs: vec![],
        parent: if is_dir { c.parent } else { 0 },
        next_cookie: if is_dir { FIRST_COOKIE } else { 0 },
    }
}

fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return errno(libc::ENAMETOOLONG);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return errno(libc::EINVAL);
    }
    Ok(())
}

/// The changes of one command: a batch plus a view of the inodes it has
/// already changed, so a command reads its own writes.
struct Txn<'a> {
    ns: &'a Namespace,
    batch: WriteBatch,
    inodes: HashMap<u64, Inode>,
    freed: Vec<u64>,
    refs: HashMap<Vec<u8>, i64>,
    inode_delta: i64,
    next_ino: Option<u64>,
    now: i64,
    ok: bool,
}

impl<'a> Txn<'a> {
    fn new(ns: &'a Namespace, now: i64) -> Self {
        Txn {
            ns,
            batch: WriteBatch::default(),
            inodes: HashMap::new(),
            freed: Vec::new(),
            refs: HashMap::new(),
            inode_delta: 0,
            next_ino: None,
            now,
            ok: false,
        }
    }

    fn cf(&self) -> &'a rocksdb::ColumnFamily {
        self.ns.store.cf(CF_META)
    }

    /// Inode `ino`. A number that no longer exists came from a node whose
    /// kernel had not yet heard of the deletion: ESTALE, so that a path
    /// syscall behind it looks its path up again (see `FsCore::getattr`).
    fn inode(&self, ino: u64) -> Result<Inode> {
        if self.freed.contains(&ino) {
            return errno(libc::ESTALE);
        }
        if let Some(i) = self.inodes.get(&ino) {
            return Ok(i.clone());
        }
        self.ns.inode(ino)?.ok_or(Error::Errno(libc::ESTALE))
    }

    fn dir(&self, ino: u64) -> Result<Inode> {
        let d = self.inode(ino)?;
        if !is_kind(&d, FileKind::Directory) {
            return errno(libc::ENOTDIR);
        }
        if d.nlink == 0 {
            return errno(libc::ENOENT); // being removed
        }
        Ok(d)
    }

    fn put(&mut self, inode: Inode) {
        self.inodes.insert(inode.ino, inode);
    }

    fn touch_dir(&mut self, mut dir: Inode) -> Inode {
        dir.mtime_ns = self.now;
        dir.ctime_ns = self.now;
        dir
    }

    fn add_entry(&mut self, dir: &mut Inode, name: &[u8], ino: u64, kind: i32) {
        let cookie = dir.next_cookie.max(FIRST_COOKIE);
        dir.next_cookie = cookie + 1;
        let entry = DirEntry { ino, cookie, kind };
        let (dk, ck) = (dentry_key(dir.ino, name), cookie_key(dir.ino, cookie));
        self.batch.put_cf(self.cf(), dk, entry.encode_to_vec());
        self.batch.put_cf(self.cf(), ck, name);
    }

    fn remove_entry(&mut self, dir: u64, name: &[u8], entry: &DirEntry) {
        let (dk, ck) = (dentry_key(dir, name), cookie_key(dir, entry.cookie));
        self.batch.delete_cf(self.cf(), dk);
        self.batch.delete_cf(self.cf(), ck);
    }

    fn entry(&self, dir: u64, name: &[u8]) -> Result<Option<DirEntry>> {
        self.ns.lookup(dir, name)
    }

    fn is_empty_dir(&self, dir: u64) -> Result<bool> {
        let mut empty = true;
        self.ns.read_dir(dir, 0, |_, _, _| {
            empty = false;
            false
        })?;
        Ok(empty)
    }

    /// The lowest inode number never handed out.
    fn next_free(&self) -> Result<u64> {
        Ok(match self.next_ino {
            Some(n) => n,
            None => self.ns.counter(KEY_NEXT_INO)?.max(ROOT_INO + 1),
        })
    }

    /// Hands out `count` numbers in a row; returns the first.
    fn reserve(&mut self, count: u64) -> Result<u64> {
        if count == 0 || count > RESERVE_MAX {
            return errno(libc::EINVAL);
        }
        let first = self.next_free()?;
        self.next_ino = Some(first + count);
        Ok(first)
    }

    /// The number of a new inode: the one its proposer reserved, if any.
    fn new_ino(&mut self, reserved: u64) -> Result<u64> {
        if reserved == 0 {
            return self.reserve(1);
        }
        // Reserved numbers are below the counter and used once; anything
        // else is a bug or garbage, and must not overwrite an inode.
        if reserved <= ROOT_INO
            || reserved >= self.next_free()?
            || self.inodes.contains_key(&reserved)
            || self.ns.inode(reserved)?.is_some()
        {
            return errno(libc::EINVAL);
        }
        Ok(reserved)
    }

    fn create(&mut self, c: &wpfs_proto::Create) -> Result<Option<Inode>> {
        check_name(&c.name)?;
        let mut parent = self.dir(c.parent)?;
        if let Some(existing) = self.entry(c.parent, &c.name)? {
            let existing = self.inode(existing.ino)?;
            if !c.exclusive
                && c.kind == FileKind::Regular as i32
                && is_kind(&existing, FileKind::Regular)
            {
                return Ok(Some(existing));
            }
            return errno(libc::EEXIST);
        }
        let kind = FileKind::try_from(c.kind).map_err(|_| Error::Errno(libc::EINVAL))?;
        if kind == FileKind::KindUnspecified {
            return errno(libc::EINVAL);
        }
        let is_dir = kind == FileKind::Directory;
        if is_dir && parent.nlink >= LINK_MAX {
            return errno(libc::EMLINK);
        }
        let at = if c.created_ns != 0 {
            c.created_ns
        } else {
            self.now
        };
        let inode = new_inode(c, &parent, self.new_ino(c.ino)?, at);
        let ino = inode.ino;
        self.add_entry(&mut parent, &c.name, ino, kind as i32);
        if is_dir {
            parent.nlink += 1;
        }
        let parent = self.touch_dir(parent);
        self.put(parent);
        self.put(inode.clone());
        self.inode_delta += 1;
        Ok(Some(inode))
    }

    fn link(&mut self, l: &wpfs_proto::Link) -> Result<Option<Inode>> {
        check_name(&l.new_name)?;
        let mut target = self.inode(l.ino)?;
        if is_kind(&target, FileKind::Directory) {
            return errno(libc::EPERM);
        }
        if target.nlink == 0 {
            return errno(libc::ENOENT);
        }
        if target.nlink >= LINK_MAX {
            return errno(libc::EMLINK);
        }
        let mut parent = self.dir(l.new_parent)?;
        if self.entry(l.new_parent, &l.new_name)?.is_some() {
            return errno(libc::EEXIST);
        }
        self.add_entry(&mut parent, &l.new_name, l.ino, target.kind);
        let parent = self.touch_dir(parent);
        self.put(parent);
        target.nlink += 1;
        target.ctime_ns = self.now;
        self.put(target.clone());
        Ok(Some(target))
    }

    fn unlink(&mut self, u: &wpfs_proto::Unlink) -> Result<()> {
        let mut parent = self.dir(u.parent)?;
        let entry = self
            .entry(u.parent, &u.name)?
            .ok_or(Error::Errno(libc::ENOENT))?;
        let target = self.inode(entry.ino)?;
        let target_is_dir = is_kind(&target, FileKind::Directory);
        if u.directory {
            if !target_is_dir {
                return errno(libc::ENOTDIR);
            }
            if !self.is_empty_dir(target.ino)? {
                return errno(libc::ENOTEMPTY);
            }
            parent.nlink -= 1;
        } else if target_is_dir {
            return errno(libc::EISDIR);
        }
        self.remove_entry(u.parent, &u.name, &entry);
        let parent = self.touch_dir(parent);
        self.put(parent);
        self.drop_link(target, u.keep_if_open)
    }

    /// One name of `inode` is gone: count it down, and free the inode with
    /// its last name unless it must outlive it as an open orphan.
    fn drop_link(&mut self, mut inode: Inode, keep_if_open: bool) -> Result<()> {
        inode.nlink = if is_kind(&inode, FileKind::Directory) {
            0
        } else {
            inode.nlink.saturating_sub(1)
        };
        inode.ctime_ns = self.now;
        if inode.nlink > 0 {
            self.put(inode);
        } else if keep_if_open {
            let k = orphan_key(inode.ino);
            self.batch.put_cf(self.cf(), k, b"");
            self.put(inode);
        } else {
            self.free(inode.ino)?;
        }
        Ok(())
    }

    fn free(&mut self, ino: u64) -> Result<()> {
        self.drop_slots(ino, 0)?;
        self.inodes.remove(&ino);
        self.freed.push(ino);
        let (ik, ok) = (inode_key(ino), orphan_key(ino));
        self.batch.delete_cf(self.cf(), ik);
        self.batch.delete_cf(self.cf(), ok);
        self.inode_delta -= 1;
        Ok(())
    }

    /// Removes the chunk slots of `ino` from index `first` on. Key by key,
    /// not with a range delete: RocksDB's range tombstones slow every later
    /// read of the memtable, and a truncate-heavy workload makes thousands.
    fn drop_slots(&mut self, ino: u64, first: u64) -> Result<()> {
        for slot in self.ns.chunk_slots(ino, first, u64::MAX, None)? {
            let key = slot_key(ino, slot.index);
            self.batch.delete_cf(self.cf(), key);
            *self.refs.entry(slot.hash).or_default() -= 1;
        }
        Ok(())
    }

    fn reap(&mut self, ino: u64) -> Result<()> {
        match self.ns.inode(ino)? {
            Some(inode) if inode.nlink == 0 => self.free(ino),
            _ => Ok(()),
        }
    }

    fn rename(&mut self, r: &wpfs_proto::Rename) -> Result<()> {
        check_name(&r.new_name)?;
        let src_parent = self.dir(r.parent)?;
        let dst_parent = self.dir(r.new_parent)?;
        let src = self
            .entry(r.parent, &r.name)?
            .ok_or(Error::Errno(libc::ENOENT))?;
        let dst = self.entry(r.new_parent, &r.new_name)?;
        let src_inode = self.inode(src.ino)?;
        let src_is_dir = is_kind(&src_inode, FileKind::Directory);

        // A directory may not move into its own subtree.
        if src_is_dir && r.parent != r.new_parent {
            let mut up = r.new_parent;
            loop {
                if up == src.ino {
                    return errno(libc::EINVAL);
                }
                if up == ROOT_INO {
                    break;
                }
                up = self.inode(up)?.parent;
            }
        }

        if r.exchange {
            let dst = dst.ok_or(Error::Errno(libc::ENOENT))?;
            return self.exchange(r, src, dst, src_parent, dst_parent);
        }
        if let Some(dst) = &dst {
            if r.noreplace {
                return errno(libc::EEXIST);
            }
            if dst.ino == src.ino {
                return Ok(()); // two names of one inode: POSIX says do nothing
            }
            let dst_inode = self.inode(dst.ino)?;
            let dst_is_dir = is_kind(&dst_inode, FileKind::Directory);
            if src_is_dir && !dst_is_dir {
                return errno(libc::ENOTDIR);
            }
            if !src_is_dir && dst_is_dir {
                return errno(libc::EISDIR);
            }
            if dst_is_dir && !self.is_empty_dir(dst.ino)? {
                return errno(libc::ENOTEMPTY);
            }
        }

        // From here on nothing fails but the store.
        let mut src_parent = src_parent;
        self.remove_entry(r.parent, &r.name, &src);
        if let Some(dst) = &dst {
            self.remove_entry(r.new_parent, &r.new_name, dst);
            let dst_inode = self.inode(dst.ino)?;
            if is_kind(&dst_inode, FileKind::Directory) {
                self.adjust_nlink(r.new_parent, &mut src_parent, -1)?;
            }
            self.drop_link(dst_inode, r.keep_if_open)?;
        }
        if r.parent == r.new_parent {
            self.add_entry(&mut src_parent, &r.new_name, src.ino, src.kind);
            let p = self.touch_dir(src_parent);
            self.put(p);
        } else {
            let mut dst_parent = self
                .inodes
                .get(&r.new_parent)
                .cloned()
                .unwrap_or(dst_parent);
            self.add_entry(&mut dst_parent, &r.new_name, src.ino, src.kind);
            if src_is_dir {
                src_parent.nlink -= 1;
                dst_parent.nlink += 1;
            }
            let (a, b) = (self.touch_dir(src_parent), self.touch_dir(dst_parent));
            self.put(a);
            self.put(b);
        }
        let mut moved = self.inode(src.ino)?;
        if src_is_dir {
            moved.parent = r.new_parent;
        }
        moved.ctime_ns = self.now;
        self.put(moved);
        Ok(())
    }

    /// nlink change of directory `ino`, which may be `same` (already loaded).
    fn adjust_nlink(&mut self, ino: u64, same: &mut Inode, delta: i32) -> Result<()> {
        if same.ino == ino {
            same.nlink = same.nlink.saturating_add_signed(delta);
        } else {
            let mut d = self.inode(ino)?;
            d.nlink = d.nlink.saturating_add_signed(delta);
            self.put(d);
        }
        Ok(())
    }

    fn exchange(
        &mut self,
        r: &wpfs_proto::Rename,
        src: DirEntry,
        dst: DirEntry,
        src_parent: Inode,
        dst_parent: Inode,
    ) -> Result<()> {
        if src.ino == dst.ino {
            return Ok(());
        }
        let dst_inode = self.inode(dst.ino)?;
        // The target may not be an ancestor of the source either.
        if is_kind(&dst_inode, FileKind::Directory) && r.parent != r.new_parent {
            let mut up = r.parent;
            while up != ROOT_INO {
                if up == dst.ino {
                    return errno(libc::EINVAL);
                }
                up = self.inode(up)?.parent;
            }
        }
        let (src_dir, dst_dir) = (
            is_kind(&self.inode(src.ino)?, FileKind::Directory),
            is_kind(&dst_inode, FileKind::Directory),
        );
        // Swap what the two names point to, keeping each name's cookie.
        let cf = self.cf();
        let at_src = DirEntry {
            ino: dst.ino,
            cookie: src.cookie,
            kind: dst.kind,
        };
        let at_dst = DirEntry {
            ino: src.ino,
            cookie: dst.cookie,
            kind: src.kind,
        };
        let (sk, dk) = (
            dentry_key(r.parent, &r.name),
            dentry_key(r.new_parent, &r.new_name),
        );
        self.batch.put_cf(cf, sk, at_src.encode_to_vec());
        let cf = self.cf();
        self.batch.put_cf(cf, dk, at_dst.encode_to_vec());
        let mut src_parent = self.touch_dir(src_parent);
        if r.parent != r.new_parent {
            let mut dst_parent = self.touch_dir(dst_parent);
            if src_dir != dst_dir {
                let delta = if src_dir { 1 } else { -1 };
                dst_parent.nlink = dst_parent.nlink.saturating_add_signed(delta);
                src_parent.nlink = src_parent.nlink.saturating_add_signed(-delta);
            }
            self.put(dst_parent);
        }
        self.put(src_parent);
        for (ino, new_parent) in [(src.ino, r.new_parent), (dst.ino, r.parent)] {
            let mut i = self.inode(ino)?;
            if is_kind(&i, FileKind::Directory) {
                i.parent = new_parent;
            }
            i.ctime_ns = self.now;
            self.put(i);
        }
        Ok(())
    }

    fn set_attr(&mut self, s: &wpfs_proto::SetAttr) -> Result<Option<Inode>> {
        let mut inode = self.inode(s.ino)?;
        if let Some(mode) = s.mode {
            inode.mode = mode & 0o7777;
        }
        if let Some(uid) = s.uid {
            inode.uid = uid;
        }
        if let Some(gid) = s.gid {
            inode.gid = gid;
        }
        if let Some(t) = s.atime_ns {
            inode.atime_ns = t;
        }
        if let Some(t) = s.mtime_ns {
            inode.mtime_ns = t;
        }
        inode.ctime_ns = self.now;
        self.put(inode.clone());
        Ok(Some(inode))
    }

    fn set_content(&mut self, s: &wpfs_proto::SetContent) -> Result<Option<Inode>> {
        // A file born with its contents (`create`) has no slots yet, unless
        // another node made the name meanwhile (create then answers with
        // that file, not the reserved number): then the new contents
        // replace that file's whole.
        let mut born = None;
        let mut inode = match &s.create {
            Some(c) if c.kind == FileKind::Regular as i32 && !c.exclusive => {
                let inode = self.create(c)?.ok_or(Error::Errno(libc::EIO))?;
                born = Some(c.ino != 0 && inode.ino == c.ino);
                inode
            }
            Some(_) => return errno(libc::EINVAL),
            None => self.inode(s.ino)?,
        };
        let ino = inode.ino;
        if !is_kind(&inode, FileKind::Regular) {
            return errno(if is_kind(&inode, FileKind::Directory) {
                libc::EISDIR
            } else {
                libc::EINVAL
            });
        }
        // Slots past the truncation point (or past a smaller new size) go
        // first; the chunks below may then fill some of them again.
        let cut = match (born, s.truncated_at) {
            (Some(true), _) => None,
            (Some(false), _) => Some(0),
            (None, Some(at)) => Some(at.min(s.size)),
            (None, None) if s.size < inode.size => Some(s.size),
            (None, None) => None,
        };
        let dropped_from = cut.map(|c| c.div_ceil(CHUNK_SIZE));
        if let Some(first) = dropped_from {
            self.drop_slots(ino, first)?;
        }
        let slots_end = s.size.div_ceil(CHUNK_SIZE);
        for c in &s.chunks {
            if c.index >= slots_end {
                continue;
            }
            let key = slot_key(ino, c.index);
            if dropped_from.is_none_or(|d| c.index < d) {
                if let Some(old) = self.ns.get(&key)? {
                    *self.refs.entry(old[..32].to_vec()).or_default() -= 1;
                }
            }
            if c.hash.is_empty() {
                self.batch.delete_cf(self.cf(), key);
            } else {
                if c.hash.len() != 32 {
                    return errno(libc::EINVAL);
                }
                *self.refs.entry(c.hash.clone()).or_default() += 1;
                let v = encode_slot(&c.hash, c.len);
                self.batch.put_cf(self.cf(), key, v);
            }
        }
        inode.size = s.size;
        inode.mtime_ns = s.mtime_ns;
        // A file born here changed last when it was last written (or made),
        // as its creator was shown; any other file changes now.
        inode.ctime_ns = match born {
            Some(true) => inode.ctime_ns.max(s.mtime_ns),
            _ => self.now,
        };
        self.put(inode.clone());
        Ok(Some(inode))
    }

    fn set_xattr(&mut self, x: &wpfs_proto::SetXattr) -> Result<Option<Inode>> {
        let mut inode = self.inode(x.ino)?;
        let existing = inode.xattrs.iter().position(|a| a.name == x.name);
        match (existing, x.flags) {
            (Some(_), f) if f & libc::XATTR_CREATE as u32 != 0 => return errno(libc::EEXIST),
            (None, f) if f & libc::XATTR_REPLACE as u32 != 0 => return errno(libc::ENODATA),
            (Some(i), _) => inode.xattrs[i].value = x.value.clone(),
            (None, _) => inode.xattrs.push(Xattr {
                name: x.name.clone(),
                value: x.value.clone(),
            }),
        }
        inode.ctime_ns = self.now;
        self.put(inode.clone());
        Ok(Some(inode))
    }

    fn remove_xattr(&mut self, x: &wpfs_proto::RemoveXattr) -> Result<Option<Inode>> {
        let mut inode = self.inode(x.ino)?;
        let i = inode
            .xattrs
            .iter()
            .position(|a| a.name == x.name)
            .ok_or(Error::Errno(libc::ENODATA))?;
        inode.xattrs.remove(i);
        inode.ctime_ns = self.now;
        self.put(inode.clone());
        Ok(Some(inode))
    }

    /// Writes the inodes, counters and reference counts into the batch.
    fn finish(&mut self) -> Result<()> {
        let cf = self.ns.store.cf(CF_META);
        for inode in self.inodes.values() {
            self.batch
                .put_cf(cf, inode_key(inode.ino), inode.encode_to_vec());
        }
        if let Some(next) = self.next_ino {
            self.batch.put_cf(cf, KEY_NEXT_INO, be(next));
        }
        if self.inode_delta != 0 {
            let count = self
                .ns
                .counter(KEY_INODES)?
                .saturating_add_signed(self.inode_delta);
            self.batch.put_cf(cf, KEY_INODES, be(count));
        }
        for (hash, delta) in std::mem::take(&mut self.refs) {
            if delta == 0 {
                continue;
            }
            let count = self.ns.chunk_refcount(&hash)?.saturating_add_signed(delta);
            if count == 0 {
                self.batch.delete_cf(cf, ref_key(&hash));
                self.batch.put_cf(cf, garbage_key(&hash), b"");
            } else {
                self.batch.put_cf(cf, ref_key(&hash), be(count));
            }
        }
        self.ok = true;
        Ok(())
    }

    /// The batch to commit: the command's changes if it succeeded, else
    /// nothing (but the applied index the caller adds).
    fn batch_or_empty(self) -> WriteBatch {
        if self.ok {
            self.batch
        } else {
            WriteBatch::default()
        }
    }
}
