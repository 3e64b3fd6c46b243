//! Every failure a filesystem operation can have, as the errno the caller
//! gets. Store and consensus failures are logged here, once, with their
//! cause, since the errno alone (EIO) says little.

use wpfs_consensus::namespace;
use wpfs_consensus::ProposeError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

pub type Result<T> = std::result::Result<T, Errno>;

impl From<namespace::Error> for Errno {
    fn from(e: namespace::Error) -> Self {
        match e {
            namespace::Error::Errno(n) => Errno(n),
            other => {
                tracing::error!("store read failed: {other}");
                store_errno(&other.to_string())
            }
        }
    }
}

impl From<rocksdb::Error> for Errno {
    fn from(e: rocksdb::Error) -> Self {
        tracing::error!("store failed: {e}");
        store_errno(e.as_ref())
    }
}

impl From<wpfs_consensus::StoreError> for Errno {
    fn from(e: wpfs_consensus::StoreError) -> Self {
        tracing::error!("store failed: {e}");
        store_errno(&e.to_string())
    }
}

impl From<ProposeError> for Errno {
    fn from(e: ProposeError) -> Self {
        tracing::error!("write refused: {e}");
        match e {
            ProposeError::NoLeader => Errno(libc::EROFS),
            ProposeError::Store(why) => store_errno(&why),
            ProposeError::Stopped | ProposeError::Timeout(_) => Errno(libc::EIO),
        }
    }
}

/// A full disk is the one store failure the writer can act on.
fn store_errno(message: &str) -> Errno {
    if message.contains("No space left") || message.contains("ENOSPC") {
        Errno(libc::ENOSPC)
    } else {
        Errno(libc::EIO)
    }
}

pub fn err<T>(errno: i32) -> Result<T> {
    Err(Errno(errno))
}
