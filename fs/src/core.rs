//! The filesystem core: every operation in POSIX terms, on inode numbers
//! and byte-string names, returning an errno on failure. The FUSE layer
//! (`fuse`) only translates to and from the kernel; what the filesystem
//! does is decided here, so it can be tested without a mount.
//!
//! Reads are local: the namespace and chunks on this node's RocksDB, plus
//! the uncommitted writes of open files (`file`). Every change is a command
//! proposed to Raft; the call returns once the command is applied here,
//! with the errno the state machine decided.
//!
//! One exception saves a Raft round trip per file: `create_file` without
//! O_EXCL answers at once, with an inode number this node reserved, and
//! the file is born in the command of its first contents (close, fsync).
//! Until then it is "unborn": this node shows it to lookups and getattr,
//! and proposes it before any other change of its own (`settle`), so
//! changes keep the order their syscalls had. If another node makes the
//! same name meanwhile, the contents replace that file's whole, as if this
//! node's open had come second; a file to which nothing was written here
//! is born as a plain create, so the other node's file stands (an open
//! with O_TRUNC that wrote nothing yet must not erase a file written after
//! it) and this handle goes on with that file.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use wpfs_consensus::namespace::{new_inode, Hash, NAME_MAX};
use wpfs_consensus::{Namespace, Node, Store};
use wpfs_proto::{self as proto, FileKind, Inode, Op, Outcome};

use crate::chunks::ChunkStore;
use crate::error::{err, Errno, Result};
use crate::file::{read_range, Contents, FileState, Kept};
use crate::replication::Replicator;

/// Inode numbers reserved at a time for files created without waiting.
const RESERVE_BATCH: u64 = 1024;

/// Attributes wpfs would store but nothing would enforce or use: POSIX
/// ACLs (`default_permissions` checks the mode bits only) and SELinux
/// labels (SELinux labels a FUSE mount as a whole, `context=`). Reads of
/// them are refused too, not answered ENODATA: after one EOPNOTSUPP, `ls
/// -l` takes the whole mount as lacking them, where ENODATA made it ask
/// for both on every file it lists (two FUSE round trips per entry, most
/// of `ls -l`'s time in a large directory).
const UNSUPPORTED_XATTRS: [&[u8]; 3] = [
    b"system.posix_acl_access",
    b"system.posix_acl_default",
    b"security.selinux",
];

fn check_supported(xattr: &[u8]) -> Result<()> {
    if is_supported(xattr) {
        Ok(())
    } else {
        err(libc::EOPNOTSUPP)
    }
}

fn is_supported(xattr: &[u8]) -> bool {
    !UNSUPPORTED_XATTRS.contains(&xattr)
}

#[derive(Clone, Debug)]
pub struct CoreOptions {
    /// How long a write may wait for Raft before it fails.
    pub write_timeout: Duration,
    pub read_only: bool,
    /// Bytes of the store's disk kept free: new contents get ENOSPC below.
    pub min_free: u64,
}

/// Who is asking: the owner of what they create.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// A time to set: a given one, or "now" on the writer's clock.
#[derive(Clone, Copy, Debug)]
pub enum SetTime {
    At(i64),
    Now,
}

#[derive(Default, Debug)]
pub struct SetAttrs {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// What to create.
pub enum NewNode<'a> {
    File {
        mode: u32,
        exclusive: bool,
    },
    Dir {
        mode: u32,
    },
    Symlink {
        target: &'a [u8],
    },
    Special {
        kind: FileKind,
        mode: u32,
        rdev: u32,
    },
}

pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
}

/// An inode open on this node: its handles and uncommitted writes.
struct OpenFile {
    handles: u32,
    state: Arc<Mutex<FileState>>,
    /// A name of it was removed while open: the last close checks whether
    /// it is an orphan to reap (every other close skips that read).
    may_be_orphan: bool,
    /// Another node deleted it meanwhile: what it was, for the handles
    /// here to read until they close. Here and not in `state`, whose lock
    /// a commit holds while it waits for the Raft apply that sets this.
    kept: Option<Arc<Kept>>,
}

