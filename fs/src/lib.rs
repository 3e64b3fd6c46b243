//! wpfs filesystem: what a mount does with the namespace and the chunks.
//!
//! - `core`: every filesystem operation in POSIX terms (testable without FUSE);
//! - `file`: writes of open files, buffered until close/fsync commits them;
//! - `chunks`: the BLAKE3-addressed chunk store and its garbage collection;
//! - `fuse`: the thin `fuser::Filesystem` that translates kernel requests;
//! - `replication`: fetching the chunks other nodes wrote;
//! - `remote`: what applying another node's change does here (kernel
//!   cache invalidation, chunk fetches);
//! - `kernel_refs`: which inodes the kernel holds (so may cache);
//! - `space`: the disk-space reserve below which new contents are refused;
//! - `metrics`: FUSE operation latencies and chunk transfers, for `/metrics`;
//! - `throttle`: log lines a fault would repeat per chunk, at most one per interval;
//! - `error`: errno mapping.

pub mod chunks;
pub mod core;
pub mod error;
pub mod file;
pub mod fuse;
pub mod kernel_refs;
pub mod metrics;
pub mod remote;
pub mod replication;
pub mod space;
pub mod throttle;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use crate::core::{CoreOptions, FsCore};

/// How the kernel sees the mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// The name shown as the mount's source (the data directory).
    pub source: String,
    pub allow_other: bool,
    pub read_only: bool,
    /// How long the kernel may trust an entry or attribute it was given.
    pub cache_ttl: Duration,
    /// FUSE worker threads.
    pub threads: usize,
}

/// Mounts `core` at `mountpoint`; the returned session serves requests
/// once `run` (or `spawn`) is called on it. `refs` learns which inodes
/// the kernel holds; `metrics` the time of each request.
pub fn mount(
    core: Arc<FsCore>,
    refs: Arc<kernel_refs::KernelRefs>,
    metrics: metrics::FuseMetrics,
    mountpoint: &Path,
    opts: &MountOptions,
) -> std::io::Result<fuser::Session<fuse::WpFs>> {
    use fuser::MountOption;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName(opts.source.clone()),
        // The kernel's own option: the mount's type becomes `fuse.wpfs`
        // (`findmnt -t fuse.wpfs`, `umount -a -t fuse.wpfs`). fuser's
        // `Subtype` goes only to fusermount, which a root mount skips.
        MountOption::CUSTOM("subtype=wpfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        if opts.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    if opts.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    fuser::Session::new(
        fuse::WpFs::new(core, refs, opts.cache_ttl, metrics),
        mountpoint,
        &config,
    )
}
