//! Faults on a running cluster (issue 4's suite). Readers (stat+read of
//! existing files) and writers (create, write, close, rename into place)
//! loop on every mount that can still take them; each scenario prints rows
//! of docs/reliability.md's table: the longest single read and write,
//! failed operations, whether the nodes converged, acknowledged writes
//! lost.
//!
//! What is asserted is what users rely on:
//! - on nodes that still see a majority, no operation fails;
//! - on a node cut off from the majority, reads keep working, writes fail
//!   with EROFS or EIO within a bound (none hangs), the log names the
//!   cause, and `wpfs status` says the node is degraded until it is back;
//! - afterwards every node converges to one tree, every write whose
//!   rename returned is on every node byte for byte, and no file under
//!   its final name holds anything but its whole contents.
//!
//! Stall times are measured and printed, not asserted: this machine's
//! timing is not a test oracle. The one time bound asserted is "a refused
//! write returns at all" (three write deadlines), which tells a refusal
//! from a hang.

use std::fs;
use std::io::BufRead;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use wpfs_tests::{
    close, daemon_of, fuse_available, noise, tree, wait_until, write_file, Cluster, Node,
};

/// The mount's default `write_timeout`.
const WRITE_DEADLINE: Duration = Duration::from_secs(5);

/// What the loops on one node saw.
#[derive(Default)]
struct Observed {
    longest_read: Duration,
    longest_write: Duration,
    /// Operations that failed, but for refused writes.
    failed: Vec<String>,
    /// Writes refused with EROFS or EIO (expected on a cut-off node only).
    refused: Vec<String>,
    /// Files whose rename into place returned, with their contents.
    acknowledged: Vec<(String, Vec<u8>)>,
}

/// The contents of node `node`'s write number `i`; the file name says both.
fn body(node: u64, i: usize) -> Vec<u8> {
    format!("node {node} write {i} ")
        .repeat(50 + i % 200)
        .into_bytes()
}

/// Loops stat+read of the seed files on `node` until `stop`.
fn read_loop(node: &Node, stop: &AtomicBool, seen: &Mutex<Observed>) {
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let path = node.path(&format!("seed/f{}", i % 50));
        let t = Instant::now();
        let read = fs::metadata(&path).and_then(|_| fs::read(&path));
        let took = t.elapsed();
        let mut s = seen.lock().unwrap();
        s.longest_read = s.longest_read.max(took);
        if let Err(e) = read {
            s.failed.push(format!("read {}: {e}", path.display()));
        }
        drop(s);
        i += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Loops writes of new files on node `n` until `stop`, the way WordPress
/// saves one: into a temporary name, then renamed into place.
fn write_loop(node: &Node, n: u64, stop: &AtomicBool, seen: &Mutex<Observed>) {
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let (tmp, name, data) = (
            format!("w/.n{n}-{i}.tmp"),
            format!("w/n{n}-{i}"),
            body(n, i),
        );
        let t = Instant::now();
        let written = write_file(node.path(&tmp), &data)
            .and_then(|_| fs::rename(node.path(&tmp), node.path(&name)));
        let took = t.elapsed();
        let mut s = seen.lock().unwrap();
        s.longest_write = s.longest_write.max(took);
        match written {
            Ok(()) => s.acknowledged.push((name, data)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EROFS | libc::EIO)) => {
                s.refused.push(format!("write {name}: {e} after {took:?}"))
            }
            Err(e) => s.failed.push(format!("write {name}: {e}")),
        }
        drop(s);
        i += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One scenario at a time: their figures are about the fault, not about
/// another cluster competing for the same CPUs.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The turn of one scenario (held until it ends); None, with the reason
/// printed, where FUSE mounts cannot be made.
fn my_turn() -> Option<std::sync::MutexGuard<'static, ()>> {
    fuse_available().then(|| ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner()))
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// kill -9: the node is gone.
    Kill9,
    /// SIGSTOP for this long, then SIGCONT: alive but silent (a gray
    /// failure), then back.
    Freeze(Duration),
    /// Off the network for this long (still running, its mount in use),
    /// then back on.
    Cut(Duration),
    /// kill -9, mounted again after this long: it catches up on what it
    /// missed, from the log (`Log`) or, when the leader has compacted the
    /// log past it, from a snapshot.
    Restart(Duration, CatchUp),
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum CatchUp {
    Log,
    Snapshot,
}

enum Victims {
    Leader,
    Follower,
    /// The leader and a follower (of five: the three left are a majority).
    LeaderAndFollower,
}

