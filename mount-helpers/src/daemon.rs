//! `wpfs mount`: checks what a newcomer gets wrong first (with one clear
//! line each), then runs the node: the store, the Raft driver, the
//! filesystem core, the admin endpoint and the FUSE session.
//!
//! Without `--foreground` the process forks before it starts any thread;
//! the parent waits on a pipe until the child reports "mounted" (exit 0)
//! or why it could not (non-zero), so `mount` and systemd see the truth.
//! `umount MOUNTPOINT` (or SIGTERM) ends the session; the daemon then
//! commits open files, syncs the store and exits 0. A daemon reopens
//! `DIR/wpfs.log` on SIGHUP (logrotate) and keeps its pid in `DIR/wpfs.pid`;
//! under systemd (`$NOTIFY_SOCKET`) it says READY=1 once mounted.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wpfs_consensus::{Namespace, Node, Store, StoreError, Transport, TransportConfig};
use wpfs_fs::kernel_refs::KernelRefs;
use wpfs_fs::metrics::FuseMetrics;
use wpfs_fs::remote::RemoteChanges;
use wpfs_fs::replication::{ReplicationConfig, Replicator};
use wpfs_fs::{CoreOptions, FsCore, MountOptions};

use crate::admin::AdminState;
use crate::cluster::{self, PeerHandler, PeerService, LEFT_FILE};
use crate::config::{db_path, NodeConfig, JOINING_FILE, LOG_FILE, PID_FILE, SOCKET_FILE};
use crate::http;
use crate::options::Options;

/// The longest a mount waits to catch up with the cluster (`catch_up`).
const CATCH_UP_WAIT: Duration = Duration::from_secs(30);

pub struct MountRequest {
    pub dir: PathBuf,
    pub mountpoint: PathBuf,
    pub options: Options,
    pub foreground: bool,
}

/// Mounts as asked; returns once mounted (daemon) or unmounted (foreground).
pub fn mount(req: MountRequest) -> Result<(), String> {
    check_fuse(&req.options)?;
    let config = NodeConfig::load(&req.dir)?;
    let dir = fs::canonicalize(&req.dir).map_err(|e| format!("{}: {e}", req.dir.display()))?;
    let mountpoint = check_mountpoint(&req.mountpoint)?;
    let req = MountRequest {
        dir,
        mountpoint,
        ..req
    };
    if req.foreground {
        run(&req, &config, &mut Reporter::none())
    } else {
        daemonize(&req, &config)
    }
}

fn check_mountpoint(mp: &Path) -> Result<PathBuf, String> {
    clear_dead_mount(mp)?;
    let meta = fs::metadata(mp).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!(
            "mountpoint {} does not exist: create it with `mkdir -p {}`",
            mp.display(),
            mp.display()
        ),
        _ => format!("mountpoint {}: {e}", mp.display()),
    })?;
    if !meta.is_dir() {
        return Err(format!("mountpoint {} is not a directory", mp.display()));
    }
    let mp = fs::canonicalize(mp).map_err(|e| format!("{}: {e}", mp.display()))?;
    if is_mount_point(&mp) {
        return Err(format!(
            "{} is already a mount point (busy): `umount {}` first, or pick another directory",
            mp.display(),
            mp.display()
        ));
    }
    Ok(mp)
}

/// A FUSE mount whose daemon died (kill -9, OOM) answers every access
/// with ENOTCONN until it is detached; the restart that `Restart=` or an
/// operator attempts would otherwise fail on it.
fn clear_dead_mount(mp: &Path) -> Result<(), String> {
    match fs::metadata(mp) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {}
        _ => return Ok(()),
    }
    let path = CString::new(mp.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("mountpoint {} has a NUL byte", mp.display()))?;
    // SAFETY: path is a valid C string.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(format!(
            "{} is a dead FUSE mount (its daemon is gone) and cannot be detached ({}): \
             run `umount -l {}`, then mount again",
            mp.display(),
            std::io::Error::last_os_error(),
            mp.display()
        ));
    }
    let _ = writeln!(
        std::io::stderr(),
        "wpfs: {} was a dead mount (its daemon was gone): detached it",
        mp.display()
    );
    Ok(())
}

