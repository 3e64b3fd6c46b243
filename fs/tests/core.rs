//! The filesystem core without FUSE: a real RocksDB store and a real
//! one-voter Raft node in a temporary directory, driven through `FsCore`.
//! These check what the mount tests cannot see: chunks shared and
//! collected, orphans reaped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wpfs_consensus::namespace::Hash;
use wpfs_consensus::store::CF_CHUNKS;
use wpfs_consensus::{Node, NodeConfig, Store, ROOT_INO};
use wpfs_fs::chunks::ChunkSource;
use wpfs_fs::core::{Caller, NewNode};
use wpfs_fs::{CoreOptions, FsCore};

struct Fixture {
    core: Arc<FsCore>,
    store: Store,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    fixture_keeping_free(0)
}

/// A fixture whose core refuses new contents below `min_free` free bytes.
fn fixture_keeping_free(min_free: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    wpfs_consensus::bootstrap(&db, 1, "127.0.0.1:1", 0, 0, 0).unwrap();
    let store = Store::open(&db, false).unwrap();
    let node = Arc::new(Node::start(NodeConfig::new(1), store.clone(), None).unwrap());
    assert!(node.wait_for_leader(Duration::from_secs(5)));
    let core = FsCore::new(
        node,
        store.clone(),
        CoreOptions {
            write_timeout: Duration::from_secs(5),
            read_only: false,
            min_free,
        },
    );
    Fixture {
        core,
        store,
        _dir: dir,
    }
}

const ME: Caller = Caller { uid: 0, gid: 0 };

fn chunks_stored(store: &Store) -> usize {
    store
        .db()
        .iterator_cf(store.cf(CF_CHUNKS), rocksdb::IteratorMode::Start)
        .count()
}

/// Writes `data` to a new file `name` and closes it.
fn write_file(core: &FsCore, name: &str, data: &[u8]) -> u64 {
    let file = NewNode::File {
        mode: 0o644,
        exclusive: true,
    };
    let ino = core
        .create(ROOT_INO, name.as_bytes(), file, ME)
        .unwrap()
        .ino;
    core.open(ino).unwrap();
    core.write(ino, 0, data).unwrap();
    core.flush(ino, false).unwrap();
    core.release(ino).unwrap();
    ino
}

/// Bytes that do not repeat within a file (so its chunks differ).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn shared_chunks_are_kept_until_their_last_reference_goes() {
    let f = fixture();
    let data = pattern(1, 200_000); // four chunks
    let a = write_file(&f.core, "a", &data);
    let b = write_file(&f.core, "b", &data);
    assert_eq!(
        chunks_stored(&f.store),
        4,
        "identical files share their chunks"
    );

    f.core.unlink(ROOT_INO, b"a", false).unwrap();
    f.core.collect_garbage().unwrap();
    assert_eq!(chunks_stored(&f.store), 4, "b still references every chunk");
    assert_eq!(f.core.read(b, 0, 300_000).unwrap(), data);
    assert!(f.core.getattr(a).is_err(), "a is gone");

    f.core.unlink(ROOT_INO, b"b", false).unwrap();
    f.core.collect_garbage().unwrap();
    assert_eq!(
        chunks_stored(&f.store),
        0,
        "no file references them any more"
    );
}

#[test]
fn an_overwrite_frees_exactly_the_chunks_it_replaced() {
    let f = fixture();
    let data = pattern(2, 4 * 65_536);
    let ino = write_file(&f.core, "f", &data);
    assert_eq!(chunks_stored(&f.store), 4);

    // Rewrite the third chunk only.
    f.core.open(ino).unwrap();
    f.core.write(ino, 2 * 65_536 + 10, b"patch").unwrap();
    f.core.release(ino).unwrap();
    f.core.collect_garbage().unwrap();
    assert_eq!(chunks_stored(&f.store), 4, "one chunk replaced by one");

    let mut expected = data.clone();
    expected[2 * 65_536 + 10..2 * 65_536 + 15].copy_from_slice(b"patch");
    assert_eq!(f.core.read(ino, 0, 1 << 20).unwrap(), expected);

    // Truncating to one chunk frees the other three.
    f.core
        .setattr(
            ino,
            wpfs_fs::core::SetAttrs {
                size: Some(1000),
                ..Default::default()
            },
        )
        .unwrap();
    f.core.collect_garbage().unwrap();
    assert_eq!(chunks_stored(&f.store), 1);
    assert_eq!(f.core.read(ino, 0, 1 << 20).unwrap(), &expected[..1000]);
}

