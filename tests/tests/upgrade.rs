//! Rolling upgrades: nodes of different releases in one cluster. Every
//! member's version shows in `wpfs status`, and a node whose messages
//! carry a field the others do not know (what a newer release's grown
//! messages look like on the wire) still replicates both ways: prost
//! skips fields it does not know.
//!
//! One test per binary: the newer node is made by the environment this
//! process passes to the daemons it starts after setting it.

use std::time::Duration;

use wpfs_tests::{fuse_available, noise, wait_until, Cluster};

#[test]
fn a_node_whose_messages_carry_an_unknown_field_still_replicates() {
    if !fuse_available() {
        return;
    }
    let mut cluster = Cluster::start(2);
    // SAFETY: no other thread of this test binary reads the environment now.
    unsafe { std::env::set_var("WPFS_WIRE_UNKNOWN_FIELD", "1") };
    cluster.add(3);
    unsafe { std::env::remove_var("WPFS_WIRE_UNKNOWN_FIELD") };
    cluster.wait_for_voters(3);

    let from_newer = noise(3, 300_000);
    std::fs::write(cluster.node(3).path("from-newer.bin"), &from_newer).unwrap();
    let from_older = noise(1, 300_000);
    std::fs::write(cluster.node(1).path("from-older.bin"), &from_older).unwrap();
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
        assert!(
            version.ends_with("(protocol 1)") && version.starts_with(env!("CARGO_PKG_VERSION")),
            "member {} has version {version:?}",
            m["id"]
        );
    }
}
