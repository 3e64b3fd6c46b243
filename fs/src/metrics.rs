//! What a mount measures, for the node's `/metrics`: the latency of every
//! FUSE operation, and the chunks moved between nodes. The metrics are
//! shared handles (`Arc` inside): the FUSE threads and the replicator
//! record, the admin endpoint registers clones and encodes them.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use wpfs_consensus::metrics::{latency_histogram, observe};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

type Latencies<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency of the FUSE operations, by operation (`lookup`, `read`, ...).
#[derive(Clone)]
pub struct FuseMetrics {
    ops: Latencies<OpLabel>,
}

impl Default for FuseMetrics {
    fn default() -> Self {
        FuseMetrics {
            ops: Family::new_with_constructor(latency_histogram),
        }
    }
}

/// Observes an operation's time when dropped (after its reply is sent).
pub struct Timed<'a> {
    ops: &'a Latencies<OpLabel>,
    op: &'static str,
    started: Instant,
}

impl Drop for Timed<'_> {
    fn drop(&mut self) {
        // The family's lock is held only here, not for the operation: a
        // slow fsync must not hold up the first `rename` of the mount.
        observe(
            &self.ops.get_or_create(&OpLabel { op: self.op }),
            self.started.elapsed(),
        );
    }
}

impl FuseMetrics {
    pub fn time(&self, op: &'static str) -> Timed<'_> {
        Timed {
            ops: &self.ops,
            op,
            started: Instant::now(),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "fuse_operation",
            "Time from a FUSE request reaching wpfs to its reply, by operation",
            Unit::Seconds,
            self.ops.clone(),
        );
    }
}

/// Chunks moved between nodes: fetches (a chunk this node lacks, asked
/// of a peer) and pushes (new chunks sent to peers before a commit).
#[derive(Clone)]
pub struct ChunkMetrics {
    fetches: Family<ResultLabel, Counter>,
    fetched_bytes: Counter,
    fetch_latency: Histogram,
    pushes: Family<ResultLabel, Counter>,
    pushed_bytes: Counter,
    push_latency: Histogram,
    /// Chunks stored here that were written elsewhere (fetched or carried
    /// in a command), and their bytes.
    pub replicated_chunks: Counter,
    pub replicated_bytes: Counter,
}

impl Default for ChunkMetrics {
    fn default() -> Self {
        let metrics = ChunkMetrics {
            fetches: Family::default(),
            fetched_bytes: Counter::default(),
            fetch_latency: latency_histogram(),
            pushes: Family::default(),
            pushed_bytes: Counter::default(),
            push_latency: latency_histogram(),
            replicated_chunks: Counter::default(),
            replicated_bytes: Counter::default(),
        };
        // Both results from the start: a series that appears only at the
        // first error is one a `rate()` alert cannot see rise.
        for ok in [true, false] {
            let _ = metrics.fetches.get_or_create(&result(ok));
            let _ = metrics.pushes.get_or_create(&result(ok));
        }
        metrics
    }
}

fn result(ok: bool) -> ResultLabel {
    ResultLabel {
        result: if ok { "ok" } else { "error" },
    }
}

impl ChunkMetrics {
    /// One request to one peer for one chunk or a batch, and what it
    /// answered for each (None: not there, or no answer in time).
    pub fn fetched(&self, started: Instant, answers: &[Option<Vec<u8>>]) {
        let got: Vec<&Vec<u8>> = answers.iter().flatten().collect();
        let missed = answers.len() - got.len();
        self.fetches
            .get_or_create(&result(true))
            .inc_by(got.len() as u64);
        self.fetches
            .get_or_create(&result(false))
            .inc_by(missed as u64);
        if !got.is_empty() {
            (self.fetched_bytes).inc_by(got.iter().map(|d| d.len() as u64).sum());
            observe(&self.fetch_latency, started.elapsed());
        }
    }

    /// One push of a batch of `bytes` to the peers; `ok` when enough of
    /// them stored it.
    pub fn pushed(&self, started: Instant, bytes: u64, ok: bool) {
        self.pushes.get_or_create(&result(ok)).inc();
        self.pushed_bytes.inc_by(bytes);
        observe(&self.push_latency, started.elapsed());
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "chunk_fetches",
            "Chunks asked of a peer, by result (error: no answer in time, or the peer lacks it)",
            self.fetches.clone(),
        );
        registry.register_with_unit(
            "chunk_fetched",
            "Bytes of the chunks peers answered fetches with",
            Unit::Bytes,
            self.fetched_bytes.clone(),
        );
        registry.register_with_unit(
            "chunk_fetch",
            "Time a peer took to answer a fetch of one chunk or a batch",
            Unit::Seconds,
            self.fetch_latency.clone(),
        );
        registry.register(
            "chunk_pushes",
            "Batches of new chunks (up to 64) sent to the peers before a commit, by result \
             (error: fewer peers than copies-1 stored it; the chunks count as under-replicated)",
            self.pushes.clone(),
        );
        registry.register_with_unit(
            "chunk_pushed",
            "Bytes of chunks in the pushed batches (once per batch, whatever the peers)",
            Unit::Bytes,
            self.pushed_bytes.clone(),
        );
        registry.register_with_unit(
            "chunk_push",
            "Time until enough peers stored a pushed batch",
            Unit::Seconds,
            self.push_latency.clone(),
        );
        registry.register(
            "replicated_chunks",
            "Chunks written on other nodes and stored here (fetched or carried in a command)",
            self.replicated_chunks.clone(),
        );
        registry.register_with_unit(
            "replicated",
            "Bytes of chunks written on other nodes and stored here",
            Unit::Bytes,
            self.replicated_bytes.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(register: impl FnOnce(&mut Registry)) -> String {
        let mut registry = Registry::with_prefix("wpfs");
        register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn an_operation_is_counted_under_its_name_once_it_ends() {
        let fuse = FuseMetrics::default();
        drop(fuse.time("lookup"));
        let running = fuse.time("rename");
        let out = text(|r| fuse.register(r));
        assert!(
            out.contains("wpfs_fuse_operation_seconds_count{op=\"lookup\"} 1\n"),
            "{out}"
        );
        assert!(!out.contains("rename"), "{out}");
        drop(running);
        let out = text(|r| fuse.register(r));
        assert!(out.contains("wpfs_fuse_operation_seconds_count{op=\"rename\"} 1\n"));
    }

    #[test]
    fn fetches_and_pushes_count_by_result_with_their_bytes() {
        let chunks = ChunkMetrics::default();
        // A batch of three, of which the peer had two; one chunk alone,
        // not answered.
        let batch = [Some(vec![0; 1000]), None, Some(vec![0; 500])];
        chunks.fetched(Instant::now(), &batch);
        chunks.fetched(Instant::now(), &[None]);
        chunks.pushed(Instant::now(), 4096, false);
        let out = text(|r| chunks.register(r));
        for line in [
            "wpfs_chunk_fetches_total{result=\"ok\"} 2\n",
            "wpfs_chunk_fetches_total{result=\"error\"} 2\n",
            "wpfs_chunk_fetched_bytes_total 1500\n",
            "wpfs_chunk_fetch_seconds_count 1\n",
            "wpfs_chunk_pushes_total{result=\"error\"} 1\n",
            "wpfs_chunk_pushed_bytes_total 4096\n",
        ] {
            assert!(out.contains(line), "no {line:?} in\n{out}");
        }
    }
}
