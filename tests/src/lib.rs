//! Test harness: real `wpfs` processes with real FUSE mounts.
//!
//! `Cluster::single()` makes a data directory with `wpfs init`, mounts it
//! with `wpfs mount` (the daemon, as a user would) and unmounts it on drop.
//! The binaries are taken from the build directory (`cargo build --bins`
//! first; `.ci/run` and the README's test command do) or `$WPFS_BIN`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

pub mod lan;
use lan::Lan;

/// The directory holding the built `wpfs` and `mount.wpfs`: `WPFS_BIN`,
/// or the target directory these tests were built in.
pub fn bin_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(p) = std::env::var_os("WPFS_BIN") {
            return PathBuf::from(p);
        }
        // target/<profile>/deps/<test> → target/<profile>
        let exe = std::env::current_exe().expect("current_exe");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_path_buf();
        let bin = dir.join("wpfs");
        assert!(
            bin.exists(),
            "{} has no wpfs binary: run `cargo build --workspace --bins` before the tests",
            dir.display()
        );
        refuse_stale(&bin);
        // mount.wpfs is a link to wpfs (`make build` makes it too).
        let helper = dir.join("mount.wpfs");
        if !helper.exists() {
            let _ = std::os::unix::fs::symlink("wpfs", &helper);
        }
        dir
    })
    .clone()
}

/// Fails when a source file of the product is newer than `bin`: `cargo
/// test -p wpfs-tests` builds the tests but not the binary they run, and
/// would test yesterday's code without a word.
fn refuse_stale(bin: &Path) {
    let modified = |p: &Path| p.metadata().and_then(|m| m.modified()).ok();
    let built = modified(bin).expect("the binary's mtime");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut dirs: Vec<PathBuf> = ["fs/src", "consensus/src", "proto", "mount-helpers/src"]
        .iter()
        .map(|d| root.join(d))
        .collect();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if modified(&path).is_some_and(|m| m > built) {
                panic!(
                    "{} is older than {}: run `cargo build --workspace --bins` first \
                     (`make test` does), or set WPFS_BIN to the directory of the binary to test",
                    bin.display(),
                    path.display()
                );
            }
        }
    }
}

pub fn wpfs(args: &[&str]) -> Output {
    Command::new(bin_dir().join("wpfs"))
        .args(args)
        .output()
        .expect("running wpfs")
}

/// Runs wpfs and returns stdout, failing the test with stderr otherwise.
pub fn wpfs_ok(args: &[&str]) -> String {
    let mut cmd = Command::new(bin_dir().join("wpfs"));
    run_ok(cmd.args(args))
}

/// Runs `cmd` and returns its stdout; fails the test with the command and
/// everything it printed when it fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("running a command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether FUSE mounts can work here; tests that need them skip (with a
/// printed reason) where they cannot.
pub fn fuse_available() -> bool {
    let ok = Path::new("/dev/fuse").exists() && unsafe { libc::geteuid() } == 0;
    if !ok {
        eprintln!("SKIPPED: needs /dev/fuse and root (the CI machine has both)");
    }
    ok
}