fn is_mount_point(path: &Path) -> bool {
    let Ok(mounts) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| m.replace("\\040", " ") == wanted)
}

fn check_fuse(options: &Options) -> Result<(), String> {
    if !Path::new("/dev/fuse").exists() {
        return Err(
            "no /dev/fuse: install FUSE (`apt-get install fuse3`) or load the module (`modprobe fuse`)".into(),
        );
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        let conf = fs::read_to_string("/etc/fuse.conf").unwrap_or_default();
        let allowed = conf.lines().any(|l| l.trim() == "user_allow_other");
        if options.allow_other && !allowed {
            return Err(
                "allow_other as a non-root user needs `user_allow_other` in /etc/fuse.conf \
                 (or mount as root)"
                    .into(),
            );
        }
    }
    Ok(())
}

/// Tells the waiting parent how mounting went, once.
struct Reporter {
    fd: Option<RawFd>,
}

impl Reporter {
    fn none() -> Self {
        Reporter { fd: None }
    }

    /// A line for the waiting `wpfs mount` to print (and the log).
    fn progress(&mut self, line: &str) {
        tracing::info!("{line}");
        if let Some(fd) = self.fd {
            let text = format!("progress {line}\n");
            // SAFETY: fd is the write end of our pipe; a short write only
            // loses a progress line.
            unsafe { libc::write(fd, text.as_ptr().cast(), text.len()) };
        }
    }

    fn report(&mut self, result: Result<(), &str>) {
        if let Some(fd) = self.fd.take() {
            // SAFETY: fd is the write end of our pipe, owned only here.
            let mut f = unsafe { fs::File::from_raw_fd(fd) };
            let _ = match result {
                Ok(()) => writeln!(f, "ok"),
                Err(e) => writeln!(f, "{e}"),
            };
        }
    }
}

fn daemonize(req: &MountRequest, config: &NodeConfig) -> Result<(), String> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    let (read_fd, write_fd) = (fds[0], fds[1]);
    // SAFETY: no thread has been started yet in this process.
    match unsafe { libc::fork() } {
        -1 => Err(format!("fork: {}", std::io::Error::last_os_error())),
        0 => {
            // SAFETY: closing our copy of the read end.
            unsafe { libc::close(read_fd) };
            let mut reporter = Reporter { fd: Some(write_fd) };
            let code = match detach(&req.dir).and_then(|_| run(req, config, &mut reporter)) {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!("{e}");
                    reporter.report(Err(&e));
                    1
                }
            };
            std::process::exit(code);
        }
        _child => {
            // SAFETY: closing our copy of the write end, then owning the read end.
            unsafe { libc::close(write_fd) };
            let f = unsafe { fs::File::from_raw_fd(read_fd) };
            for line in std::io::BufRead::lines(std::io::BufReader::new(f)) {
                let Ok(line) = line else { break };
                match line.strip_prefix("progress ") {
                    // Progress is a courtesy: a closed stderr must not
                    // end the wait (eprintln! would panic).
                    Some(text) => {
                        let _ = writeln!(std::io::stderr(), "wpfs: {text}");
                    }
                    None if line == "ok" => return Ok(()),
                    None => return Err(line),
                }
            }
            Err(format!(
                "the wpfs daemon exited before mounting: see {}",
                req.dir.join(LOG_FILE).display()
            ))
        }
    }
}

/// Leaves the terminal: new session, stdin from /dev/null, output to the log.
fn detach(dir: &Path) -> Result<(), String> {
    let null = CString::new("/dev/null").expect("no NUL");
    // SAFETY: plain syscalls on fds we own; no threads exist yet.
    unsafe {
        libc::setsid();
        let devnull = libc::open(null.as_ptr(), libc::O_RDONLY);
        libc::dup2(devnull, 0);
    }
    open_log(dir)
}

