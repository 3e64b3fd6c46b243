//! Each POSIX operation WordPress, PHP, unzip, rsync, tar and an admin use,
//! run on a wpfs mount and on a local directory: the results (bytes,
//! attributes, errno) must be the same.

use std::ffi::CString;
use std::fmt::Debug;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use wpfs_tests::{fuse_available, last_errno, local_dir, write_file, Node};

type R<T> = Result<T, i32>;

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn check(rc: libc::c_int) -> R<()> {
    if rc < 0 {
        Err(last_errno())
    } else {
        Ok(())
    }
}

/// getxattr(2) into a buffer of `size` bytes.
fn get_xattr(p: &Path, name: &str, size: usize) -> R<Vec<u8>> {
    let name = CString::new(name).unwrap();
    let mut buf = vec![0u8; size];
    let n = unsafe { libc::getxattr(c(p).as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), size) };
    if n < 0 {
        return Err(last_errno());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn set_xattr(p: &Path, name: &str, value: &[u8], flags: i32) -> R<()> {
    let name = CString::new(name).unwrap();
    check(unsafe {
        libc::setxattr(
            c(p).as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

/// listxattr(2): the names, each followed by a NUL.
fn list_xattr(p: &Path) -> R<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    let n = unsafe { libc::listxattr(c(p).as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(last_errno());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn open(p: &Path, flags: i32, mode: u32) -> R<i32> {
    let fd = unsafe { libc::open(c(p).as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        Err(last_errno())
    } else {
        Ok(fd)
    }
}

fn pwrite(fd: i32, data: &[u8], off: i64) -> R<usize> {
    let n = unsafe { libc::pwrite(fd, data.as_ptr().cast(), data.len(), off) };
    if n < 0 {
        Err(last_errno())
    } else {
        Ok(n as usize)
    }
}

fn write(fd: i32, data: &[u8]) -> R<usize> {
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    if n < 0 {
        Err(last_errno())
    } else {
        Ok(n as usize)
    }
}

fn pread(fd: i32, len: usize, off: i64) -> R<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), len, off) };
    if n < 0 {
        return Err(last_errno());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn close(fd: i32) -> R<()> {
    check(unsafe { libc::close(fd) })
}

fn rename2(a: &Path, b: &Path, flags: u32) -> R<()> {
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c(a).as_ptr(),
            libc::AT_FDCWD,
            c(b).as_ptr(),
            flags,
        )
    };
    check(rc)
}

fn stat_summary(p: &Path) -> R<(u32, u64, u64)> {
    std::fs::symlink_metadata(p)
        .map(|m| (m.mode(), m.len(), m.nlink()))
        .map_err(|e| e.raw_os_error().unwrap_or(0))
}

fn io<T>(r: std::io::Result<T>) -> R<T> {
    r.map_err(|e| e.raw_os_error().unwrap_or(-1))
}

/// Runs `f` in a fresh directory on the mount and in a local one and
/// asserts the two results are equal.
fn same<T: PartialEq + Debug>(node: &Node, local: &Path, case: &str, f: impl Fn(&Path) -> T) {
    let on_wpfs = node.mnt.join(case);
    let on_local = local.join(case);
    std::fs::create_dir(&on_wpfs).unwrap();
    std::fs::create_dir(&on_local).unwrap();
    let a = f(&on_wpfs);
    let b = f(&on_local);
    assert_eq!(
        a, b,
        "case {case}: wpfs (left) differs from the local disk (right)"
    );
}

#[test]
fn files_read_write_truncate_append_sparse() {
    if !fuse_available() {
        return;
    }
    let node = Node::single();
    let local = local_dir();
    let local = local.path();

    same(&node, local, "create_write_read", |d| {
        let p = d.join("f");
        let fd = open(&p, libc::O_CREAT | libc::O_RDWR, 0o644)?;
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        pwrite(fd, &data, 0)?;
        let back = pread(fd, 400_000, 0)?;
        close(fd)?;
        Ok::<_, i32>((
            back == data,
            stat_summary(&p)?,
            std::fs::read(&p).map(|v| v == data).ok(),
        ))
    });

    same(&node, local, "o_excl", |d| {
        let p = d.join("f");
        close(open(
            &p,
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
            0o600,
        )?)?;
        open(&p, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY, 0o600).map(|_| ())
    });

    same(&node, local, "o_trunc_and_append", |d| {
        let p = d.join("f");
        write_file(&p, b"hello world").unwrap();
        let fd = open(&p, libc::O_WRONLY | libc::O_TRUNC, 0)?;
        write(fd, b"abc")?;
        close(fd)?;
        let fd = open(&p, libc::O_WRONLY | libc::O_APPEND, 0)?;
        write(fd, b"def")?;
        pwrite(fd, b"XY", 0)?; // O_APPEND: Linux appends even with pwrite
        close(fd)?;
        io(std::fs::read(&p))
    });

    same(&node, local, "sparse_past_eof", |d| {
        let p = d.join("f");
        let fd = open(&p, libc::O_CREAT | libc::O_RDWR, 0o644)?;
        pwrite(fd, b"end", 5_000_000)?;
        pwrite(fd, b"mid", 70_000)?;
        let head = pread(fd, 16, 0)?;
        let mid = pread(fd, 8, 69_998)?;
        close(fd)?;
        Ok::<_, i32>((head, mid, stat_summary(&p)?.1, io(std::fs::read(&p))?.len()))
    });

    same(&node, local, "truncate_shrink_then_grow", |d| {
        let p = d.join("f");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 7 + 1) as u8).collect();
        write_file(&p, &data).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        io(f.set_len(70_001))?;
        io(f.set_len(150_000))?; // the bytes past 70_001 must read as zeros
        drop(f);
        io(std::fs::read(&p))
    });

    same(&node, local, "truncate_by_path_and_dir", |d| {
        let p = d.join("f");
        write_file(&p, vec![9u8; 100_000]).unwrap();
        let rc = check(unsafe { libc::truncate(c(&p).as_ptr(), 1000) });
        let dir = check(unsafe { libc::truncate(c(d).as_ptr(), 0) });
        (rc, dir, std::fs::read(&p).unwrap())
    });

    same(&node, local, "partial_overwrite", |d| {
        let p = d.join("f");
        let mut data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
        write_file(&p, &data).unwrap();
        let fd = open(&p, libc::O_RDWR, 0)?;
        pwrite(fd, b"PATCH", 654_321)?;
        close(fd)?;
        data[654_321..654_326].copy_from_slice(b"PATCH");
        Ok::<_, i32>(io(std::fs::read(&p))? == data)
    });

    same(&node, local, "unlinked_while_open", |d| {
        let p = d.join("f");
        write_file(&p, b"still here").unwrap();
        let fd = open(&p, libc::O_RDWR, 0)?;
        io(std::fs::remove_file(&p))?;
        pwrite(fd, b"STILL", 0)?;
        let back = pread(fd, 100, 0)?;
        close(fd)?;
        Ok::<_, i32>((back, p.exists()))
    });

    same(&node, local, "two_handles_one_file", |d| {
        let p = d.join("f");
        let w = open(&p, libc::O_CREAT | libc::O_WRONLY, 0o644)?;
        pwrite(w, b"written by w", 0)?;
        let r = open(&p, libc::O_RDONLY, 0)?;
        let seen = pread(r, 100, 0)?; // before w closes: same node sees it
        close(w)?;
        close(r)?;
        Ok::<_, i32>(seen)
    });

    same(&node, local, "fallocate", |d| {
        let p = d.join("f");
        let fd = open(&p, libc::O_CREAT | libc::O_RDWR, 0o644)?;
        check(unsafe { libc::fallocate(fd, 0, 0, 123_456) })?;
        check(unsafe { libc::fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, 0, 999_999) })?;
        close(fd)?;
        Ok::<_, i32>(stat_summary(&p)?.1)
    });
}

#[test]
fn directories_renames_and_their_errors() {
    if !fuse_available() {
        return;
    }
    let node = Node::single();
    let local = local_dir();
    let local = local.path();

    same(&node, local, "mkdir_rmdir", |d| {
        let a = d.join("a");
        let r1 = io(std::fs::create_dir(&a));
        let r2 = io(std::fs::create_dir(&a)); // EEXIST
        write_file(a.join("x"), b"x").unwrap();
        let r3 = io(std::fs::remove_dir(&a)); // ENOTEMPTY
        let r4 = io(std::fs::remove_dir(a.join("x"))); // ENOTDIR
        let r5 = io(std::fs::remove_file(&a)); // EISDIR
        std::fs::remove_file(a.join("x")).unwrap();
        let r6 = io(std::fs::remove_dir(&a));
        let r7 = io(std::fs::remove_dir(d.join("missing"))); // ENOENT
        (r1, r2, r3, r4, r5, r6, r7, stat_summary(d).map(|s| s.2))
    });

    same(&node, local, "name_too_long", |d| {
        let long = "n".repeat(256);
        let ok = "n".repeat(255);
        (
            io(write_file(d.join(&long), b"")),
            io(std::fs::create_dir(d.join(&long))),
            io(std::fs::metadata(d.join(&long))).map(|_| ()),
            io(write_file(d.join(&ok), b"255 is fine")),
            io(std::fs::read(d.join(&ok))),
        )
    });

    same(&node, local, "rename_cases", |d| {
        std::fs::create_dir(d.join("dir1")).unwrap();
        std::fs::create_dir(d.join("dir2")).unwrap();
        std::fs::create_dir(d.join("dir2/sub")).unwrap();
        write_file(d.join("f1"), b"one").unwrap();
        write_file(d.join("f2"), b"two").unwrap();
        write_file(d.join("dir2/sub/inner"), b"in").unwrap();
        let r = [
            rename2(&d.join("f1"), &d.join("f2"), 0),   // replace a file
            rename2(&d.join("f2"), &d.join("dir1"), 0), // EISDIR
            rename2(&d.join("dir1"), &d.join("f2"), 0), // ENOTDIR
            rename2(&d.join("dir1"), &d.join("dir2"), 0), // ENOTEMPTY
            rename2(&d.join("dir2"), &d.join("dir2/sub/x"), 0), // EINVAL
            rename2(&d.join("missing"), &d.join("x"), 0), // ENOENT
            rename2(&d.join("dir2/sub"), &d.join("dir1/moved"), 0), // directory moves
            rename2(&d.join("f2"), &d.join("dir1"), libc::RENAME_NOREPLACE), // EEXIST
            rename2(&d.join("f2"), &d.join("dir1/moved"), libc::RENAME_EXCHANGE), // swap kinds
            rename2(&d.join("f2"), &d.join("nope"), libc::RENAME_EXCHANGE), // ENOENT
        ];
        (r, wpfs_tests::tree(d))
    });

    same(&node, local, "rename_over_empty_dir_and_self", |d| {
        std::fs::create_dir_all(d.join("a/inner")).unwrap();
        std::fs::create_dir(d.join("b")).unwrap();
        write_file(d.join("f"), b"f").unwrap();
        std::fs::hard_link(d.join("f"), d.join("g")).unwrap();
        let r1 = rename2(&d.join("a"), &d.join("b"), 0); // over an empty dir
        let r2 = rename2(&d.join("f"), &d.join("g"), 0); // same inode: no-op
        (r1, r2, wpfs_tests::tree(d))
    });

    same(&node, local, "readdir_many_entries", |d| {
        for i in 0..3000 {
            write_file(d.join(format!("file-{i:05}")), b"").unwrap();
        }
        let mut names: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    });
}

/// readdir while the directory changes: every entry present throughout is
/// listed exactly once.
#[test]
fn readdir_offsets_stay_stable_while_entries_change() {
    if !fuse_available() {
        return;
    }
    let node = Node::single();
    let d = node.path("dir");
    std::fs::create_dir(&d).unwrap();
    for i in 0..2000 {
        write_file(d.join(format!("keep-{i}")), b"").unwrap();
        write_file(d.join(format!("gone-{i}")), b"").unwrap();
    }
    let dir = unsafe { libc::opendir(c(&d).as_ptr()) };
    assert!(!dir.is_null());
    let mut seen = std::collections::HashMap::<String, u32>::new();
    let mut n = 0;
    loop {
        let ent = unsafe { libc::readdir(dir) };
        if ent.is_null() {
            break;
        }
        let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        *seen.entry(name).or_default() += 1;
        n += 1;
        if n % 100 == 0 {
            // Churn: remove some, add new ones, while the listing goes on.
            let k = n / 100;
            let _ = std::fs::remove_file(d.join(format!("gone-{k}")));
            write_file(d.join(format!("new-{k}")), b"").unwrap();
        }
    }
    unsafe { libc::closedir(dir) };
    for i in 0..2000 {
        assert_eq!(
            seen.get(&format!("keep-{i}")),
            Some(&1),
            "keep-{i} not listed exactly once"
        );
    }
    assert!(
        seen.values().all(|&c| c == 1),
        "some entry was listed twice"
    );
}

#[test]
fn links_symlinks_xattrs_special_files_attributes() {
    if !fuse_available() {
        return;
    }
    let node = Node::single();
    let local = local_dir();
    let local = local.path();

    same(&node, local, "hard_links", |d| {
        write_file(d.join("a"), b"shared").unwrap();
        let r1 = io(std::fs::hard_link(d.join("a"), d.join("b")));
        let r2 = io(std::fs::hard_link(d.join("a"), d.join("b"))); // EEXIST
        std::fs::create_dir(d.join("dir")).unwrap();
        let r3 = io(std::fs::hard_link(d.join("dir"), d.join("dir2"))); // EPERM
        write_file(d.join("b"), b"changed via b").unwrap();
        std::fs::remove_file(d.join("a")).unwrap();
        (
            r1,
            r2,
            r3,
            io(std::fs::read(d.join("b"))),
            stat_summary(&d.join("b")).map(|s| s.2),
        )
    });

    same(&node, local, "symlinks", |d| {
        let r1 = io(std::os::unix::fs::symlink("target/../x", d.join("l")));
        let r2 = io(std::fs::read_link(d.join("l")));
        let r3 = io(std::os::unix::fs::symlink("y", d.join("l"))); // EEXIST
        write_file(d.join("real"), b"via link").unwrap();
        std::os::unix::fs::symlink("real", d.join("l2")).unwrap();
        let r4 = io(std::fs::read(d.join("l2")));
        let r5 = io(std::fs::read_link(d.join("real"))).map(|_| ()); // EINVAL
        (r1, r2, r3, r4, r5)
    });

    same(&node, local, "chmod_chown_utimens", |d| {
        let p = d.join("f");
        write_file(&p, b"x").unwrap();
        io(std::fs::set_permissions(
            &p,
            std::fs::Permissions::from_mode(0o4751),
        ))?;
        check(unsafe { libc::chown(c(&p).as_ptr(), 1234, 5678) })?;
        let times = [
            libc::timespec {
                tv_sec: 1_000_000_000,
                tv_nsec: 123_456_789,
            },
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
        ];
        check(unsafe { libc::utimensat(libc::AT_FDCWD, c(&p).as_ptr(), times.as_ptr(), 0) })?;
        let m = io(std::fs::metadata(&p))?;
        let times = [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            libc::timespec {
                tv_sec: 1_500_000_000,
                tv_nsec: 5,
            },
        ];
        check(unsafe { libc::utimensat(libc::AT_FDCWD, c(&p).as_ptr(), times.as_ptr(), 0) })?;
        let m2 = io(std::fs::metadata(&p))?;
        Ok::<_, i32>((
            m.mode(),
            m.uid(),
            m.gid(),
            m.atime(),
            m.atime_nsec(),
            m2.mtime(),
            m2.mtime_nsec(),
            m2.atime(),
        ))
    });

    same(&node, local, "setgid_directory", |d| {
        let g = d.join("g");
        std::fs::create_dir(&g).unwrap();
        check(unsafe { libc::chown(c(&g).as_ptr(), 0, 4321) })?;
        io(std::fs::set_permissions(
            &g,
            std::fs::Permissions::from_mode(0o2775),
        ))?;
        write_file(g.join("f"), b"").unwrap();
        std::fs::create_dir(g.join("sub")).unwrap();
        let f = io(std::fs::metadata(g.join("f")))?;
        let s = io(std::fs::metadata(g.join("sub")))?;
        Ok::<_, i32>((f.gid(), s.gid(), s.mode() & 0o2000))
    });

    same(&node, local, "xattrs", |d| {
        let p = d.join("f");
        write_file(&p, b"x").unwrap();
        let name = CString::new("user.wp").unwrap();
        (
            set_xattr(&p, "user.wp", b"v1", libc::XATTR_REPLACE), // ENODATA
            set_xattr(&p, "user.wp", b"v1", libc::XATTR_CREATE),
            set_xattr(&p, "user.wp", b"v1", libc::XATTR_CREATE), // EEXIST
            get_xattr(&p, "user.wp", 64),
            get_xattr(&p, "user.wp", 1), // ERANGE
            list_xattr(&p),
            check(unsafe { libc::removexattr(c(&p).as_ptr(), name.as_ptr()) }),
            check(unsafe { libc::removexattr(c(&p).as_ptr(), name.as_ptr()) }), // ENODATA
        )
    });

    same(&node, local, "fifo_and_mknod", |d| {
        let p = d.join("fifo");
        let r = check(unsafe { libc::mkfifo(c(&p).as_ptr(), 0o640) });
        (r, stat_summary(&p).map(|s| s.0))
    });

    // ACLs and SELinux labels would be stored and never enforced: refused,
    // reads included, so `ls -l` asks for them once per mount, not twice
    // per file. A user attribute on the same directory (which takes a
    // default ACL too) still works.
    let p = node.path("xattrs");
    // version 2; user::rw-, group::r--, other::r--
    let acl: Vec<u8> = [
        2u32.to_le_bytes().to_vec(),
        acl_entry(0x01, 6),
        acl_entry(0x04, 4),
        acl_entry(0x20, 4),
    ]
    .concat();
    for attr in [
        "system.posix_acl_access",
        "system.posix_acl_default",
        "security.selinux",
    ] {
        assert_eq!(get_xattr(&p, attr, 64), Err(libc::EOPNOTSUPP), "get {attr}");
        assert_eq!(
            set_xattr(&p, attr, &acl, 0),
            Err(libc::EOPNOTSUPP),
            "set {attr}"
        );
    }
    set_xattr(&p, "user.still", b"ok", 0).unwrap();
    assert_eq!(list_xattr(&p), Ok(b"user.still\0".to_vec()));
}

/// One entry of a POSIX ACL as setfacl writes it in the xattr: tag,
/// permissions, and an id that these three tags do not use.
fn acl_entry(tag: u16, perm: u16) -> Vec<u8> {
    let mut e = [tag.to_le_bytes(), perm.to_le_bytes()].concat();
    e.extend(u32::MAX.to_le_bytes());
    e
}

/// Files of several GiB: a 1.1 GiB file written and read back whole, and a
/// sparse one whose only bytes sit past 6 GiB.
#[test]
fn large_files() {
    if !fuse_available() {
        return;
    }
    let node = Node::single();
    let p = node.path("big");
    let block: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let blocks = 1100u64;
    let fd = open(&p, libc::O_CREAT | libc::O_WRONLY, 0o644).unwrap();
    for i in 0..blocks {
        let mut b = block.clone();
        b[..8].copy_from_slice(&i.to_le_bytes()); // every MiB different
        assert_eq!(write(fd, &b), Ok(b.len()));
    }
    close(fd).unwrap();
    assert_eq!(stat_summary(&p).unwrap().1, blocks << 20);
    let fd = open(&p, libc::O_RDONLY, 0).unwrap();
    for i in (0..blocks).rev().step_by(7) {
        let got = pread(fd, 1 << 20, (i << 20) as i64).unwrap();
        assert_eq!(&got[..8], &i.to_le_bytes(), "MiB {i}");
        assert_eq!(&got[8..], &block[8..], "MiB {i}");
    }
    close(fd).unwrap();

    let sparse = node.path("sparse");
    let fd = open(&sparse, libc::O_CREAT | libc::O_RDWR, 0o644).unwrap();
    let far = 6i64 << 30;
    pwrite(fd, b"far away", far).unwrap();
    assert_eq!(pread(fd, 16, far - 8).unwrap(), b"\0\0\0\0\0\0\0\0far away");
    close(fd).unwrap();
    assert_eq!(stat_summary(&sparse).unwrap().1, far as u64 + 8);
}

#[test]
fn statfs_and_access() {
    if !fuse_available() {
        return;
    }
    let node = Node::single();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    check(unsafe { libc::statvfs(c(&node.mnt).as_ptr(), &mut st) }).unwrap();
    assert!(
        st.f_blocks > 0 && st.f_bavail > 0,
        "statfs reports no space"
    );
    assert_eq!(st.f_namemax, 255);
    write_file(node.path("f"), b"").unwrap();
    check(unsafe { libc::access(c(&node.path("f")).as_ptr(), libc::R_OK | libc::W_OK) }).unwrap();
    assert_eq!(
        check(unsafe { libc::access(c(&node.path("missing")).as_ptr(), libc::F_OK) }),
        Err(libc::ENOENT)
    );
}
