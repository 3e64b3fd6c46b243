//! Several nodes, one tree: real `wpfs` daemons on 127.0.0.1, each with its
//! own store and FUSE mount, joined with `wpfs join` as an operator would.
//!
//! What users rely on: a change closed on one node is seen, byte for byte,
//! by every other node (also where the kernel had cached the old version
//! or the name's absence); concurrent writers end with one whole version
//! everywhere; nodes join, leave and are removed without losing anything;
//! the whole cluster restarts with everything intact; a node with a wrong
//! token is refused; a file deleted elsewhere while open here never reads
//! as other bytes.

use std::fs;
use std::path::Path;
use std::time::Duration;

use wpfs_tests::{
    copy_tree, diff_clean, fuse_available, noise, s, tree, wait_until, wpfs, wpfs_ok, write_file,
    Cluster,
};

const CONVERGE: Duration = Duration::from_secs(20);

/// Waits until every node shows the same tree as node 1; returns it.
fn converged(cluster: &Cluster, rel: &str) -> Vec<String> {
    let want = tree(&cluster.node(1).path(rel));
    for node in &cluster.nodes[1..] {
        wait_until(CONVERGE, "every node to show node 1's tree", || {
            tree(&node.path(rel)) == want
        });
    }
    want
}

/// Waits until `path` reads as `want`. Before that it may be missing or
/// empty (an `O_EXCL` create is applied before the writer's close commits
/// the bytes), never anything else: a reader sees whole versions only.
fn wait_for_bytes(path: &Path, want: &[u8]) {
    wait_until(
        CONVERGE,
        &format!("{} to read as written", path.display()),
        || match fs::read(path) {
            Ok(b) if b == want => true,
            Ok(b) => {
                assert!(
                    b.is_empty(),
                    "{}: a partial version ({} bytes)",
                    path.display(),
                    b.len()
                );
                false
            }
            Err(_) => false,
        },
    );
}