#[test]
fn a_file_unlinked_while_open_lives_until_its_last_close() {
    let f = fixture();
    let ino = write_file(&f.core, "f", b"orphan data");
    f.core.open(ino).unwrap();
    f.core.unlink(ROOT_INO, b"f", false).unwrap();
    assert!(f.core.lookup(ROOT_INO, b"f").unwrap().is_none());
    assert_eq!(f.core.read(ino, 0, 100).unwrap(), b"orphan data");
    assert_eq!(f.core.namespace().orphans().unwrap(), vec![ino]);

    f.core.release(ino).unwrap();
    assert!(f.core.getattr(ino).is_err(), "reaped at the last close");
    assert!(f.core.namespace().orphans().unwrap().is_empty());
    f.core.collect_garbage().unwrap();
    assert_eq!(chunks_stored(&f.store), 0);
}

#[test]
fn a_corrupt_chunk_reads_as_eio_never_as_wrong_bytes() {
    let f = fixture();
    let data = pattern(3, 3 * 65_536);
    let ino = write_file(&f.core, "f", &data);
    // Damage the second chunk on disk: same key, other bytes.
    let cf = f.store.cf(CF_CHUNKS);
    let keys: Vec<Box<[u8]>> = f
        .store
        .db()
        .iterator_cf(cf, rocksdb::IteratorMode::Start)
        .map(|kv| kv.unwrap().0)
        .collect();
    let second = blake3::hash(&data[65_536..2 * 65_536]);
    let victim = keys.iter().find(|k| ***k == *second.as_bytes()).unwrap();
    f.store.db().put_cf(cf, victim, vec![0u8; 65_536]).unwrap();

    assert_eq!(
        f.core.read(ino, 0, 65_536).unwrap(),
        &data[..65_536],
        "other chunks still read"
    );
    assert_eq!(
        f.core.read(ino, 65_536, 10).map_err(|e| e.0),
        Err(libc::EIO)
    );
    assert_eq!(
        f.core.read(ino, 0, 1 << 20).map_err(|e| e.0),
        Err(libc::EIO)
    );
}

#[test]
fn below_the_reserve_new_contents_get_enospc_and_the_namespace_still_works() {
    // A reserve larger than any disk: every new chunk is refused.
    let f = fixture_keeping_free(u64::MAX / 2);
    let core = &f.core;
    let file = NewNode::File {
        mode: 0o644,
        exclusive: true,
    };
    let ino = core.create(ROOT_INO, b"big", file, ME).unwrap().ino;
    core.open(ino).unwrap();
    core.write(ino, 0, &pattern(1, 300_000)).unwrap();
    let enospc = Err(wpfs_fs::error::Errno(libc::ENOSPC));
    assert_eq!(core.flush(ino, false), enospc);
    assert_eq!(core.release(ino), enospc, "the last close tries again");
    assert_eq!(chunks_stored(&f.store), 0);
    // Creating, renaming and deleting (which frees space) still work.
    core.rename(ROOT_INO, b"big", ROOT_INO, b"renamed", false, false)
        .unwrap();
    core.unlink(ROOT_INO, b"renamed", false).unwrap();
    assert_eq!(core.statfs().unwrap().bavail, 0, "df shows nothing usable");
}

/// open(O_CREAT) without O_EXCL, as most programs create files.
fn create_file(core: &FsCore, name: &str) -> u64 {
    let (inode, _fh) = core
        .create_file(ROOT_INO, name.as_bytes(), 0o644, false, ME)
        .unwrap();
    inode.ino
}

fn applied(core: &FsCore) -> u64 {
    core.namespace().applied().unwrap().0
}

#[test]
fn a_new_file_is_one_command_and_shows_here_before_it() {
    let f = fixture();
    let core = &f.core;
    let first = create_file(core, "first"); // reserves inode numbers
    core.release(first).unwrap();
    let before = applied(core);
    let ino = create_file(core, "new.php");
    assert_eq!(applied(core), before, "open(O_CREAT) proposes nothing");
    assert!(core.namespace().inode(ino).unwrap().is_none());
    // This node shows it already: by name, by number, with its writes.
    assert_eq!(core.lookup(ROOT_INO, b"new.php").unwrap().unwrap().ino, ino);
    core.write(ino, 0, b"<?php echo 1;").unwrap();
    assert_eq!(core.getattr(ino).unwrap().size, 13);
    assert_eq!(core.read(ino, 0, 100).unwrap(), b"<?php echo 1;");
    core.flush(ino, false).unwrap();
    core.release(ino).unwrap();
    assert_eq!(
        applied(core),
        before + 1,
        "born with its contents: one entry"
    );
    assert_eq!(core.namespace().inode(ino).unwrap().unwrap().size, 13);
    assert_eq!(core.read(ino, 0, 100).unwrap(), b"<?php echo 1;");
    // A file closed with nothing written is born empty, with the times
    // it was shown with (a stat before and after its close agree).
    let empty = create_file(core, "empty");
    let shown = core.getattr(empty).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    core.release(empty).unwrap();
    let born = core.namespace().inode(empty).unwrap().unwrap();
    assert_eq!(born.size, 0);
    let times = |i: &wpfs_proto::Inode| (i.atime_ns, i.mtime_ns, i.ctime_ns, i.crtime_ns);
    assert_eq!(times(&born), times(&shown));
}

