//! The peer transport: length-delimited prost frames over TCP between the
//! nodes of one cluster, carrying Raft messages and a few requests (fetch a
//! chunk, fetch a snapshot piece, join, remove).
//!
//! Why not gRPC: everything here runs on plain threads (the Raft driver,
//! the FUSE workers), the messages are few and already prost-encoded, and a
//! frame loop of a hundred lines is easier to reason about under faults
//! than an async runtime. One protocol, one port.
//!
//! Connections: this node dials one outbound connection per peer address
//! (a `Link`, with a thread that dials and writes out backlogs, and a
//! reader thread for responses) and accepts inbound ones (a reader thread
//! each, answering requests on the same socket). Raft messages travel on
//! the sender's outbound link, written by the sending thread itself
//! without blocking (`TlsStream::send_now`); a message to a peer that is
//! down or not reading is dropped at once (Raft retries), never queued
//! behind a dead socket.
//!
//! Authentication: every connection is TLS 1.3 with certificates of the
//! cluster CA on both ends (`tls`); inside it, both ends also prove they
//! know the cluster secret by answering the other's fresh nonce with a
//! keyed BLAKE3 hash, which also tells each side who the other is. A peer
//! that fails either (or sends garbage, or a frame over `MAX_FRAME`) is
//! logged and disconnected; nothing it sent is acted on.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::mailbox::{self, Receiver, RecvError, Sender};
use parking_lot::{Mutex, RwLock};
use wpfs_proto::peer_frame::Body;
use wpfs_proto::peer_request::Kind;
use wpfs_proto::{Challenge, Hello, Message, PeerFrame, PeerRequest, PeerResponse};

use crate::tls::{PeerTls, Sent, TlsHalf, TlsStream};

/// The largest frame accepted: a snapshot piece or a batch of Raft entries
/// is far smaller; anything bigger is garbage.
pub const MAX_FRAME: usize = 64 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// An inbound connection silent this long is closed; its dialer reconnects.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const RECONNECT_DELAY: Duration = Duration::from_millis(200);
/// A link to an address that no member has any more (a removed node's, a
/// join's first peer) stops dialing once unused this long.
const UNUSED_LINK_KEPT: Duration = Duration::from_secs(10);
/// The peer protocol this build speaks. Raise it when a message changes
/// meaning; a new field does not count (prost skips fields it does not
/// know, so older nodes read newer messages). Raise `MIN_PROTOCOL` when
/// this build stops talking to an older one. Protocol 2 added
/// `FetchChunks` (many chunks in one request); a protocol 1 peer is asked
/// one chunk at a time.
pub const PROTOCOL: u32 = 2;
pub const MIN_PROTOCOL: u32 = 1;
/// This build's release, as peers see it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// This build as `wpfs status` shows a member's version.
pub fn this_version() -> String {
    format!("{VERSION} (protocol {})", spoken_protocol())
}

/// The peer protocol this process speaks: `PROTOCOL`, or an older one
/// with `WPFS_PEER_PROTOCOL=N`. The upgrade test runs nodes so, standing
/// in for an older release: they say N in their hello, ask peers only
/// what N has, and refuse what it lacks.
pub fn spoken_protocol() -> u32 {
    static SPOKEN: OnceLock<u32> = OnceLock::new();
    *SPOKEN.get_or_init(|| {
        std::env::var("WPFS_PEER_PROTOCOL")
            .ok()
            .and_then(|n| n.parse().ok())
            .map_or(PROTOCOL, |n: u32| n.clamp(MIN_PROTOCOL, PROTOCOL))
    })
}

/// The error a request of a kind this node does not know is answered with.
pub const UNKNOWN_REQUEST: &str = "unknown request (a newer wpfs?)";

/// In the error of a call to a peer that refused this node's credentials.
pub const REFUSED: &str =
    "refused by the peer: this node's cluster id or secret is not its cluster's";

#[derive(Clone, Debug)]
pub struct TransportConfig {
    pub node_id: u64,
    pub listen: String,
    pub cluster_id: String,
    pub secret: String,
}

/// What the node does with what peers send.
pub trait Handler: Send + Sync + 'static {
    fn raft_message(&self, msg: raft::eraftpb::Message);
    /// Answers a request. Single chunk fetches, pushes and snapshot
    /// pieces run on the connection's reader and must not wait on the
    /// network; batch fetches and membership requests run on their own
    /// thread, and membership requests may block.
    fn request(&self, from: u64, kind: Kind) -> Result<Vec<u8>, String>;
}