/// Starts a cluster of `size` nodes with seed files everywhere, runs the
/// loads, applies `fault` to the victims after a while, keeps the loads
/// going through it and after it, then checks and reports.
fn scenario(name: &str, size: u64, victims: Victims, fault: Fault) {
    let Some(_turn) = my_turn() else {
        return;
    };
    let cluster = match fault {
        Fault::Cut(_) => match Cluster::start_partitionable(size) {
            Some(cluster) => cluster,
            None => return,
        },
        _ => Cluster::start(size),
    };
    seed(&cluster);

    let leader = leader(&cluster);
    let follower = (1..=size).find(|id| *id != leader).unwrap();
    let victims = match victims {
        Victims::Leader => vec![leader],
        Victims::Follower => vec![follower],
        Victims::LeaderAndFollower => vec![leader, follower],
    };
    // A cut-off node stays in use (that is the point); a dead or frozen
    // one cannot take any load.
    let loaded: Vec<u64> = (1..=size)
        .filter(|id| matches!(fault, Fault::Cut(_)) || !victims.contains(id))
        .collect();

    let ((degraded_after, caught_up), seen) = under_load(&cluster, &loaded, || {
        let (mut degraded_after, mut caught_up) = (None, None);
        match fault {
            Fault::Kill9 => {
                for id in &victims {
                    cluster.node(*id).kill9();
                }
                std::thread::sleep(Duration::from_secs(8));
            }
            Fault::Freeze(how_long) => {
                let pids: Vec<i32> = victims
                    .iter()
                    .map(|id| cluster.node(*id).pid().expect("daemon pid"))
                    .collect();
                pids.iter().for_each(|pid| unsafe {
                    libc::kill(*pid, libc::SIGSTOP);
                });
                std::thread::sleep(how_long);
                pids.iter().for_each(|pid| unsafe {
                    libc::kill(*pid, libc::SIGCONT);
                });
                std::thread::sleep(Duration::from_secs(5));
            }
            Fault::Cut(how_long) => {
                let lan = cluster.lan.as_ref().expect("a partitionable cluster");
                let cut_at = Instant::now();
                victims.iter().for_each(|id| lan.cut(*id));
                degraded_after = Some(wait_degraded(&cluster, &victims, how_long));
                std::thread::sleep(how_long.saturating_sub(cut_at.elapsed()));
                victims.iter().for_each(|id| lan.heal(*id));
                for id in &victims {
                    wait_until(
                        Duration::from_secs(30),
                        "a healed node to be healthy",
                        || cluster.node(*id).status()["health"] == "ok",
                    );
                }
                std::thread::sleep(Duration::from_secs(3));
            }
            Fault::Restart(down, want) => {
                caught_up = Some(restart(&cluster, victims[0], down, want));
                std::thread::sleep(Duration::from_secs(3));
            }
        }
        (degraded_after, caught_up)
    });

    // Every node still running is checked: a frozen or cut-off node is
    // back by now, a killed one is not.
    let running: Vec<u64> = (1..=size)
        .filter(|id| fault != Fault::Kill9 || !victims.contains(id))
        .collect();
    let cut_off: Vec<u64> = match fault {
        Fault::Cut(_) => victims.clone(),
        _ => vec![],
    };
    let note = caught_up.map(|(how, took)| {
        let from = match how {
            CatchUp::Log => "the log",
            CatchUp::Snapshot => "a snapshot",
        };
        format!("caught up from {from} in {:.1} s", took.as_secs_f64())
    });
    check(
        &cluster,
        Outcome {
            name,
            running,
            loads: loaded.into_iter().zip(seen).collect(),
            cut_off,
            degraded_after,
            note,
        },
    );
    if let (Fault::Restart(_, want), Some((how, _))) = (fault, caught_up) {
        assert_eq!(
            how, want,
            "{name}: the restarted node caught up the other way"
        );
    }
}

/// Runs a reader and a writer on each of the nodes `loaded`, and `fault`
/// 2 s after they start; stops them when it returns. What it returned,
/// and what the loops on each node saw.
fn under_load<T>(
    cluster: &Cluster,
    loaded: &[u64],
    fault: impl FnOnce() -> T,
) -> (T, Vec<Observed>) {
    /// Stops the loops when `fault` returns or panics (the scope waits
    /// for them before a panic goes on).
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let stop = AtomicBool::new(false);
    let seen: Vec<Mutex<Observed>> = loaded.iter().map(|_| Mutex::default()).collect();
    let result = std::thread::scope(|scope| {
        for (id, seen) in loaded.iter().zip(&seen) {
            let (node, stop) = (cluster.node(*id), &stop);
            scope.spawn(move || read_loop(node, stop, seen));
            scope.spawn(move || write_loop(node, *id, stop, seen));
        }
        let _stop = StopOnDrop(&stop);
        std::thread::sleep(Duration::from_secs(2));
        fault()
    });
    let seen = seen.into_iter().map(|s| s.into_inner().unwrap()).collect();
    (result, seen)
}