/// A file created here that is not in the namespace yet (its handles are
/// open: it is born at the latest when the last one closes).
struct Unborn {
    parent: u64,
    name: Vec<u8>,
    inode: Inode,
}

pub struct FsCore {
    node: Arc<Node>,
    /// Places copies of new chunks on peers before a commit (multi-node).
    replicator: std::sync::OnceLock<Arc<Replicator>>,
    contents: Contents,
    open: Mutex<HashMap<u64, OpenFile>>,
    /// The inodes not open here that the latest deleting command deletes
    /// (see `deleting`); locked under `open`.
    deleting: Mutex<Vec<u64>>,
    unborn: Mutex<HashMap<u64, Unborn>>,
    /// Inode numbers reserved for `create_file`, not used yet.
    reserved: Mutex<std::ops::Range<u64>>,
    next_fh: AtomicU64,
    opts: CoreOptions,
}

pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn is_kind(inode: &Inode, kind: FileKind) -> bool {
    inode.kind == kind as i32
}

fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return err(libc::ENAMETOOLONG);
    }
    Ok(())
}

impl FsCore {
    pub fn new(node: Arc<Node>, store: Store, opts: CoreOptions) -> Arc<FsCore> {
        let namespace = Namespace::new(store.clone());
        let chunks = Arc::new(ChunkStore::new(store, opts.min_free));
        Arc::new(FsCore {
            node,
            replicator: std::sync::OnceLock::new(),
            contents: Contents { namespace, chunks },
            open: Mutex::new(HashMap::new()),
            deleting: Mutex::new(Vec::new()),
            unborn: Mutex::new(HashMap::new()),
            reserved: Mutex::new(0..0),
            next_fh: AtomicU64::new(1),
            opts,
        })
    }

    pub fn namespace(&self) -> &Namespace {
        &self.contents.namespace
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    pub fn chunks(&self) -> &Arc<ChunkStore> {
        &self.contents.chunks
    }

    /// Connects the core to the peers: new chunks get their copies there,
    /// missing ones come from there.
    pub fn set_replicator(&self, replicator: Arc<Replicator>, keep_fetched: bool) {
        self.contents
            .chunks
            .set_source(replicator.clone(), keep_fetched);
        let _ = self.replicator.set(replicator);
    }

    fn propose(&self, op: Op, durable: bool) -> Result<Outcome> {
        if self.opts.read_only {
            return err(libc::EROFS);
        }
        // Contents and births (a create with a number this node reserved)
        // are what `settle` proposes: they need no settling first.
        let birth = matches!(&op, Op::Create(c) if c.ino != 0);
        if !birth && !matches!(op, Op::SetContent(_) | Op::Reserve(_)) {
            self.settle();
        }
        let outcome = self
            .node
            .propose(op, now_ns(), durable, self.opts.write_timeout)?;
        if outcome.errno != 0 {
            return err(outcome.errno);
        }
        Ok(outcome)
    }

    fn propose_inode(&self, op: Op) -> Result<Inode> {
        self.propose(op, false)?.inode.ok_or(Errno(libc::EIO))
    }

    /// Proposes the files created here and not proposed yet, so that the
    /// change about to be proposed comes after them, as its syscall did.
    /// A file that cannot be born (its name became a directory elsewhere)
    /// stays unborn: its close reports why.
    fn settle(&self) {
        let unborn: Vec<u64> = self.unborn.lock().keys().copied().collect();
        for ino in unborn {
            if let Some(state) = self.state_if_open(ino) {
                if let Err(e) = self.commit(&mut state.lock(), false) {
                    tracing::debug!("inode {ino} created here could not be proposed yet: {e:?}");
                }
            }
        }
    }

    /// The inode `name` in `parent` points to here: in the namespace, or
    /// a file created here and not proposed yet.
    fn ino_named(&self, parent: u64, name: &[u8]) -> Result<Option<u64>> {
        if let Some(entry) = self.namespace().lookup(parent, name)? {
            return Ok(Some(entry.ino));
        }
        let unborn = self.unborn.lock();
        let found = unborn
            .iter()
            .find(|(_, u)| u.parent == parent && u.name == name);
        Ok(found.map(|(ino, _)| *ino))
    }

    /// A number for a new inode, from those this node reserved.
    fn reserved_ino(&self) -> Result<u64> {
        let mut reserved = self.reserved.lock();
        if reserved.is_empty() {
            let count = RESERVE_BATCH;
            let first = self
                .propose(Op::Reserve(proto::Reserve { count }), false)?
                .reserved;
            *reserved = first..first + count;
        }
        reserved.next().ok_or(Errno(libc::EIO))
    }

    // --- reads ---------------------------------------------------------

    /// The inode a name points to; `None` when the name does not exist.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Inode>> {
        check_name(name)?;
        match self.ino_named(parent, name)? {
            Some(ino) => Ok(Some(self.getattr(ino)?)),
            None if self.namespace().inode(parent)?.is_none() => err(libc::ESTALE),
            None => Ok(None),
        }
    }

