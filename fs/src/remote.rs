//! Changes made on other nodes, as this node applies them: the kernel's
//! caches here must forget what they changed, and their new chunks must be
//! fetched.
//!
//! The kernel keeps entries (names, also "this name does not exist"),
//! attributes and pages of this mount for the cache TTL, and pages across
//! opens. A command another node proposed changes the namespace under it,
//! so for each one the kernel is told exactly which entries and inodes to
//! drop (fuser's `Notifier`). Those notifications may block on a directory
//! lock that a FUSE request holds, so they are sent from their own thread,
//! never from the Raft driver or under a lock of ours.
//!
//! Each invalidation is sent again a little later (`RESEND_AFTER`): a
//! lookup that read the namespace just before the change was applied can
//! deliver its answer (say, "no such name", cached for the TTL) after the
//! first invalidation; the kernel has no version check for names.
//!
//! A file deleted while open here (by any node: a local unlink that raced
//! the open) is kept for its handles (`FsCore::deleting`), from the store
//! as it was just before the deletion's write.
//!
//! Only what the kernel can hold is invalidated (`kernel_refs`), checked
//! when the change is applied and again at each send. Nothing is queued
//! for a directory the kernel does not hold: a lookup in it needs the
//! directory first, and the directory is counted before that reply goes
//! out, so a lookup racing with the change finds it counted. A tree copied
//! in on another node thus wakes nothing here.
//!
//! The thread works in batches: whatever queued up while it slept, and the
//! resends that are due, at most every `GATHER`, each invalidation once.
//! A tree copied in on another node is thousands of changes a second, and
//! waking up for each was a fifth of this node's thread switches.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use rocksdb::WriteBatch;
use wpfs_consensus::mailbox::{self, RecvError, Sender};
use wpfs_consensus::ApplyObserver;
use wpfs_proto::{Command, Op, Outcome};

use crate::core::FsCore;
use crate::kernel_refs::KernelRefs;
use crate::replication::Replicator;

/// When each invalidation is sent again after the first time.
const RESEND_AFTER: [Duration; 2] = [Duration::from_millis(20), Duration::from_millis(200)];
/// The invalidation thread sleeps this long after a batch.
const GATHER: Duration = Duration::from_millis(1);

#[derive(Clone, PartialEq, Eq, Hash)]
enum Invalidation {
    Entry(u64, Vec<u8>),
    Inode(u64),
    /// A snapshot replaced everything: every inode this node knows.
    All,
}

/// The `ApplyObserver` of a mounted node.
pub struct RemoteChanges {
    node_id: u64,
    invalidations: Sender<Invalidation>,
    refs: Arc<KernelRefs>,
    notifier: Arc<OnceLock<fuser::Notifier>>,
    replicator: Option<Arc<Replicator>>,
    /// Weak: the core holds the Raft node, which holds this observer.
    core: Weak<FsCore>,
}

impl RemoteChanges {
    pub fn new(
        node_id: u64,
        refs: Arc<KernelRefs>,
        replicator: Option<Arc<Replicator>>,
        core: &Arc<FsCore>,
    ) -> Arc<RemoteChanges> {
        let (tx, rx) = mailbox::unbounded::<Invalidation>();
        let notifier: Arc<OnceLock<fuser::Notifier>> = Arc::new(OnceLock::new());
        let n = notifier.clone();
        let thread_refs = refs.clone();
        std::thread::Builder::new()
            .name("invalidate".into())
            .spawn(move || {
                // One queue per resend: each delay is fixed, so each queue
                // is in due order as it is filled.
                let mut again: [VecDeque<(Instant, Invalidation)>; RESEND_AFTER.len()] =
                    Default::default();
                loop {
                    let next = again
                        .iter()
                        .filter_map(|q| q.front().map(|(due, _)| *due))
                        .min();
                    let wait = next.map_or(Duration::from_secs(3600), |due| {
                        due.saturating_duration_since(Instant::now())
                    });
                    // (invalidation, how many times it was sent before)
                    let mut batch = Vec::new();
                    match rx.recv_timeout(wait) {
                        Ok(inval) => batch.push((inval, 0)),
                        Err(RecvError::Timeout) => {}
                        Err(RecvError::Closed) => return,
                    }
                    while let Some(inval) = rx.try_recv() {
                        batch.push((inval, 0));
                    }
                    let now = Instant::now();
                    for (stage, queue) in again.iter_mut().enumerate() {
                        while queue.front().is_some_and(|(due, _)| *due <= now) {
                            let (_, inval) = queue.pop_front().expect("checked");
                            batch.push((inval, stage + 1));
                        }
                    }
                    let mut seen = HashSet::new();
                    batch.retain(|item| seen.insert(item.clone()));
                    for (inval, sent) in batch {
                        if let Some(notifier) = n.get() {
                            send(notifier, &thread_refs, inval.clone());
                        }
                        if let Some(delay) = RESEND_AFTER.get(sent) {
                            again[sent].push_back((now + *delay, inval));
                        }
                    }
                    std::thread::sleep(GATHER);
                }
            })
            .expect("spawning a thread");
        Arc::new(RemoteChanges {
            node_id,
            invalidations: tx,
            refs,
            notifier,
            replicator,
            core: Arc::downgrade(core),
        })
    }

