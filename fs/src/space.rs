//! Disk space: a node takes no new file contents while the free space of
//! its store's filesystem is below a reserve (`min_free`, 256 MiB by
//! default).
//!
//! The reason is RocksDB: a write that meets a full disk latches a
//! background error, and from then on every write fails until the store
//! is reopened, even once space is freed (RocksDB issues #919, #8217,
//! #11643). So the store must never meet a full disk. Contents are nearly
//! all of what a node writes; refusing new chunks below the reserve gives
//! the writer ENOSPC while the small writes the namespace needs (the Raft
//! log, applied commands, deletions that free space) still fit in the
//! reserve, and writing works again as soon as space is freed.
//!
//! The reserve covers what RocksDB writes beyond the chunks it was given: a
//! memtable flush (up to 64 MiB of blob file) while its write-ahead log
//! still exists, and the space it preallocates for new log and blob files.
//! Measured on a tmpfs: after the last refused chunk RocksDB took another
//! ~106 MiB; a 64 MiB reserve ran the disk full, 128 MiB held.
//! Should the disk fill all the same (another program), the store fails,
//! the node reports `degraded: store failed` and must be restarted once
//! space is freed.
//!
//! A `statvfs` per chunk was a percent of a node's CPU while a tree is
//! copied in, so a check grants a credit: half the headroom it saw above
//! the reserve may be stored without asking the kernel again, for
//! `CREDIT_FOR` at most. Half, so that a credit never takes a node further
//! into its disk than a check right before each chunk would have.

use std::ffi::CString;
use std::path::Path;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::error::{Errno, Result};
use crate::throttle::{held_back, Throttle};

pub const DEFAULT_MIN_FREE: u64 = 256 << 20;
/// How long the credit of a check lasts (see the module comment).
const CREDIT_FOR: Duration = Duration::from_secs(1);

pub struct Space {
    /// A path on the store's filesystem, NUL-terminated for statvfs.
    path: CString,
    min_free: u64,
    /// The "refused" warning, once every 10 s at most.
    warning: Throttle,
    /// Bytes that may still be stored without a check, and until when.
    credit: Mutex<(u64, Instant)>,
}

/// The store's filesystem as statvfs sees it, in `block_size` units.
pub struct Usage {
    pub block_size: u64,
    pub blocks: u64,
    pub free: u64,
    pub available: u64,
}

impl Space {
    pub fn new(path: &Path, min_free: u64) -> Space {
        Space {
            path: CString::new(path.as_os_str().as_encoded_bytes()).unwrap_or_default(),
            min_free,
            warning: Throttle::new(Duration::from_secs(10)),
            credit: Mutex::new((0, Instant::now())),
        }
    }

    /// The reserve new contents may not eat into, in bytes.
    pub fn min_free(&self) -> u64 {
        self.min_free
    }

    pub fn usage(&self) -> Result<Usage> {
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: path is NUL-terminated and st is a valid out-pointer.
        if unsafe { libc::statvfs(self.path.as_ptr(), &mut st) } != 0 {
            let errno = std::io::Error::last_os_error().raw_os_error();
            return Err(Errno(errno.unwrap_or(libc::EIO)));
        }
        Ok(Usage {
            block_size: st.f_frsize as u64,
            blocks: st.f_blocks as u64,
            free: st.f_bfree as u64,
            available: st.f_bavail as u64,
        })
    }

    /// What writers may still use: the available space less the reserve,
    /// in `block_size` units (what `df` shows for the mount).
    pub fn usable(&self) -> Result<Usage> {
        let mut u = self.usage()?;
        let reserve = self.min_free.div_ceil(u.block_size.max(1));
        u.available = u.available.saturating_sub(reserve);
        u.free = u.free.saturating_sub(reserve);
        Ok(u)
    }

    /// ENOSPC once storing `len` more bytes would eat into the reserve.
    pub fn check(&self, len: usize) -> Result<()> {
        let len = len as u64;
        let mut credit = self.credit.lock();
        if credit.0 >= len && Instant::now() < credit.1 {
            credit.0 -= len;
            return Ok(());
        }
        let u = self.usage()?;
        let headroom = (u.available * u.block_size).saturating_sub(self.min_free);
        let left = headroom.checked_sub(len);
        *credit = (left.unwrap_or(0) / 2, Instant::now() + CREDIT_FOR);
        if left.is_none() {
            if let Some(held) = self.warning.admit() {
                tracing::warn!(
                    "refused new contents: {} MiB free on the store's disk, {} MiB are kept in \
                     reserve (free space, or lower -o min_free){}",
                    (u.available * u.block_size) >> 20,
                    self.min_free >> 20,
                    held_back(held)
                );
            }
            return Err(Errno(libc::ENOSPC));
        }
        Ok(())
    }
}
