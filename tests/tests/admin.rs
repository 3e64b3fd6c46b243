//! The admin endpoint as load balancers, Prometheus and careless or
//! hostile clients see it: every node has an address of its own, health
//! follows the node's state, metrics parse with a real Prometheus parser
//! and say what happened, and no client can hold the endpoint up.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use prometheus_parse::{Sample, Scrape, Value};
use wpfs_tests::{
    fuse_available, local_dir, noise, port, s, wait_until, wpfs, wpfs_ok, Cluster, Node,
    UnmountOnDrop,
};

/// One HTTP/1.0 request: the status code and the body. The server gives a
/// silent client 5 s to send its request; waiting less than that for the
/// answer is what proves it is not waiting for that client.
fn http(addr: &str, request_line: &str) -> (u16, String) {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    write!(conn, "{request_line} HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer)
        .unwrap_or_else(|e| panic!("{request_line}: no answer from {addr}: {e}"));
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    (status_of(head).expect("a status code"), body.to_string())
}

fn status_of(head: &str) -> Option<u16> {
    head.split_whitespace().nth(1).and_then(|c| c.parse().ok())
}

/// Sends `bytes` (ignoring a server that stops reading and resets), then
/// reads what comes back: the status code of an answer, or None when the
/// server closed or reset the connection without one. Panics when the
/// server keeps the connection open: that is a hung handler.
fn abuse(addr: &str, bytes: Vec<u8>) -> Option<u16> {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut writer = conn.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&bytes);
    });
    let mut answer = Vec::new();
    let read = conn.read_to_end(&mut answer);
    sender.join().unwrap();
    match read {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("the server held the connection open for 15 s")
        }
        _ => status_of(&String::from_utf8_lossy(&answer)),
    }
}

/// The `--admin` address keeps answering, quickly, while 200 clients hold
/// idle connections; a client that sends garbage, 1 MiB of it, or its
/// request head one line a second, gets an error and its connection
/// closed, not a handler waiting on it. Membership changes are refused
/// there (Unix socket only).
#[test]
fn the_admin_address_outlasts_idle_slow_and_garbage_clients() {
    if !fuse_available() {
        return;
    }
    let tmp = local_dir();
    let (data, mnt) = (tmp.path().join("d"), tmp.path().join("m"));
    std::fs::create_dir(&mnt).unwrap();
    let admin = format!("127.0.0.1:{}", port());
    let listen = format!("127.0.0.1:{}", port());
    let args = ["init", "--data", s(&data), "--node-id", "1"];
    wpfs_ok(&[&args[..], &["--listen", &listen, "--admin", &admin]].concat());
    wpfs_ok(&["mount", s(&data), s(&mnt)]);
    let _guard = UnmountOnDrop(mnt.clone());

    let idle: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(&admin).unwrap())
        .collect();
    let idle_local: Vec<UnixStream> = (0..20)
        .map(|_| UnixStream::connect(data.join("wpfs.sock")).unwrap())
        .collect();
    let asked = Instant::now();
    assert_eq!(http(&admin, "GET /health"), (200, "ok\n".to_string()));
    let (status, metrics) = http(&admin, "GET /metrics");
    assert_eq!(status, 200);
    for line in ["wpfs_healthy 1\n", "wpfs_raft_is_leader 1\n"] {
        assert!(metrics.contains(line), "no {line:?} in\n{metrics}");
    }
    let said = wpfs_ok(&["status", "--data", s(&data)]);
    assert!(said.contains("leader"), "{said}");
    println!("answered beside 220 idle clients in {:?}", asked.elapsed());

    assert_eq!(http(&admin, "GET /nothing").0, 404);
    assert_eq!(http(&admin, "POST /leave").0, 403);
    assert_eq!(http(&admin, "DELETE /health").0, 405);

    assert_eq!(
        abuse(&admin, b"\x16\x03\x01\x02\x00 not http\r\n\r\n".to_vec()),
        Some(400)
    );
    let garbage = noise(17, 1 << 20);
    let answer = abuse(&admin, garbage);
    assert!(matches!(answer, None | Some(400..=499)), "{answer:?}");
    let mut huge_head = b"GET /health HTTP/1.1\r\nX-Padding: ".to_vec();
    huge_head.resize(1 << 20, b'a');
    let answer = abuse(&admin, huge_head);
    assert!(matches!(answer, None | Some(431 | 400)), "{answer:?}");

    // One header line a second, for ever: the server ends it.
    let mut slow = TcpStream::connect(&admin).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let started = Instant::now();
    slow.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
    let closed_after = loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a client sending its head one line a second held a connection for 30 s"
        );
        if slow.write_all(b"X-Slow: yes\r\n").is_err() {
            break started.elapsed();
        }
        let mut buf = [0u8; 512];
        match slow.read(&mut buf) {
            Ok(_) => break started.elapsed(), // an answer (408) or the close
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break started.elapsed(),
        }
    };
    println!("a slow head was cut off after {closed_after:?}");

    drop((idle, idle_local));
    assert_eq!(http(&admin, "GET /health"), (200, "ok\n".to_string()));
}

