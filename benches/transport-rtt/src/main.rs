//! transport-rtt: what moving the peer transport onto tokio would cost.
//!
//! Measures round trips of length-prefixed frames over TLS 1.3 (rustls 0.23
//! on ring, mutual certificates as in consensus/src/tls.rs) on 127.0.0.1,
//! both ends in this process, for frames of 200 bytes (a Raft append or
//! heartbeat) and 64 KiB (a chunk); the far end answers each with a 16-byte
//! ack frame. Three transports:
//!
//! * `threads`: today's design. The caller (standing in for the Raft driver)
//!   encrypts and writes the frame itself without blocking (`send_now`, a
//!   condensed copy of tls.rs: rustls state under a mutex never held while
//!   blocking, `send(MSG_DONTWAIT)`, a backlog written by a flusher thread
//!   standing in for the link's dial thread). A client reader thread
//!   ("peer-in") blocks on the socket, decrypts the ack and hands it to the
//!   caller through a mutex+condvar mailbox (as `Transport::call` gets its
//!   response). The server is one thread per connection ("peer-conn")
//!   reading frames and writing each ack in line.
//! * `tokio-ct`: the caller stays a plain thread; it `try_send`s the frame
//!   on a bounded tokio mpsc to a writer task that owns the write half of a
//!   tokio-rustls stream; a reader task reads the ack and posts it to the
//!   same mailbox. Client runtime: current_thread on one dedicated thread;
//!   server: a task on its own current_thread runtime and thread.
//! * `tokio-mt2`: the same tasks on multi_thread runtimes of 2 workers each
//!   (one runtime for the client, one for the server).
//!
//! Modes: `seq`: WARMUP then N sequential round trips, timed each (p50, p99,
//! max); `pipe64`: 64 frames sent, then 64 acks awaited, repeated (frames/s).
//! CPU is getrusage(RUSAGE_SELF) user+sys over the measured part, so it is
//! both ends (every node is both), per round trip or per frame. Each round
//! runs every (mode, size, transport) once, on a fresh connection; the
//! summary gives median (min-max) over rounds.
//!
//! Run (from this directory):
//!   export CC="ccache cc" CXX="ccache c++"
//!   CARGO_TARGET_DIR=/var/tmp/wpfs-rtt-target cargo build --release
//!   /var/tmp/wpfs-rtt-target/release/transport-rtt [ROUNDS=3] [N=20000]
//! ONLY=tokio-ct (a substring of "mode size transport", e.g. "seq 65536")
//! runs only the matching runs (for strace/perf of one variant).

use std::io::{self, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex as StdMutex};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, PKCS_ED25519};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WARMUP: usize = 2000;
const DEPTH: usize = 64;
const ACK: usize = 16;
const NAME: &str = "peer.wpfs.invalid";

// ---------------------------------------------------------------- TLS setup
fn tls_configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let ca_key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, &ca_key);
    let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let leaf = CertificateParams::new(vec![NAME.to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(ca_cert.der().clone()).unwrap();
    let roots = Arc::new(roots);
    let chain: Vec<CertificateDer<'static>> = vec![leaf.der().clone()];
    let pk = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    #[allow(deprecated)] // the call consensus/src/tls.rs makes: X25519, no post-quantum
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .unwrap();
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), pk.clone_key())
        .unwrap();
    server.send_tls13_tickets = 0;
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, pk)
        .unwrap();
    client.resumption = rustls::client::Resumption::disabled();
    (Arc::new(server), Arc::new(client))
}

// ------------------------------------ mailbox (as consensus/src/mailbox.rs)
/// Mutex + condvar, sleeping on the first miss (std mpsc spins first).
#[derive(Default)]
struct Mailbox {
    n: StdMutex<usize>,
    cv: Condvar,
}
impl Mailbox {
    fn post(&self) {
        *self.n.lock().unwrap() += 1;
        self.cv.notify_one();
    }
    fn take(&self) {
        let mut n = self.n.lock().unwrap();
        while *n == 0 {
            n = self.cv.wait(n).unwrap();
        }
        *n -= 1;
    }
}

// ------------------------- threads: a condensed copy of tls.rs' TlsStream
struct TlsStream {
    sock: TcpStream,
    state: Mutex<(Connection, Vec<u8>)>,
    out: Mutex<(Vec<u8>, bool)>,
}