#[test]
fn a_change_on_any_node_is_seen_on_every_node() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::start(3);
    // Each node writes; every other node reads the same bytes.
    for (i, writer) in cluster.nodes.iter().enumerate() {
        let data: Vec<u8> = (0..300_000u32).map(|x| (x * 7 + i as u32) as u8).collect();
        write_file(writer.path(&format!("from-{i}")), &data).unwrap();
        for reader in &cluster.nodes {
            wait_for_bytes(&reader.path(&format!("from-{i}")), &data);
        }
    }

    // The kernel on node 2 caches the file's pages and a name's absence;
    // a change on node 1 must still be seen there (cache TTL is 60 s).
    let (a, b) = (cluster.node(1), cluster.node(2));
    write_file(a.path("cached"), b"old version").unwrap();
    wait_for_bytes(&b.path("cached"), b"old version");
    assert!(!b.path("appears-later").exists());
    // Likewise in a directory node 2's kernel looked into after it came.
    fs::create_dir(a.path("sub")).unwrap();
    wait_until(CONVERGE, "the directory on node 2", || {
        b.path("sub").is_dir()
    });
    // Past the resends of the directory's own invalidation (up to 200 ms),
    // which would drop what is cached under it by chance.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fs::read_dir(b.path("sub")).unwrap().count(), 0);
    assert!(!b.path("sub/appears-later").exists());
    write_file(a.path("cached"), b"the new, longer version").unwrap();
    write_file(a.path("appears-later"), b"here").unwrap();
    write_file(a.path("sub/appears-later"), b"here too").unwrap();
    wait_until(CONVERGE, "the rewrite to reach node 2", || {
        fs::read(b.path("cached")).unwrap() == b"the new, longer version"
    });
    wait_for_bytes(&b.path("appears-later"), b"here");
    wait_for_bytes(&b.path("sub/appears-later"), b"here too");

    // Renames, links, attributes and deletes replicate too.
    fs::create_dir_all(a.path("d/e")).unwrap();
    write_file(a.path("d/e/f"), b"f").unwrap();
    fs::rename(a.path("d/e"), a.path("d/g")).unwrap();
    fs::hard_link(a.path("d/g/f"), a.path("d/link")).unwrap();
    std::os::unix::fs::symlink("g/f", a.path("d/sym")).unwrap();
    fs::set_permissions(
        a.path("d/g/f"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    fs::remove_file(a.path("from-0")).unwrap();
    converged(&cluster, "");
    assert!(!cluster.node(3).path("from-0").exists());
    assert!(!cluster.node(3).path("d/e").exists());
    assert_eq!(fs::read(cluster.node(3).path("d/sym")).unwrap(), b"f");
}

#[test]
fn a_wordpress_tree_copied_on_one_node_diffs_clean_on_the_others() {
    if !fuse_available() {
        return;
    }
    let source = Path::new("/usr/share/wordpress");
    if !source.is_dir() {
        eprintln!("SKIPPED: /usr/share/wordpress is missing (apt-get install wordpress)");
        return;
    }
    let cluster = Cluster::start(3);
    copy_tree(source, &cluster.node(2).path("wp"));
    converged(&cluster, "wp");
    for node in &cluster.nodes {
        diff_clean(source, &node.path("wp"));
    }
}

#[test]
fn concurrent_writers_on_all_nodes_converge() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::start(3);
    fs::create_dir(cluster.node(1).path("shared")).unwrap();
    wait_until(CONVERGE, "the directory on node 3", || {
        cluster.node(3).path("shared").is_dir()
    });
    std::thread::scope(|scope| {
        for (n, node) in cluster.nodes.iter().enumerate() {
            scope.spawn(move || {
                // Creates in one directory from every node at once.
                for i in 0..150 {
                    write_file(node.path(&format!("shared/n{n}-{i}")), format!("{n}:{i}")).unwrap();
                }
                let letter = b"ABC"[n];
                // New names made on every node at once: each ends as one
                // node's version, whole, wherever it is read.
                for i in 0..50 {
                    let body = vec![letter; 70_000 + i];
                    write_file(node.path(&format!("race-{i}")), &body).unwrap();
                }
                // Rewrites of one file: each version is one letter, whole.
                for round in 0..40 {
                    let body = vec![letter; 100_000 + round * 1000];
                    write_file(node.path("contended"), &body).unwrap();
                }
                // A rename storm: every node moves its own files around.
                for i in 0..100 {
                    fs::rename(
                        node.path(&format!("shared/n{n}-{i}")),
                        node.path(&format!("shared/moved-n{n}-{i}")),
                    )
                    .unwrap();
                }
            });
        }
    });
    let want = converged(&cluster, "");
    let names = fs::read_dir(cluster.node(2).path("shared"))
        .unwrap()
        .count();
    assert_eq!(names, 3 * 150, "every create from every node is there once");
    assert_eq!(want.iter().filter(|l| l.contains("moved-")).count(), 300);
    for i in 0..50 {
        let name = format!("race-{i}");
        let body = fs::read(cluster.node(1).path(&name)).unwrap();
        assert_eq!(body.len(), 70_000 + i, "{name}: a whole version");
        assert!(body.iter().all(|b| *b == body[0]), "{name} mixes versions");
        for node in &cluster.nodes[1..] {
            assert_eq!(fs::read(node.path(&name)).unwrap(), body, "{name}");
        }
    }
    for node in &cluster.nodes {
        let body = fs::read(node.path("contended")).unwrap();
        assert!(!body.is_empty());
        assert!(
            body.iter().all(|b| *b == body[0]),
            "{}: the contended file mixes versions",
            node.mnt.display()
        );
    }
}

/// Threads of daemon `pid` that keep a link to a peer address.
fn dialing_threads(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter(|t| {
            fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("peer-out"))
        })
        .count()
}