/// Every node, not only the first, has an admin address a load balancer
/// and Prometheus can ask: `wpfs join --admin`, or `wpfs config --admin`
/// on an existing node (applied at its next mount; `none` clears it).
/// After a workload (small and large files written on node 2, node 3 down
/// meanwhile so that it must fetch; a file read on each), `/metrics` on each node parses with
/// a Prometheus parser, gives every family its HELP, and its values say
/// what happened.
#[test]
fn every_node_has_an_admin_address_and_metrics_of_its_own() {
    if !fuse_available() {
        return;
    }
    let mut cluster = Cluster::start(1);
    let admins: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", port())).collect();
    let first = cluster.node(1);
    let said = wpfs_ok(&["config", "--data", s(&first.data), "--admin", &admins[0]]);
    assert!(said.contains("next mount"), "{said}");
    first.unmount();
    first.mount();
    for id in 2..=3 {
        cluster.add_with(id, &["--admin", &admins[id as usize - 1]]);
    }
    cluster.wait_for_voters(3);
    for admin in &admins {
        assert_eq!(
            http(admin, "GET /health"),
            (200, "ok\n".to_string()),
            "{admin}"
        );
        assert_eq!(http(admin, "POST /leave").0, 403, "{admin}");
    }

    // The workload: node 3 misses a large file, and fetches it on return.
    let writer = cluster.node(2);
    for i in 0..20 {
        std::fs::write(
            writer.path(&format!("small-{i}.php")),
            format!("<?php // {i}\n"),
        )
        .unwrap();
    }
    cluster.node(3).unmount();
    let large = noise(3, 3 << 20);
    std::fs::write(writer.path("upload.jpg"), &large).unwrap();
    cluster.node(3).mount();
    assert_eq!(
        std::fs::read(cluster.node(3).path("upload.jpg")).unwrap(),
        large
    );
    for id in 1..=3 {
        let node = cluster.node(id);
        assert_eq!(
            std::fs::read(node.path("small-7.php")).unwrap(),
            b"<?php // 7\n"
        );
        wait_until(Duration::from_secs(30), "replication to finish", || {
            node.holds_every_chunk()
        });
    }

    let scrapes: Vec<Scrape> = admins.iter().map(|a| scrape(a)).collect();
    for (i, m) in scrapes.iter().enumerate() {
        let id = i as u64 + 1;
        for family in [
            "wpfs_healthy",
            "wpfs_raft_term",
            "wpfs_raft_commit_index",
            "wpfs_raft_applied_index",
            "wpfs_store_bytes",
            "wpfs_rocksdb_memtables_bytes",
            "wpfs_rocksdb_block_cache_bytes",
            "wpfs_inodes",
            "wpfs_replication_backlog_chunks",
            "wpfs_under_replicated_chunks",
            "wpfs_under_replicated_bytes",
            "wpfs_peers_reachable",
            "wpfs_peer_reachable",
            "wpfs_disk_free_bytes",
            "wpfs_disk_min_free_bytes",
            "wpfs_raft_propose_to_commit_seconds",
            "wpfs_raft_commit_to_apply_seconds",
            "wpfs_fuse_operation_seconds",
            "wpfs_chunk_fetches",
            "wpfs_chunk_fetch_seconds",
            "wpfs_chunk_pushes",
            "wpfs_chunk_push_seconds",
            "wpfs_replicated_bytes",
        ] {
            assert!(
                m.docs.get(family).is_some_and(|help| !help.is_empty()),
                "node {id}: no HELP for {family}"
            );
        }
        assert_eq!(value(m, "wpfs_healthy", &[]), 1.0, "node {id}");
        assert!(value(m, "wpfs_inodes", &[]) >= 22.0, "node {id}");
        assert!(value(m, "wpfs_store_bytes", &[]) > 3e6, "node {id}");
        // The workload's writes sit in the memtables (far below 64 MiB).
        let memtables = value(m, "wpfs_rocksdb_memtables_bytes", &[]);
        assert!(
            memtables > 1e5 && memtables < 64e6,
            "node {id}: {memtables}"
        );
        assert_eq!(value(m, "wpfs_under_replicated_chunks", &[]), 0.0);
        assert_eq!(value(m, "wpfs_under_replicated_bytes", &[]), 0.0);
        let reserve = value(m, "wpfs_disk_min_free_bytes", &[]);
        assert_eq!(
            reserve,
            (256u64 << 20) as f64,
            "node {id}: the default min_free"
        );
        assert!(value(m, "wpfs_disk_free_bytes", &[]) > reserve, "node {id}");
        for peer in (1..=3).filter(|p| *p != id) {
            // A link dials its peer on its own schedule (a just-joined
            // member's, too): wait for it, rather than ask at one instant.
            let peer = peer.to_string();
            wait_until(
                Duration::from_secs(10),
                &format!("node {id} to see node {peer}"),
                || {
                    value(
                        &scrape(&admins[i]),
                        "wpfs_peer_reachable",
                        &[("peer", &peer)],
                    ) == 1.0
                },
            );
        }
        let applied = histogram_count(m, "wpfs_raft_commit_to_apply_seconds", &[]);
        assert!(applied >= 1.0, "node {id} timed {applied} applies");
        assert!(histogram_count(m, "wpfs_fuse_operation_seconds", &[("op", "lookup")]) >= 1.0);
    }

    let on_writer = &scrapes[1];
    for op in ["create", "write", "flush", "release"] {
        let n = histogram_count(on_writer, "wpfs_fuse_operation_seconds", &[("op", op)]);
        assert!(n >= 21.0, "node 2 timed {n} {op} operations");
    }
    assert!(histogram_count(on_writer, "wpfs_raft_propose_to_commit_seconds", &[]) >= 21.0);
    assert!(histogram_count(on_writer, "wpfs_raft_commit_to_apply_seconds", &[]) >= 21.0);
    assert!(value(on_writer, "wpfs_chunk_pushes_total", &[("result", "ok")]) >= 1.0);
    assert!(value(on_writer, "wpfs_chunk_pushed_bytes_total", &[]) >= large.len() as f64);
    assert!(histogram_count(on_writer, "wpfs_chunk_push_seconds", &[]) >= 1.0);

    let returned = &scrapes[2];
    assert!(value(returned, "wpfs_chunk_fetches_total", &[("result", "ok")]) >= 1.0);
    assert!(histogram_count(returned, "wpfs_chunk_fetch_seconds", &[]) >= 1.0);
    let fetched = value(returned, "wpfs_chunk_fetched_bytes_total", &[]);
    assert!(
        fetched >= large.len() as f64,
        "node 3 fetched {fetched} bytes"
    );
    assert!(value(returned, "wpfs_replicated_bytes_total", &[]) >= large.len() as f64);

    let leader = scrapes
        .iter()
        .position(|m| value(m, "wpfs_raft_is_leader", &[]) == 1.0)
        .expect("a leader among the nodes");
    for peer in (1..=3).filter(|p| *p != leader as u64 + 1) {
        let lag = value(
            &scrapes[leader],
            "wpfs_peer_match_lag_entries",
            &[("peer", &peer.to_string())],
        );
        assert!(lag < 1000.0, "node {peer} is {lag} entries behind");
    }

    let third = cluster.node(3);
    let bad = wpfs(&["config", "--data", s(&third.data), "--admin", "nowhere"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("HOST:PORT"));
    wpfs_ok(&["config", "--data", s(&third.data), "--admin", "none"]);
    third.unmount();
    third.mount();
    assert!(
        TcpStream::connect(&admins[2]).is_err(),
        "node 3 still serves {} after `wpfs config --admin none`",
        admins[2]
    );
}

fn scrape(admin: &str) -> Scrape {
    let (status, text) = http(admin, "GET /metrics");
    assert_eq!(status, 200, "{admin}: {text}");
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text")
}

fn sample<'a>(m: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> &'a Sample {
    m.samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no {name}{labels:?} in the scrape"))
}

/// A gauge's or counter's value (counters named `_total`, as OpenMetrics
/// writes them, parse as untyped samples).
fn value(m: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(m, name, labels).value {
        Value::Gauge(v) | Value::Counter(v) | Value::Untyped(v) => v,
        ref other => panic!("{name} is {other:?}"),
    }
}

/// How many observations a histogram holds (its +Inf bucket).
fn histogram_count(m: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    match &sample(m, name, labels).value {
        Value::Histogram(buckets) => buckets
            .iter()
            .find(|b| b.less_than.is_infinite())
            .map(|b| b.count)
            .expect("a +Inf bucket"),
        other => panic!("{name} is {other:?}"),
    }
}

/// A load balancer's view of three nodes, each with its own admin
/// address: /health is 200 on each; a node cut off from the other two
/// answers 503 with the reason within seconds while they stay 200, and
/// 200 again once its network is back.
#[test]
fn health_is_503_with_the_reason_on_a_node_cut_off_from_the_majority() {
    if !fuse_available() {
        return;
    }
    let Some(mut cluster) = Cluster::start_partitionable(1) else {
        return;
    };
    // Loopback inside each node's own network namespace.
    let admins: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", port())).collect();
    let first = cluster.node(1);
    wpfs_ok(&["config", "--data", s(&first.data), "--admin", &admins[0]]);
    first.unmount();
    first.mount();
    for id in 2..=3 {
        cluster.add_with(id, &["--admin", &admins[id as usize - 1]]);
    }
    cluster.wait_for_voters(3);
    let health = |id: u64| http_on(cluster.node(id), &admins[id as usize - 1], "GET /health");
    for id in 1..=3 {
        assert_eq!(health(id), (200, "ok\n".to_string()), "node {id}");
    }

    let lan = cluster.lan.as_ref().expect("a partitionable cluster");
    lan.cut(3);
    wait_until(
        Duration::from_secs(15),
        "node 3 to report itself degraded",
        || health(3).0 == 503,
    );
    let (_, why) = health(3);
    assert!(why.starts_with("degraded: no Raft leader"), "{why}");
    for id in 1..=2 {
        wait_until(
            Duration::from_secs(15),
            &format!("node {id} to be healthy"),
            || health(id).0 == 200,
        );
    }
    lan.heal(3);
    wait_until(
        Duration::from_secs(15),
        "node 3 to be healthy again",
        || health(3).0 == 200,
    );
}

/// `http` from inside `node`'s network namespace (a thread of its own
/// enters it: `setns` moves only the calling thread).
fn http_on(node: &Node, addr: &str, request_line: &str) -> (u16, String) {
    use std::os::fd::AsRawFd;
    let ns = node.netns().expect("a host of a Lan").to_string();
    let (addr, line) = (addr.to_string(), request_line.to_string());
    std::thread::spawn(move || {
        let f = std::fs::File::open(&ns).unwrap();
        // SAFETY: a valid namespace fd; only this thread changes namespace.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        http(&addr, &line)
    })
    .join()
    .expect("the request thread")
}