/// How a scenario ended, for `check`.
struct Outcome<'a> {
    name: &'a str,
    /// The nodes that must have converged.
    running: Vec<u64>,
    /// What the loops on each loaded node saw.
    loads: Vec<(u64, Observed)>,
    /// Nodes that were cut off from the majority (their writes may be
    /// refused; their rows are apart).
    cut_off: Vec<u64>,
    /// How long a cut-off node took to call itself degraded.
    degraded_after: Option<Duration>,
    /// Said after "converged" in the table.
    note: Option<String>,
}

impl<'a> Outcome<'a> {
    /// A scenario in which no node was cut off: `running` must converge,
    /// `loaded` ran the loops that saw `seen`.
    fn of(
        name: &'a str,
        running: Vec<u64>,
        loaded: &[u64],
        seen: Vec<Observed>,
        note: String,
    ) -> Self {
        Outcome {
            name,
            running,
            loads: loaded.iter().copied().zip(seen).collect(),
            cut_off: vec![],
            degraded_after: None,
            note: Some(note),
        }
    }
}

/// Checks what users rely on after a fault, and prints the table's rows:
/// the nodes that kept a majority, then the cut-off ones.
fn check(cluster: &Cluster, o: Outcome) {
    let name = o.name;
    let reference = cluster.node(o.running[0]);
    let converged = o.running.iter().all(|id| {
        let node = cluster.node(*id);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if tree(&node.mnt) == tree(&reference.mnt) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    });
    let mut lost = Vec::new();
    for (_, seen) in &o.loads {
        for (file, data) in &seen.acknowledged {
            for id in &o.running {
                if fs::read(cluster.node(*id).path(file)).ok().as_ref() != Some(data) {
                    lost.push(format!("{file} on node {id}"));
                }
            }
        }
    }
    let half_written = half_written(reference);

    let mut converged_text = if converged {
        format!("yes ({} nodes)", o.running.len())
    } else {
        "no".to_string()
    };
    if let Some(note) = &o.note {
        converged_text += &format!("; {note}");
    }
    let mut majority_failed = Vec::new();
    for (rows_of_cut_off, label) in [
        (false, name.to_string()),
        (true, format!("{name}: the cut-off node")),
    ] {
        let group: Vec<&Observed> = o
            .loads
            .iter()
            .filter(|(id, _)| o.cut_off.contains(id) == rows_of_cut_off)
            .map(|(_, s)| s)
            .collect();
        if group.is_empty() {
            continue;
        }
        let (mut read, mut write, mut failed, mut refused, mut acked) =
            (Duration::ZERO, Duration::ZERO, vec![], vec![], 0);
        for s in group {
            read = read.max(s.longest_read);
            write = write.max(s.longest_write);
            failed.extend(s.failed.iter().cloned());
            refused.extend(s.refused.iter().cloned());
            acked += s.acknowledged.len();
        }
        let failed_text = if rows_of_cut_off {
            format!(
                "{} ({} writes refused with EROFS/EIO as they must be; degraded after {:.1} s)",
                failed.len(),
                refused.len(),
                o.degraded_after.unwrap_or_default().as_secs_f64()
            )
        } else {
            (failed.len() + refused.len()).to_string()
        };
        table_row(&format!(
            "| {label} | {:.0} ms | {:.0} ms | {failed_text} | {converged_text} | {} of {acked} |",
            read.as_secs_f64() * 1e3,
            write.as_secs_f64() * 1e3,
            lost.len(),
        ));
        if rows_of_cut_off {
            assert!(
                failed.is_empty(),
                "{label}: failures other than refused writes: {failed:?}"
            );
            assert!(
                !refused.is_empty(),
                "{label}: no write was refused while cut off"
            );
            assert!(
                write <= 3 * WRITE_DEADLINE,
                "{label}: a write took {write:?} to be refused (a hang, not a refusal)"
            );
        } else {
            majority_failed = [failed, refused].concat();
        }
    }
    assert!(
        majority_failed.is_empty(),
        "{name}: operations failed: {majority_failed:?}"
    );
    assert!(converged, "{name}: the nodes did not converge");
    assert!(
        lost.is_empty(),
        "{name}: acknowledged writes lost: {lost:?}"
    );
    assert!(
        half_written.is_empty(),
        "{name}: half-written files: {half_written:?}"
    );
    for id in &o.cut_off {
        let log = fs::read_to_string(cluster.node(*id).data.join("wpfs.log")).unwrap();
        assert!(
            log.contains("write refused"),
            "node {id}'s log names no refused write"
        );
    }
}