/// How one peer looks from here, for `wpfs status`.
#[derive(Clone, Debug)]
pub struct LinkStatus {
    pub addr: String,
    pub connected: bool,
    pub last_error: Option<String>,
    /// The peer's release and protocol, from its last handshake.
    pub version: Option<String>,
    /// The peer protocol both ends speak: the older of the two (0 until a
    /// handshake told).
    pub protocol: u32,
}

#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

struct Inner {
    config: TransportConfig,
    tls: PeerTls,
    key: [u8; 32],
    handler: OnceLock<Arc<dyn Handler>>,
    /// Peer addresses by node id: from the membership and from handshakes.
    addrs: RwLock<HashMap<u64, String>>,
    links: Mutex<HashMap<String, Arc<Link>>>,
    next_request: AtomicU64,
}

impl Transport {
    /// Binds the listen address and starts accepting peers. Requests and
    /// Raft messages wait until `set_handler`.
    pub fn start(config: TransportConfig) -> Result<Transport, String> {
        let listener = TcpListener::bind(&config.listen).map_err(|e| {
            format!(
                "cannot listen on {} for peers: {e} (is another wpfs or service using it?)",
                config.listen
            )
        })?;
        let key = blake3::derive_key("wpfs peer authentication v1", config.secret.as_bytes());
        let tls = PeerTls::new(&config.cluster_id, &config.secret, config.node_id)?;
        let inner = Arc::new(Inner {
            config,
            tls,
            key,
            handler: OnceLock::new(),
            addrs: RwLock::new(HashMap::new()),
            links: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
        });
        let accepting = inner.clone();
        std::thread::Builder::new()
            .name("peer-accept".into())
            .spawn(move || accepting.accept(listener))
            .map_err(|e| e.to_string())?;
        Ok(Transport { inner })
    }

    pub fn set_handler(&self, handler: Arc<dyn Handler>) {
        let _ = self.inner.handler.set(handler);
    }

    pub fn node_id(&self) -> u64 {
        self.inner.config.node_id
    }

    /// Records (or, with `None`, forgets) where node `id` listens.
    pub fn set_address(&self, id: u64, addr: Option<&str>) {
        if id == self.inner.config.node_id {
            return;
        }
        let mut addrs = self.inner.addrs.write();
        match addr {
            Some(a) => {
                addrs.insert(id, a.to_string());
                // Dial now: status shows a member's reachability at once.
                self.inner.link(a).wake();
            }
            None => {
                addrs.remove(&id);
            }
        }
    }

    pub fn address(&self, id: u64) -> Option<String> {
        self.inner.addrs.read().get(&id).cloned()
    }

    /// Queues a Raft message; false when it cannot go out now (no address,
    /// link down or backed up), so Raft can treat the peer as unreachable.
    pub fn send_raft(&self, msg: &raft::eraftpb::Message) -> bool {
        let Some((link, stream)) = self.connected(msg.to) else {
            return false;
        };
        let frame = PeerFrame {
            body: Some(Body::Raft(prost011::Message::encode_to_vec(msg))),
        };
        link.send(&stream, &framed(&frame)).is_ok()
    }

    /// Sends a request to node `to` and waits for its answer.
    pub fn call(&self, to: u64, kind: Kind, timeout: Duration) -> Result<Vec<u8>, String> {
        let addr = self
            .address(to)
            .ok_or_else(|| format!("node {to} has no known address"))?;
        self.call_addr(&addr, kind, timeout)
    }

    /// Sends a request to whoever listens at `addr`.
    pub fn call_addr(&self, addr: &str, kind: Kind, timeout: Duration) -> Result<Vec<u8>, String> {
        let deadline = Instant::now() + timeout;
        let link = self.inner.link(addr);
        let stream = link
            .connected_by(deadline)
            .ok_or_else(|| link.unreachable())?;
        let (tx, rx) = mailbox::bounded(1);
        let id = self.inner.request(&link, &stream, kind, tx)?;
        let answer = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        link.pending.lock().remove(&id);
        match answer {
            Ok(r) if r.error.is_empty() => Ok(r.data),
            Ok(r) => Err(r.error),
            Err(RecvError::Timeout) => Err(format!("{addr} did not answer within {timeout:?}")),
            Err(RecvError::Closed) => Err(link.unreachable()),
        }
    }

