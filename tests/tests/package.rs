//! wpfs as an operator installs it: the Debian package built by
//! packaging/build-deb.sh, installed with `dpkg -i`, a node mounted from
//! an /etc/fstab line and found by `findmnt -t fuse.wpfs`, the unit
//! checked by `systemd-analyze verify`, then `dpkg -r` and `dpkg --purge`.
//! The unit as shipped in packaging/, verified before any install. And the
//! logrotate snippet it ships, run against a live daemon's log.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use wpfs_tests::{bin_dir, fuse_available, init_with, local_dir, port, run_ok, s, Node};

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging")
}

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("SKIPPED: no {tool} on this machine (`make deps` installs it)");
    }
    found
}

/// The paths the package installs.
const PACKAGE_FILES: &[&str] = &[
    "/usr/bin/wpfs",
    "/sbin/mount.wpfs",
    "/sbin/mount.fuse.wpfs",
    "/lib/systemd/system/wpfs.service",
    "/etc/default/wpfs",
    "/etc/logrotate.d/wpfs",
    "/usr/share/doc/wpfs/operations.md",
];

/// packaging/wpfs.service with its ExecStart on the binary under test
/// (verify checks that the command exists), passed through `edit`, as
/// DIR/wpfs.service; `systemd-analyze verify`'s output on it.
fn verify_shipped_unit(dir: &Path, edit: impl Fn(String) -> String) -> std::process::Output {
    let unit = std::fs::read_to_string(packaging().join("wpfs.service")).unwrap();
    assert!(unit.contains("\nExecStart=/usr/bin/wpfs mount --foreground "));
    let path = dir.join("wpfs.service");
    let wpfs = bin_dir().join("wpfs");
    std::fs::write(&path, edit(unit.replace("/usr/bin/wpfs", s(&wpfs)))).unwrap();
    Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap()
}

/// The unit as shipped passes `systemd-analyze verify`, which is no
/// no-op here: the same unit with a command that does not exist fails it.
#[test]
fn the_shipped_unit_passes_systemd_analyze_verify() {
    if !have("systemd-analyze") {
        return;
    }
    let tmp = local_dir();
    let out = verify_shipped_unit(tmp.path(), |unit| unit);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {err}");
    assert!(
        !err.contains("wpfs.service"),
        "systemd-analyze verify: {err}"
    );
    let out = verify_shipped_unit(tmp.path(), |unit| {
        unit.replace("[Service]\n", "[Service]\nExecStartPre=/nonexistent/wpfs\n")
    });
    assert!(
        !out.status.success(),
        "systemd-analyze verify passed a unit whose command does not exist"
    );
}

/// Puts the machine back as the test found it: unmounts, restores
/// /etc/fstab byte for byte, removes the package. Also on a panic.
struct Restore {
    mnt: PathBuf,
    fstab: Vec<u8>,
}

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).output();
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
        let _ = std::fs::write("/etc/fstab", &self.fstab);
        let _ = Command::new("dpkg").args(["--purge", "wpfs"]).output();
    }
}