#[test]
fn changes_made_here_come_after_the_files_created_here() {
    let f = fixture();
    let core = &f.core;
    let ino = create_file(core, "upload.tmp");
    core.write(ino, 0, b"jpeg bytes").unwrap();
    // A listing shows it; a rename of it (still open) moves it.
    let mut names = Vec::new();
    core.read_dir(ROOT_INO, 0, |_, _, _, name| {
        names.push(name.to_vec());
        true
    })
    .unwrap();
    assert!(names.contains(&b"upload.tmp".to_vec()), "listed: {names:?}");
    core.rename(
        ROOT_INO,
        b"upload.tmp",
        ROOT_INO,
        b"photo.jpg",
        false,
        false,
    )
    .unwrap();
    core.write(ino, 10, b" and more").unwrap();
    core.release(ino).unwrap();
    let photo = core.lookup(ROOT_INO, b"photo.jpg").unwrap().unwrap();
    assert_eq!(photo.ino, ino);
    assert_eq!(core.read(ino, 0, 100).unwrap(), b"jpeg bytes and more");

    // Unlinked while open and unborn: kept until the close, then reaped.
    let gone = create_file(core, "gone");
    core.unlink(ROOT_INO, b"gone", false).unwrap();
    core.write(gone, 0, b"still writable").unwrap();
    assert_eq!(core.read(gone, 0, 100).unwrap(), b"still writable");
    core.release(gone).unwrap();
    assert!(core.getattr(gone).is_err());
    assert!(core.namespace().orphans().unwrap().is_empty());
}

/// Another node makes `name` and commits `data` (at most 64 KiB) in it:
/// its commands, applied here; its inode number.
fn made_elsewhere(core: &FsCore, name: &str, data: &[u8]) -> u64 {
    let propose = |op| {
        let outcome = core.node().propose(op, 0, false, Duration::from_secs(5));
        outcome.unwrap().inode.unwrap()
    };
    let theirs = propose(wpfs_proto::Op::Create(wpfs_proto::Create {
        parent: ROOT_INO,
        name: name.as_bytes().to_vec(),
        kind: wpfs_proto::FileKind::Regular as i32,
        mode: 0o644,
        ..Default::default()
    }))
    .ino;
    let hash = *blake3::hash(data).as_bytes();
    core.chunks().put_hashed([(&hash, data)]).unwrap();
    propose(wpfs_proto::Op::SetContent(wpfs_proto::SetContent {
        ino: theirs,
        size: data.len() as u64,
        chunks: vec![wpfs_proto::ChunkRef {
            index: 0,
            hash: hash.to_vec(),
            len: data.len() as u32,
        }],
        mtime_ns: 1,
        ..Default::default()
    }));
    theirs
}

#[test]
fn an_open_that_wrote_nothing_never_erases_a_file_made_elsewhere_since() {
    let f = fixture();
    let core = &f.core;
    // open(O_CREAT|O_TRUNC) of a name that does not exist yet here.
    let mine = create_file(core, "cache.html");
    let theirs = made_elsewhere(core, "cache.html", &pattern(6, 60_000));
    core.release(mine).unwrap();
    let found = core.lookup(ROOT_INO, b"cache.html").unwrap().unwrap();
    assert_eq!(found.ino, theirs, "one file under the name");
    assert_eq!(core.read(theirs, 0, 1 << 20).unwrap(), pattern(6, 60_000));
}

#[test]
fn a_file_created_here_and_elsewhere_at_once_ends_with_the_later_contents_whole() {
    let f = fixture();
    let core = &f.core;
    let mine = create_file(core, "cache.html");
    core.write(mine, 0, &pattern(5, 100_000)).unwrap();
    let theirs = made_elsewhere(core, "cache.html", &pattern(6, 60_000));
    // This node's close comes later: its contents replace theirs whole.
    let data = pattern(7, 30_000);
    core.write(mine, 0, &data).unwrap();
    core.release(mine).unwrap();
    let found = core.lookup(ROOT_INO, b"cache.html").unwrap().unwrap();
    assert_eq!(found.ino, theirs, "one file under the name");
    let mut expected = pattern(5, 100_000);
    expected[..30_000].copy_from_slice(&data);
    assert_eq!(core.read(theirs, 0, 1 << 20).unwrap(), expected);
    assert!(
        core.getattr(mine).is_err(),
        "the number it was shown is gone"
    );
    core.collect_garbage().unwrap();
    assert_eq!(chunks_stored(&f.store), 2, "nothing of theirs is left");
}