    /// The inode as this node sees it: with its open files' unwritten
    /// sizes, and the files created here that are not proposed yet.
    ///
    /// The kernel asks by number, for numbers it was given. One that no
    /// longer exists was deleted by another node, and the kernel's entry
    /// for its name is about to be invalidated (`remote`): ESTALE, on this
    /// and every other request by number, makes the kernel look the path
    /// up again once (as for NFS), so a stat or open of a file replaced
    /// elsewhere by rename finds the new file, not ENOENT.
    pub fn getattr(&self, ino: u64) -> Result<Inode> {
        let mut inode = match self.namespace().inode(ino)? {
            Some(inode) => inode,
            None => (self.unborn.lock().get(&ino))
                .map(|u| u.inode.clone())
                .or_else(|| self.kept(ino).map(|k| k.inode.clone()))
                .or_else(|| self.born_elsewhere(ino))
                .ok_or(Errno(libc::ESTALE))?,
        };
        self.overlay(&mut inode);
        Ok(inode)
    }

    /// A file created here whose name another node made first: its open
    /// handles write to that node's file (`FileState::committed`), and
    /// show its attributes under the number the kernel knows.
    fn born_elsewhere(&self, ino: u64) -> Option<Inode> {
        let target = self.state_if_open(ino)?.lock().ino();
        if target == ino {
            return None;
        }
        let inode = self.namespace().inode(target).ok()??;
        Some(Inode { ino, ..inode })
    }

    fn overlay(&self, inode: &mut Inode) {
        let state = self.open.lock().get(&inode.ino).map(|o| o.state.clone());
        if let Some(state) = state {
            let s = state.lock();
            if s.is_dirty() {
                inode.size = s.size;
                inode.mtime_ns = s.mtime_ns;
                inode.ctime_ns = inode.ctime_ns.max(s.mtime_ns);
            }
        }
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let inode = self.getattr(ino)?;
        if !is_kind(&inode, FileKind::Symlink) {
            return err(libc::EINVAL);
        }
        Ok(inode.symlink_target)
    }

    pub fn read(&self, ino: u64, offset: u64, len: u32) -> Result<Vec<u8>> {
        let open = self
            .open
            .lock()
            .get(&ino)
            .map(|o| (o.state.clone(), o.kept.clone()));
        if let Some((state, kept)) = open {
            let state = state.lock();
            return state.read(&self.contents, offset, len as u64, kept.as_deref());
        }
        // Not open here, so there are no uncommitted writes to overlay.
        let inode = self.namespace().inode(ino)?.ok_or(Errno(libc::ESTALE))?;
        if is_kind(&inode, FileKind::Directory) {
            return err(libc::EISDIR);
        }
        read_range(
            &self.contents,
            ino,
            inode.size,
            offset,
            len as u64,
            None,
            None,
        )
    }