    /// Sends the same request to every connected node of `peers` at once,
    /// without waiting: `Calls::wait` collects the answers. For pushes that
    /// need a few copies and must not wait for the slowest peer.
    pub fn ask_all(&self, peers: &[u64], kind: &Kind) -> Calls {
        let (tx, answers) = mailbox::unbounded();
        let mut asked = Vec::new();
        for &peer in peers {
            let Some((link, stream)) = self.connected(peer) else {
                continue;
            };
            match self.inner.request(&link, &stream, kind.clone(), tx.clone()) {
                Ok(id) => asked.push((link, id)),
                Err(e) => tracing::debug!("request to node {peer}: {e}"),
            }
        }
        Calls { asked, answers }
    }

    /// The link to node `id` and its connection, if it has one now; a link
    /// without one is told to dial at once.
    fn connected(&self, id: u64) -> Option<(Arc<Link>, Arc<TlsStream>)> {
        let link = self.inner.link(&self.address(id)?);
        let Some(stream) = link.stream() else {
            link.wake();
            return None;
        };
        Some((link, stream))
    }

    /// Every peer link, by node id.
    pub fn links(&self) -> HashMap<u64, LinkStatus> {
        let addrs = self.inner.addrs.read().clone();
        let links = self.inner.links.lock();
        addrs
            .into_iter()
            .map(|(id, addr)| {
                let link = links.get(&addr);
                let status = LinkStatus {
                    connected: link.is_some_and(|l| l.stream().is_some()),
                    last_error: link.and_then(|l| l.last_error.lock().clone()),
                    version: link.and_then(|l| l.version.lock().clone()),
                    protocol: link.map_or(0, |l| {
                        l.protocol.load(Ordering::Relaxed).min(spoken_protocol())
                    }),
                    addr,
                };
                (id, status)
            })
            .collect()
    }
}

impl Inner {
    /// Sends a request on `link`; its answer will go to `reply`.
    fn request(
        &self,
        link: &Link,
        stream: &TlsStream,
        kind: Kind,
        reply: Sender<PeerResponse>,
    ) -> Result<u64, String> {
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        link.pending.lock().insert(id, reply);
        let frame = PeerFrame {
            body: Some(Body::Request(PeerRequest {
                id,
                kind: Some(kind),
            })),
        };
        link.send(stream, &framed(&frame)).map_err(|e| {
            link.pending.lock().remove(&id);
            format!("{}: {e}", link.addr)
        })?;
        Ok(id)
    }

    fn link(self: &Arc<Self>, addr: &str) -> Arc<Link> {
        let mut links = self.links.lock();
        if let Some(l) = links.get(addr) {
            *l.used.lock() = Instant::now();
            return l.clone();
        }
        let (wake_tx, wake_rx) = mailbox::bounded(1);
        let link = Arc::new(Link {
            addr: addr.to_string(),
            wake: wake_tx,
            stream: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            last_error: Mutex::new(None),
            version: Mutex::new(None),
            protocol: AtomicU32::new(0),
            used: Mutex::new(Instant::now()),
        });
        links.insert(addr.to_string(), link.clone());
        let (inner, l) = (self.clone(), link.clone());
        let _ = std::thread::Builder::new()
            .name(format!("peer-out {addr}"))
            .spawn(move || inner.dial_loop(&l, wake_rx));
        link
    }

    /// Keeps the link to one address connected and writes out its backlog,
    /// while a member listens there or the link is in use.
    fn dial_loop(self: &Arc<Self>, link: &Arc<Link>, wake: Receiver<()>) {
        loop {
            if self.forget_if_unused(link) {
                tracing::info!(
                    "no member listens at {} any more: stopped dialing it",
                    link.addr
                );
                return;
            }
            match self.dial(&link.addr) {
                Ok((stream, hello)) => {
                    let peer = hello.node_id;
                    *link.last_error.lock() = None;
                    *link.version.lock() = Some(version_of(&hello));
                    link.protocol.store(protocol_of(&hello), Ordering::Relaxed);
                    *link.stream.lock() = Some(stream.clone());
                    tracing::info!("connected to node {peer} at {}", link.addr);
                    let why = self.serve_link(link, stream, &wake);
                    *link.stream.lock() = None;
                    tracing::warn!("lost node {peer} at {}: {why}", link.addr);
                    *link.last_error.lock() = Some(why);
                }
                Err(why) => {
                    let changed = link.last_error.lock().as_deref() != Some(why.as_str());
                    if changed {
                        tracing::warn!("cannot reach peer {}: {why}", link.addr);
                    }
                    *link.last_error.lock() = Some(why);
                }
            }
            link.pending.lock().clear();
            let _ = wake.recv_timeout(RECONNECT_DELAY);
            std::thread::sleep(RECONNECT_DELAY / 4);
        }
    }