/// Where the rows of docs/reliability.md's table go as well as to stdout
/// (which `cargo test` shows only with `--nocapture`): `make test` prints
/// the file after the suite.
const TABLE: &str = concat!(env!("CARGO_TARGET_TMPDIR"), "/reliability-table.md");

fn table_row(row: &str) {
    use std::io::Write;
    println!("{row}");
    let file = fs::OpenOptions::new().create(true).append(true).open(TABLE);
    if let Err(e) = file.and_then(|mut f| writeln!(f, "{row}")) {
        eprintln!("cannot add the row to {TABLE}: {e}");
    }
}

/// The current leader, as node 1 sees it.
fn leader(cluster: &Cluster) -> u64 {
    cluster.node(1).status()["leader"].as_u64().unwrap()
}

/// 50 seed files, written on node 1 and present on every node.
fn seed(cluster: &Cluster) {
    let first = cluster.node(1);
    fs::create_dir(first.path("seed")).unwrap();
    fs::create_dir(first.path("w")).unwrap();
    for i in 0..50 {
        write_file(first.path(&format!("seed/f{i}")), body(0, i)).unwrap();
    }
    wait_converged(cluster, Duration::from_secs(20));
}

/// Waits until every node's tree is node 1's.
fn wait_converged(cluster: &Cluster, within: Duration) {
    let want = tree(&cluster.node(1).mnt);
    for node in &cluster.nodes {
        wait_until(within, "the nodes to converge", || tree(&node.mnt) == want);
    }
}

/// kill -9 node `id`, mounts it again `down` later and waits until it has
/// applied what the cluster had committed by then: how it caught up (a
/// snapshot install is logged) and how long that took.
fn restart(cluster: &Cluster, id: u64, down: Duration, want: CatchUp) -> (CatchUp, Duration) {
    let node = cluster.node(id);
    let installs = || {
        fs::read_to_string(node.data.join("wpfs.log"))
            .unwrap()
            .matches("installed the snapshot")
            .count()
    };
    let before = installs();
    node.kill9();
    let missed_from = node.status()["last_log_index"].as_u64().unwrap() + 1;
    std::thread::sleep(down);
    let other = cluster.node(if id == 1 { 2 } else { 1 });
    if want == CatchUp::Snapshot {
        // The load's pace depends on the machine: keep the node down
        // until the others' logs no longer hold what it missed.
        wait_until(
            Duration::from_secs(240),
            "the log to be compacted past the stopped node",
            || other.status()["first_log_index"].as_u64().unwrap() > missed_from,
        );
    }
    let t = Instant::now();
    node.mount();
    let commit = other.status()["commit_index"].as_u64().unwrap();
    wait_until(
        Duration::from_secs(60),
        "the restarted node to catch up",
        || node.status()["applied_index"].as_u64().unwrap() >= commit,
    );
    let how = if installs() > before {
        CatchUp::Snapshot
    } else {
        CatchUp::Log
    };
    (how, t.elapsed())
}

/// Waits until every cut-off node's status says it is degraded; how long
/// that took.
fn wait_degraded(cluster: &Cluster, victims: &[u64], within: Duration) -> Duration {
    let t = Instant::now();
    for id in victims {
        wait_until(within, "a cut-off node to report itself degraded", || {
            cluster.node(*id).status()["health"]
                .as_str()
                .is_some_and(|h| h.starts_with("degraded"))
        });
    }
    t.elapsed()
}

/// Files under their final name in `w/` whose contents are not the whole
/// contents their writer wrote.
fn half_written(node: &Node) -> Vec<String> {
    let mut bad = Vec::new();
    for entry in fs::read_dir(node.path("w")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let Some((n, i)) = name
            .strip_prefix('n')
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(n, i)| Some((n.parse().ok()?, i.parse().ok()?)))
        else {
            continue; // a temporary file a refused write left behind
        };
        if fs::read(node.path(&format!("w/{name}"))).ok() != Some(body(n, i)) {
            bad.push(name);
        }
    }
    bad
}

#[test]
fn kill_9_a_follower() {
    scenario(
        "kill -9 a follower (3 nodes)",
        3,
        Victims::Follower,
        Fault::Kill9,
    );
}