    /// Lists directory `ino` from `offset` (0, or an offset it returned
    /// before): `f(ino, next_offset, kind, name)` until it returns false.
    /// Offsets are per-entry cookies, so they stay valid while the
    /// directory changes.
    pub fn read_dir(
        &self,
        ino: u64,
        offset: u64,
        mut f: impl FnMut(u64, u64, FileKind, &[u8]) -> bool,
    ) -> Result<()> {
        self.settle(); // entries of files created here have their cookies
        let dir = self.getattr(ino)?;
        if !is_kind(&dir, FileKind::Directory) {
            return err(libc::ENOTDIR);
        }
        if offset < 1 && !f(ino, 1, FileKind::Directory, b".") {
            return Ok(());
        }
        if offset < 2 && !f(dir.parent, 2, FileKind::Directory, b"..") {
            return Ok(());
        }
        self.namespace()
            .read_dir(ino, offset.max(2), |cookie, name, entry| {
                let kind = FileKind::try_from(entry.kind).unwrap_or(FileKind::Regular);
                f(entry.ino, cookie, kind, name)
            })?;
        Ok(())
    }

    /// The store's disk, less the reserve new contents may not use.
    pub fn statfs(&self) -> Result<Statfs> {
        let u = self.contents.chunks.space().usable()?;
        let used = self.namespace().inode_count()?;
        let ffree = (u.available * u.block_size) / 4096;
        Ok(Statfs {
            blocks: u.blocks,
            bfree: u.free,
            bavail: u.available,
            files: used + ffree,
            ffree,
            bsize: u.block_size as u32,
        })
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        check_supported(name)?;
        let inode = self.getattr(ino)?;
        inode
            .xattrs
            .into_iter()
            .find(|x| x.name == name)
            .map(|x| x.value)
            .ok_or(Errno(libc::ENODATA))
    }

