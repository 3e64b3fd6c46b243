//! Faults on a running cluster, with readers and writers looping on every
//! surviving mount throughout (issue 4's suite; these are its first
//! scenarios). Each scenario prints one row of docs/reliability.md's table:
//! the longest single read and write on the survivors, failed operations,
//! whether the survivors converged, and acknowledged writes lost.
//!
//! What is asserted is what users rely on: no operation fails on nodes
//! that still see a majority, every write whose close() returned is on
//! every survivor, byte for byte, and the survivors end with one tree.
//! Stall times are measured and printed, not asserted (this machine's
//! timing is not a test oracle).

use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use wpfs_tests::{fuse_available, tree, wait_until, Cluster, Node};

/// What the loops on one survivor saw.
#[derive(Default)]
struct Observed {
    longest_read: Duration,
    longest_write: Duration,
    failed: Vec<String>,
    /// Files whose close() returned, with their contents.
    acknowledged: Vec<(String, Vec<u8>)>,
}

fn body(node: usize, i: usize) -> Vec<u8> {
    format!("node {node} write {i} ")
        .repeat(50 + i % 200)
        .into_bytes()
}

/// Loops stat+read of existing files and create+write+close of new ones
/// on `node` until `stop`.
fn load(node: &Node, n: usize, stop: &AtomicBool, seen: &Mutex<Observed>) {
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let path = node.path(&format!("seed/f{}", i % 50));
        let read = fs::metadata(&path).and_then(|_| fs::read(&path));
        let took = t.elapsed();
        let name = format!("w/n{n}-{i}");
        let data = body(n, i);
        let t = Instant::now();
        let written = fs::write(node.path(&name), &data);
        let wrote = t.elapsed();
        let mut s = seen.lock().unwrap();
        s.longest_read = s.longest_read.max(took);
        s.longest_write = s.longest_write.max(wrote);
        if let Err(e) = read {
            s.failed.push(format!("read {}: {e}", path.display()));
        }
        match written {
            Ok(()) => s.acknowledged.push((name, data)),
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

enum Fault {
    /// kill -9: the node is gone.
    Kill9,
    /// SIGSTOP for this long, then SIGCONT: alive but silent (a gray
    /// failure), then back.
    Freeze(Duration),
}

/// Runs the load on every node but the victim, applies the fault to the
/// victim after a while, keeps the load going, then checks and reports.
fn scenario(name: &str, victim_is_leader: bool, fault: Fault) {
    if !fuse_available() {
        return;
    }
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = Cluster::start(3);
    let first = cluster.node(1);
    fs::create_dir(first.path("seed")).unwrap();
    fs::create_dir(first.path("w")).unwrap();
    for i in 0..50 {
        fs::write(first.path(&format!("seed/f{i}")), body(0, i)).unwrap();
    }
    let want = tree(&first.mnt);
    for node in &cluster.nodes {
        wait_until(Duration::from_secs(20), "the seed files everywhere", || {
            tree(&node.mnt) == want
        });
    }
    let leader = first.status()["leader"].as_u64().unwrap();
    let victim = if victim_is_leader {
        leader
    } else {
        (1..=3).find(|id| *id != leader).unwrap()
    };
    let survivors: Vec<(usize, &Node)> = (1..=3u64)
        .filter(|id| *id != victim)
        .map(|id| (id as usize, cluster.node(id)))
        .collect();

    let stop = AtomicBool::new(false);
    let seen: Vec<Mutex<Observed>> = survivors.iter().map(|_| Mutex::default()).collect();
    std::thread::scope(|scope| {
        for ((n, node), seen) in survivors.iter().zip(&seen) {
            let stop = &stop;
            scope.spawn(move || load(node, *n, stop, seen));
        }
        std::thread::sleep(Duration::from_secs(2));
        match fault {
            Fault::Kill9 => {
                cluster.node(victim).kill9();
                std::thread::sleep(Duration::from_secs(8));
            }
            Fault::Freeze(how_long) => {
                let pid = cluster.node(victim).pid().expect("daemon pid");
                unsafe { libc::kill(pid, libc::SIGSTOP) };
                std::thread::sleep(how_long);
                unsafe { libc::kill(pid, libc::SIGCONT) };
                std::thread::sleep(Duration::from_secs(5));
            }
        }
        stop.store(true, Ordering::Relaxed);
    });

    // Every acknowledged write is on every node still running, and they
    // agree (a frozen node is running again by now).
    let mut checked = survivors.clone();
    if let Fault::Freeze(_) = fault {
        checked.push((victim as usize, cluster.node(victim)));
    }
    let reference = survivors[0].1;
    let converged = checked.iter().all(|(_, node)| {
        let mut same = false;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !same && Instant::now() < deadline {
            same = tree(&node.mnt) == tree(&reference.mnt);
            std::thread::sleep(Duration::from_millis(100));
        }
        same
    });
    let mut lost = Vec::new();
    for s in &seen {
        for (file, data) in &s.lock().unwrap().acknowledged {
            for (n, node) in &checked {
                if fs::read(node.path(file)).ok().as_ref() != Some(data) {
                    lost.push(format!("{file} on node {n}"));
                }
            }
        }
    }
    let (mut read, mut write, mut failed, mut acked) = (Duration::ZERO, Duration::ZERO, vec![], 0);
    for s in &seen {
        let s = s.lock().unwrap();
        read = read.max(s.longest_read);
        write = write.max(s.longest_write);
        failed.extend(s.failed.iter().cloned());
        acked += s.acknowledged.len();
    }
    println!(
        "| {name} | {:.0} ms | {:.0} ms | {} | {} | {} of {acked} |",
        read.as_secs_f64() * 1e3,
        write.as_secs_f64() * 1e3,
        failed.len(),
        if converged { "yes" } else { "no" },
        lost.len(),
    );
    assert!(failed.is_empty(), "{name}: operations failed: {failed:?}");
    assert!(converged, "{name}: the survivors did not converge");
    assert!(
        lost.is_empty(),
        "{name}: acknowledged writes lost: {lost:?}"
    );
}

#[test]
fn kill_9_a_follower() {
    scenario("kill -9 a follower (3 nodes)", false, Fault::Kill9);
}

#[test]
fn kill_9_the_leader() {
    scenario("kill -9 the leader (3 nodes)", true, Fault::Kill9);
}

#[test]
fn freeze_a_follower_for_10_s() {
    scenario(
        "SIGSTOP a follower 10 s, then SIGCONT (3 nodes)",
        false,
        Fault::Freeze(Duration::from_secs(10)),
    );
}

#[test]
fn freeze_the_leader_for_10_s() {
    scenario(
        "SIGSTOP the leader 10 s, then SIGCONT (3 nodes)",
        true,
        Fault::Freeze(Duration::from_secs(10)),
    );
}