/// Points stdout and stderr at `DIR/wpfs.log`, opened anew: at start, and
/// on SIGHUP after logrotate has moved the old file away.
fn open_log(dir: &Path) -> Result<(), String> {
    let path = dir.join(LOG_FILE);
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&log);
    // SAFETY: dup2 onto the standard fds; each write of the logger goes
    // to whichever file they name at that moment.
    unsafe {
        libc::dup2(fd, 1);
        libc::dup2(fd, 2);
    }
    Ok(())
}

/// The log filter: the `log=` mount option, else `WPFS_LOG`, else
/// `RUST_LOG`, else `info`.
fn init_logging(option: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = option
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_from_env("WPFS_LOG").ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// Blocks the stop signals in this thread (and every thread it starts);
/// a dedicated thread takes them with sigwait.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, then pthread_sigmask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn run(req: &MountRequest, config: &NodeConfig, reporter: &mut Reporter) -> Result<(), String> {
    limit_malloc_arenas();
    init_logging(req.options.log.as_deref());
    let signals = block_stop_signals();
    if req.dir.join(LEFT_FILE).exists() {
        return Err(format!(
            "node {} left its cluster: to add this machine again, use a new data directory \
             with `wpfs join` (and remove {} when you no longer need it)",
            config.node_id,
            req.dir.display()
        ));
    }
    let db = db_path(&req.dir);
    // A joined node's store is created by its first mount.
    let first_mount = config.peer.is_some() && !db.exists();
    if first_mount {
        joining_progress(&req.dir, "making the store");
    }
    let store = Store::open(&db, first_mount).map_err(|e| match e {
        StoreError::Locked { .. } => format!(
            "{} is in use by a running wpfs (mounted elsewhere?): `wpfs status --data {}` shows where",
            req.dir.display(),
            req.dir.display()
        ),
        other => other.to_string(),
    })?;
    let transport = Transport::start(TransportConfig {
        node_id: config.node_id,
        listen: config.listen.clone(),
        cluster_id: config.cluster_id.clone(),
        secret: config.secret.clone(),
    })?;
    let node = Arc::new(
        Node::start(
            wpfs_consensus::NodeConfig::new(config.node_id),
            store.clone(),
            Some(transport.clone()),
        )
        .map_err(|e| format!("cannot start Raft: {e}"))?,
    );
    let service = PeerService::new(
        node.clone(),
        store.clone(),
        transport.clone(),
        config.witness,
        req.options.min_free,
    );
    transport.set_handler(Arc::new(PeerHandler(service.clone())));
    let namespace = Namespace::new(store.clone());
    if namespace.applied().map_err(|e| e.to_string())?.0 == 0 {
        let Some(peer) = &config.peer else {
            return Err(format!(
                "{} holds no filesystem (an interrupted `wpfs init`?): create the node again",
                db.display()
            ));
        };
        let me = wpfs_proto::Member {
            node_id: config.node_id,
            addr: config.listen.clone(),
            witness: config.witness,
        };
        let joined = cluster::join(&service, me, peer, &mut |line| {
            joining_progress(&req.dir, &line);
            reporter.progress(&line)
        });
        let _ = std::fs::remove_file(req.dir.join(JOINING_FILE));
        joined?;
    }
    let has_leader = node.wait_for_leader(req.options.write_timeout);
    if !has_leader {
        tracing::warn!(
            "no Raft leader yet: the mount serves reads, writes fail until one is elected"
        );
    }
    let core = FsCore::new(
        node.clone(),
        store,
        CoreOptions {
            write_timeout: req.options.write_timeout,
            read_only: req.options.read_only,
            min_free: req.options.min_free,
        },
    );
    let replicator = Replicator::start(
        transport.clone(),
        core.chunks().clone(),
        namespace.clone(),
        ReplicationConfig {
            copies: req.options.copies,
            witness: config.witness,
        },
    );
    core.set_replicator(replicator.clone(), !config.witness);
    let refs = Arc::new(KernelRefs::default());
    let remote = RemoteChanges::new(
        config.node_id,
        refs.clone(),
        Some(replicator.clone()),
        &core,
    );
    node.set_observer(remote.clone());
    {
        let r = replicator.clone();
        std::thread::spawn(move || r.scan());
    }
    if !req.options.read_only {
        match core.reap_orphans() {
            Ok(0) => {}
            Ok(n) => tracing::info!("freed {n} files unlinked while open before the last stop"),
            Err(e) => tracing::warn!("could not free orphans: {e:?}"),
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let maintenance = spawn_maintenance(
        core.clone(),
        replicator.clone(),
        req.dir.clone(),
        stop.clone(),
    );

    if has_leader {
        catch_up(&node, reporter);
    }
    let mount_opts = MountOptions {
        source: req.dir.to_string_lossy().into_owned(),
        allow_other: req.options.allow_other,
        read_only: req.options.read_only,
        cache_ttl: req.options.cache_ttl,
        threads: req.options.threads,
    };
    let fuse_metrics = FuseMetrics::default();
    let mut session = wpfs_fs::mount(
        core.clone(),
        refs,
        fuse_metrics.clone(),
        &req.mountpoint,
        &mount_opts,
    )
    .map_err(|e| format!("cannot mount at {}: {e}", req.mountpoint.display()))?;
    remote.set_notifier(session.notifier());
    let state = Arc::new(AdminState {
        core: core.clone(),
        config: config.clone(),
        dir: req.dir.clone(),
        mountpoint: req.mountpoint.clone(),
        mounted: AtomicBool::new(true),
        transport,
        replicator,
        service,
        fuse_metrics,
    });
    http::serve(
        state.clone(),
        &req.dir.join(SOCKET_FILE),
        config.admin.as_deref(),
    )?;
    tracing::info!(
        "node {} mounted {} at {}",
        config.node_id,
        req.dir.display(),
        req.mountpoint.display()
    );
    let pid_file = req.dir.join(PID_FILE);
    if let Err(e) = fs::write(&pid_file, format!("{}\n", std::process::id())) {
        tracing::warn!(
            "cannot write {}: {e} (logrotate cannot signal this daemon)",
            pid_file.display()
        );
    }
    reporter.report(Ok(()));
    systemd_notify(sd_notify::NotifyState::Ready);

    let mut unmounter = session.unmount_callable();
    let log_dir = (!req.foreground).then(|| req.dir.clone());
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: waits for one of the signals blocked above.
            if unsafe { libc::sigwait(&signals, &mut sig) } != 0 {
                continue;
            }
            // A daemon has no terminal to lose: its SIGHUP is logrotate's.
            if let (libc::SIGHUP, Some(dir)) = (sig, &log_dir) {
                match open_log(dir) {
                    Ok(()) => tracing::info!("SIGHUP: reopened {}", dir.join(LOG_FILE).display()),
                    Err(e) => tracing::error!("SIGHUP: {e}"),
                }
                continue;
            }
            tracing::info!("signal {sig}: unmounting");
            systemd_notify(sd_notify::NotifyState::Stopping);
            if let Err(e) = unmounter.unmount() {
                tracing::error!("unmount failed: {e} (is the mount busy?)");
            }
        })
        .map_err(|e| e.to_string())?;

    let served = session.run();
    state.mounted.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let _ = maintenance.join();
    node.stop();
    tracing::info!("unmounted {}; store closed", req.mountpoint.display());
    let _ = fs::remove_file(&pid_file);
    served.map_err(|e| format!("FUSE session ended with an error: {e}"))
}