    /// The attribute names, each followed by a NUL, as listxattr(2) returns.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        let inode = self.getattr(ino)?;
        let mut out = Vec::new();
        // A refused name may have been stored by a release that took it.
        for x in inode.xattrs.iter().filter(|x| is_supported(&x.name)) {
            out.extend_from_slice(&x.name);
            out.push(0);
        }
        Ok(out)
    }

    // --- namespace changes -----------------------------------------------

    pub fn create(
        &self,
        parent: u64,
        name: &[u8],
        what: NewNode<'_>,
        caller: Caller,
    ) -> Result<Inode> {
        check_name(name)?;
        let (kind, mode, rdev, target, exclusive) = match what {
            NewNode::File { mode, exclusive } => (FileKind::Regular, mode, 0, &[][..], exclusive),
            NewNode::Dir { mode } => (FileKind::Directory, mode, 0, &[][..], true),
            NewNode::Symlink { target } => (FileKind::Symlink, 0o777, 0, target, true),
            NewNode::Special { kind, mode, rdev } => (kind, mode, rdev, &[][..], true),
        };
        if target.len() > libc::PATH_MAX as usize {
            return err(libc::ENAMETOOLONG);
        }
        self.propose_inode(Op::Create(proto::Create {
            parent,
            name: name.to_vec(),
            kind: kind as i32,
            mode,
            uid: caller.uid,
            gid: caller.gid,
            rdev,
            symlink_target: target.to_vec(),
            exclusive,
            ino: 0,
            created_ns: 0,
        }))
    }

    /// open(2) with O_CREAT of a regular file: the inode and a handle.
    /// Without O_EXCL, a name that does not exist here yet gets a file at
    /// once, born at its first commit (see the module comment).
    pub fn create_file(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        exclusive: bool,
        caller: Caller,
    ) -> Result<(Inode, u64)> {
        check_name(name)?;
        if exclusive || self.opts.read_only || self.ino_named(parent, name)?.is_some() {
            let inode = self.create(parent, name, NewNode::File { mode, exclusive }, caller)?;
            return Ok((inode.clone(), self.open(inode.ino)?));
        }
        let dir = self.namespace().inode(parent)?.ok_or(Errno(libc::ESTALE))?;
        if !is_kind(&dir, FileKind::Directory) {
            return err(libc::ENOTDIR);
        }
        if dir.nlink == 0 {
            return err(libc::ENOENT);
        }
        let create = proto::Create {
            parent,
            name: name.to_vec(),
            kind: FileKind::Regular as i32,
            mode,
            uid: caller.uid,
            gid: caller.gid,
            ino: self.reserved_ino()?,
            created_ns: now_ns(),
            ..Default::default()
        };
        let inode = new_inode(&create, &dir, create.ino, create.created_ns);
        let state = FileState::unborn(&inode, create);
        self.open.lock().insert(
            inode.ino,
            OpenFile {
                handles: 1,
                state: Arc::new(Mutex::new(state)),
                may_be_orphan: false,
                kept: None,
            },
        );
        let unborn = Unborn {
            parent,
            name: name.to_vec(),
            inode: inode.clone(),
        };
        self.unborn.lock().insert(inode.ino, unborn);
        Ok((inode, self.next_fh.fetch_add(1, Ordering::Relaxed)))
    }

    pub fn link(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> Result<Inode> {
        check_name(new_name)?;
        let mut inode = self.propose_inode(Op::Link(proto::Link {
            ino,
            new_parent,
            new_name: new_name.to_vec(),
        }))?;
        self.overlay(&mut inode);
        Ok(inode)
    }

    /// Whether the inode `name` points to is open here: then its last
    /// unlink must keep it (as an orphan) until the last handle closes.
    fn open_target(&self, parent: u64, name: &[u8]) -> Result<bool> {
        let Some(ino) = self.ino_named(parent, name)? else {
            return Ok(false);
        };
        Ok(match self.open.lock().get_mut(&ino) {
            Some(open) => {
                open.may_be_orphan = true;
                true
            }
            None => false,
        })
    }

    pub fn unlink(&self, parent: u64, name: &[u8], directory: bool) -> Result<()> {
        check_name(name)?;
        let keep_if_open = self.open_target(parent, name)?;
        self.propose(
            Op::Unlink(proto::Unlink {
                parent,
                name: name.to_vec(),
                directory,
                keep_if_open,
            }),
            false,
        )?;
        Ok(())
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        noreplace: bool,
        exchange: bool,
    ) -> Result<()> {
        check_name(name)?;
        check_name(new_name)?;
        let keep_if_open = self.open_target(new_parent, new_name)?;
        self.propose(
            Op::Rename(proto::Rename {
                parent,
                name: name.to_vec(),
                new_parent,
                new_name: new_name.to_vec(),
                noreplace,
                exchange,
                keep_if_open,
            }),
            false,
        )?;
        Ok(())
    }

    pub fn setattr(&self, ino: u64, attrs: SetAttrs) -> Result<Inode> {
        // Commit written data first, so that an explicit mtime (cp -p, tar,
        // rsync set it on the open file) is not overwritten by a later flush.
        self.flush(ino, false)?;
        if let Some(size) = attrs.size {
            self.truncate(ino, size)?;
        }
        if attrs.mode.is_some()
            || attrs.uid.is_some()
            || attrs.gid.is_some()
            || attrs.atime.is_some()
            || attrs.mtime.is_some()
        {
            let now = now_ns();
            let at = |t: Option<SetTime>| {
                t.map(|t| match t {
                    SetTime::At(ns) => ns,
                    SetTime::Now => now,
                })
            };
            self.propose(
                Op::SetAttr(proto::SetAttr {
                    ino,
                    mode: attrs.mode,
                    uid: attrs.uid,
                    gid: attrs.gid,
                    atime_ns: at(attrs.atime),
                    mtime_ns: at(attrs.mtime),
                }),
                false,
            )?;
        }
        let inode = self.getattr(ino)?;
        if let Some(state) = self.state_if_open(ino) {
            state.lock().refresh(&inode);
        }
        Ok(inode)
    }

    fn truncate(&self, ino: u64, size: u64) -> Result<()> {
        let inode = self.getattr(ino)?;
        if is_kind(&inode, FileKind::Directory) {
            return err(libc::EISDIR);
        }
        if !is_kind(&inode, FileKind::Regular) {
            return err(libc::EINVAL);
        }
        self.with_state(ino, |state| {
            state.truncate(&self.contents, size, now_ns())?;
            self.commit(state, false)
        })
    }

    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        check_supported(name)?;
        if name.is_empty() || name.len() > 255 {
            return err(libc::ERANGE);
        }
        if value.len() > 64 * 1024 {
            return err(libc::E2BIG);
        }
        self.propose(
            Op::SetXattr(proto::SetXattr {
                ino,
                name: name.to_vec(),
                value: value.to_vec(),
                flags: flags as u32,
            }),
            false,
        )?;
        Ok(())
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        check_supported(name)?;
        self.propose(
            Op::RemoveXattr(proto::RemoveXattr {
                ino,
                name: name.to_vec(),
            }),
            false,
        )?;
        Ok(())
    }

    // --- open files ------------------------------------------------------

    fn state_if_open(&self, ino: u64) -> Option<Arc<Mutex<FileState>>> {
        self.open.lock().get(&ino).map(|o| o.state.clone())
    }

    fn kept(&self, ino: u64) -> Option<Arc<Kept>> {
        self.open.lock().get(&ino).and_then(|o| o.kept.clone())
    }

    /// Files `inos` are about to be deleted from the store by a command
    /// being applied (called by the Raft driver before the command's
    /// write): those open here keep, for their handles, what they were
    /// until the last one closes, as on a local filesystem. The others
    /// can no longer be opened: an open that read the inode just before
    /// the write would miss being kept. Their marks stay until the next
    /// such command; after the write they only repeat what the store says,
    /// as inode numbers are never reused.
    pub fn deleting(&self, inos: &[u64]) {
        let mut open = self.open.lock();
        let mut not_open = Vec::new();
        for &ino in inos {
            let Some(file) = open.get_mut(&ino) else {
                not_open.push(ino);
                continue;
            };
            match Kept::take(&self.contents, ino) {
                Ok(kept) => file.kept = kept.map(Arc::new),
                Err(e) => tracing::warn!("inode {ino}, deleted while open here: {e:?}"),
            }
        }
        *self.deleting.lock() = not_open;
    }

    /// Registers a handle on `ino` and returns its number.
    pub fn open(&self, ino: u64) -> Result<u64> {
        self.register(ino, 1)?;
        Ok(self.next_fh.fetch_add(1, Ordering::Relaxed))
    }

    /// The write state of `ino`, registered (with `handles` more handles)
    /// if the inode is not open here yet. Only then is the inode read: an
    /// open inode's state already knows its size.
    fn register(&self, ino: u64, handles: u32) -> Result<Arc<Mutex<FileState>>> {
        if let Some(entry) = self.open.lock().get_mut(&ino) {
            entry.handles += handles;
            return Ok(entry.state.clone());
        }
        let mut open = self.open.lock();
        if self.deleting.lock().contains(&ino) {
            return err(libc::ESTALE);
        }
        let inode = self.namespace().inode(ino)?.ok_or(Errno(libc::ESTALE))?;
        let entry = open.entry(ino).or_insert_with(|| OpenFile {
            handles: 0,
            state: Arc::new(Mutex::new(FileState::new(&inode))),
            may_be_orphan: false,
            kept: None,
        });
        entry.handles += handles;
        Ok(entry.state.clone())
    }

    /// Runs `f` on the write state of `ino`. Without an open handle
    /// (truncate(2) by path) the state is a passing one, committed before
    /// this returns.
    fn with_state<T>(&self, ino: u64, f: impl FnOnce(&mut FileState) -> Result<T>) -> Result<T> {
        let state = self.register(ino, 0)?;
        let mut guard = state.lock();
        let value = f(&mut guard)?;
        let passing = {
            let mut open = self.open.lock();
            let passing = open
                .get(&ino)
                .is_some_and(|o| o.handles == 0 && Arc::ptr_eq(&o.state, &state));
            if passing {
                open.remove(&ino);
            }
            passing
        };
        if passing {
            self.commit(&mut guard, false)?;
        }
        Ok(value)
    }

    /// Buffers a write; the state machine refuses the commit of anything
    /// but a regular file (the kernel writes only to those anyway).
    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<u32> {
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > i64::MAX as u64)
        {
            return err(libc::EFBIG);
        }
        self.with_state(ino, |state| {
            state.write(&self.contents, offset, data, now_ns())
        })?;
        Ok(data.len() as u32)
    }

    /// Commits the uncommitted writes of `ino`; with `durable`, on disk.
    pub fn flush(&self, ino: u64, durable: bool) -> Result<()> {
        let Some(state) = self.state_if_open(ino) else {
            return Ok(());
        };
        let mut state = state.lock();
        self.commit(&mut state, durable)
    }

    pub fn fsync(&self, ino: u64) -> Result<()> {
        let Some(state) = self.state_if_open(ino) else {
            return self.sync_store();
        };
        let mut state = state.lock();
        if state.is_dirty() {
            self.commit(&mut state, true)
        } else {
            self.sync_store()
        }
    }

    fn sync_store(&self) -> Result<()> {
        self.namespace().store().sync().map_err(|e| {
            tracing::error!("fsync: {e}");
            Errno(libc::EIO)
        })
    }

    fn commit(&self, state: &mut FileState, durable: bool) -> Result<()> {
        // A file deleted elsewhere keeps what is written to it here for its
        // handles, and loses it with the last one, as an unlinked file does
        // (checked first: a proposal would store chunks to be refused).
        let ino = state.ino();
        let deleted_elsewhere = || self.kept(ino).is_some();
        if !state.is_dirty() || deleted_elsewhere() {
            return Ok(());
        }
        if let Some(create) = state.empty_birth() {
            // A plain create: if another node made the name since this
            // node's open, its file stands, as a file made after an open
            // with O_TRUNC does on one machine. Only what this handle
            // writes replaces it.
            let outcome = self.propose(Op::Create(create.clone()), durable)?;
            state.committed(&outcome.inode.ok_or(Errno(libc::EIO))?);
            self.unborn.lock().remove(&ino);
            return Ok(());
        }
        let replicator = self.replicator.get();
        let carry_max = replicator.map_or(0, |r| r.carry_max());
        let update = state.update(&self.contents, carry_max)?;
        let born = update.create.as_ref().map(|_| update.ino);
        let new: Vec<Hash> = update
            .chunks
            .iter()
            .filter_map(|c| Hash::try_from(&c.hash[..]).ok())
            .collect();
        // The copies travel while the command commits; close() returns
        // when both are done. Carried chunks arrive with the commit.
        let placer = replicator.filter(|r| {
            !new.is_empty() && r.must_push(!update.carried.is_empty(), || self.node.voters())
        });
        let outcome = match placer {
            Some(r) => std::thread::scope(|scope| {
                scope.spawn(|| r.place(&new));
                self.propose(Op::SetContent(update), durable)
            }),
            None => self.propose(Op::SetContent(update), durable),
        };
        let outcome = match outcome {
            Err(Errno(libc::ESTALE)) if deleted_elsewhere() => return Ok(()),
            outcome => outcome?,
        };
        let inode = outcome.inode.ok_or(Errno(libc::EIO))?;
        state.committed(&inode);
        if let Some(ino) = born {
            self.unborn.lock().remove(&ino);
        }
        Ok(())
    }

    /// A handle is closed; the last one commits and lets an unlinked inode go.
    pub fn release(&self, ino: u64) -> Result<()> {
        let last = {
            let mut open = self.open.lock();
            match open.get_mut(&ino) {
                Some(o) if o.handles > 1 => {
                    o.handles -= 1;
                    None
                }
                Some(_) => open.remove(&ino),
                None => None,
            }
        };
        let Some(last) = last else { return Ok(()) };
        if last.kept.is_some() {
            return Ok(()); // deleted elsewhere: its writes here go with it
        }
        let mut state = last.state.lock();
        let result = self.commit(&mut state, false);
        if let (Err(_), Some(create)) = (&result, state.birth()) {
            // Its contents failed (ENOSPC…), but open(2) said the file
            // exists: it stays, empty, unless its name went elsewhere.
            let _ = self.propose(Op::Create(create.clone()), false);
        }
        drop(state);
        self.unborn.lock().remove(&ino); // born, or never will be
        if last.may_be_orphan && self.namespace().inode(ino)?.is_some_and(|i| i.nlink == 0) {
            self.propose(Op::Reap(proto::Reap { ino }), false)?;
        }
        result
    }

    /// Frees the orphans left by handles a previous run did not close.
    pub fn reap_orphans(&self) -> Result<usize> {
        let orphans = self.namespace().orphans()?;
        for &ino in &orphans {
            if !self.open.lock().contains_key(&ino) {
                self.propose(Op::Reap(proto::Reap { ino }), false)?;
            }
        }
        Ok(orphans.len())
    }

    /// Deletes chunks nothing references any more.
    pub fn collect_garbage(&self) -> Result<usize> {
        self.contents.chunks.collect(self.namespace())
    }

    pub fn chunk_count_estimate(&self) -> u64 {
        self.contents.chunks.count_estimate()
    }

    /// fallocate(2): reserving space is a no-op (contents are chunks), but
    /// growing the size is real; punching holes is not supported.
    pub fn fallocate(&self, ino: u64, offset: u64, len: u64, mode: i32) -> Result<()> {
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            return err(libc::EOPNOTSUPP);
        }
        let end = offset.checked_add(len).ok_or(Errno(libc::EFBIG))?;
        if mode & libc::FALLOC_FL_KEEP_SIZE != 0 {
            return self.getattr(ino).map(|_| ());
        }
        self.with_state(ino, |state| {
            if end > state.size {
                state.truncate(&self.contents, end, now_ns())?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel_refs::KernelRefs;
    use crate::remote::RemoteChanges;
    use wpfs_consensus::{NodeConfig, ROOT_INO};

    /// A one-node core over a fresh store, with the observer a mount has.
    fn one_node(dir: &std::path::Path) -> Arc<FsCore> {
        let db = dir.join("db");
        wpfs_consensus::bootstrap(&db, 1, "127.0.0.1:1", now_ns(), 0, 0).unwrap();
        let store = Store::open(&db, false).unwrap();
        let node = Arc::new(Node::start(NodeConfig::new(1), store.clone(), None).unwrap());
        assert!(node.wait_for_leader(Duration::from_secs(10)));
        let opts = CoreOptions {
            write_timeout: Duration::from_secs(10),
            read_only: false,
            min_free: 0,
        };
        let core = FsCore::new(node.clone(), store, opts);
        let refs = Arc::new(KernelRefs::default());
        node.set_observer(RemoteChanges::new(1, refs, None, &core));
        core
    }

    #[test]
    fn a_file_deleted_elsewhere_is_kept_for_its_handles_then_collected() {
        let dir = tempfile::tempdir().unwrap();
        let core = one_node(dir.path());
        let caller = Caller { uid: 0, gid: 0 };
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (inode, _) = core
            .create_file(ROOT_INO, b"a", 0o644, false, caller)
            .unwrap();
        let ino = inode.ino;
        core.write(ino, 0, &data).unwrap();
        core.release(ino).unwrap();
        core.open(ino).unwrap();
        // What another node proposes: it does not know of the handle here.
        let unlink = proto::Unlink {
            parent: ROOT_INO,
            name: b"a".to_vec(),
            directory: false,
            keep_if_open: false,
        };
        core.propose(Op::Unlink(unlink), false).unwrap();
        assert_eq!(core.namespace().inode(ino).unwrap(), None);

        assert_eq!(core.read(ino, 0, data.len() as u32).unwrap(), data);
        let attrs = core.getattr(ino).unwrap();
        assert_eq!((attrs.size, attrs.nlink), (data.len() as u64, 0));
        core.write(ino, 0, b"scratch").unwrap();
        core.flush(ino, false).unwrap();
        assert_eq!(core.read(ino, 0, 7).unwrap(), b"scratch");
        assert_eq!(core.collect_garbage().unwrap(), 0, "chunks of an open file");

        core.release(ino).unwrap();
        let chunks = data.len().div_ceil(wpfs_consensus::CHUNK_SIZE as usize);
        assert_eq!(
            core.collect_garbage().unwrap(),
            chunks,
            "chunks once closed"
        );
        assert_eq!(core.getattr(ino).unwrap_err(), Errno(libc::ESTALE));
    }
}
