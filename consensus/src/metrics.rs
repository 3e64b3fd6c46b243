//! What the Raft driver measures, for the node's `/metrics`: how long a
//! proposal of this node waits for its commit, and how long a committed
//! entry waits to be applied. The histograms are shared handles: the
//! driver observes, the admin endpoint registers clones and encodes them.

use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Bucket bounds in seconds for every latency wpfs reports: 1-2.5-5 steps
/// from 10 µs (a cached FUSE lookup) to 10 s (a write across an election).
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    (-5..=0)
        .flat_map(|exp| [1.0, 2.5, 5.0].map(|m| m * 10f64.powi(exp)))
        .chain([10.0])
}

/// A latency histogram with `latency_buckets`.
pub fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

pub fn observe(histogram: &Histogram, took: Duration) {
    histogram.observe(took.as_secs_f64());
}

#[derive(Clone)]
pub struct RaftMetrics {
    /// From `Node::propose` to the entry's commit, for this node's proposals.
    pub propose_to_commit: Histogram,
    /// From the driver learning of a commit to the entry being applied.
    pub commit_to_apply: Histogram,
}

impl Default for RaftMetrics {
    fn default() -> Self {
        RaftMetrics {
            propose_to_commit: latency_histogram(),
            commit_to_apply: latency_histogram(),
        }
    }
}

impl RaftMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "raft_propose_to_commit",
            "Time from a change proposed on this node to its Raft commit \
             (includes waiting for a leader)",
            Unit::Seconds,
            self.propose_to_commit.clone(),
        );
        registry.register_with_unit(
            "raft_commit_to_apply",
            "Time from this node learning an entry is committed to the entry applied here",
            Unit::Seconds,
            self.commit_to_apply.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_rise_from_ten_microseconds_to_ten_seconds() {
        let b: Vec<f64> = latency_buckets().collect();
        assert_eq!(b.len(), 19);
        assert!((b[0] - 1e-5).abs() < 1e-12);
        assert_eq!(b[18], 10.0, "{b:?}");
        assert!(b.windows(2).all(|w| w[0] < w[1]));
    }
}