    /// Drops `link` when no member has its address and nobody used it for
    /// `UNUSED_LINK_KEPT`. The last check is made under the lock that
    /// `link()` takes, so a caller either finds the link still there (and
    /// marks it used) or makes a new one.
    fn forget_if_unused(&self, link: &Link) -> bool {
        if self.addrs.read().values().any(|a| *a == link.addr) {
            return false;
        }
        let mut links = self.links.lock();
        if link.used.lock().elapsed() < UNUSED_LINK_KEPT || !link.pending.lock().is_empty() {
            return false;
        }
        links.remove(&link.addr);
        true
    }

    /// Connects and authenticates: the stream, and the peer's hello (its
    /// node id, release and protocol).
    fn dial(&self, addr: &str) -> Result<(Arc<TlsStream>, Hello), String> {
        let sockaddr: SocketAddr = addr
            .to_socket_addrs()
            .map_err(|e| format!("bad address: {e}"))?
            .next()
            .ok_or("address resolves to nothing")?;
        let sock = TcpStream::connect_timeout(&sockaddr, CONNECT_TIMEOUT)
            .map_err(|e| format!("connect: {e}"))?;
        sock.set_nodelay(true).ok();
        sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).ok();
        let stream = self
            .tls
            .connect(sock)
            .map_err(|e| tls_refusal(&e.to_string()))?;
        let mut r = BufReader::new(TlsHalf(stream.clone()));
        // With TLS 1.3 the server judges our certificate after we finished
        // the handshake: its verdict arrives as the first read.
        let first = read_frame(&mut r).map_err(|e| tls_refusal(&e))?;
        let Some(Body::Challenge(ch)) = first.body else {
            return Err("peer did not start with a challenge".into());
        };
        let nonce = random_nonce();
        let hello = self.hello(&ch.nonce, nonce.to_vec());
        write_frame(
            &stream,
            &PeerFrame {
                body: Some(Body::Hello(hello)),
            },
        )?;
        let Some(Body::Hello(theirs)) = read_frame(&mut r)?.body else {
            return Err("the peer answered the handshake with something else".into());
        };
        if theirs.node_id == 0 {
            return Err(match theirs.refused.as_str() {
                "" => REFUSED.into(),
                why => format!("refused by the peer: {why}"),
            });
        }
        if !self.verify(&theirs, &nonce) {
            return Err(
                "the peer failed authentication: it is not a member of this cluster".into(),
            );
        }
        if let Some(why) = incompatible(&theirs, MIN_PROTOCOL) {
            return Err(why);
        }
        stream.socket().set_read_timeout(None).ok();
        Ok((stream, theirs))
    }

    fn hello(&self, their_nonce: &[u8], my_nonce: Vec<u8>) -> Hello {
        let mut hello = Hello {
            cluster_id: self.config.cluster_id.clone(),
            node_id: self.config.node_id,
            addr: self.config.listen.clone(),
            proof: vec![],
            nonce: my_nonce,
            protocol: spoken_protocol(),
            version: VERSION.into(),
            refused: String::new(),
        };
        hello.proof = self.proof(their_nonce, &hello).to_vec();
        hello
    }

    fn proof(&self, nonce: &[u8], hello: &Hello) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(nonce);
        h.update(&hello.node_id.to_be_bytes());
        h.update(hello.cluster_id.as_bytes());
        h.update(&[0]);
        h.update(hello.addr.as_bytes());
        *h.finalize().as_bytes()
    }

    fn verify(&self, hello: &Hello, my_nonce: &[u8]) -> bool {
        hello.cluster_id == self.config.cluster_id
            && hello.node_id != 0
            && hello.proof.len() == 32
            && constant_time_eq(&self.proof(my_nonce, hello), &hello.proof)
    }

    /// Writes out what senders left in the backlog, whenever they wake it,
    /// until the connection fails; a reader thread hands responses to their
    /// callers meanwhile.
    fn serve_link(&self, link: &Arc<Link>, stream: Arc<TlsStream>, wake: &Receiver<()>) -> String {
        let reader = TlsHalf(stream.clone());
        let dead = Arc::new(AtomicBool::new(false));
        let (l, d) = (link.clone(), dead.clone());
        let _ = std::thread::Builder::new()
            .name(format!("peer-in {}", link.addr))
            .spawn(move || {
                let mut r = BufReader::new(reader);
                while let Ok(frame) = read_frame(&mut r) {
                    if let Some(Body::Response(resp)) = frame.body {
                        if let Some(tx) = l.pending.lock().remove(&resp.id) {
                            let _ = tx.send(resp);
                        }
                    }
                }
                d.store(true, Ordering::Relaxed);
                l.wake();
            });
        // No timer: a sender whose frame was queued wakes this thread, and
        // so does the reader when the connection ends. An idle link costs
        // no wakeups (a leader has one per member).
        let why = loop {
            if dead.load(Ordering::Relaxed) {
                break "connection closed by the peer".to_string();
            }
            match wake.recv() {
                Some(()) => {
                    if let Err(e) = stream.flush() {
                        break e.to_string();
                    }
                }
                None => break "stopped".into(),
            }
        };
        stream.shutdown();
        why
    }

    fn accept(self: Arc<Self>, listener: TcpListener) {
        for conn in listener.incoming() {
            let Ok(stream) = conn else { continue };
            let inner = self.clone();
            let _ = std::thread::Builder::new()
                .name("peer-conn".into())
                .spawn(move || {
                    let from = stream
                        .peer_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    match inner.serve_inbound(stream) {
                        Ok(()) => {}
                        Err(why) => tracing::debug!("connection from {from} ended: {why}"),
                    }
                });
        }
    }

    fn serve_inbound(self: &Arc<Self>, sock: TcpStream) -> Result<(), String> {
        let from = sock.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        sock.set_nodelay(true).ok();
        sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).ok();
        let stream = self.tls.accept(sock).map_err(|e| {
            tracing::warn!(
                "refused a peer connection from {from}: it failed authentication (TLS: {e}; \
                 a wrong join token, or not a wpfs node)"
            );
            e.to_string()
        })?;
        let mut r = BufReader::new(TlsHalf(stream.clone()));
        let nonce = random_nonce();
        write_frame(
            &stream,
            &PeerFrame {
                body: Some(Body::Challenge(Challenge {
                    nonce: nonce.to_vec(),
                })),
            },
        )?;
        let hello = match read_frame(&mut r) {
            Ok(PeerFrame {
                body: Some(Body::Hello(h)),
            }) if self.verify(&h, &nonce) => h,
            Ok(_) => {
                tracing::warn!("refused a peer connection from {from}: it failed authentication (wrong cluster or join token)");
                // No reason given: the dialer says REFUSED, what an honest
                // but misconfigured node needs to hear.
                refuse(&stream, String::new());
                return Err("authentication failed".into());
            }
            Err(e) => {
                tracing::warn!("refused a peer connection from {from}: {e}");
                return Err(e);
            }
        };
        if let Some(why) = incompatible(&hello, MIN_PROTOCOL) {
            tracing::warn!("refused a peer connection from {from}: {why}");
            refuse(&stream, why.clone());
            return Err(why);
        }
        let peer = hello.node_id;
        write_frame(
            &stream,
            &PeerFrame {
                body: Some(Body::Hello(self.hello(&hello.nonce, vec![]))),
            },
        )?;
        if !hello.addr.is_empty() && !self.addrs.read().contains_key(&peer) {
            self.addrs.write().insert(peer, hello.addr.clone());
        }
        stream.socket().set_read_timeout(Some(IDLE_TIMEOUT)).ok();
        let _close = Closer(stream.clone());
        loop {
            let frame = read_frame(&mut r)?;
            let Some(handler) = self.handler.get() else {
                continue; // still starting: the peer will retry
            };
            match frame.body {
                Some(Body::Raft(bytes)) => {
                    match <raft::eraftpb::Message as prost011::Message>::decode(&bytes[..]) {
                        Ok(msg) => handler.raft_message(msg),
                        Err(e) => return Err(format!("node {peer} sent a bad Raft message: {e}")),
                    }
                }
                Some(Body::Request(req)) => {
                    let quick = matches!(
                        req.kind,
                        Some(Kind::FetchChunk(_) | Kind::StoreChunks(_) | Kind::SnapshotPiece(_))
                    );
                    let answer = move |handler: &Arc<dyn Handler>, stream: &TlsStream| {
                        let resp = match req.kind {
                            Some(kind) => match handler.request(peer, kind) {
                                Ok(data) => PeerResponse {
                                    id: req.id,
                                    error: String::new(),
                                    data,
                                },
                                Err(error) => PeerResponse {
                                    id: req.id,
                                    error,
                                    data: vec![],
                                },
                            },
                            None => PeerResponse {
                                id: req.id,
                                error: UNKNOWN_REQUEST.into(),
                                data: vec![],
                            },
                        };
                        let _ = write_frame(
                            stream,
                            &PeerFrame {
                                body: Some(Body::Response(resp)),
                            },
                        );
                    };
                    if quick {
                        // Local reads and writes: answered in line, saving a
                        // thread hop on every close() and chunk fetch.
                        answer(handler, &stream);
                    } else {
                        let (handler, stream) = (handler.clone(), stream.clone());
                        let _ = std::thread::Builder::new()
                            .name("peer-request".into())
                            .spawn(move || answer(&handler, &stream));
                    }
                }
                _ => return Err(format!("node {peer} sent an unexpected frame")),
            }
        }
    }
}

