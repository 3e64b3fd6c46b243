//! The command-line contract and the errors a newcomer hits: each is one
//! clear line naming the cause, with a non-zero exit, never a panic.

use std::process::{Command, Stdio};
use std::time::Duration;

use wpfs_tests::{
    bin_dir, daemon_of, fuse_available, init, local_dir, port, run_ok, s, wait_gone, wait_until,
    wpfs, wpfs_ok, Node, UnmountOnDrop,
};

fn stderr_of(args: &[&str]) -> String {
    let out = wpfs(args);
    assert!(!out.status.success(), "wpfs {args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "wpfs {args:?} panicked: {err}");
    assert_eq!(
        err.trim().lines().count(),
        1,
        "expected one line, got: {err}"
    );
    err
}

#[test]
fn init_prints_token_last_and_refuses_an_existing_store() {
    let tmp = local_dir();
    let data = tmp.path().join("d");
    let out = init(&data);
    let token = out.trim().lines().last().unwrap().to_string();
    assert!(
        token.starts_with("wpfs1."),
        "last line is not a token: {out}"
    );
    assert_eq!(wpfs_ok(&["token", "--data", s(&data)]).trim(), token);
    let err = stderr_of(&[
        "init",
        "--data",
        s(&data),
        "--node-id",
        "1",
        "--listen",
        "127.0.0.1:7400",
    ]);
    assert!(err.contains("already holds"), "{err}");
    let err = stderr_of(&[
        "init",
        "--data",
        s(&tmp.path().join("e")),
        "--node-id",
        "1",
        "--listen",
        "nonsense",
    ]);
    assert!(err.contains("HOST:PORT"), "{err}");
}

#[test]
fn status_of_a_stopped_node() {
    let tmp = local_dir();
    let data = tmp.path().join("d");
    wpfs_ok(&[
        "init",
        "--data",
        s(&data),
        "--node-id",
        "3",
        "--listen",
        "127.0.0.1:7400",
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&wpfs_ok(&["status", "--data", s(&data), "--json"])).unwrap();
    assert_eq!(v["node_id"], 3);
    assert_eq!(v["role"], "stopped");
    assert_eq!(v["mounted"], false);
    let text = wpfs_ok(&["status", "--data", s(&data)]);
    assert!(text.contains("health"), "{text}");
    let err = stderr_of(&["status", "--data", s(&tmp.path().join("nothing"))]);
    assert!(err.contains("does not exist"), "{err}");
}

/// A first mount still joining its cluster (its admin endpoint is not up
/// yet) shows as joining in `wpfs status`, with its progress; once that
/// mount is gone, the node shows as stopped again.
#[test]
fn status_of_a_node_still_joining() {
    if !fuse_available() {
        return;
    }
    let tmp = local_dir();
    let (founder, data, mnt) = (
        tmp.path().join("founder"),
        tmp.path().join("d"),
        tmp.path().join("mnt"),
    );
    let token = init(&founder).trim().lines().last().unwrap().to_string();
    // Nothing listens at the peer's address: the join waits and retries.
    let peer = format!("127.0.0.1:{}", port());
    let listen = format!("127.0.0.1:{}", port());
    wpfs_ok(&[
        "join",
        "--data",
        s(&data),
        "--node-id",
        "2",
        "--listen",
        &listen,
        "--peer",
        &peer,
        "--token",
        &token,
    ]);
    std::fs::create_dir(&mnt).unwrap();
    let mut mount = Command::new(bin_dir().join("wpfs"))
        .args(["mount", s(&data), s(&mnt)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("running wpfs mount");
    let status = || -> serde_json::Value {
        serde_json::from_str(&wpfs_ok(&["status", "--data", s(&data), "--json"])).unwrap()
    };
    wait_until(Duration::from_secs(20), "status to show the join", || {
        let v = status();
        v["role"] == "joining" && v["health"].as_str().is_some_and(|h| h.contains(&peer))
    });
    let daemon = daemon_of(&mount).expect("the mount's daemon");
    unsafe { libc::kill(daemon, libc::SIGKILL) };
    assert!(wait_gone(daemon, Duration::from_secs(30)));
    let _ = mount.wait();
    assert_eq!(status()["role"], "stopped");
}

#[test]
fn mount_errors_name_their_cause() {
    let tmp = local_dir();
    let data = tmp.path().join("d");
    let mnt = tmp.path().join("m");
    std::fs::create_dir(&mnt).unwrap();
    let err = stderr_of(&["mount", s(&data), s(&mnt)]);
    assert!(err.contains("does not exist"), "{err}");
    std::fs::create_dir(&data).unwrap();
    let err = stderr_of(&["mount", s(&data), s(&mnt)]);
    assert!(err.contains("not a wpfs data directory"), "{err}");
    init(&data);
    let err = stderr_of(&["mount", s(&data), s(&tmp.path().join("nomnt"))]);
    assert!(err.contains("mkdir -p"), "{err}");
    let err = stderr_of(&["mount", s(&data), s(&mnt), "-o", "rw,frobnicate"]);
    assert!(err.contains("frobnicate"), "{err}");
}

#[test]
fn a_running_node_refuses_a_second_mount_and_a_busy_mountpoint() {
    if !fuse_available() {
        return;
    }
    let node = Node::single();
    let other = node.root.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let err = stderr_of(&["mount", s(&node.data), s(&other)]);
    assert!(err.contains("in use"), "{err}");
    let err = stderr_of(&["mount", s(&node.data), s(&node.mnt)]);
    assert!(err.contains("already a mount point"), "{err}");
    let v = node.status();
    assert_eq!(v["role"], "leader");
    assert_eq!(v["mounted"], true);
    assert_eq!(v["health"], "ok");
}

#[test]
fn mount_wpfs_takes_fstab_options() {
    if !fuse_available() {
        return;
    }
    let tmp = local_dir();
    let data = tmp.path().join("d");
    let mnt = tmp.path().join("m");
    std::fs::create_dir(&mnt).unwrap();
    init(&data);
    let helper = bin_dir().join("mount.wpfs");
    let bad = Command::new(&helper)
        .args([s(&data), s(&mnt), "-o", "defaults,bogus"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(32));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bogus"));
    run_ok(Command::new(&helper).args([
        s(&data),
        s(&mnt),
        "-o",
        "defaults,_netdev,allow_other,noauto,x-systemd.automount",
    ]));
    let _guard = UnmountOnDrop(mnt.clone());
    wpfs_tests::write_file(mnt.join("hello"), b"fstab").unwrap();
    // The mount's type names it (`findmnt -t fuse.wpfs`); its source is the data dir.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let line = format!("{} {} fuse.wpfs ", s(&data), s(&mnt));
    assert!(
        mounts.lines().any(|l| l.starts_with(&line)),
        "{line} not in /proc/mounts:\n{mounts}"
    );
    let out = Command::new("umount").arg(&mnt).output().unwrap();
    assert!(out.status.success());
    // The daemon exits after umount and leaves the store closed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let v: serde_json::Value =
            serde_json::from_str(&wpfs_ok(&["status", "--data", s(&data), "--json"])).unwrap();
        if v["role"] == "stopped" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not exit after umount"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(std::fs::read(mnt.join("hello")).is_err(), "still mounted");
}

#[test]
fn allow_other_as_a_user_needs_fuse_conf() {
    if !fuse_available() {
        return;
    }
    let conf = std::fs::read_to_string("/etc/fuse.conf").unwrap_or_default();
    if conf.lines().any(|l| l.trim() == "user_allow_other") {
        eprintln!("SKIPPED: /etc/fuse.conf already has user_allow_other");
        return;
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin_dir().join("wpfs"))
        .args(["mount", "/var/lib/wpfs-none", "/tmp", "-o", "allow_other"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("user_allow_other"), "{err}");
}

#[test]
fn a_damaged_config_is_reported_not_panicked_on() {
    let tmp = local_dir();
    let data = tmp.path().join("d");
    init(&data);
    std::fs::write(data.join("wpfs.json"), b"{ not json").unwrap();
    let err = stderr_of(&["status", "--data", s(&data)]);
    assert!(err.contains("damaged"), "{err}");
}

/// What an operator's tools see of a mount: its type is `fuse.wpfs` with
/// the data directory as its source, `-o log=` sets the daemon's level,
/// the daemon's pid is in DIR/wpfs.pid, and SIGHUP (logrotate's
/// postrotate) makes it write to a fresh DIR/wpfs.log.
#[test]
fn a_mount_names_itself_and_reopens_its_log_on_sighup() {
    if !fuse_available() {
        return;
    }
    let node = Node::single_with(&["log=warn"]);
    let listed = run_ok(
        Command::new("findmnt")
            .args(["-t", "fuse.wpfs", "-n", "-o", "SOURCE"])
            .arg(&node.mnt),
    );
    let data = std::fs::canonicalize(&node.data).unwrap();
    assert_eq!(listed.trim(), s(&data));
    let log = std::fs::read_to_string(data.join("wpfs.log")).unwrap();
    assert!(
        !log.contains(" INFO "),
        "log=warn still logs INFO lines:\n{log}"
    );
    node.unmount();
    assert!(
        !data.join("wpfs.pid").exists(),
        "a stopped daemon left wpfs.pid"
    );

    node.mount();
    let pid = node.pid_from_file();
    assert_eq!(node.pid(), Some(pid));
    std::fs::rename(data.join("wpfs.log"), data.join("wpfs.log.1")).unwrap();
    unsafe { libc::kill(pid, libc::SIGHUP) };
    node.wait_for_reopened_log();
    std::fs::write(node.path("after-hup"), b"still serving").unwrap();
    assert_eq!(
        std::fs::read(node.path("after-hup")).unwrap(),
        b"still serving"
    );
    node.unmount();
    let log = std::fs::read_to_string(data.join("wpfs.log")).unwrap();
    assert!(
        log.contains("unmounted"),
        "the last lines went elsewhere:\n{log}"
    );
}

/// A daemon killed with -9 leaves a dead mount (ENOTCONN on every access):
/// the next `wpfs mount` detaches it and serves what was written.
#[test]
fn a_mount_after_a_killed_daemon_clears_the_dead_mount() {
    if !fuse_available() {
        return;
    }
    let node = Node::single();
    std::fs::write(node.path("kept"), b"kept").unwrap();
    let pid = node.pid_from_file();
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(wait_gone(pid, Duration::from_secs(30)));
    let dead = std::fs::metadata(&node.mnt).unwrap_err();
    assert_eq!(dead.raw_os_error(), Some(libc::ENOTCONN), "{dead}");
    let out = wpfs(&["mount", s(&node.data), s(&node.mnt)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("dead mount"), "{err}");
    assert_eq!(std::fs::read(node.path("kept")).unwrap(), b"kept");
}