#[test]
fn nodes_join_leave_and_are_removed_and_the_cluster_restarts_whole() {
    if !fuse_available() {
        return;
    }
    let mut cluster = Cluster::start(3);
    let a = cluster.node(1);
    fs::create_dir(a.path("uploads")).unwrap();
    for i in 0..300 {
        let body: Vec<u8> = (0..(i * 997 % 200_000)).map(|x| (x ^ i) as u8).collect();
        write_file(a.path(&format!("uploads/{i}.jpg")), body).unwrap();
    }
    let before = converged(&cluster, "");

    // A fourth node joins the populated cluster and gets everything.
    cluster.add(4);
    cluster.wait_for_voters(4);
    wait_until(CONVERGE, "node 4 to hold node 1's tree", || {
        tree(&cluster.node(4).mnt) == before
    });
    wait_until(CONVERGE, "node 4's replication backlog to drain", || {
        cluster.node(4).holds_every_chunk()
    });

    // Node 3 dies; node 2 removes it; the others keep writing.
    cluster.node(3).kill9();
    let out = wpfs_ok(&[
        "remove",
        "--data",
        s(&cluster.node(2).data),
        "--node-id",
        "3",
    ]);
    assert!(out.contains("node 3 removed"), "{out}");
    cluster.wait_for_voters(3);
    write_file(cluster.node(4).path("after-remove"), b"x").unwrap();
    wait_for_bytes(&cluster.node(1).path("after-remove"), b"x");
    let status = cluster.node(1).status();
    let ids: Vec<u64> = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert!(!ids.contains(&3), "members after remove: {ids:?}");

    // Node 4 leaves cleanly: it unmounts, and may not come back as is.
    let out = wpfs_ok(&["leave", "--data", s(&cluster.node(4).data)]);
    assert!(out.contains("left"), "{out}");
    wait_until(CONVERGE, "node 4 to unmount", || {
        cluster.node(4).status()["running"] == false
    });
    let again = wpfs(&["mount", s(&cluster.node(4).data), s(&cluster.node(4).mnt)]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("left its cluster"));
    cluster.wait_for_voters(2);
    // Node 1 stops dialing the two that are gone; one link is left.
    let pid = cluster.node(1).pid().expect("node 1's daemon");
    wait_until(CONVERGE, "node 1 to stop dialing nodes 3 and 4", || {
        dialing_threads(pid) == 1
    });

    // The remaining two stop and start again: nothing is lost.
    let want = tree(&cluster.node(1).mnt);
    cluster.node(1).unmount();
    cluster.node(2).unmount();
    std::thread::scope(|scope| {
        scope.spawn(|| cluster.node(1).mount());
        scope.spawn(|| cluster.node(2).mount());
    });
    for id in [1, 2] {
        assert_eq!(tree(&cluster.node(id).mnt), want, "node {id} after restart");
    }
    write_file(cluster.node(2).path("after-restart"), b"y").unwrap();
    wait_for_bytes(&cluster.node(1).path("after-restart"), b"y");
}

#[test]
fn a_node_with_a_wrong_token_is_refused() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::start(1);
    let token = cluster.token();
    let (cluster_id, rest) = token
        .strip_prefix("wpfs1.")
        .and_then(|t| t.split_once('.'))
        .unwrap();
    let addr = rest.split_once('.').unwrap().1;
    let forged = format!("wpfs1.{cluster_id}.{}.{addr}", "ab".repeat(32));
    let (stranger, result) = cluster.try_join(2, &forged);
    let err = result.expect_err("a wrong secret must not join");
    assert!(err.contains("refused"), "{err}");
    assert_eq!(
        stranger.status()["running"],
        false,
        "the refused daemon exits"
    );
    let log = fs::read_to_string(cluster.node(1).data.join("wpfs.log")).unwrap();
    assert!(
        log.contains("failed authentication (TLS"),
        "node 1 logs the refusal"
    );
    assert_eq!(
        cluster.node(1).status()["voters"].as_array().unwrap().len(),
        1
    );

    // Garbage on the peer port neither crashes nor wedges the node.
    use std::io::Write;
    let listen = cluster.node(1).status()["listen"]
        .as_str()
        .unwrap()
        .to_string();
    let mut junk = std::net::TcpStream::connect(&listen).unwrap();
    let _ = junk.write_all(&[0xff; 4096]);
    drop(junk);
    write_file(cluster.node(1).path("still-works"), b"ok").unwrap();
    assert_eq!(
        fs::read(cluster.node(1).path("still-works")).unwrap(),
        b"ok"
    );
}