/// Hands the memory freed since the last call back to the kernel. glibc's
/// arenas keep what they free (they only shrink from the top): a node's
/// RSS reached 297 MiB after one 512 MiB file was written, of which
/// RocksDB's memtables held 48 MiB; trimming every 2 s keeps it near what
/// is in use. A fixed mmap threshold (`M_MMAP_THRESHOLD`) kept RSS at 94
/// MiB too, but cost big files 15-18 % of their throughput (each 1 MiB
/// buffer mapped and faulted in afresh).
fn give_back_freed_memory() {
    // SAFETY: malloc_trim only returns free pages of glibc's allocator.
    unsafe { libc::malloc_trim(0) };
}

/// Caps glibc at two malloc arenas (its default is eight per core). Each
/// arena keeps the memory its threads freed, and `malloc_trim` returns
/// only whole free pages: with 1,000,000 files, while 100,000 more were
/// copied in, 14 arenas held 209 MiB of a 477 MiB peak; two arenas
/// brought the peak to 346-371 MiB and the idle RSS from 293 to 190 MiB,
/// with W1, W3 and W4 within noise (`benches/ab.sh`).
fn limit_malloc_arenas() {
    // SAFETY: mallopt only changes glibc's allocator settings; it runs
    // before the daemon starts its threads.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
}

