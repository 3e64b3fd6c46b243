//! Rolling upgrades: nodes of different releases in one cluster, as when
//! one node of a cluster is upgraded first. Every member's version shows
//! in `wpfs status`, and contents replicate both ways between the newer
//! node and the older ones: the newer one's messages carry a field the
//! others do not know (what a newer release's grown messages look like on
//! the wire; prost skips it), and it asks the older ones, which speak peer
//! protocol 1, for chunks one at a time rather than in batches.
//!
//! One test per binary: the older and newer nodes are made by the
//! environment this process passes to the daemons it starts after
//! setting it.

use std::time::Duration;

use wpfs_tests::{fuse_available, noise, wait_until, Cluster};

#[test]
fn a_newer_node_replicates_with_older_ones() {
    if !fuse_available() {
        return;
    }
    // SAFETY: no other thread of this test binary reads the environment now.
    unsafe { std::env::set_var("WPFS_PEER_PROTOCOL", "1") };
    let mut cluster = Cluster::start(2);
    unsafe { std::env::remove_var("WPFS_PEER_PROTOCOL") };
    // Written before the newer node joins, over 64 KiB (not carried in its
    // command): the newer node fetches its chunks from the older ones.
    let from_older = noise(1, 300_000);
    std::fs::write(cluster.node(1).path("from-older.bin"), &from_older).unwrap();
    unsafe { std::env::set_var("WPFS_WIRE_UNKNOWN_FIELD", "1") };
    cluster.add(3);
    unsafe { std::env::remove_var("WPFS_WIRE_UNKNOWN_FIELD") };
    cluster.wait_for_voters(3);

    let from_newer = noise(3, 300_000);
    std::fs::write(cluster.node(3).path("from-newer.bin"), &from_newer).unwrap();
    for (id, name, want) in [
        (1, "from-newer.bin", &from_newer),
        (2, "from-newer.bin", &from_newer),
        (3, "from-older.bin", &from_older),
    ] {
        let path = cluster.node(id).path(name);
        wait_until(
            Duration::from_secs(20),
            &format!("node {id} to read {name}"),
            || std::fs::read(&path).is_ok_and(|b| b == *want),
        );
    }

    // Each member's version, as node 1 sees it (its own, and from each
    // peer's handshake).
    let status = cluster.node(1).status();
    let members = status["members"].as_array().expect("members");
    assert_eq!(members.len(), 3, "{status:#}");
    for m in members {
        let version = m["version"].as_str().unwrap_or_default();
        let protocol = if m["id"] == 3 { 2 } else { 1 };
        assert!(
            version.ends_with(&format!("(protocol {protocol})"))
                && version.starts_with(env!("CARGO_PKG_VERSION")),
            "member {} has version {version:?}",
            m["id"]
        );
    }
}