#[test]
fn the_package_installs_mounts_from_fstab_and_removes_cleanly() {
    if !fuse_available() || !have("dpkg-deb") || !have("systemd-analyze") {
        return;
    }
    if Command::new("dpkg")
        .args(["-s", "wpfs"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("SKIPPED: a wpfs package is installed on this machine; the test leaves it alone");
        return;
    }
    if let Some(f) = PACKAGE_FILES
        .iter()
        .find(|f| Path::new(f).symlink_metadata().is_ok())
    {
        eprintln!("SKIPPED: {f} exists (`make install`?); the package would replace it");
        return;
    }
    let tmp = local_dir();
    let deb = run_ok(
        Command::new(packaging().join("build-deb.sh"))
            .arg(bin_dir().join("wpfs"))
            .arg(tmp.path().join("deb")),
    );
    let (data, mnt) = (tmp.path().join("data"), tmp.path().join("wp-content"));
    std::fs::create_dir(&mnt).unwrap();
    let _restore = Restore {
        mnt: mnt.clone(),
        fstab: std::fs::read("/etc/fstab").unwrap_or_default(),
    };
    run_ok(Command::new("dpkg").args(["-i", deb.trim()]));
    let files = run_ok(Command::new("dpkg").args(["-L", "wpfs"]));
    eprintln!(
        "{}: {} bytes",
        deb.trim(),
        std::fs::metadata(deb.trim()).unwrap().len()
    );
    for f in PACKAGE_FILES {
        assert!(
            files.lines().any(|l| l == *f),
            "{f} not in the package:\n{files}"
        );
    }
    run_ok(Command::new("systemd-analyze").args(["verify", "/lib/systemd/system/wpfs.service"]));

    let installed = "/usr/bin/wpfs";
    let listen = format!("127.0.0.1:{}", port());
    init_with(Command::new(installed), &data, &listen);
    let mut fstab = std::fs::read_to_string("/etc/fstab").unwrap_or_default();
    if !fstab.is_empty() && !fstab.ends_with('\n') {
        fstab.push('\n');
    }
    fstab.push_str(&format!(
        "{} {} fuse.wpfs _netdev,noauto,allow_other,x-systemd.requires=network-online.target 0 0\n",
        s(&data),
        s(&mnt)
    ));
    std::fs::write("/etc/fstab", fstab).unwrap();
    run_ok(Command::new("mount").arg(&mnt));
    let listed = run_ok(
        Command::new("findmnt")
            .args(["-t", "fuse.wpfs", "-n", "-o", "SOURCE"])
            .arg(&mnt),
    );
    assert_eq!(listed.trim(), s(&std::fs::canonicalize(&data).unwrap()));
    let pid = wpfs_tests::pid_file(&data);
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(
        exe,
        Path::new(installed),
        "the daemon is not the installed binary"
    );
    let bytes = wpfs_tests::noise(7, 200_000);
    std::fs::write(mnt.join("uploaded.jpg"), &bytes).unwrap();
    assert_eq!(std::fs::read(mnt.join("uploaded.jpg")).unwrap(), bytes);
    run_ok(Command::new("umount").arg(&mnt));
    assert!(wpfs_tests::wait_gone(pid, Duration::from_secs(30)));

    run_ok(Command::new("dpkg").args(["-r", "wpfs"]));
    assert!(!Path::new(installed).exists(), "dpkg -r left {installed}");
    assert!(!Path::new("/sbin/mount.fuse.wpfs").exists());
    assert!(
        Path::new("/etc/default/wpfs").exists(),
        "dpkg -r removed a conffile"
    );
    run_ok(Command::new("dpkg").args(["--purge", "wpfs"]));
    for f in PACKAGE_FILES {
        assert!(
            Path::new(f).symlink_metadata().is_err(),
            "{f} left after purge"
        );
    }
    assert!(data.join("wpfs.json").exists(), "the package took the data");
}

/// The shipped logrotate snippet, pointed at a live daemon's log: the old
/// log is moved away and the daemon, signalled by the snippet's
/// postrotate, writes its next lines to a new DIR/wpfs.log.
#[test]
fn the_logrotate_snippet_rotates_a_running_daemons_log() {
    if !fuse_available() || !have("logrotate") {
        return;
    }
    let tmp = local_dir();
    let state = tmp.path().join("logrotate.state");
    let snippet = packaging().join("wpfs.logrotate");
    let out = Command::new("logrotate")
        .arg("-d")
        .arg("-s")
        .arg(&state)
        .arg(&snippet)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("error"),
        "logrotate -d {}: {err}",
        snippet.display()
    );
    let node = Node::single();
    let shipped = std::fs::read_to_string(&snippet).unwrap();
    assert!(shipped.contains("/var/lib/wpfs*/wpfs.log {"), "{shipped}");
    let conf = tmp.path().join("logrotate.conf");
    let log = node.data.join("wpfs.log");
    std::fs::write(&conf, shipped.replace("/var/lib/wpfs*/wpfs.log", s(&log))).unwrap();
    run_ok(
        Command::new("logrotate")
            .arg("-d")
            .arg("-s")
            .arg(&state)
            .arg(&conf),
    );
    run_ok(
        Command::new("logrotate")
            .arg("-f")
            .arg("-s")
            .arg(&state)
            .arg(&conf),
    );
    let old = std::fs::read_to_string(node.data.join("wpfs.log.1")).expect("the rotated log");
    assert!(old.contains("mounted"), "{old}");
    node.wait_for_reopened_log();
    std::fs::write(node.path("after"), b"rotated").unwrap();
    assert_eq!(std::fs::read(node.path("after")).unwrap(), b"rotated");
    node.unmount();
    let new = std::fs::read_to_string(&log).unwrap();
    assert!(new.contains("unmounted"), "not in the new wpfs.log: {new}");
    let old = std::fs::read_to_string(node.data.join("wpfs.log.1")).unwrap();
    assert!(
        !old.contains("unmounted"),
        "the daemon wrote on to wpfs.log.1"
    );
}