static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// A port for a node to listen on. Below the kernel's ephemeral range
/// (32768 and up), so that no outgoing connection of this machine can hold
/// it, in a block of its own per test process, and skipping any port that
/// something (a daemon of an earlier run) still listens on.
pub fn port() -> u16 {
    const FIRST: u16 = 10_000;
    const BLOCK: u16 = 200;
    const BLOCKS: u32 = (32_000 - FIRST as u32) / BLOCK as u32;
    let base = FIRST + (std::process::id() % BLOCKS) as u16 * BLOCK;
    (0..BLOCK)
        .map(|_| base + NEXT_PORT.fetch_add(1, Ordering::Relaxed) % BLOCK)
        .find(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        .unwrap_or_else(|| panic!("no free port in {base}..{}", base + BLOCK))
}

/// `wpfs init` of node 1 of a new cluster in `data`; returns its output.
pub fn init(data: &Path) -> String {
    init_with(
        Command::new(bin_dir().join("wpfs")),
        data,
        &format!("127.0.0.1:{}", port()),
    )
}

/// The pid a running daemon of data directory `data` wrote to DIR/wpfs.pid.
pub fn pid_file(data: &Path) -> i32 {
    let text = std::fs::read_to_string(data.join("wpfs.pid")).expect("DIR/wpfs.pid");
    text.trim().parse().expect("a pid in wpfs.pid")
}

/// `wpfs init` through `wpfs` (the built binary, an installed one, or
/// either in a network namespace), a command to which the arguments are added.
pub fn init_with(mut wpfs: Command, data: &Path, listen: &str) -> String {
    run_ok(wpfs.args([
        "init",
        "--data",
        s(data),
        "--node-id",
        "1",
        "--listen",
        listen,
    ]))
}

/// One node: its data directory and mountpoint.
pub struct Node {
    pub root: tempfile::TempDir,
    pub data: PathBuf,
    pub mnt: PathBuf,
    /// The network namespace its daemon runs in, on a `Lan`; None for
    /// this machine's own network (127.0.0.1).
    netns: Option<String>,
    /// The address it listens on for peers.
    host: String,
    /// Whether `data` is a small filesystem of its own (unmounted on drop).
    small_disk: bool,
}

impl Node {
    /// `wpfs init` + `wpfs mount` in a fresh temporary directory.
    pub fn single() -> Node {
        Self::single_with(&[])
    }

    pub fn single_with(mount_options: &[&str]) -> Node {
        let node = Node::unmounted(None);
        init(&node.data);
        node.mount_with(mount_options);
        node
    }

    /// A temporary directory for a node, with nothing in it yet; on `lan`,
    /// host `id` of it.
    fn unmounted(lan: Option<(&Lan, u64)>) -> Node {
        let mut root = tempfile::Builder::new()
            .prefix("wpfs-test-")
            .tempdir_in(std::env::var_os("WPFS_TEST_DIR").unwrap_or_else(|| "/var/tmp".into()))
            .expect("temp dir");
        // WPFS_TEST_KEEP=1 keeps data directories and logs for a post-mortem.
        root.disable_cleanup(std::env::var_os("WPFS_TEST_KEEP").is_some());
        let data = root.path().join("data");
        let mnt = root.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let (netns, host) = match lan {
            Some((lan, id)) => {
                lan.add_host(id);
                (Some(lan.netns_path(id)), lan.address(id))
            }
            None => (None, "127.0.0.1".to_string()),
        };
        Node {
            root,
            data,
            mnt,
            netns,
            host,
            small_disk: false,
        }
    }

    /// `wpfs args` run in the node's network namespace.
    fn wpfs(&self, args: &[&str]) -> Command {
        let bin = bin_dir().join("wpfs");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={ns}")).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(args);
        cmd
    }

    /// This node's peer address, on a new port.
    fn new_listen(&self) -> String {
        format!("{}:{}", self.host, port())
    }

    pub fn mount(&self) {
        self.mount_with(&[]);
    }

    pub fn mount_with(&self, options: &[&str]) {
        run_ok(&mut self.mount_command(options));
    }

    fn mount_command(&self, options: &[&str]) -> Command {
        let mut args = vec!["mount", s(&self.data), s(&self.mnt)];
        let joined = options.join(",");
        if !options.is_empty() {
            args.extend(["-o", &joined]);
        }
        self.wpfs(&args)
    }

    /// `wpfs mount`, not waited for: its progress lines come on the
    /// child's stderr, and `daemon_of` finds the daemon it forks.
    pub fn spawn_mount(&self) -> std::process::Child {
        self.mount_command(&[])
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("running wpfs mount")
    }

    /// `umount`, then waits until the daemon has exited.
    pub fn unmount(&self) {
        let pid = self.pid();
        let out = Command::new("umount").arg(&self.mnt).output().unwrap();
        assert!(
            out.status.success(),
            "umount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(pid) = pid {
            wait_gone(pid, Duration::from_secs(30));
        }
    }

    /// The network namespace the daemon runs in (`nsenter --net=`), on a `Lan`.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// The daemon's pid, from DIR/wpfs.pid (what logrotate signals).
    pub fn pid_from_file(&self) -> i32 {
        pid_file(&self.data)
    }

    /// Waits until the daemon, told to reopen its log (SIGHUP), writes to
    /// a new DIR/wpfs.log.
    pub fn wait_for_reopened_log(&self) {
        let log = self.data.join("wpfs.log");
        wait_until(
            Duration::from_secs(10),
            "the daemon to write a new wpfs.log",
            || std::fs::read_to_string(&log).is_ok_and(|l| l.contains("reopened")),
        );
    }

    /// The daemon's pid, from its status endpoint.
    pub fn pid(&self) -> Option<i32> {
        let v = self.status();
        v["pid"].as_i64().map(|p| p as i32)
    }

    pub fn status(&self) -> serde_json::Value {
        let out = wpfs_ok(&["status", "--data", s(&self.data), "--json"]);
        serde_json::from_str(&out).expect("status JSON")
    }

    /// Whether this node holds every chunk its namespace references, as
    /// far as it knows: nothing to fetch, no scan for missing ones running.
    pub fn holds_every_chunk(&self) -> bool {
        let status = self.status();
        status["replication_backlog_chunks"] == 0 && status["replication_scan_percent"].is_null()
    }

    /// kill -9 the daemon; the mount is left dead, then lazily detached.
    pub fn kill9(&self) {
        self.kill9_daemon(self.pid().expect("daemon pid"));
    }

    /// `kill9` of the daemon `pid` (from `pid()` earlier): for a test that
    /// holds a file open for writing, where asking for the pid now would
    /// spawn `wpfs status`, and the spawned child's copy of the open file,
    /// closed at exec, would flush (commit) it.
    pub fn kill9_daemon(&self, pid: i32) {
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert!(
            wait_gone(pid, Duration::from_secs(30)),
            "daemon {pid} outlived kill -9"
        );
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let pid = std::panic::catch_unwind(|| self.pid()).ok().flatten();
        let _ = Command::new("umount").arg(&self.mnt).output();
        if let Some(pid) = pid {
            if !wait_gone(pid, Duration::from_secs(10)) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
                wait_gone(pid, Duration::from_secs(10));
            }
        }
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
        if self.small_disk {
            let _ = Command::new("umount").arg("-l").arg(&self.data).output();
        }
    }
}