#[test]
fn a_closed_file_survives_its_writer_dying_at_once() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::start(3);
    let data = noise(1, 3_000_000);
    write_file(cluster.node(1).path("upload.bin"), &data).unwrap();
    // close() returned: the contents are on a second node already, so the
    // writer may die before any background replication ran.
    cluster.node(1).kill9();
    for id in [2, 3] {
        wait_for_bytes(&cluster.node(id).path("upload.bin"), &data);
    }
    assert_eq!(cluster.node(2).status()["under_replicated_chunks"], 0);
}

#[test]
fn two_web_nodes_and_a_witness_survive_losing_a_web_node() {
    if !fuse_available() {
        return;
    }
    let mut cluster = Cluster::start(2);
    cluster.add_witness(3);
    cluster.wait_for_voters(3);
    for i in 0..20 {
        write_file(
            cluster.node(1).path(&format!("f{i}")),
            vec![i as u8; 200_000],
        )
        .unwrap();
    }
    for i in 0..20 {
        wait_for_bytes(&cluster.node(2).path(&format!("f{i}")), &[i as u8; 200_000]);
    }
    let witness = cluster.node(3).status();
    assert_eq!(witness["witness"], true);
    assert_eq!(
        witness["replicated_chunks"], 0,
        "a witness fetches no contents"
    );
    assert_eq!(witness["chunks"], 0, "a witness stores no contents");

    // One web node dies: the other and the witness are a majority.
    cluster.node(2).kill9();
    write_file(cluster.node(1).path("after"), b"still writable").unwrap();
    assert_eq!(
        fs::read(cluster.node(1).path("after")).unwrap(),
        b"still writable"
    );
    assert_eq!(
        fs::read(cluster.node(1).path("f7")).unwrap(),
        vec![7u8; 200_000]
    );
}

#[test]
fn a_node_that_missed_many_changes_catches_up_from_a_snapshot() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::start(3);
    let a = cluster.node(1);
    write_file(a.path("f"), b"x").unwrap();
    converged(&cluster, "");
    cluster.node(3).unmount();
    // More log entries than the leader keeps: node 3 cannot catch up from
    // the log any more.
    use std::os::unix::fs::PermissionsExt;
    for i in 0..21_000u32 {
        fs::set_permissions(
            a.path("f"),
            fs::Permissions::from_mode(0o600 | ((i % 2) * 0o44)),
        )
        .unwrap();
    }
    for i in 0..50 {
        write_file(a.path(&format!("new-{i}")), vec![i as u8; 70_000]).unwrap();
    }
    let first_log_index = a.status()["first_log_index"].as_u64().unwrap();
    assert!(
        first_log_index > 10_000,
        "the leader compacted its log (first index {first_log_index})"
    );
    cluster.node(3).mount();
    converged(&cluster, "");
    let log = fs::read_to_string(cluster.node(3).data.join("wpfs.log")).unwrap();
    assert!(
        log.matches("installed the snapshot").count() >= 2,
        "node 3 caught up from a second snapshot"
    );
}

