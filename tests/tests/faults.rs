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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use wpfs_tests::{fuse_available, tree, wait_until, Cluster, Node};

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

/// Writes `data` to a new file and closes it, with close()'s error: that is
/// where wpfs commits (`fs::write` drops the file and its close error).
fn write_file(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::fd::IntoRawFd;
    let mut file = fs::File::create(path)?;
    file.write_all(data)?;
    // SAFETY: the fd is ours alone, closed once.
    if unsafe { libc::close(file.into_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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
        let written = write_file(&node.path(&tmp), &data)
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
    if !fuse_available() {
        return;
    }
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = match fault {
        Fault::Cut(_) => match Cluster::start_partitionable(size) {
            Some(cluster) => cluster,
            None => return,
        },
        _ => Cluster::start(size),
    };
    seed(&cluster);

    let leader = cluster.node(1).status()["leader"].as_u64().unwrap();
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

    let stop = AtomicBool::new(false);
    let seen: Vec<Mutex<Observed>> = loaded.iter().map(|_| Mutex::default()).collect();
    let mut degraded_after = None;
    let mut caught_up = None;
    std::thread::scope(|scope| {
        for (id, seen) in loaded.iter().zip(&seen) {
            let (node, stop) = (cluster.node(*id), &stop);
            scope.spawn(move || read_loop(node, stop, seen));
            scope.spawn(move || write_loop(node, *id, stop, seen));
        }
        std::thread::sleep(Duration::from_secs(2));
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
            Fault::Restart(down, _) => {
                caught_up = Some(restart(&cluster, victims[0], down));
                std::thread::sleep(Duration::from_secs(3));
            }
        }
        stop.store(true, Ordering::Relaxed);
    });

    // Every node still running is checked: a frozen or cut-off node is
    // back by now, a killed one is not.
    let running: Vec<u64> = (1..=size)
        .filter(|id| fault != Fault::Kill9 || !victims.contains(id))
        .collect();
    let reference = cluster.node(running[0]);
    let converged = running.iter().all(|id| {
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
    for s in &seen {
        for (file, data) in &s.lock().unwrap().acknowledged {
            for id in &running {
                if fs::read(cluster.node(*id).path(file)).ok().as_ref() != Some(data) {
                    lost.push(format!("{file} on node {id}"));
                }
            }
        }
    }
    let half_written = half_written(reference);

    // The rows: the nodes that kept a majority, then the cut-off ones.
    let cut_off = |id: &u64| matches!(fault, Fault::Cut(_)) && victims.contains(id);
    let mut converged_text = if converged {
        format!("yes ({} nodes)", running.len())
    } else {
        "no".to_string()
    };
    if let Some((how, took)) = caught_up {
        let from = match how {
            CatchUp::Log => "the log",
            CatchUp::Snapshot => "a snapshot",
        };
        converged_text += &format!("; caught up from {from} in {:.1} s", took.as_secs_f64());
    }
    let mut majority_failed = Vec::new();
    for (rows_of_cut_off, label) in [
        (false, name.to_string()),
        (true, format!("{name}: the cut-off node")),
    ] {
        let group: Vec<&Mutex<Observed>> = loaded
            .iter()
            .zip(&seen)
            .filter(|(id, _)| cut_off(id) == rows_of_cut_off)
            .map(|(_, s)| s)
            .collect();
        if group.is_empty() {
            continue;
        }
        let (mut read, mut write, mut failed, mut refused, mut acked) =
            (Duration::ZERO, Duration::ZERO, vec![], vec![], 0);
        for s in group {
            let s = s.lock().unwrap();
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
                degraded_after.unwrap_or_default().as_secs_f64()
            )
        } else {
            (failed.len() + refused.len()).to_string()
        };
        println!(
            "| {label} | {:.0} ms | {:.0} ms | {failed_text} | {converged_text} | {} of {acked} |",
            read.as_secs_f64() * 1e3,
            write.as_secs_f64() * 1e3,
            lost.len(),
        );
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
    if let (Fault::Restart(_, want), Some((how, _))) = (fault, caught_up) {
        assert_eq!(
            how, want,
            "{name}: the restarted node caught up the other way"
        );
    }
    for id in victims.iter().filter(|id| cut_off(id)) {
        let log = fs::read_to_string(cluster.node(*id).data.join("wpfs.log")).unwrap();
        assert!(
            log.contains("write refused"),
            "node {id}'s log names no refused write"
        );
    }
}

/// 50 seed files, written on node 1 and present on every node.
fn seed(cluster: &Cluster) {
    let first = cluster.node(1);
    fs::create_dir(first.path("seed")).unwrap();
    fs::create_dir(first.path("w")).unwrap();
    for i in 0..50 {
        fs::write(first.path(&format!("seed/f{i}")), body(0, i)).unwrap();
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
fn restart(cluster: &Cluster, id: u64, down: Duration) -> (CatchUp, Duration) {
    let node = cluster.node(id);
    let installs = || {
        fs::read_to_string(node.data.join("wpfs.log"))
            .unwrap()
            .matches("installed the snapshot")
            .count()
    };
    let before = installs();
    node.kill9();
    std::thread::sleep(down);
    let other = cluster.node(if id == 1 { 2 } else { 1 });
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
    if !fuse_available() {
        return;
    }
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
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
    let stop = AtomicBool::new(false);
    let seen: Vec<Mutex<Observed>> = (0..2).map(|_| Mutex::default()).collect();
    let mut written = Vec::new();
    let refused = std::thread::scope(|scope| {
        for (id, seen) in [1u64, 2].iter().zip(&seen) {
            let (node, stop) = (cluster.node(*id), &stop);
            scope.spawn(move || read_loop(node, stop, seen));
            scope.spawn(move || write_loop(node, *id, stop, seen));
        }
        let mut refused = None;
        for i in 0..64u64 {
            let (name, data) = (format!("big-{i}"), noise(i, 1 << 20));
            match write_file(&full.path(&name), &data) {
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
        stop.store(true, Ordering::Relaxed);
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
    write_file(&full.path(after_refusal), b"space again").unwrap();

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
    let mut failed = Vec::new();
    for s in &seen {
        let s = s.lock().unwrap();
        failed.extend(s.failed.iter().chain(&s.refused).cloned());
    }
    println!(
        "| fill the disk under one node's store (3 nodes) | ENOSPC after {} MiB on the full node; \
         writes on the others: {} failed | converged after the space was freed | 0 lost |",
        written.len(), // 1 MiB files
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "the other nodes' operations failed: {failed:?}"
    );
    assert!(half_written(cluster.node(1)).is_empty());
}

/// Free bytes of the filesystem holding `path`.
fn free_bytes(path: &std::path::Path) -> u64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: NUL-terminated path, valid out-pointer.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st.f_bavail as u64 * st.f_frsize as u64
}

/// `len` bytes that neither compress nor share chunks with other seeds'.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut bytes = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    bytes
}