/// Several nodes of one cluster on 127.0.0.1, each a real `wpfs` daemon
/// with its own store, peer port and mount.
pub struct Cluster {
    pub nodes: Vec<Node>,
    token: String,
    first_listen: String,
    /// The network its nodes are hosts of, when they can be cut off;
    /// dropped after the nodes (fields drop in order).
    pub lan: Option<Lan>,
}

impl Cluster {
    /// Node 1 by `wpfs init`, nodes 2..=n by `wpfs join`; all mounted.
    pub fn start(n: u64) -> Cluster {
        Self::start_on(n, None)
    }

    /// Like `start`, each node a host of its own on a `Lan`, so that
    /// `lan.cut(id)` partitions it; None (reason printed) where network
    /// namespaces cannot be made.
    pub fn start_partitionable(n: u64) -> Option<Cluster> {
        Some(Self::start_on(n, Some(Lan::new()?)))
    }

    fn start_on(n: u64, lan: Option<Lan>) -> Cluster {
        let first = Node::unmounted(lan.as_ref().map(|l| (l, 1)));
        let listen = first.new_listen();
        let out = init_with(first.wpfs(&[]), &first.data, &listen);
        let token = out.lines().last().expect("token line").to_string();
        first.mount();
        let mut cluster = Cluster {
            nodes: vec![first],
            token,
            first_listen: listen,
            lan,
        };
        for id in 2..=n {
            cluster.add(id);
        }
        cluster.wait_for_voters(n.min(5) as usize);
        cluster
    }

    /// `wpfs join` + first `wpfs mount` of node `id` through node 1.
    pub fn add(&mut self, id: u64) -> &Node {
        self.add_with(id, &[])
    }

