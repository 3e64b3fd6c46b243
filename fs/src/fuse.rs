//! The FUSE layer: translates kernel requests into `FsCore` calls and
//! results into replies, timing each (`metrics`). Nothing is decided here.
//!
//! Caching: every change this node makes goes through this mount, so the
//! kernel's caches stay right with long TTLs (the kernel invalidates what
//! its own requests change). Absent names are cached too (negative
//! entries), which saves PHP's include-path probing a round trip each.
//! Pages are kept across opens (FOPEN_KEEP_CACHE); the writeback cache
//! stays off so that a size change applied from elsewhere reaches the
//! kernel (see docs/design.md).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use wpfs_proto::{FileKind, Inode};

use crate::core::{Caller, FsCore, NewNode, SetAttrs, SetTime};
use crate::kernel_refs::KernelRefs;
use crate::metrics::FuseMetrics;

pub struct WpFs {
    core: Arc<FsCore>,
    refs: Arc<KernelRefs>,
    ttl: Duration,
    metrics: FuseMetrics,
}

impl WpFs {
    pub fn new(
        core: Arc<FsCore>,
        refs: Arc<KernelRefs>,
        ttl: Duration,
        metrics: FuseMetrics,
    ) -> Self {
        WpFs {
            core,
            refs,
            ttl,
            metrics,
        }
    }

    /// Replies with an entry the kernel may keep: it holds the inode then.
    fn entry(&self, inode: &Inode, reply: ReplyEntry) {
        self.refs.given(inode.ino);
        reply.entry(&self.ttl, &attr(inode), Generation(0))
    }
}

fn errno(e: crate::error::Errno) -> Errno {
    Errno::from_i32(e.0)
}

fn time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(st) => SetTime::At(match st.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i64,
            Err(e) => -(e.duration().as_nanos() as i64),
        }),
    }
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
        FileKind::Regular | FileKind::KindUnspecified => FileType::RegularFile,
    }
}

