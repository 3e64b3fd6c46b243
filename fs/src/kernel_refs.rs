//! Which inodes the kernel holds. It caches names, attributes and pages
//! only under inodes this mount gave it (a lookup, a create, a
//! readdirplus entry) and has not forgotten yet (FUSE `forget` counts them
//! back), so only those can hold anything stale.
//!
//! `remote` asks before telling the kernel to drop something: a tree
//! copied in on another node is thousands of changes under directories
//! nobody here has looked at, and each invalidation of them was a write
//! to /dev/fuse answered with ENOENT, a sixth of a follower's CPU.
//!
//! Counting too high is harmless (an invalidation too many); too low would
//! leave stale caches. So every reply that may give the kernel an inode
//! counts it, even where the kernel might not keep it ("." and ".." in a
//! readdirplus).

use std::collections::HashMap;

use parking_lot::Mutex;
use wpfs_consensus::ROOT_INO;

#[derive(Default)]
pub struct KernelRefs {
    /// Inode → lookups the kernel has not forgotten yet.
    counts: Mutex<HashMap<u64, u64>>,
}

impl KernelRefs {
    /// The kernel was given `ino` once more.
    pub fn given(&self, ino: u64) {
        *self.counts.lock().entry(ino).or_default() += 1;
    }

    /// The kernel forgot `n` of its lookups of `ino`.
    pub fn forgotten(&self, ino: u64, n: u64) {
        let mut counts = self.counts.lock();
        if let Some(count) = counts.get_mut(&ino) {
            *count = count.saturating_sub(n);
            if *count == 0 {
                counts.remove(&ino);
            }
        }
    }

    /// Whether the kernel may cache anything of `ino` (the root it always holds).
    pub fn holds(&self, ino: u64) -> bool {
        ino == ROOT_INO || self.counts.lock().contains_key(&ino)
    }

    /// Every inode the kernel may cache anything of.
    pub fn held(&self) -> Vec<u64> {
        let counts = self.counts.lock();
        let root = (!counts.contains_key(&ROOT_INO)).then_some(ROOT_INO);
        counts.keys().copied().chain(root).collect()
    }
}