impl TlsStream {
    fn handshake(mut sock: TcpStream, mut conn: Connection) -> Arc<TlsStream> {
        conn.set_buffer_limit(None);
        while conn.is_handshaking() {
            conn.complete_io(&mut sock).unwrap();
        }
        while conn.wants_write() {
            conn.write_tls(&mut sock).unwrap();
        }
        Arc::new(TlsStream {
            sock,
            state: Mutex::new((conn, Vec::new())),
            out: Mutex::new((Vec::new(), false)),
        })
    }
    fn read_plain(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut st = self.state.lock();
                let (conn, received) = &mut *st;
                while !received.is_empty() && conn.wants_read() {
                    let taken = conn.read_tls(&mut &received[..])?;
                    received.drain(..taken);
                    conn.process_new_packets().map_err(io::Error::other)?;
                    if taken == 0 {
                        break;
                    }
                }
                match conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            let mut raw = [0u8; 16 * 1024];
            let n = (&self.sock).read(&mut raw)?;
            if n == 0 {
                return Ok(0);
            }
            self.state.lock().1.extend_from_slice(&raw[..n]);
        }
    }
    /// Encrypts and hands the kernel what it takes now; true if some of it
    /// waits in the backlog for `flush`.
    fn send_now(&self, plain: &[u8]) -> io::Result<bool> {
        let mut out = self.out.lock();
        let bytes = {
            let mut st = self.state.lock();
            st.0.writer().write_all(plain)?;
            let mut v = Vec::new();
            while st.0.wants_write() {
                st.0.write_tls(&mut v)?;
            }
            v
        };
        if out.1 || !out.0.is_empty() {
            out.0.extend_from_slice(&bytes);
            return Ok(true);
        }
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            // SAFETY: a valid socket and buffer.
            let n = unsafe {
                libc::send(
                    self.sock.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => break,
                    _ => return Err(e),
                }
            }
            rest = &rest[n as usize..];
        }
        out.0.extend_from_slice(rest);
        Ok(!rest.is_empty())
    }
    fn flush(&self) -> io::Result<()> {
        let mut out = self.out.lock();
        if out.1 {
            return Ok(());
        }
        while !out.0.is_empty() {
            let bytes = std::mem::take(&mut out.0);
            out.1 = true;
            drop(out);
            let r = (&self.sock).write_all(&bytes);
            out = self.out.lock();
            out.1 = false;
            r?;
        }
        Ok(())
    }
    fn write_all(&self, plain: &[u8]) -> io::Result<()> {
        if self.send_now(plain)? {
            self.flush()?;
        }
        Ok(())
    }
}
struct Half(Arc<TlsStream>);
impl Read for Half {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.0.read_plain(b)
    }
}

fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    buf.resize(u32::from_be_bytes(len) as usize, 0);
    r.read_exact(buf)
}
fn frame(payload: usize) -> Vec<u8> {
    let mut f = (payload as u32).to_be_bytes().to_vec();
    f.resize(4 + payload, 0x5a);
    f
}

trait Client {
    fn send(&self, frame: Vec<u8>);
    fn ack(&self);
    fn close(self: Box<Self>);
}

struct ThreadsClient {
    s: Arc<TlsStream>,
    acks: Arc<Mailbox>,
    wake: Arc<(StdMutex<(bool, bool)>, Condvar)>,
    threads: Vec<std::thread::JoinHandle<()>>,
}
impl Client for ThreadsClient {
    fn send(&self, frame: Vec<u8>) {
        if self.s.send_now(&frame).unwrap() {
            self.wake.0.lock().unwrap().0 = true; // the link thread writes the rest
            self.wake.1.notify_one();
        }
    }
    fn ack(&self) {
        self.acks.take()
    }
    fn close(self: Box<Self>) {
        self.wake.0.lock().unwrap().1 = true;
        self.wake.1.notify_one();
        let _ = self.s.sock.shutdown(std::net::Shutdown::Both);
        for t in self.threads {
            t.join().unwrap();
        }
    }
}

fn threads_client(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Box<dyn Client> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = std::thread::Builder::new()
        .name("peer-conn".into())
        .spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            sock.set_nodelay(true).unwrap();
            let s = TlsStream::handshake(sock, ServerConnection::new(server).unwrap().into());
            let mut r = BufReader::new(Half(s.clone()));
            let (mut buf, ack) = (Vec::new(), frame(ACK));
            while read_frame(&mut r, &mut buf).is_ok() {
                if s.write_all(&ack).is_err() {
                    break;
                }
            }
        })
        .unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_nodelay(true).unwrap();
    let conn = ClientConnection::new(client, ServerName::try_from(NAME).unwrap()).unwrap();
    let s = TlsStream::handshake(sock, conn.into());
    let acks = Arc::new(Mailbox::default());
    let (s2, a2) = (s.clone(), acks.clone());
    let reader = std::thread::Builder::new()
        .name("peer-in".into())
        .spawn(move || {
            let (mut r, mut buf) = (BufReader::new(Half(s2)), Vec::new());
            while read_frame(&mut r, &mut buf).is_ok() {
                a2.post();
            }
        })
        .unwrap();
    let wake = Arc::new((StdMutex::new((false, false)), Condvar::new()));
    let (s3, w3) = (s.clone(), wake.clone());
    let flusher = std::thread::Builder::new()
        .name("peer-out".into())
        .spawn(move || loop {
            let mut g = w3.0.lock().unwrap();
            while !g.0 && !g.1 {
                g = w3.1.wait(g).unwrap();
            }
            if g.1 {
                return;
            }
            g.0 = false;
            drop(g);
            if s3.flush().is_err() {
                return;
            }
        })
        .unwrap();
    Box::new(ThreadsClient {
        s,
        acks,
        wake,
        threads: vec![srv, reader, flusher],
    })
}

