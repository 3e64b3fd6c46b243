//! What survives: a remount keeps everything; a WordPress tree copied in
//! is identical (diff -r), also after a remount; `kill -9` during a write
//! storm loses no file whose close() had returned, and the store opens
//! again without repair.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wpfs_tests::{copy_tree, diff_clean, fuse_available, tree, write_file, Node};

fn content(i: u64) -> Vec<u8> {
    let len = (i * 7919) % 200_000 + 1;
    (0..len).map(|j| ((i * 31 + j) % 253) as u8).collect()
}

/// Writes a file and returns Ok only if close() itself succeeded (Rust's
/// `File` drop ignores close errors, which is where a FUSE flush fails).
fn write_and_close(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::fd::IntoRawFd;
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    if unsafe { libc::close(f.into_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[test]
fn kill_9_during_a_write_storm_loses_no_closed_file() {
    if !fuse_available() {
        return;
    }
    let node = Node::single();
    let dir = node.path("storm");
    std::fs::create_dir(&dir).unwrap();
    let closed = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let (dir, closed, stop) = (dir.clone(), closed.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    if write_and_close(&dir.join(format!("f{i}")), &content(i)).is_err() {
                        break;
                    }
                    closed.lock().unwrap().insert(i);
                    i += 4;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    node.kill9();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let closed = closed.lock().unwrap().clone();
    assert!(
        closed.len() > 50,
        "the storm wrote only {} files",
        closed.len()
    );

    node.mount(); // the store must open as it is
    for i in &closed {
        let got = std::fs::read(dir.join(format!("f{i}")))
            .unwrap_or_else(|e| panic!("f{i} was closed before the kill but is unreadable: {e}"));
        assert!(
            got == content(*i),
            "f{i} was closed before the kill but its bytes differ"
        );
    }
    eprintln!("{} closed files all intact after kill -9", closed.len());
}

#[test]
fn remount_keeps_everything_and_a_wordpress_tree_diffs_clean() {
    if !fuse_available() {
        return;
    }
    let source = Path::new("/usr/share/wordpress");
    let node = Node::single();
    std::fs::create_dir_all(node.path("a/b")).unwrap();
    write_file(node.path("a/b/file"), vec![42u8; 1_000_000]).unwrap();
    std::os::unix::fs::symlink("b/file", node.path("a/link")).unwrap();
    let wordpress = source.is_dir();
    if wordpress {
        copy_tree(source, &node.path("wordpress"));
    } else {
        eprintln!(
            "SKIPPED the WordPress part: {} is missing (apt-get install wordpress)",
            source.display()
        );
    }
    let before = tree(&node.mnt);
    if wordpress {
        diff_clean(source, &node.path("wordpress"));
    }

    node.unmount();
    node.mount();
    assert_eq!(
        tree(&node.mnt),
        before,
        "the tree changed across umount/mount"
    );
    if wordpress {
        diff_clean(source, &node.path("wordpress"));
    }
}
