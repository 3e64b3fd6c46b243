//! One RocksDB per node, with a column family per kind of data:
//!
//! - `raft`: the Raft log entries and hard state (see `raft_log`);
//! - `meta`: the namespace state machine: inodes, directory entries, chunk
//!   slots, chunk reference counts, and the applied index (see `namespace`);
//! - `chunks`: file contents, BLAKE3 hash → bytes (used by the fs crate).
//!
//! All three share one write-ahead log, so a write to one is never durable
//! without every write made before it: a synced Raft append also makes the
//! chunks written before it durable, and a state machine batch carries its
//! applied index, so a crash anywhere restarts consistent.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use librocksdb_sys as ffi;
use rocksdb::{
    AsColumnFamilyRef, AsRawPtr, BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor,
    Env, LruCacheOptions, Options, WriteBufferManager, DB,
};

pub const CF_RAFT: &str = "raft";
pub const CF_META: &str = "meta";
pub const CF_CHUNKS: &str = "chunks";

/// The block cache all column families share, memtables included.
/// (128 MiB read 1M files as fast and lowered a node's peak under a copy
/// by 15-40 MiB: docs/performance.md, "a join in batches".)
const BLOCK_CACHE_BYTES: usize = 160 << 20;
/// The memtables of all column families together, charged to the block
/// cache: without a shared limit each column family filled its own
/// (RocksDB's default of 64 MiB, twice that while one is flushed), and
/// a node's memtables reached 168 MiB while 100,000 files were copied in.
const MEMTABLES_BYTES: usize = 64 << 20;

/// Why the store could not be opened, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {} is in use by a running wpfs process (stop it first: umount its mountpoint)", path.display())]
    Locked { path: PathBuf },
    #[error("store {} cannot be opened: {source} (check the disk and the directory's permissions)", path.display())]
    Open {
        path: PathBuf,
        source: rocksdb::Error,
    },
    #[error("store {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("store {}: {source}", path.display())]
    Other {
        path: PathBuf,
        source: rocksdb::Error,
    },
}