/// Tells systemd (a `Type=notify` unit) how the daemon is; a no-op
/// elsewhere.
fn systemd_notify(state: sd_notify::NotifyState) {
    if let Err(e) = sd_notify::notify(false, &[state]) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// Waits, before the mount serves anything, until this node has applied
/// what the cluster had committed when it asked. A node restarted after
/// missing changes would serve its older copy of them meanwhile: a file's
/// previous version, or a new file still empty. Contents not here yet
/// are fetched on demand, so only the namespace is waited for. Past
/// `CATCH_UP_WAIT` (a leader that does not answer, a backlog too long)
/// it mounts what it has, says so, and applies the rest while serving.
fn catch_up(node: &Node, reporter: &mut Reporter) {
    let started = Instant::now();
    let target = match node.read_index(Duration::from_secs(5)) {
        Ok(index) => index,
        Err(e) => {
            tracing::warn!(
                "could not learn the cluster's commit index ({e}): mounting this node's copy \
                 as it is; changes it missed are applied as they arrive"
            );
            return;
        }
    };
    let behind_at_first = target.saturating_sub(node.status().applied);
    let mut said = Instant::now();
    loop {
        let applied = node.status().applied;
        if applied >= target {
            if behind_at_first > 0 {
                tracing::info!(
                    "caught up on {behind_at_first} changes in {:?}",
                    started.elapsed()
                );
            }
            return;
        }
        if started.elapsed() >= CATCH_UP_WAIT {
            tracing::warn!(
                "still {} changes behind the cluster after {CATCH_UP_WAIT:?}: mounting; they \
                 are applied while the mount serves",
                target - applied
            );
            return;
        }
        if said.elapsed() >= Duration::from_secs(1) {
            reporter.progress(&format!(
                "catching up on changes made while this node was away: {} of {behind_at_first} applied",
                behind_at_first.saturating_sub(target - applied)
            ));
            said = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Where a first mount's join is, for `wpfs status` (`JOINING_FILE`): a
/// join killed midway leaves the file behind with a pid that is gone.
fn joining_progress(dir: &Path, line: &str) {
    let _ = std::fs::write(
        dir.join(JOINING_FILE),
        format!("{}\n{line}", std::process::id()),
    );
}

/// Every few seconds: collects unreferenced chunks and retries chunk
/// fetches that failed. Unmounts once this node has been removed.
fn spawn_maintenance(
    core: Arc<FsCore>,
    replicator: Arc<Replicator>,
    dir: PathBuf,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("maintenance".into())
        .spawn(move || {
            let mut ticks = 0u32;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                ticks += 1;
                if ticks.is_multiple_of(20) {
                    if let Err(e) = core.collect_garbage() {
                        tracing::warn!("chunk collection failed: {e:?}");
                    }
                    replicator.retry();
                    give_back_freed_memory();
                }
                if core.node().status().removed && !dir.join(LEFT_FILE).exists() {
                    tracing::warn!("this node was removed from the cluster: unmounting");
                    let _ = cluster::mark_left(&dir);
                    // SAFETY: signals our own process; the signal thread unmounts.
                    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
                }
            }
        })
        .expect("spawning a thread")
}
