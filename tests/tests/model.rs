//! Randomized model test: thousands of random operations applied to a wpfs
//! mount and to a local directory (the reference model), compared after
//! every step: each operation's errno, and the whole tree (names, kinds,
//! modes, link counts, sizes, bytes). The seed is printed; rerun one with
//! `WPFS_MODEL_SEED=<seed>`, more steps with `WPFS_MODEL_STEPS=<n>`.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wpfs_tests::{fuse_available, last_errno, local_dir, tree, Node};

const NAMES: [&str; 8] = ["a", "b", "c", "d/a", "d/b", "e/a", "d", "e"];

#[derive(Debug, Clone)]
enum Op {
    Write {
        path: &'static str,
        offset: u64,
        len: usize,
        byte: u8,
    },
    Truncate {
        path: &'static str,
        size: u64,
    },
    Rename {
        from: &'static str,
        to: &'static str,
    },
    Link {
        from: &'static str,
        to: &'static str,
    },
    Unlink {
        path: &'static str,
    },
    Mkdir {
        path: &'static str,
    },
    Rmdir {
        path: &'static str,
    },
}

fn random_op(rng: &mut StdRng) -> Op {
    let mut name = || NAMES[rng.random_range(0..NAMES.len())];
    let (a, b) = (name(), name());
    match rng.random_range(0..100) {
        0..=34 => Op::Write {
            path: a,
            offset: match rng.random_range(0..3) {
                0 => 0,
                1 => rng.random_range(0..70_000),
                _ => rng.random_range(0..300_000),
            },
            len: rng.random_range(1..100_000),
            byte: rng.random(),
        },
        35..=44 => Op::Truncate {
            path: a,
            size: rng.random_range(0..200_000),
        },
        45..=59 => Op::Rename { from: a, to: b },
        60..=67 => Op::Link { from: a, to: b },
        68..=81 => Op::Unlink { path: a },
        82..=92 => Op::Mkdir { path: a },
        _ => Op::Rmdir { path: a },
    }
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn rc(r: libc::c_int) -> Result<(), i32> {
    if r < 0 {
        Err(last_errno())
    } else {
        Ok(())
    }
}

fn apply(root: &Path, op: &Op) -> Result<(), i32> {
    unsafe {
        match op {
            Op::Write {
                path,
                offset,
                len,
                byte,
            } => {
                let fd = libc::open(
                    c(&root.join(path)).as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY,
                    0o644,
                );
                rc(fd)?;
                let data: Vec<u8> = (0..*len).map(|i| byte.wrapping_add(i as u8)).collect();
                let n = libc::pwrite(fd, data.as_ptr().cast(), data.len(), *offset as i64);
                let w = if n < 0 { Err(last_errno()) } else { Ok(()) };
                rc(libc::close(fd))?;
                w
            }
            Op::Truncate { path, size } => {
                rc(libc::truncate(c(&root.join(path)).as_ptr(), *size as i64))
            }
            Op::Rename { from, to } => rc(libc::rename(
                c(&root.join(from)).as_ptr(),
                c(&root.join(to)).as_ptr(),
            )),
            Op::Link { from, to } => rc(libc::link(
                c(&root.join(from)).as_ptr(),
                c(&root.join(to)).as_ptr(),
            )),
            Op::Unlink { path } => rc(libc::unlink(c(&root.join(path)).as_ptr())),
            Op::Mkdir { path } => rc(libc::mkdir(c(&root.join(path)).as_ptr(), 0o755)),
            Op::Rmdir { path } => rc(libc::rmdir(c(&root.join(path)).as_ptr())),
        }
    }
}

#[test]
fn random_operations_match_a_local_directory() {
    if !fuse_available() {
        return;
    }
    let seed: u64 = std::env::var("WPFS_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    let steps: usize = std::env::var("WPFS_MODEL_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    eprintln!("model test: seed {seed}, {steps} steps (WPFS_MODEL_SEED={seed} reruns it)");
    let node = Node::single();
    let wp = node.path("model");
    std::fs::create_dir(&wp).unwrap();
    let local = local_dir();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut history = Vec::new();
    for step in 0..steps {
        let op = random_op(&mut rng);
        history.push(op.clone());
        let a = apply(&wp, &op);
        let b = apply(local.path(), &op);
        let context = || {
            let tail: Vec<_> = history.iter().rev().take(8).rev().collect();
            format!("seed {seed}, step {step}, op {op:?}; last ops: {tail:#?}")
        };
        assert_eq!(
            a,
            b,
            "errno differs (wpfs left, local right): {}",
            context()
        );
        let (ta, tb) = (tree(&wp), tree(local.path()));
        assert_eq!(
            ta,
            tb,
            "trees differ (wpfs left, local right): {}",
            context()
        );
    }
    // The same after a remount: everything was committed.
    node.unmount();
    node.mount();
    assert_eq!(
        tree(&wp),
        tree(local.path()),
        "tree changed across a remount (seed {seed})"
    );
}
