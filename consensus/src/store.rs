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

use rocksdb::{BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, Env, Options, DB};

pub const CF_RAFT: &str = "raft";
pub const CF_META: &str = "meta";
pub const CF_CHUNKS: &str = "chunks";

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
        // Flushes and compactions run niced: on a small web node, a PHP
        // worker's read must not queue behind them.
        let mut env = Env::new().map_err(|e| StoreError::io(path, e))?;
        env.lower_thread_pool_cpu_priority();
        env.lower_high_priority_thread_pool_cpu_priority();
        db_opts.set_env(&env);
        // The namespace is read on every FUSE lookup and getattr the kernel
        // does not answer from its cache: keep it in one shared block cache.
        let cache = Cache::new_lru_cache(128 << 20);
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