#[test]
fn kill_9_the_leader() {
    scenario(
        "kill -9 the leader (3 nodes)",
        3,
        Victims::Leader,
        Fault::Kill9,
    );
}

#[test]
fn kill_9_two_nodes_of_five() {
    scenario(
        "kill -9 the leader and a follower (5 nodes)",
        5,
        Victims::LeaderAndFollower,
        Fault::Kill9,
    );
}

#[test]
fn freeze_a_follower_for_30_s() {
    scenario(
        "SIGSTOP a follower 30 s, then SIGCONT (3 nodes)",
        3,
        Victims::Follower,
        Fault::Freeze(Duration::from_secs(30)),
    );
}

#[test]
fn freeze_the_leader_for_30_s() {
    scenario(
        "SIGSTOP the leader 30 s, then SIGCONT (3 nodes)",
        3,
        Victims::Leader,
        Fault::Freeze(Duration::from_secs(30)),
    );
}

#[test]
fn restart_a_follower_that_missed_a_few_changes() {
    scenario(
        "kill -9 a follower, restart it 5 s later (3 nodes)",
        3,
        Victims::Follower,
        Fault::Restart(Duration::from_secs(5), CatchUp::Log),
    );
}

#[test]
fn restart_a_follower_that_missed_more_than_the_log_keeps() {
    scenario(
        "kill -9 a follower, restart it 50 s later (3 nodes)",
        3,
        Victims::Follower,
        Fault::Restart(Duration::from_secs(50), CatchUp::Snapshot),
    );
}

#[test]
fn cut_a_follower_off_for_30_s() {
    scenario(
        "cut a follower off the network 30 s, then heal (3 nodes)",
        3,
        Victims::Follower,
        Fault::Cut(Duration::from_secs(30)),
    );
}

#[test]
fn cut_the_leader_off_for_30_s() {
    scenario(
        "cut the leader off the network 30 s, then heal (3 nodes)",
        3,
        Victims::Leader,
        Fault::Cut(Duration::from_secs(30)),
    );
}