#[test]
fn a_file_deleted_or_replaced_elsewhere_stays_readable_where_it_is_open() {
    if !fuse_available() {
        return;
    }
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let cluster = Cluster::start(3);
    let image = noise(2, 3_000_000);
    let style = noise(3, 300_000);
    write_file(cluster.node(1).path("image.jpg"), &image).unwrap();
    write_file(cluster.node(1).path("style.css"), &style).unwrap();
    let (image_here, style_here) = (
        cluster.node(2).path("image.jpg"),
        cluster.node(2).path("style.css"),
    );
    wait_for_bytes(&image_here, &image);
    wait_for_bytes(&style_here, &style);
    // A web server on node 2 starts sending both files; on node 1 an
    // editor deletes one and an update replaces the other (a new file
    // renamed over it). The reads below must reach the filesystem, so the
    // kernel drops the files' pages first.
    let drop_pages = |f: &fs::File| {
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0, "posix_fadvise");
    };
    let mut open = [
        fs::File::open(&image_here).unwrap(),
        fs::File::open(&style_here).unwrap(),
    ];
    for (f, data) in open.iter_mut().zip([&image, &style]) {
        drop_pages(f);
        let mut first = vec![0u8; 4096];
        f.read_exact(&mut first).unwrap();
        assert_eq!(first, data[..4096]);
    }
    fs::remove_file(cluster.node(1).path("image.jpg")).unwrap();
    let new_style = noise(4, 200_000);
    write_file(cluster.node(1).path("style.css.new"), &new_style).unwrap();
    fs::rename(
        cluster.node(1).path("style.css.new"),
        cluster.node(1).path("style.css"),
    )
    .unwrap();
    wait_until(CONVERGE, "node 2 to apply the deletion", || {
        !image_here.exists()
    });
    wait_until(CONVERGE, "node 2 to read the new style.css", || {
        fs::read(&style_here).is_ok_and(|b| b == new_style)
    });
    // The open handles read the files they opened, whole, as they would on
    // one machine: not zeros, not an error, not the new version.
    for (f, data) in open.iter_mut().zip([&image, &style]) {
        drop_pages(f);
        let mut rest = Vec::new();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.read_to_end(&mut rest).unwrap();
        assert!(
            rest == data[4096..],
            "read {} bytes that are not the opened file's",
            rest.len()
        );
        let meta = f.metadata().unwrap();
        assert_eq!((meta.len(), meta.nlink()), (data.len() as u64, 0), "fstat");
    }
}

#[test]
fn a_file_replaced_by_rename_elsewhere_never_goes_missing_here() {
    if !fuse_available() {
        return;
    }
    use std::sync::atomic::{AtomicBool, Ordering};
    // An update on node 1 replaces style.css again and again (a new file
    // renamed over it); a web server on node 2 keeps opening and reading
    // it. The name exists at every moment, so node 2 must never be told
    // otherwise, and every read is one whole version.
    let cluster = Cluster::start(3);
    let version = |i: u32| format!("v{i};").repeat(1000).into_bytes();
    write_file(cluster.node(1).path("style.css"), version(0)).unwrap();
    let here = cluster.node(2).path("style.css");
    wait_for_bytes(&here, &version(0));
    let done = AtomicBool::new(false);
    let (mut reads, mut stale) = (0, 0);
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 1..=300 {
                let tmp = cluster.node(1).path("style.css.new");
                write_file(&tmp, version(i)).unwrap();
                fs::rename(&tmp, cluster.node(1).path("style.css")).unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
            done.store(true, Ordering::Relaxed);
        });
        while !done.load(Ordering::Relaxed) {
            match fs::read(&here) {
                Ok(b) => {
                    let i: u32 = (b.get(1..b.iter().position(|c| *c == b';').unwrap_or(1)))
                        .and_then(|n| std::str::from_utf8(n).ok()?.parse().ok())
                        .unwrap_or_else(|| panic!("read {} bytes of no version", b.len()));
                    assert!(
                        b == version(i),
                        "read {} bytes, not all of version {i}",
                        b.len()
                    );
                    reads += 1;
                }
                // The kernel looks the name up again after a stale answer,
                // once; a second replacement within that retry leaves the
                // error to the reader (as on NFS).
                Err(e) if e.raw_os_error() == Some(libc::ESTALE) => stale += 1,
                Err(e) => panic!("{}: {e} (after {reads} whole reads)", here.display()),
            }
        }
    });
    println!("{reads} whole reads, {stale} ESTALE");
    assert!(stale * 20 < reads, "{stale} ESTALE against {reads} reads");
}