    /// Like `add`, for a witness: a voter that stores no file contents.
    pub fn add_witness(&mut self, id: u64) -> &Node {
        self.add_with(id, &["--witness"])
    }

    /// Like `add`, with the node's data directory on a filesystem of its
    /// own (a tmpfs of `mib` MiB), mounted with `options`.
    pub fn add_on_small_disk(&mut self, id: u64, mib: u64, options: &[&str]) -> &Node {
        let mut node = Node::unmounted(self.lan.as_ref().map(|l| (l, id)));
        std::fs::create_dir(&node.data).unwrap();
        run_ok(
            Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={mib}m"),
                    "wpfs-test-disk",
                ])
                .arg(&node.data),
        );
        node.small_disk = true;
        let token = self.token.clone();
        node.join(id, &self.first_listen, &token, &[], options)
            .expect("wpfs join + mount");
        self.nodes.push(node);
        self.nodes.last().unwrap()
    }

    /// Like `add`, with `flags` for `wpfs join` (`--admin ADDR`, say).
    pub fn add_with(&mut self, id: u64, flags: &[&str]) -> &Node {
        let node = Node::unmounted(self.lan.as_ref().map(|l| (l, id)));
        let token = self.token.clone();
        node.join(id, &self.first_listen, &token, flags, &[])
            .expect("wpfs join + mount");
        self.nodes.push(node);
        self.nodes.last().unwrap()
    }

    /// A node prepared with `token` that tries to join: the first mount's
    /// error when it fails.
    pub fn try_join(&self, id: u64, token: &str) -> (Node, Result<(), String>) {
        let node = Node::unmounted(self.lan.as_ref().map(|l| (l, id)));
        let result = node.join(id, &self.first_listen, token, &[], &[]);
        (node, result)
    }

    /// Node `id` after `wpfs join`, not mounted: its first mount, which
    /// adds it to the cluster, is the caller's (`spawn_mount`). Not in
    /// `nodes` until the caller pushes it.
    pub fn prepare_join(&self, id: u64) -> Node {
        let node = Node::unmounted(self.lan.as_ref().map(|l| (l, id)));
        node.prepare(id, &self.first_listen, &self.token, &[]);
        node
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// Node `id` (ids are 1-based, in the order they were added).
    pub fn node(&self, id: u64) -> &Node {
        &self.nodes[id as usize - 1]
    }

    /// Waits until node 1 sees `n` voters (learners are promoted once
    /// they have caught up).
    pub fn wait_for_voters(&self, n: usize) {
        let node = &self.nodes[0];
        wait_until(Duration::from_secs(30), "voters to be promoted", || {
            node.status()["voters"].as_array().map(|v| v.len()) == Some(n)
        });
    }
}

impl Node {
    /// `wpfs join` with `flags`: the node is ready for its first mount.
    fn prepare(&self, id: u64, peer: &str, token: &str, flags: &[&str]) {
        let listen = self.new_listen();
        let id = id.to_string();
        let mut args = vec![
            "join",
            "--data",
            s(&self.data),
            "--node-id",
            &id,
            "--listen",
            &listen,
            "--peer",
            peer,
            "--token",
            token,
        ];
        args.extend(flags);
        run_ok(&mut self.wpfs(&args));
    }

    /// `wpfs join` with `flags`, then the first mount with `options`.
    fn join(
        &self,
        id: u64,
        peer: &str,
        token: &str,
        flags: &[&str],
        options: &[&str],
    ) -> Result<(), String> {
        self.prepare(id, peer, token, flags);
        let out = self.mount_command(options).output().expect("running wpfs");
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

/// `len` bytes that neither compress nor share chunks with other seeds'.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut bytes = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    bytes
}

/// Writes `data` to a new file (or over one) and closes it, with close()'s
/// error: wpfs commits at close, and `fs::write` drops the file, and the
/// error of its close with it.
pub fn write_file(path: impl AsRef<Path>, data: impl AsRef<[u8]>) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    file.write_all(data.as_ref())?;
    close(file)
}