// -------------------------------------------------------------------- tokio
enum Rt {
    Ct(std::thread::JoinHandle<()>),
    Mt(tokio::runtime::Runtime),
}
fn run_on(
    multi: bool,
    name: &str,
    fut: impl std::future::Future<Output = ()> + Send + 'static,
) -> Rt {
    if multi {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(name)
            .enable_io()
            .build()
            .unwrap();
        rt.spawn(fut);
        Rt::Mt(rt)
    } else {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        Rt::Ct(
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || rt.block_on(fut))
                .unwrap(),
        )
    }
}
fn stop(rt: Rt) {
    match rt {
        Rt::Ct(t) => t.join().unwrap(),
        Rt::Mt(rt) => rt.shutdown_timeout(Duration::from_secs(5)),
    }
}

struct TokioClient {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    acks: Arc<Mailbox>,
    rts: Vec<Rt>,
}
impl Client for TokioClient {
    fn send(&self, frame: Vec<u8>) {
        self.tx.try_send(frame).expect("queue full")
    }
    fn ack(&self) {
        self.acks.take()
    }
    fn close(self: Box<Self>) {
        drop(self.tx); // the writer task ends, closes the stream; the server then ends
        for rt in self.rts {
            stop(rt);
        }
    }
}

fn tokio_client(
    multi: bool,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
) -> Box<dyn Client> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let srv = run_on(multi, "srv-rt", async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let (sock, _) = listener.accept().await.unwrap();
        sock.set_nodelay(true).unwrap();
        let s = tokio_rustls::TlsAcceptor::from(server)
            .accept(sock)
            .await
            .unwrap();
        let mut s = tokio::io::BufReader::new(s);
        let (mut buf, ack) = (Vec::new(), frame(ACK));
        loop {
            let Ok(len) = s.read_u32().await else { return };
            buf.resize(len as usize, 0);
            if s.read_exact(&mut buf).await.is_err() {
                return;
            }
            if s.write_all(&ack).await.is_err() || s.flush().await.is_err() {
                return;
            }
        }
    });
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1024);
    let acks = Arc::new(Mailbox::default());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let a2 = acks.clone();
    let cli = run_on(multi, "cli-rt", async move {
        let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        sock.set_nodelay(true).unwrap();
        let s = tokio_rustls::TlsConnector::from(client)
            .connect(ServerName::try_from(NAME).unwrap(), sock)
            .await
            .unwrap();
        let (r, mut w) = tokio::io::split(s);
        tokio::spawn(async move {
            let (mut r, mut buf) = (tokio::io::BufReader::new(r), Vec::new());
            loop {
                let Ok(len) = r.read_u32().await else { return };
                buf.resize(len as usize, 0);
                if r.read_exact(&mut buf).await.is_err() {
                    return;
                }
                a2.post();
            }
        });
        ready_tx.send(()).unwrap();
        while let Some(f) = rx.recv().await {
            w.write_all(&f).await.unwrap();
            while let Ok(f) = rx.try_recv() {
                w.write_all(&f).await.unwrap();
            }
            w.flush().await.unwrap();
        }
        let _ = w.shutdown().await;
    });
    ready_rx.recv().unwrap();
    Box::new(TokioClient {
        tx,
        acks,
        rts: vec![cli, srv],
    })
}

// -------------------------------------------------------------- measurement
fn cpu_us() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 * 1e6 + tv.tv_usec as f64;
    t(ru.ru_utime) + t(ru.ru_stime)
}
/// Steal time in ms (USER_HZ = 100) from the first line of /proc/stat.
fn steal_ms() -> u64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    s.lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(8))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
        * 10
}