#[test]
fn a_file_created_on_two_nodes_at_once_keeps_the_bytes_written_last() {
    if !fuse_available() {
        return;
    }
    use std::io::Write;
    // Two web nodes write the same new cache file (open without O_EXCL):
    // node 2 opens it with O_CREAT|O_TRUNC and writes nothing yet; node 1
    // then writes and closes it. On one machine node 1's bytes would
    // stand: they must here too, whatever node 2 proposes meanwhile. Once
    // node 2 writes and closes, its bytes replace them, and its handle
    // works throughout.
    let cluster = Cluster::start(3);
    let mut later = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(cluster.node(2).path("cache.html"))
        .unwrap();
    write_file(cluster.node(1).path("cache.html"), b"from node 1").unwrap();
    node_2_has_applied_node_1s_file(&cluster);
    // Any change node 2 proposes proposes its open file first.
    fs::create_dir(cluster.node(2).path("made-after")).unwrap();
    for n in [1, 2, 3] {
        let node = cluster.node(n);
        wait_until(CONVERGE, "every node to apply node 2's mkdir", || {
            node.path("made-after").is_dir()
        });
        assert_eq!(
            fs::read(node.path("cache.html")).unwrap(),
            b"from node 1",
            "node {n}: {}",
            where_is(&cluster, "cache.html")
        );
    }
    later.write_all(b"from node 2, later").unwrap();
    later.sync_all().unwrap();
    let meta = later.metadata().expect("fstat of the later handle");
    assert_eq!(meta.len(), 18);
    drop(later);
    for n in [1, 2, 3] {
        let path = cluster.node(n).path("cache.html");
        wait_until(CONVERGE, "every node to read node 2's bytes", || {
            fs::read(&path).is_ok_and(|b| b == b"from node 2, later")
        });
    }
}

/// Waits until node 2 has applied what node 1 committed so far (by its
/// log index: node 2's own open file is what the tests look at).
fn node_2_has_applied_node_1s_file(cluster: &Cluster) {
    let written = cluster.node(1).status()["commit_index"].as_u64().unwrap();
    let started = std::time::Instant::now();
    while cluster.node(2).status()["applied_index"].as_u64() < Some(written) {
        assert!(
            started.elapsed() < CONVERGE,
            "node 2 did not apply node 1's file in {CONVERGE:?}: {}",
            where_is(cluster, "cache.html")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What each node shows of `rel` (inode, size) and how far it has
/// applied the log: the state to report when a wait for it times out.
fn where_is(cluster: &Cluster, rel: &str) -> String {
    use std::os::unix::fs::MetadataExt;
    let shown = |n: &wpfs_tests::Node| match fs::metadata(n.path(rel)) {
        Ok(m) => format!("inode {} of {} bytes", m.ino(), m.len()),
        Err(e) => e.to_string(),
    };
    (1..=cluster.nodes.len() as u64)
        .map(|id| {
            let node = cluster.node(id);
            let status = node.status();
            format!(
                "node {id}: {}, applied {} of commit {}",
                shown(node),
                status["applied_index"],
                status["commit_index"]
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A node mounted again after missing changes serves none of its older
/// copy: once `wpfs mount` returns, every change the cluster had committed
/// is there, rewritten files in their new version and new files whole
/// (contents that replication has not brought yet are fetched on demand).
#[test]
fn a_node_mounted_again_after_missing_changes_serves_the_current_tree_at_once() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::start(3);
    let (one, three) = (cluster.node(1), cluster.node(3));
    write_file(one.path("style.css"), "version 1").unwrap();
    wait_for_bytes(&three.path("style.css"), b"version 1");
    three.unmount();

    let uploads: Vec<Vec<u8>> = (0..3).map(|i| noise(40 + i, 4_000_000)).collect();
    for (i, data) in uploads.iter().enumerate() {
        write_file(one.path(&format!("upload{i}.bin")), data).unwrap();
    }
    fs::create_dir(one.path("plugin")).unwrap();
    for i in 0..3000 {
        write_file(
            one.path(&format!("plugin/f{i}.php")),
            format!("<?php // {i}"),
        )
        .unwrap();
    }
    write_file(one.path("style.css"), "version 3").unwrap();
    three.mount();

    // The last change first: the one a lagging node applies last.
    assert_eq!(
        fs::read_to_string(three.path("style.css")).unwrap(),
        "version 3"
    );
    for (i, data) in uploads.iter().enumerate() {
        let read = fs::read(three.path(&format!("upload{i}.bin"))).unwrap();
        assert!(
            read == *data,
            "upload{i}.bin: {} bytes, not the upload",
            read.len()
        );
    }
    assert_eq!(fs::read_dir(three.path("plugin")).unwrap().count(), 3000);
    assert_eq!(
        fs::read_to_string(three.path("plugin/f2999.php")).unwrap(),
        "<?php // 2999"
    );
}