/// Closes `file` with close()'s error.
pub fn close(file: std::fs::File) -> std::io::Result<()> {
    use std::os::fd::IntoRawFd;
    // SAFETY: the fd is ours alone, closed once.
    if unsafe { libc::close(file.into_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `cp -a source dest`, failing the test with cp's complaint.
pub fn copy_tree(source: &Path, dest: &Path) {
    run_ok(Command::new("cp").arg("-a").arg(source).arg(dest));
}

/// `diff -r --no-dereference`: `copy` holds exactly `source` (symlinks
/// compared as links, so relative ones pointing outside are fine); fails
/// the test with the differences.
pub fn diff_clean(source: &Path, copy: &Path) {
    run_ok(
        Command::new("diff")
            .args(["-r", "--no-dereference"])
            .arg(source)
            .arg(copy),
    );
}

/// Polls `cond` every 20 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Unmounts a mount made outside `Node` (e.g. through mount.wpfs) when
/// dropped, so a failing test does not leave it behind.
pub struct UnmountOnDrop(pub PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

/// The daemon a `wpfs mount` (still waiting for it) forked: the process
/// whose parent it is. Its admin endpoint does not answer before the
/// mount is made, so this is how a test reaches a daemon that is still
/// joining.
pub fn daemon_of(mount: &std::process::Child) -> Option<i32> {
    let parent = mount.id() as i32;
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces, not ')'.
            let ppid: i32 = stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()?;
            (ppid == parent).then_some(pid)
        })
}

/// Waits for process `pid` to exit; false on timeout.
pub fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if unsafe { libc::kill(pid, 0) } != 0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The errno of the last failed libc call.
pub fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A local directory to compare against (same filesystem as the temp dirs).
pub fn local_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("wpfs-local-")
        .tempdir_in("/var/tmp")
        .expect("temp dir")
}

/// A snapshot of a tree for comparisons: path → (kind, mode, size, bytes or target).
///
/// A tree that is still changing (another node's changes being applied)
/// can lose an entry between listing a directory and reading the entry;
/// that entry is recorded as vanished, so the snapshot differs from any
/// settled tree and a wait for convergence goes on.
pub fn tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    use std::os::unix::fs::MetadataExt;
    let rel = |p: &Path| p.strip_prefix(root).unwrap().display().to_string();
    // A vanished directory is named by its full path, which differs
    // between mounts: a tree that saw one never equals another.
    let full = dir.display().to_string();
    let Some(list) = present(std::fs::read_dir(dir), "read_dir", dir, &full, out) else {
        return;
    };
    let mut entries: Vec<_> = list.map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        let rel = rel(&p);
        let Some(m) = present(std::fs::symlink_metadata(&p), "stat", &p, &rel, out) else {
            continue;
        };
        let ft = m.file_type();
        if ft.is_dir() {
            out.push(format!(
                "{rel} dir {:o} nlink={}",
                m.mode() & 0o7777,
                m.nlink()
            ));
            walk(root, &p, out);
        } else if ft.is_symlink() {
            out.push(format!(
                "{rel} -> {}",
                std::fs::read_link(&p).map_or("(vanished)".into(), |t| t.display().to_string())
            ));
        } else if ft.is_file() {
            let Some(bytes) = present(std::fs::read(&p), "read", &p, &rel, out) else {
                continue;
            };
            out.push(format!(
                "{rel} file {:o} nlink={} size={} digest={}",
                m.mode() & 0o7777,
                m.nlink(),
                m.len(),
                digest(&bytes)
            ));
        } else {
            out.push(format!("{rel} special {:o}", m.mode()));
        }
    }
}

/// What `what` of `path` gave; None, with `rel` recorded as vanished, when
/// the entry was removed meanwhile; any other error fails the test.
fn present<T>(
    result: std::io::Result<T>,
    what: &str,
    path: &Path,
    rel: &str,
    out: &mut Vec<String>,
) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            out.push(format!("{rel} vanished"));
            None
        }
        Err(e) => panic!("{what} {}: {e}", path.display()),
    }
}

fn digest(b: &[u8]) -> String {
    // A cheap stable digest for comparisons; not security relevant.
    let mut h: u64 = 0xcbf29ce484222325;
    for &x in b {
        h ^= x as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}