    /// Starts telling the kernel, once the mount exists.
    pub fn set_notifier(&self, notifier: fuser::Notifier) {
        let _ = self.notifier.set(notifier);
    }

    fn entry(&self, parent: u64, name: &[u8]) {
        if self.refs.holds(parent) {
            let _ = self
                .invalidations
                .send(Invalidation::Entry(parent, name.to_vec()));
            let _ = self.invalidations.send(Invalidation::Inode(parent));
        }
    }

    fn inode(&self, ino: u64) {
        if self.refs.holds(ino) {
            let _ = self.invalidations.send(Invalidation::Inode(ino));
        }
    }
}

impl ApplyObserver for RemoteChanges {
    fn storing(&self, cmd: &Command, outcome: &Outcome, freed: &[u64], batch: &mut WriteBatch) {
        if !freed.is_empty() {
            if let Some(core) = self.core.upgrade() {
                core.deleting(freed);
            }
        }
        if let (Some(Op::SetContent(s)), Some(r)) = (&cmd.op, &self.replicator) {
            if outcome.errno == 0 && cmd.node_id != self.node_id {
                r.received(s, cmd.node_id, batch);
            }
        }
    }

    fn applied(&self, cmd: &Command, outcome: &Outcome) {
        if outcome.errno != 0 {
            return;
        }
        if cmd.node_id == self.node_id {
            // The kernel saw this change go through it, except the birth
            // of a file created here: its directory changed only now (a
            // stat of it since the create is cached), and if another node
            // made the name meanwhile (its file got the contents), the
            // number the kernel was given is gone. A birth comes with the
            // file's contents, or alone (a create with the number this
            // node reserved) when nothing was written to it.
            let birth = match &cmd.op {
                Some(Op::SetContent(s)) => s.create.as_ref(),
                Some(Op::Create(c)) if c.ino != 0 => Some(c),
                _ => None,
            };
            if let (Some(c), Some(inode)) = (birth, &outcome.inode) {
                self.inode(c.parent);
                if inode.ino != c.ino {
                    self.entry(c.parent, &c.name);
                    self.inode(c.ino);
                }
            }
            return;
        }
        match &cmd.op {
            Some(Op::Create(c)) => self.entry(c.parent, &c.name),
            Some(Op::Link(l)) => {
                self.entry(l.new_parent, &l.new_name);
                self.inode(l.ino);
            }
            Some(Op::Unlink(u)) => self.entry(u.parent, &u.name),
            Some(Op::Rename(r)) => {
                self.entry(r.parent, &r.name);
                self.entry(r.new_parent, &r.new_name);
            }
            Some(Op::SetAttr(s)) => self.inode(s.ino),
            Some(Op::SetXattr(x)) => self.inode(x.ino),
            Some(Op::RemoveXattr(x)) => self.inode(x.ino),
            Some(Op::SetContent(s)) => {
                let ino = outcome.inode.as_ref().map_or(s.ino, |i| i.ino);
                if let Some(c) = &s.create {
                    self.entry(c.parent, &c.name);
                }
                // A file this command made has a number the kernel here was
                // never given (numbers are not reused); one it found may be
                // held.
                if s.create.is_none() || ino != s.ino {
                    self.inode(ino);
                }
            }
            Some(Op::Reap(_)) | Some(Op::Reserve(_)) | None => {}
        }
    }

    fn snapshot_installed(&self) {
        let _ = self.invalidations.send(Invalidation::All);
        if let Some(r) = self.replicator.clone() {
            std::thread::spawn(move || r.scan());
        }
    }
}

fn send(notifier: &fuser::Notifier, refs: &KernelRefs, inval: Invalidation) {
    let inval_inode = |ino: u64| notifier.inval_inode(fuser::INodeNo(ino), 0, 0);
    let result = match inval {
        Invalidation::Entry(parent, name) if refs.holds(parent) => notifier.inval_entry(
            fuser::INodeNo(parent),
            std::os::unix::ffi::OsStrExt::from_bytes(&name[..]),
        ),
        Invalidation::Inode(ino) if refs.holds(ino) => inval_inode(ino),
        Invalidation::All => {
            for ino in refs.held() {
                let _ = inval_inode(ino);
            }
            Ok(())
        }
        _ => Ok(()), // nothing of it can be cached
    };
    // ENOENT: the kernel did not have it cached, which is fine.
    if let Err(e) = result {
        if e.raw_os_error() != Some(libc::ENOENT) {
            tracing::debug!("cache invalidation failed: {e}");
        }
    }
}
