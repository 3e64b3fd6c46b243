//! Every node applies the same log; the state machine must leave every
//! node's namespace byte-identical, whatever the commands (failing ones
//! included) and wherever a node stops and restarts.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rocksdb::IteratorMode;
use wpfs_consensus::store::CF_META;
use wpfs_consensus::{Namespace, Store, ROOT_INO};
use wpfs_proto::{self as proto, ChunkRef, Command, FileKind, Op};

fn random_log(seed: u64, n: usize) -> Vec<Command> {
    let mut rng = StdRng::seed_from_u64(seed);
    let names: [&[u8]; 5] = [b"a", b"b", b"c", b"wp-content", b"x.php"];
    (0..n)
        .map(|i| {
            let ino = rng.random_range(1..40u64);
            let parent = rng.random_range(1..40u64);
            let name = names[rng.random_range(0..names.len())].to_vec();
            let op = match rng.random_range(0..10) {
                0 | 1 => Op::Create(proto::Create {
                    parent,
                    name,
                    kind: if rng.random() {
                        FileKind::Directory
                    } else {
                        FileKind::Regular
                    } as i32,
                    mode: 0o755,
                    uid: rng.random_range(0..3),
                    gid: rng.random_range(0..3),
                    ..Default::default()
                }),
                2 => Op::Unlink(proto::Unlink {
                    parent,
                    name,
                    directory: rng.random(),
                    keep_if_open: rng.random(),
                }),
                3 => Op::Rename(proto::Rename {
                    parent,
                    name,
                    new_parent: rng.random_range(1..40),
                    new_name: names[rng.random_range(0..names.len())].to_vec(),
                    noreplace: rng.random_bool(0.2),
                    exchange: rng.random_bool(0.2),
                    keep_if_open: false,
                }),
                4 => Op::Link(proto::Link {
                    ino,
                    new_parent: parent,
                    new_name: name,
                }),
                5 => Op::SetAttr(proto::SetAttr {
                    ino,
                    mode: Some(rng.random_range(0..0o7777)),
                    mtime_ns: Some(rng.random()),
                    ..Default::default()
                }),
                6 => Op::SetContent(proto::SetContent {
                    ino,
                    size: rng.random_range(0..300_000),
                    truncated_at: rng.random_bool(0.3).then(|| rng.random_range(0..300_000)),
                    chunks: (0..rng.random_range(0..4))
                        .map(|_| ChunkRef {
                            index: rng.random_range(0..5),
                            hash: vec![rng.random_range(0..4u8); 32],
                            len: 65_536,
                        })
                        .collect(),
                    mtime_ns: i as i64,
                    carried: vec![],
                    create: None,
                }),
                7 => Op::Reserve(proto::Reserve {
                    count: rng.random_range(0..4),
                }),
                8 => Op::SetContent(born(ino, &name, rng.random_range(1..4), i as i64)),
                _ => Op::Reap(proto::Reap { ino }),
            };
            Command {
                node_id: 1,
                request_id: i as u64,
                now_ns: 1_000_000 + i as i64,
                oldest_pending: i as u64,
                op: Some(op),
            }
        })
        .collect()
}

/// A new file `name` in the root, born with one chunk (`fill` 32 times
/// as its hash) of `fill` bytes, numbered `ino`.
fn born(ino: u64, name: &[u8], fill: u8, now: i64) -> proto::SetContent {
    proto::SetContent {
        ino,
        size: fill as u64,
        truncated_at: Some(0),
        chunks: vec![ChunkRef {
            index: 0,
            hash: vec![fill; 32],
            len: fill as u32,
        }],
        mtime_ns: now,
        carried: vec![],
        create: Some(proto::Create {
            parent: ROOT_INO,
            name: name.to_vec(),
            kind: FileKind::Regular as i32,
            mode: 0o644,
            ino,
            created_ns: now - 1,
            ..Default::default()
        }),
    }
}

fn command(i: u64, op: Op) -> Command {
    Command {
        node_id: 1,
        request_id: i,
        now_ns: i as i64,
        oldest_pending: i,
        op: Some(op),
    }
}

fn fresh(dir: &std::path::Path) -> Store {
    let store = Store::open(dir, true).unwrap();
    Namespace::bootstrap(&store, 0, 0, 0).unwrap();
    store
}

fn apply(store: &Store, log: &[Command], first_index: u64) -> Vec<i32> {
    let ns = Namespace::new(store.clone());
    log.iter()
        .enumerate()
        .map(|(i, cmd)| {
            ns.apply(first_index + i as u64, 1, cmd)
                .unwrap()
                .expect("every command is new")
                .errno
        })
        .collect()
}

/// Every key and value of the namespace, in order.
type Pairs = Vec<(Box<[u8]>, Box<[u8]>)>;

fn contents(store: &Store) -> Pairs {
    store
        .db()
        .iterator_cf(store.cf(CF_META), IteratorMode::Start)
        .map(|kv| kv.unwrap())
        .collect()
}