/// seq: [p50, p99, max, cpu/rtt] in µs; pipe: [frames/s, cpu/frame].
fn measure(c: &dyn Client, size: usize, pipe: bool, n: usize) -> Vec<f64> {
    let f = frame(size);
    if pipe {
        let batch = |c: &dyn Client| {
            for _ in 0..DEPTH {
                c.send(f.clone())
            }
            for _ in 0..DEPTH {
                c.ack()
            }
        };
        for _ in 0..WARMUP / DEPTH {
            batch(c)
        }
        let (batches, cpu0, t0) = (n / DEPTH, cpu_us(), Instant::now());
        for _ in 0..batches {
            batch(c)
        }
        let (secs, frames) = (t0.elapsed().as_secs_f64(), (batches * DEPTH) as f64);
        return vec![frames / secs, (cpu_us() - cpu0) / frames];
    }
    let mut rtt = Vec::with_capacity(n);
    let mut cpu0 = 0.0;
    for i in 0..WARMUP + n {
        if i == WARMUP {
            cpu0 = cpu_us();
        }
        let t0 = Instant::now();
        c.send(f.clone());
        c.ack();
        if i >= WARMUP {
            rtt.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    let cpu = (cpu_us() - cpu0) / n as f64;
    rtt.sort_by(|a, b| a.partial_cmp(b).unwrap());
    vec![rtt[n / 2], rtt[n * 99 / 100], rtt[n - 1], cpu]
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("ROUNDS N"))
        .collect();
    let (rounds, n) = (
        args.first().copied().unwrap_or(3),
        args.get(1).copied().unwrap_or(20_000),
    );
    let (server, client) = tls_configs();
    let transports = ["threads", "tokio-ct", "tokio-mt2"];
    let mut cases = vec![];
    for pipe in [false, true] {
        for size in [200usize, 65536] {
            cases.push((pipe, size))
        }
    }
    println!(
        "nproc {}, {rounds} rounds, {n} frames per run, warm-up {WARMUP}",
        std::thread::available_parallelism()
            .map(|p| p.get())
            .unwrap_or(0)
    );
    let mut results: Vec<Vec<Vec<f64>>> = vec![vec![]; cases.len() * transports.len()];
    let steal_start = steal_ms();
    let only = std::env::var("ONLY").unwrap_or_default();
    let chosen = |pipe: bool, size: usize, t: &str| {
        format!("{} {size} {t}", if pipe { "pipe64" } else { "seq" }).contains(&only)
    };
    for round in 0..rounds {
        for (ci, &(pipe, size)) in cases.iter().enumerate() {
            for (ti, t) in transports.iter().enumerate() {
                if !chosen(pipe, size, t) {
                    continue;
                }
                let c = match ti {
                    0 => threads_client(server.clone(), client.clone()),
                    _ => tokio_client(ti == 2, server.clone(), client.clone()),
                };
                let st0 = steal_ms();
                let r = measure(&*c, size, pipe, n);
                let st = steal_ms() - st0;
                c.close();
                println!(
                    "round {round} {:6} {size:5} B {t:9}: {r:.1?}  steal {st} ms",
                    if pipe { "pipe64" } else { "seq" }
                );
                results[ci * transports.len() + ti].push(r);
            }
        }
    }
    println!("steal over all runs: {} ms\n", steal_ms() - steal_start);
    let fmt = |rs: &[Vec<f64>], k: usize, prec: usize| {
        let mut v: Vec<f64> = rs.iter().map(|r| r[k]).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        format!(
            "{:.p$} ({:.p$}-{:.p$})",
            v[v.len() / 2],
            v[0],
            v[v.len() - 1],
            p = prec
        )
    };
    println!("| mode | size | transport | p50 µs | p99 µs | max µs | CPU µs/rtt |\n|---|---|---|---|---|---|---|");
    let mut pipe_header = false;
    for (ci, &(pipe, size)) in cases.iter().enumerate() {
        for (ti, t) in transports.iter().enumerate() {
            let rs = &results[ci * transports.len() + ti];
            if rs.is_empty() {
                continue;
            }
            if pipe {
                if !pipe_header {
                    pipe_header = true;
                    println!("\n| mode | size | transport | frames/s | CPU µs/frame |\n|---|---|---|---|---|");
                }
                println!(
                    "| pipe64 | {size} | {t} | {} | {} |",
                    fmt(rs, 0, 0),
                    fmt(rs, 1, 2)
                );
            } else {
                println!(
                    "| seq | {size} | {t} | {} | {} | {} | {} |",
                    fmt(rs, 0, 1),
                    fmt(rs, 1, 1),
                    fmt(rs, 2, 0),
                    fmt(rs, 3, 1)
                );
            }
        }
    }
}