#[test]
fn a_carried_chunk_is_not_left_for_the_collector_to_look_at() {
    // Chunks that ride in a command are stored as it is applied, already
    // referenced; pushed ones may arrive before their command and are
    // flagged with their arrival time.
    let f = fixture();
    let carried = pattern(8, 1000);
    let pushed = pattern(9, 1000);
    let hash = |d: &[u8]| *blake3::hash(d).as_bytes();
    let mut batch = rocksdb::WriteBatch::default();
    f.core
        .chunks()
        .put_carried(&mut batch, &hash(&carried), &carried)
        .unwrap();
    f.store.db().write(batch).unwrap();
    f.core
        .chunks()
        .put_hashed([(&hash(&pushed), &pushed[..])])
        .unwrap();
    let flagged: Vec<_> = f
        .core
        .namespace()
        .garbage_chunks_after(None, usize::MAX)
        .unwrap();
    assert_eq!(flagged.len(), 1);
    assert_eq!(flagged[0].0, hash(&pushed));
    assert_eq!(chunks_stored(&f.store), 2);
}

#[test]
fn a_peer_asking_for_many_chunks_gets_those_here_in_its_order() {
    let f = fixture();
    let chunks: Vec<Vec<u8>> = (0..4).map(|i| pattern(20 + i, 5000)).collect();
    let hashes: Vec<Hash> = chunks.iter().map(|c| *blake3::hash(c).as_bytes()).collect();
    // The first three arrive from a peer in one write; the last never.
    let stored = hashes.iter().zip(chunks.iter().map(Vec::as_slice)).take(3);
    f.core.chunks().put_hashed(stored).unwrap();
    // The second is damaged on disk: it must not be served.
    let cf = f.store.cf(CF_CHUNKS);
    f.store.db().put_cf(cf, hashes[1], vec![0u8; 5000]).unwrap();

    let asked = [hashes[3], hashes[2], hashes[1], hashes[0]];
    let answer = f.core.chunks().here_of(&asked);
    assert_eq!(
        answer,
        vec![Vec::new(), chunks[2].clone(), Vec::new(), chunks[0].clone()],
        "absent and damaged ones answer empty, the others their bytes in order"
    );
}

/// Another node's store, as the core fetches what it lacks from it; counts
/// the fetches in flight at once.
#[derive(Default)]
struct Peer {
    chunks: parking_lot::Mutex<HashMap<Hash, Vec<u8>>>,
    in_flight: AtomicUsize,
    most_at_once: AtomicUsize,
}

impl ChunkSource for Peer {
    fn fetch(&self, hash: &Hash) -> Option<Vec<u8>> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20)); // a round trip
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.chunks.lock().get(hash).cloned()
    }
}

#[test]
fn a_read_of_chunks_not_here_fetches_them_together_and_keeps_them() {
    let f = fixture();
    let data = pattern(7, 16 * 65_536);
    let ino = write_file(&f.core, "f", &data);
    // This node keeps the file's slots and loses its bytes to the peer:
    // a node that replication has not caught up yet.
    let peer = Arc::new(Peer::default());
    let cf = f.store.cf(CF_CHUNKS);
    for kv in f.store.db().iterator_cf(cf, rocksdb::IteratorMode::Start) {
        let (key, value) = kv.unwrap();
        peer.chunks
            .lock()
            .insert(Hash::try_from(&key[..]).unwrap(), value.to_vec());
        f.store.db().delete_cf(cf, key).unwrap();
    }
    assert_eq!(peer.chunks.lock().len(), 16);
    f.core.chunks().set_source(peer.clone(), true);

    assert_eq!(f.core.read(ino, 0, 1 << 20).unwrap(), data);
    let most = peer.most_at_once.load(Ordering::SeqCst);
    assert!(most > 1, "the 16 chunks came one at a time");
    assert_eq!(chunks_stored(&f.store), 16, "fetched chunks are kept");

    // A chunk that neither this node nor any peer has: EIO, never zeros.
    let sixth = *blake3::hash(&data[5 * 65_536..6 * 65_536]).as_bytes();
    f.store.db().delete_cf(cf, sixth).unwrap();
    peer.chunks.lock().remove(&sixth);
    let read = |offset: u64, len: u32| f.core.read(ino, offset, len).map_err(|e| e.0);
    assert_eq!(read(5 * 65_536 + 7, 10), Err(libc::EIO));
    assert_eq!(read(0, 1 << 20), Err(libc::EIO));
    assert_eq!(
        read(6 * 65_536, 65_536).unwrap(),
        &data[6 * 65_536..7 * 65_536]
    );
}