#[test]
fn the_same_log_gives_the_same_namespace_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    for seed in 0..8 {
        let log = random_log(seed, 600);
        let a = fresh(&tmp.path().join(format!("a{seed}")));
        let b = fresh(&tmp.path().join(format!("b{seed}")));
        let errnos = apply(&a, &log, 1);
        assert_eq!(apply(&b, &log, 1), errnos, "seed {seed}: outcomes differ");
        assert!(errnos.contains(&0), "seed {seed}: nothing succeeded");
        assert_eq!(contents(&a), contents(&b), "seed {seed}: stores differ");

        // A node that stops halfway and reopens its store ends the same.
        let c_path = tmp.path().join(format!("c{seed}"));
        let c = fresh(&c_path);
        apply(&c, &log[..300], 1);
        drop(c);
        let c = Store::open(&c_path, false).unwrap();
        assert_eq!(Namespace::new(c.clone()).applied().unwrap(), (300, 1));
        apply(&c, &log[300..], 301);
        assert_eq!(
            contents(&a),
            contents(&c),
            "seed {seed}: restart changed the result"
        );
    }
}

#[test]
fn a_command_proposed_again_is_applied_once() {
    // After a leader change a node proposes its waiting commands again; a
    // copy of one the log already holds must change nothing.
    let tmp = tempfile::tempdir().unwrap();
    let log: Vec<Command> = random_log(42, 200)
        .into_iter()
        .map(|mut c| {
            // The proposer still waits for its last 20 requests.
            c.oldest_pending = c.request_id.saturating_sub(20);
            c
        })
        .collect();
    let once = fresh(&tmp.path().join("once"));
    apply(&once, &log, 1);

    let twice = fresh(&tmp.path().join("twice"));
    let ns = Namespace::new(twice.clone());
    let mut index = 1;
    for (i, cmd) in log.iter().enumerate() {
        // Each command, a copy of it at once, and a copy of an older one.
        let older = &log[i.saturating_sub(10)];
        for (n, c) in [cmd, cmd, older].into_iter().enumerate() {
            let applied = ns.apply(index, 1, c).unwrap().is_some();
            assert_eq!(
                applied,
                n == 0,
                "entry {index}: only the first copy applies"
            );
            index += 1;
        }
    }
    let without_index = |pairs: Pairs| -> Pairs {
        pairs
            .into_iter()
            .filter(|(k, _)| &k[..] != b"sapplied")
            .collect()
    };
    assert_eq!(
        without_index(contents(&twice)),
        without_index(contents(&once))
    );
}

#[test]
fn a_file_born_with_its_contents_replaces_one_made_meanwhile_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let store = fresh(tmp.path());
    let ns = Namespace::new(store.clone());
    let mut index = 0;
    let mut apply = |op: Op| {
        index += 1;
        ns.apply(index, 1, &command(index, op)).unwrap().unwrap()
    };
    let first = apply(Op::Reserve(proto::Reserve { count: 2 })).reserved;
    assert!(first > ROOT_INO);

    let mine = apply(Op::SetContent(born(first, b"new.php", 2, 10)));
    assert_eq!(mine.errno, 0);
    let inode = mine.inode.unwrap();
    assert_eq!((inode.ino, inode.size), (first, 2));

    // The same name, born on another node that had not seen it yet: its
    // contents replace the file's whole, under the number already there.
    let theirs = apply(Op::SetContent(born(first + 1, b"new.php", 1, 11)));
    assert_eq!(theirs.errno, 0);
    assert_eq!(theirs.inode.unwrap().ino, first);
    let slots = ns.chunk_slots(first, 0, 10, None).unwrap();
    assert_eq!(slots.len(), 1);
    assert_eq!((slots[0].hash.clone(), slots[0].len), (vec![1; 32], 1));
    assert!(ns.inode(first + 1).unwrap().is_none());
    assert_eq!(ns.chunk_refcount(&[2; 32]).unwrap(), 0);

    // Numbers nobody reserved, or already in use, are refused.
    for ino in [first + 2, first, ROOT_INO] {
        let out = apply(Op::SetContent(born(ino, b"other.php", 1, 12)));
        assert_eq!(out.errno, libc::EINVAL, "number {ino}");
    }
    assert_eq!(
        apply(Op::Reserve(proto::Reserve { count: 0 })).errno,
        libc::EINVAL
    );
}

#[test]
fn the_referenced_chunks_are_listed_in_steps_each_once() {
    let tmp = tempfile::tempdir().unwrap();
    let store = fresh(tmp.path());
    let files = 2_500u64;
    let reserve = command(1, Op::Reserve(proto::Reserve { count: files }));
    let ns = Namespace::new(store.clone());
    let first = ns.apply(1, 1, &reserve).unwrap().unwrap().reserved;
    let log: Vec<Command> = (0..files)
        .map(|i| {
            let mut content = born(first + i, format!("f{i}").as_bytes(), 1, i as i64);
            content.chunks[0].hash = blake3::hash(&i.to_be_bytes()).as_bytes().to_vec();
            command(i + 2, Op::SetContent(content))
        })
        .collect();
    assert!(apply(&store, &log, 2).iter().all(|errno| *errno == 0));
    let all = ns.referenced_chunks_after(None, usize::MAX).unwrap();
    assert_eq!(all.len(), files as usize);
    let mut stepped = Vec::new();
    let mut after = None;
    loop {
        let step = ns.referenced_chunks_after(after.as_ref(), 1024).unwrap();
        let Some(last) = step.last() else { break };
        after = Some(*last);
        stepped.extend(step);
    }
    assert_eq!(stepped, all, "every reference once, in order");
}