/// Requests in flight to several peers (`Transport::ask_all`).
pub struct Calls {
    asked: Vec<(Arc<Link>, u64)>,
    answers: Receiver<PeerResponse>,
}

impl Calls {
    /// How many peers answered without error: returns as soon as `enough`
    /// did, or all answered, or `timeout` passed.
    pub fn wait(self, enough: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let (mut answered, mut ok) = (0, 0);
        while ok < enough && answered < self.asked.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(r) = self.answers.recv_timeout(left) else {
                break; // timed out, or every link dropped its call
            };
            answered += 1;
            if r.error.is_empty() {
                ok += 1;
            } else {
                tracing::debug!("a peer refused a request: {}", r.error);
            }
        }
        ok
    }
}

impl Drop for Calls {
    fn drop(&mut self) {
        for (link, id) in &self.asked {
            link.pending.lock().remove(id);
        }
    }
}

struct Link {
    addr: String,
    /// Wakes the link's thread: to dial at once, or to write the backlog.
    wake: Sender<()>,
    /// The connection, while there is one.
    stream: Mutex<Option<Arc<TlsStream>>>,
    pending: Mutex<HashMap<u64, Sender<PeerResponse>>>,
    last_error: Mutex<Option<String>>,
    version: Mutex<Option<String>>,
    protocol: AtomicU32,
    /// When a caller last asked for the link (`Inner::link`).
    used: Mutex<Instant>,
}