impl StoreError {
    pub fn io(path: &Path, source: rocksdb::Error) -> Self {
        StoreError::Other {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Bytes RocksDB holds in memory (`Store::memory`).
#[derive(Clone, Copy, Debug, Default)]
pub struct StoreMemory {
    pub memtables: u64,
    pub block_cache: u64,
}

/// The node's RocksDB with its column families.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
    path: PathBuf,
}

impl Store {
    /// Opens (and with `create`, creates) the store at `path`.
    pub fn open(path: &Path, create: bool) -> Result<Store, StoreError> {
        let mut db_opts = Options::default();
        db_opts.create_if_missing(create);
        db_opts.create_missing_column_families(create);
        db_opts.set_max_background_jobs(2);
        db_opts.set_keep_log_file_num(3);
        // The write-ahead log is kept until every column family's memtable
        // holding its writes is flushed; the Raft and namespace memtables
        // fill slowly, so by default it grew to 1.4 GB at 100,000 files,
        // disk that `df` shows taken and a restart replays (2.3 s against
        // 0.55 s bounded). Past this size the oldest memtables are flushed.
        db_opts.set_max_total_wal_size(256 << 20);
        // Flushes and compactions run niced: on a small web node, a PHP
        // worker's read must not queue behind them.
        let mut env = Env::new().map_err(|e| StoreError::io(path, e))?;
        env.lower_thread_pool_cpu_priority();
        env.lower_high_priority_thread_pool_cpu_priority();
        db_opts.set_env(&env);
        // The namespace is read on every FUSE lookup and getattr the kernel
        // does not answer from its cache: keep it in one shared block cache.
        // One shard, not RocksDB's default of 2 MiB shards: a table's
        // filter block outgrows a shard (about 1.5 MB per 64 MiB table),
        // so it was evicted as soon as read, and every lookup read and
        // checksummed it again: at 1,000,000 files `ls -l` of a
        // 104,000-entry directory took 169 s, nearly all CPU, and 7-9 s
        // with one shard.
        let mut lru = LruCacheOptions::default();
        lru.set_capacity(BLOCK_CACHE_BYTES);
        lru.set_num_shard_bits(0);
        let cache = Cache::new_lru_cache_opts(&lru);
        let memtables = WriteBufferManager::new_write_buffer_manager_with_cache(
            MEMTABLES_BYTES,
            false,
            cache.clone(),
        );
        db_opts.set_write_buffer_manager(&memtables);
        let cfs = [CF_RAFT, CF_META, CF_CHUNKS]
            .into_iter()
            .map(|name| ColumnFamilyDescriptor::new(name, cf_options(name, Some(&cache))))
            .collect::<Vec<_>>();
        let db = DB::open_cf_descriptors(&db_opts, path, cfs).map_err(|e| classify(path, e))?;
        Ok(Store {
            db: Arc::new(db),
            path: path.to_path_buf(),
        })
    }

    /// Opens an existing store read-only; works while a daemon holds it.
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        let opts = Options::default();
        let db = DB::open_cf_for_read_only(&opts, path, [CF_RAFT, CF_META, CF_CHUNKS], false)
            .map_err(|e| classify(path, e))?;
        Ok(Store {
            db: Arc::new(db),
            path: path.to_path_buf(),
        })
    }

    pub fn db(&self) -> &DB {
        &self.db
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created with the store")
    }

    /// Disk space the store takes, in bytes (all its files: tables, blob
    /// files, write-ahead log), which is what an operator budgets for.
    pub fn size_bytes(&self) -> u64 {
        std::fs::read_dir(&self.path)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// What RocksDB holds in memory now: the memtables of every column
    /// family, and the block cache they share.
    pub fn memory(&self) -> StoreMemory {
        let int = |cf: &str, property: &str| {
            self.db
                .property_int_value_cf(self.cf(cf), property)
                .ok()
                .flatten()
                .unwrap_or(0)
        };
        StoreMemory {
            memtables: [CF_RAFT, CF_META, CF_CHUNKS]
                .iter()
                .map(|cf| int(cf, "rocksdb.cur-size-all-mem-tables"))
                .sum(),
            block_cache: int(CF_META, "rocksdb.block-cache-usage"),
        }
    }

    /// Makes every write so far durable on disk (fsync of the WAL).
    pub fn sync(&self) -> Result<(), StoreError> {
        self.db
            .flush_wal(true)
            .map_err(|e| StoreError::io(&self.path, e))
    }
}

/// Answers which keys a column family holds without reading their values.
///
/// A `get` reads the value with the key, and a chunk's value is up to
/// 64 KiB in a blob file: the replication scan at start, asking about every
/// referenced chunk, read the node's whole contents (1.1 GB and 96 s at
/// 100,000 files). An iterator that leaves values unprepared
/// (`allow_unprepared_value`) stops at the key. rust-rocksdb does not wrap
/// that option, hence the C API here.
///
/// It reads one view of the store, taken when it is made: keys written
/// later are not seen, so keep it for one batch of questions.
pub struct KeyProbe<'a> {
    options: *mut ffi::rocksdb_readoptions_t,
    iter: *mut ffi::rocksdb_iterator_t,
    store: &'a Store,
}

impl Store {
    pub fn key_probe(&self, cf: &str) -> KeyProbe<'_> {
        // SAFETY: the pointers come from a live DB and column family, and
        // `KeyProbe` borrows the store, so they outlive the iterator.
        unsafe {
            let options = ffi::rocksdb_readoptions_create();
            ffi::rocksdb_readoptions_set_allow_unprepared_value(options, 1);
            let iter =
                ffi::rocksdb_create_iterator_cf(self.db.as_raw_ptr(), options, self.cf(cf).inner());
            KeyProbe {
                options,
                iter,
                store: self,
            }
        }
    }
}