fn attr(i: &Inode) -> FileAttr {
    FileAttr {
        ino: INodeNo(i.ino),
        size: i.size,
        blocks: i.size.div_ceil(512),
        atime: time(i.atime_ns),
        mtime: time(i.mtime_ns),
        ctime: time(i.ctime_ns),
        crtime: time(i.crtime_ns),
        kind: file_type(FileKind::try_from(i.kind).unwrap_or(FileKind::Regular)),
        perm: (i.mode & 0o7777) as u16,
        nlink: i.nlink,
        uid: i.uid,
        gid: i.gid,
        rdev: i.rdev,
        blksize: 64 * 1024,
        flags: 0,
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

impl WpFs {
    fn reply_entry(&self, result: crate::error::Result<Inode>, reply: ReplyEntry) {
        match result {
            Ok(inode) => self.entry(&inode, reply),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn reply_empty(result: crate::error::Result<()>, reply: ReplyEmpty) {
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn reply_xattr(result: crate::error::Result<Vec<u8>>, size: u32, reply: ReplyXattr) {
        match result {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno(e)),
        }
    }
}

impl Filesystem for WpFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Each is optional: an older kernel without one still mounts.
        for cap in [
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_AUTO_INVAL_DATA,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
        ] {
            let _ = config.add_capabilities(cap);
        }
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _timed = self.metrics.time("lookup");
        match self.core.lookup(parent.0, name.as_bytes()) {
            Ok(Some(inode)) => self.entry(&inode, reply),
            // A negative entry: the kernel remembers the name is absent.
            Ok(None) => {
                let mut none = attr(&Inode::default());
                none.ino = INodeNo(0);
                reply.entry(&self.ttl, &none, Generation(0))
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.refs.forgotten(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _timed = self.metrics.time("getattr");
        match self.core.getattr(ino.0) {
            Ok(inode) => reply.attr(&self.ttl, &attr(&inode)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _timed = self.metrics.time("setattr");
        let attrs = SetAttrs {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
        };
        match self.core.setattr(ino.0, attrs) {
            Ok(inode) => reply.attr(&self.ttl, &attr(&inode)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _timed = self.metrics.time("readlink");
        match self.core.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _timed = self.metrics.time("mknod");
        let perm = mode & 0o7777;
        let what = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => NewNode::File {
                mode: perm,
                exclusive: true,
            },
            libc::S_IFDIR => NewNode::Dir { mode: perm },
            libc::S_IFIFO => NewNode::Special {
                kind: FileKind::Fifo,
                mode: perm,
                rdev: 0,
            },
            libc::S_IFSOCK => NewNode::Special {
                kind: FileKind::Socket,
                mode: perm,
                rdev: 0,
            },
            libc::S_IFCHR => NewNode::Special {
                kind: FileKind::CharDevice,
                mode: perm,
                rdev,
            },
            libc::S_IFBLK => NewNode::Special {
                kind: FileKind::BlockDevice,
                mode: perm,
                rdev,
            },
            _ => return reply.error(Errno::EINVAL),
        };
        self.reply_entry(
            self.core
                .create(parent.0, name.as_bytes(), what, caller(req)),
            reply,
        )
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let _timed = self.metrics.time("mkdir");
        let what = NewNode::Dir {
            mode: mode & 0o7777,
        };
        self.reply_entry(
            self.core
                .create(parent.0, name.as_bytes(), what, caller(req)),
            reply,
        )
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _timed = self.metrics.time("unlink");
        Self::reply_empty(self.core.unlink(parent.0, name.as_bytes(), false), reply)
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _timed = self.metrics.time("rmdir");
        Self::reply_empty(self.core.unlink(parent.0, name.as_bytes(), true), reply)
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _timed = self.metrics.time("symlink");
        let what = NewNode::Symlink {
            target: target.as_os_str().as_bytes(),
        };
        self.reply_entry(
            self.core
                .create(parent.0, link_name.as_bytes(), what, caller(req)),
            reply,
        )
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _timed = self.metrics.time("rename");
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        Self::reply_empty(
            self.core.rename(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                flags.contains(RenameFlags::RENAME_NOREPLACE),
                flags.contains(RenameFlags::RENAME_EXCHANGE),
            ),
            reply,
        )
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _timed = self.metrics.time("link");
        self.reply_entry(
            self.core.link(ino.0, newparent.0, newname.as_bytes()),
            reply,
        )
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _timed = self.metrics.time("open");
        // A read-only handle has nothing to commit at close(): spare PHP's
        // include storm the FLUSH round trip.
        let mut fopen = FopenFlags::FOPEN_KEEP_CACHE;
        if flags.0 & libc::O_ACCMODE == libc::O_RDONLY {
            fopen |= FopenFlags::FOPEN_NOFLUSH;
        }
        match self.core.open(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), fopen),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _timed = self.metrics.time("read");
        match self.core.read(ino.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _timed = self.metrics.time("write");
        match self.core.write(ino.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _timed = self.metrics.time("flush");
        Self::reply_empty(self.core.flush(ino.0, false), reply)
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _timed = self.metrics.time("release");
        Self::reply_empty(self.core.release(ino.0), reply)
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _timed = self.metrics.time("fsync");
        Self::reply_empty(self.core.fsync(ino.0), reply)
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _timed = self.metrics.time("readdir");
        let result = self.core.read_dir(ino.0, offset, |ino, next, kind, name| {
            !reply.add(INodeNo(ino), next, file_type(kind), OsStr::from_bytes(name))
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _timed = self.metrics.time("readdirplus");
        let result = self.core.read_dir(ino.0, offset, |ino, next, _kind, name| {
            // An entry removed meanwhile is skipped, not an error.
            let Ok(inode) = self.core.getattr(ino) else {
                return true;
            };
            let name = OsStr::from_bytes(name);
            let full = reply.add(
                INodeNo(ino),
                next,
                name,
                &self.ttl,
                &attr(&inode),
                Generation(0),
            );
            if !full {
                self.refs.given(ino);
            }
            !full
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _timed = self.metrics.time("fsyncdir");
        Self::reply_empty(self.core.fsync(ino.0), reply)
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _timed = self.metrics.time("statfs");
        match self.core.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, 255, s.bsize,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _timed = self.metrics.time("setxattr");
        Self::reply_empty(
            self.core.setxattr(ino.0, name.as_bytes(), value, flags),
            reply,
        )
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _timed = self.metrics.time("getxattr");
        Self::reply_xattr(self.core.getxattr(ino.0, name.as_bytes()), size, reply)
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _timed = self.metrics.time("listxattr");
        Self::reply_xattr(self.core.listxattr(ino.0), size, reply)
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _timed = self.metrics.time("removexattr");
        Self::reply_empty(self.core.removexattr(ino.0, name.as_bytes()), reply)
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        let _timed = self.metrics.time("access");
        // The kernel checks permissions (default_permissions); this only
        // says whether the inode exists.
        Self::reply_empty(self.core.getattr(ino.0).map(|_| ()), reply)
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _timed = self.metrics.time("create");
        let exclusive = flags & libc::O_EXCL != 0;
        let result = (self.core).create_file(
            parent.0,
            name.as_bytes(),
            mode & 0o7777,
            exclusive,
            caller(req),
        );
        match result {
            Ok((inode, fh)) => {
                self.refs.given(inode.ino);
                reply.created(
                    &self.ttl,
                    &attr(&inode),
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::FOPEN_KEEP_CACHE,
                )
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _timed = self.metrics.time("fallocate");
        Self::reply_empty(self.core.fallocate(ino.0, offset, length, mode), reply)
    }
}