/// Fills the disk under node 3's store (its own small tmpfs, mostly taken
/// by a ballast file as another program would) while nodes 1 and 2 write
/// on: node 3's writer gets ENOSPC, nothing it had written is lost, the
/// others do not notice; once the ballast goes, node 3 writes again,
/// catches up on the contents it had to leave, and its store reopens.
#[test]
fn a_full_disk_gives_enospc_and_loses_nothing() {
    let Some(_turn) = my_turn() else {
        return;
    };
    const MIN_FREE_MIB: u64 = 128;
    let min_free = format!("min_free={MIN_FREE_MIB}");
    let mut cluster = Cluster::start(2);
    cluster.add_on_small_disk(3, 384, &[&min_free]);
    cluster.wait_for_voters(3);
    seed(&cluster);
    let full = cluster.node(3);

    // Leave 16 MiB above the reserve, then write 1 MiB files until refused.
    let ballast = full.data.join("ballast");
    let free = || free_bytes(&full.data);
    let leave = (MIN_FREE_MIB + 16) << 20;
    fs::write(&ballast, vec![7u8; (free() - leave) as usize]).unwrap();
    let mut written = Vec::new();
    let (refused, seen) = under_load(&cluster, &[1, 2], || {
        let mut refused = None;
        for i in 0..64u64 {
            let (name, data) = (format!("big-{i}"), noise(i, 1 << 20));
            match write_file(full.path(&name), &data) {
                Ok(()) => written.push((name, data)),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        // While full: reads and namespace changes still work here.
        for (name, data) in &written {
            assert_eq!(
                &fs::read(full.path(name)).unwrap(),
                data,
                "{name} while full"
            );
        }
        fs::create_dir(full.path("made-while-full")).unwrap_or_else(|e| {
            let log = fs::read_to_string(full.data.join("wpfs.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            panic!("mkdir on the full node: {e}; its log ends with {tail:#?}")
        });
        std::thread::sleep(Duration::from_secs(2));
        refused
    });
    let refused = refused.expect("node 3 never ran out of space");
    assert_eq!(
        refused.raw_os_error(),
        Some(libc::ENOSPC),
        "a write on the full disk: {refused}"
    );
    let after_refusal = "after-the-disk-was-full";
    fs::remove_file(&ballast).unwrap();
    write_file(full.path(after_refusal), b"space again").unwrap();

    // Its store reopens, and every node ends with the same tree, every
    // acknowledged write included.
    full.unmount();
    full.mount_with(&[&min_free]);
    wait_converged(&cluster, Duration::from_secs(60));
    for (name, data) in &written {
        for node in &cluster.nodes {
            assert_eq!(&fs::read(node.path(name)).unwrap(), data, "{name}");
        }
    }
    check(
        &cluster,
        Outcome::of(
            "fill the disk under one node's store (3 nodes)",
            vec![1, 2, 3],
            &[1, 2],
            seen,
            format!(
                "ENOSPC on the full node after {} MiB; it writes again once space is freed",
                written.len() // 1 MiB files
            ),
        ),
    );
}

/// Free bytes of the filesystem holding `path`.
fn free_bytes(path: &std::path::Path) -> u64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: NUL-terminated path, valid out-pointer.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st.f_bavail as u64 * st.f_frsize as u64
}

/// Files of small contents that make the namespace big enough for its
/// snapshot (about 4 MB) to take seconds on a slowed link.
const BULK_FILES: usize = 24_000;
/// Link speed to a joining node while it receives the namespace snapshot.
const SNAPSHOT_MBIT: u32 = 8;
/// Files of 1 MiB of contents a joining node fetches after the namespace,
/// and the link speed meanwhile: seconds of fetching, to kill it in.
const CONTENT_FILES: u64 = 32;
const CONTENTS_MBIT: u32 = 80;
/// The size of the big upload.
const UPLOAD: usize = 128 << 20;

/// A 3-node cluster on a `Lan` (None where one cannot be made) holding the
/// seed files, `BULK_FILES` small files and `CONTENT_FILES` MiB of
/// contents, everywhere; and node 4, prepared to join it (not mounted),
/// its link slowed to `SNAPSHOT_MBIT`.
fn populated_and_a_newcomer() -> Option<(Cluster, Node)> {
    let cluster = Cluster::start_partitionable(3)?;
    seed(&cluster);
    let first = cluster.node(1);
    fs::create_dir(first.path("bulk")).unwrap();
    std::thread::scope(|scope| {
        for t in 0..8 {
            scope.spawn(move || {
                let dir = first.path(&format!("bulk/{t}"));
                fs::create_dir(&dir).unwrap();
                for i in 0..BULK_FILES / 8 {
                    write_file(dir.join(i.to_string()), format!("{t}/{i}").as_bytes()).unwrap();
                }
            });
        }
    });
    fs::create_dir(first.path("big")).unwrap();
    for i in 0..CONTENT_FILES {
        write_file(first.path(&format!("big/{i}")), noise(i, 1 << 20)).unwrap();
    }
    wait_converged(&cluster, Duration::from_secs(120));
    let newcomer = cluster.prepare_join(4);
    cluster.lan.as_ref().unwrap().slow(4, SNAPSHOT_MBIT);
    Some((cluster, newcomer))
}

/// Reads a joining node's `wpfs mount` progress until it says part (not
/// all) of the namespace snapshot has arrived; panics if the mount ends
/// first.
fn wait_for_half_a_snapshot(mount: &mut Child) {
    let stderr = std::io::BufReader::new(mount.stderr.take().expect("piped stderr"));
    let mut said = Vec::new();
    for line in stderr.lines() {
        let line = line.unwrap_or_default();
        // "wpfs: snapshot <index>: <received> of <size> bytes"
        let part = line
            .split_once("snapshot ")
            .and_then(|(_, rest)| rest.split_once(": "))
            .and_then(|(_, rest)| rest.strip_suffix(" bytes"))
            .and_then(|rest| rest.split_once(" of "))
            .and_then(|(got, size)| Some((got.parse::<u64>().ok()?, size.parse::<u64>().ok()?)));
        said.push(line);
        if part.is_some_and(|(got, size)| got > 0 && got < size) {
            return;
        }
    }
    panic!("the mount ended before the snapshot was half there: {said:#?}");
}

/// Waits (at most `within`) for a `wpfs mount` to finish; its error if it
/// failed.
fn finish_mount(mut mount: Child, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = mount.try_wait().unwrap() {
            let mut said = String::new();
            if let Some(mut e) = mount.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut said);
            }
            return if status.success() { Ok(()) } else { Err(said) };
        }
        if Instant::now() > deadline {
            let _ = mount.kill();
            return Err(format!("the mount did not finish within {within:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `node` has every chunk its namespace references.
fn wait_replicated(node: &Node, within: Duration) {
    wait_until(within, "a node's contents to be complete", || {
        node.holds_every_chunk() && node.status()["replicated_chunks"] != 0
    });
}

/// A node joins a populated cluster and is killed twice on the way: while
/// the namespace snapshot arrives (its first mount never finishes), then
/// while file contents arrive. Each time it is mounted again and must end
/// with everything, while the three members serve on undisturbed.
#[test]
fn kill_9_a_joining_node_mid_snapshot_and_mid_contents() {
    let Some(_turn) = my_turn() else {
        return;
    };
    let Some((mut cluster, newcomer)) = populated_and_a_newcomer() else {
        return;
    };
    let lan = cluster.lan.as_ref().unwrap();
    let loaded = [1, 2, 3];
    let (took, seen) = under_load(&cluster, &loaded, || {
        let mut mount = newcomer.spawn_mount();
        wait_for_half_a_snapshot(&mut mount);
        newcomer.kill9_daemon(daemon_of(&mount).expect("the joining daemon"));
        assert!(
            finish_mount(mount, Duration::from_secs(10)).is_err(),
            "the first mount succeeded though its daemon was killed"
        );
        let t = Instant::now();
        finish_mount(newcomer.spawn_mount(), Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("mounting the joining node again: {e}"));
        let namespace = t.elapsed();

        lan.slow(4, CONTENTS_MBIT);
        wait_until(
            Duration::from_secs(60),
            "contents to start arriving",
            || newcomer.status()["replicated_bytes"].as_u64() > Some(1 << 20),
        );
        newcomer.kill9();
        let t = Instant::now();
        newcomer.mount();
        wait_replicated(&newcomer, Duration::from_secs(120));
        (namespace, t.elapsed())
    });
    cluster.nodes.push(newcomer);
    cluster.wait_for_voters(4);
    check(
        &cluster,
        Outcome::of(
            "kill -9 a node joining a populated cluster, mid snapshot, then mid contents \
                   (3 nodes + 1, slowed link)",
            vec![1, 2, 3, 4],
            &loaded,
            seen,
            format!(
                "mounted again: namespace in {:.1} s, contents in {:.1} s",
                took.0.as_secs_f64(),
                took.1.as_secs_f64()
            ),
        ),
    );
}

/// The leader is killed while it streams the namespace snapshot to a
/// joining node: the two voters left elect a leader, which sends the
/// snapshot again; the join completes, the old leader comes back.
#[test]
fn kill_9_the_leader_while_it_sends_a_snapshot() {
    let Some(_turn) = my_turn() else {
        return;
    };
    let Some((mut cluster, newcomer)) = populated_and_a_newcomer() else {
        return;
    };
    let lan = cluster.lan.as_ref().unwrap();
    let leader = leader(&cluster);
    let loaded: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let (took, seen) = under_load(&cluster, &loaded, || {
        let mut mount = newcomer.spawn_mount();
        wait_for_half_a_snapshot(&mut mount);
        cluster.node(leader).kill9();
        let t = Instant::now();
        finish_mount(mount, Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("the joining node's mount: {e}"));
        let took = t.elapsed();
        lan.slow(4, CONTENTS_MBIT);
        cluster.node(leader).mount();
        wait_replicated(&newcomer, Duration::from_secs(120));
        took
    });
    cluster.nodes.push(newcomer);
    check(
        &cluster,
        Outcome::of(
            "kill -9 the leader while it sends a snapshot to a joining node \
                   (3 nodes + 1, slowed link)",
            vec![1, 2, 3, 4],
            &loaded,
            seen,
            format!(
                "the joining node had the namespace {:.1} s after the kill",
                took.as_secs_f64()
            ),
        ),
    );
}

/// Whether `path` holds nothing or all of `data` (never a part of it):
/// what a reader may see of a file whose writer died before close()
/// returned. Missing is fine too.
fn empty_or_whole(path: &std::path::Path, data: &[u8]) -> bool {
    match fs::read(path) {
        Ok(bytes) => bytes.is_empty() || bytes == data,
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

/// The node a big file is written on is killed in the middle of its
/// write(), and (mounted again) in the middle of its close(): the other
/// nodes serve on undisturbed, and no node ever shows part of a file.
/// The create was committed, so an empty file may stay: close-to-open
/// semantics promise contents only once close() returns.
#[test]
fn kill_9_a_node_in_the_middle_of_a_big_upload() {
    let Some(_turn) = my_turn() else {
        return;
    };
    let cluster = Cluster::start(3);
    seed(&cluster);
    let leader = leader(&cluster);
    let writer = (1..=3).find(|id| *id != leader).unwrap();
    let loaded: Vec<u64> = (1..=3).filter(|id| *id != writer).collect();
    let node = cluster.node(writer);
    let uploads = [
        ("w/upload-killed-in-write", noise(1, UPLOAD)),
        ("w/upload-killed-in-close", noise(2, UPLOAD)),
    ];
    let (closed, seen) = under_load(&cluster, &loaded, || {
        use std::io::Write;
        // In write(): killed after a quarter of the file.
        let written = AtomicUsize::new(0);
        let daemon = node.pid().expect("daemon pid");
        std::thread::scope(|scope| {
            let (name, data) = &uploads[0];
            let written = &written;
            scope.spawn(move || {
                let mut file = fs::File::create(node.path(name)).unwrap();
                for piece in data.chunks(1 << 20) {
                    if file.write_all(piece).is_err() {
                        return; // the daemon is gone
                    }
                    written.fetch_add(piece.len(), Ordering::Relaxed);
                }
                panic!("the whole upload was written before the kill");
            });
            wait_until(Duration::from_secs(60), "a quarter of the upload", || {
                written.load(Ordering::Relaxed) >= UPLOAD / 4
            });
            node.kill9_daemon(daemon);
        });
        node.mount();

        // In close(): killed while the copies travel.
        let (name, data) = &uploads[1];
        let daemon = node.pid().expect("daemon pid");
        let mut file = fs::File::create(node.path(name)).unwrap();
        file.write_all(data).unwrap();
        let closed = std::thread::scope(|scope| {
            let closing = scope.spawn(move || close(file).is_ok());
            std::thread::sleep(Duration::from_millis(200));
            node.kill9_daemon(daemon);
            closing.join().unwrap()
        });
        node.mount();
        closed
    });
    for (name, data) in &uploads {
        for n in &cluster.nodes {
            assert!(
                empty_or_whole(&n.path(name), data),
                "{name} on {} holds part of the upload: {:?} bytes",
                n.mnt.display(),
                fs::metadata(n.path(name)).map(|m| m.len())
            );
        }
    }
    if closed {
        let (name, data) = &uploads[1];
        for n in &cluster.nodes {
            assert!(
                fs::read(n.path(name)).unwrap() == *data,
                "{name} after close() returned"
            );
        }
    }
    check(
        &cluster,
        Outcome::of(
            "kill -9 a node in the middle of a 128 MiB upload on it: in write(), \
                   then in close() (3 nodes)",
            vec![1, 2, 3],
            &loaded,
            seen,
            format!(
                "the upload killed in close() ended {}",
                if fs::metadata(cluster.node(1).path(uploads[1].0)).is_ok_and(|m| m.len() > 0) {
                    "whole everywhere"
                } else {
                    "empty everywhere"
                }
            ) + if closed {
                " (close() had returned)"
            } else {
                ""
            },
        ),
    );
}

/// A node that receives the copies of a big upload is killed during the
/// writer's close(): close() still returns success (the third node takes
/// the copies), and the killed node, mounted again, ends with the file.
#[test]
fn kill_9_a_node_receiving_a_big_upload() {
    let Some(_turn) = my_turn() else {
        return;
    };
    let cluster = Cluster::start(3);
    seed(&cluster);
    let (writer, receiver) = (1, 2);
    let loaded = [1, 3];
    let (name, data) = ("w/upload", noise(3, UPLOAD));
    let (took, seen) = under_load(&cluster, &loaded, || {
        use std::io::Write;
        let daemon = cluster.node(receiver).pid().expect("daemon pid");
        let mut file = fs::File::create(cluster.node(writer).path(name)).unwrap();
        file.write_all(&data).unwrap();
        let took = std::thread::scope(|scope| {
            let closing = scope.spawn(move || {
                let t = Instant::now();
                close(file).map(|()| t.elapsed())
            });
            std::thread::sleep(Duration::from_millis(300));
            cluster.node(receiver).kill9_daemon(daemon);
            closing.join().unwrap()
        })
        .unwrap_or_else(|e| panic!("close() of the upload while a copy's receiver died: {e}"));
        std::thread::sleep(Duration::from_secs(2));
        cluster.node(receiver).mount();
        wait_replicated(cluster.node(receiver), Duration::from_secs(120));
        took
    });
    for n in &cluster.nodes {
        assert!(
            fs::read(n.path(name)).unwrap() == data,
            "the upload on {} is not whole",
            n.mnt.display()
        );
    }
    check(
        &cluster,
        Outcome::of(
            "kill -9 a node receiving a 128 MiB upload's copies during close() (3 nodes)",
            vec![1, 2, 3],
            &loaded,
            seen,
            format!(
                "the upload's close() succeeded in {:.1} s",
                took.as_secs_f64()
            ),
        ),
    );
}