impl KeyProbe<'_> {
    /// Whether the column family holds `key`.
    pub fn contains(&mut self, key: &[u8]) -> Result<bool, StoreError> {
        // SAFETY: `iter` is valid until drop; the key slice RocksDB returns
        // is copied out before the iterator moves again.
        unsafe {
            ffi::rocksdb_iter_seek(self.iter, key.as_ptr().cast(), key.len());
            if ffi::rocksdb_iter_valid(self.iter) != 0 {
                let mut len = 0;
                let found = ffi::rocksdb_iter_key(self.iter, &mut len);
                return Ok(std::slice::from_raw_parts(found.cast::<u8>(), len) == key);
            }
            let mut error: *mut std::ffi::c_char = std::ptr::null_mut();
            ffi::rocksdb_iter_get_error(self.iter, &mut error);
            if error.is_null() {
                return Ok(false); // past the last key
            }
            let reason = std::ffi::CStr::from_ptr(error)
                .to_string_lossy()
                .into_owned();
            ffi::rocksdb_free(error.cast());
            Err(StoreError::Read {
                path: self.store.path.clone(),
                reason,
            })
        }
    }
}

impl Drop for KeyProbe<'_> {
    fn drop(&mut self) {
        // SAFETY: made in `key_probe`, destroyed once, iterator first.
        unsafe {
            ffi::rocksdb_iter_destroy(self.iter);
            ffi::rocksdb_readoptions_destroy(self.options);
        }
    }
}

/// The options of SST files written for the `meta` column family
/// (`snapshot::install`): its tables' format, no cache.
pub fn sst_options() -> Options {
    cf_options(CF_META, None)
}

fn cf_options(name: &str, cache: Option<&Cache>) -> Options {
    let mut opts = Options::default();
    let mut table = BlockBasedOptions::default();
    match cache {
        Some(cache) => table.set_block_cache(cache),
        None => table.disable_cache(),
    }
    table.set_bloom_filter(10.0, false);
    table.set_cache_index_and_filter_blocks(true);
    opts.set_block_based_table_factory(&table);
    if name == CF_CHUNKS {
        // Chunks are large, written once and never updated: keep them in
        // blob files so compaction does not rewrite them again and again.
        opts.set_enable_blob_files(true);
        opts.set_min_blob_size(4096);
        opts.set_blob_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_enable_blob_gc(true);
    }
    if name == CF_RAFT {
        // The Raft log is deleted soon after it is written (`compact_log`)
        // and read from memory (`raft_log`): compressing it at every
        // memtable flush is work for nothing.
        opts.set_compression_type(rocksdb::DBCompressionType::None);
    } else {
        // Many reads ask the memtable for a key it lacks (a name not yet
        // made, a chunk not yet here, an inode counted from disk): a bloom
        // filter answers them without walking its skiplist.
        opts.set_memtable_whole_key_filtering(true);
        opts.set_memtable_prefix_bloom_ratio(0.02);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    }
    opts
}

fn classify(path: &Path, e: rocksdb::Error) -> StoreError {
    let text = e.to_string();
    if text.contains("lock") && (text.contains("LOCK") || text.contains("Resource temporarily")) {
        StoreError::Locked {
            path: path.to_path_buf(),
        }
    } else {
        StoreError::Open {
            path: path.to_path_buf(),
            source: e,
        }
    }
}

/// Big-endian u64, so RocksDB's byte order is numeric order.
pub fn be(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

/// Reads a big-endian u64 from the first 8 bytes of `b`.
pub fn read_be(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_probe_finds_exactly_the_stored_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), true).unwrap();
        let cf = store.cf(CF_CHUNKS);
        // Values of a blob file's size, flushed: what the probe must not
        // need to read.
        for key in [b"b".as_slice(), b"d"] {
            store.db().put_cf(cf, key, vec![7u8; 64 << 10]).unwrap();
        }
        store.db().flush_cf(cf).unwrap();
        store.db().put_cf(cf, b"f", b"in the memtable").unwrap();
        let mut probe = store.key_probe(CF_CHUNKS);
        let found: Vec<bool> = [b"a".as_slice(), b"b", b"c", b"d", b"e", b"f", b"g", b"bb"]
            .iter()
            .map(|k| probe.contains(k).unwrap())
            .collect();
        assert_eq!(found, [false, true, false, true, false, true, false, false]);
    }

    #[test]
    fn a_key_probe_sees_the_store_as_it_was_made() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), true).unwrap();
        let mut probe = store.key_probe(CF_CHUNKS);
        store.db().put_cf(store.cf(CF_CHUNKS), b"k", b"v").unwrap();
        assert!(!probe.contains(b"k").unwrap());
        assert!(store.key_probe(CF_CHUNKS).contains(b"k").unwrap());
    }
}