impl Link {
    fn stream(&self) -> Option<Arc<TlsStream>> {
        self.stream.lock().clone()
    }

    fn unreachable(&self) -> String {
        format!(
            "{} is unreachable: {}",
            self.addr,
            self.last_error.lock().clone().unwrap_or_default()
        )
    }

    /// The connection, waiting for the link to (re)connect until `deadline`.
    fn connected_by(&self, deadline: Instant) -> Option<Arc<TlsStream>> {
        loop {
            if let Some(stream) = self.stream() {
                return Some(stream);
            }
            if Instant::now() >= deadline {
                return None;
            }
            self.wake();
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Puts a whole frame on `stream` without blocking the caller.
    fn send(&self, stream: &TlsStream, frame: &[u8]) -> Result<(), String> {
        match stream.send_now(frame) {
            Ok(Sent::Done) => Ok(()),
            Ok(Sent::Queued) => {
                self.wake(); // the link's thread writes the rest
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(e.to_string()),
            Err(e) => {
                stream.shutdown(); // its threads notice and reconnect
                Err(e.to_string())
            }
        }
    }

    /// Cuts the reconnect delay short, or has the backlog written.
    fn wake(&self) {
        let _ = self.wake.send(());
    }
}

/// Closes an inbound connection when its reader ends, however it ends.
struct Closer(Arc<TlsStream>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

/// A TLS failure while joining means the other side is not of our cluster
/// (or we are not of its): say so, so a joining node stops retrying.
fn tls_refusal(error: &str) -> String {
    if error.contains("certificate") || error.contains("alert") {
        format!("{REFUSED} ({error})")
    } else {
        error.to_string()
    }
}

fn random_nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    rand::fill(&mut n);
    n
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Answers a dialer's hello with a refusal: node id 0, and why.
fn refuse(stream: &TlsStream, refused: String) {
    let hello = Hello {
        refused,
        ..Hello::default()
    };
    let _ = write_frame(
        stream,
        &PeerFrame {
            body: Some(Body::Hello(hello)),
        },
    );
}

/// The peer protocol a hello names; one sent before versions were
/// exchanged has none and spoke protocol 1.
fn protocol_of(hello: &Hello) -> u32 {
    hello.protocol.max(1)
}

fn version_of(hello: &Hello) -> String {
    let release = if hello.version.is_empty() {
        "?"
    } else {
        &hello.version
    };
    format!("{release} (protocol {})", protocol_of(hello))
}

/// Why this build, which talks to protocol `min` and newer, cannot talk
/// to the sender of `hello`, if it cannot.
fn incompatible(hello: &Hello, min: u32) -> Option<String> {
    let theirs = protocol_of(hello);
    (theirs < min).then(|| {
        format!(
            "node {} runs wpfs {}, this node runs wpfs {VERSION} (protocol {PROTOCOL}, which talks \
             to protocol {min} and newer): upgrade node {} to a release this close",
            hello.node_id,
            version_of(hello),
            hello.node_id
        )
    })
}

/// With `WPFS_WIRE_UNKNOWN_FIELD=1` every frame this process sends also
/// carries a field no release knows (number 2047, 16 bytes): the upgrade
/// test runs one node so, standing in for a newer release whose messages
/// grew a field, and checks the others still replicate with it.
fn unknown_field() -> &'static [u8] {
    static FIELD: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    FIELD.get_or_init(|| {
        if std::env::var_os("WPFS_WIRE_UNKNOWN_FIELD").is_none() {
            return vec![];
        }
        let mut field = vec![];
        prost::encoding::bytes::encode(2047, &b"from a newer wpfs".to_vec(), &mut field);
        field
    })
}

/// A frame as it goes on the wire: its length, then its bytes, encoded
/// in place (a frame can hold a 4 MiB chunk: no second copy).
fn framed(frame: &PeerFrame) -> Vec<u8> {
    let extra = unknown_field();
    let len = frame.encoded_len() + extra.len();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    frame.encode(&mut out).expect("a Vec grows to any frame");
    out.extend_from_slice(extra);
    out
}

/// Writes a whole frame, blocking until it is on its way.
fn write_frame(stream: &TlsStream, frame: &PeerFrame) -> Result<(), String> {
    stream.write_all(&framed(frame)).map_err(|e| e.to_string())
}

fn read_frame(r: &mut impl Read) -> Result<PeerFrame, String> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(|e| e.to_string())?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(format!(
            "frame of {len} bytes is over the limit: not a wpfs peer"
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).map_err(|e| e.to_string())?;
    PeerFrame::decode(&buf[..]).map_err(|e| format!("garbage instead of a frame: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hello_without_a_protocol_is_protocol_1_and_an_older_one_is_refused_by_name() {
        let old = Hello {
            node_id: 4,
            ..Hello::default()
        };
        assert_eq!(protocol_of(&old), 1);
        assert_eq!(version_of(&old), "? (protocol 1)");
        assert!(incompatible(&old, MIN_PROTOCOL).is_none());
        let why = incompatible(&old, 2).expect("protocol 1 is older than 2");
        for part in [
            "node 4 runs wpfs ? (protocol 1)",
            VERSION,
            "protocol 2 and newer",
        ] {
            assert!(why.contains(part), "{part:?} not in {why:?}");
        }
        let current = Hello {
            protocol: PROTOCOL,
            version: VERSION.into(),
            ..old
        };
        assert_eq!(version_of(&current), this_version());
    }

    #[test]
    fn a_frame_with_a_field_this_build_does_not_know_decodes_to_what_it_knows() {
        let frame = PeerFrame {
            body: Some(Body::Raft(b"a raft message".to_vec())),
        };
        let mut bytes = frame.encode_to_vec();
        prost::encoding::bytes::encode(2047, &b"newer".to_vec(), &mut bytes);
        let mut framed = (bytes.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        assert_eq!(read_frame(&mut &framed[..]).unwrap(), frame);
    }
}
