//! Serving the admin endpoint (`admin` decides the answers): HTTP/1
//! through hyper, on a tokio runtime of one thread of its own, so that
//! a thousand idle or slow clients cost a task each, not a thread.
//!
//! Every connection is bounded: its request head must arrive within
//! `HEAD_WAIT` and fit in `MAX_HEAD` bytes (else hyper answers 408 or
//! 431, or 400 for what is not HTTP, and closes), the connection ends
//! after one answer, and none lives past `CONNECTION_LIMIT` however
//! slowly the client reads. At most `MAX_CONNECTIONS` are served at once;
//! later ones wait in the listen queue.
//!
//! Answers are computed on tokio's blocking pool: a status that reads the
//! store, or a membership change that waits for Raft, must not hold up a
//! load balancer's health check.
//!
//! The Raft driver, the peer transport and the FUSE threads stay plain
//! threads (docs/design.md, "Threads and tokio").

use std::convert::Infallible;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::admin::{AdminState, Caller, Reply};

/// How long a client may take to send its request head.
const HEAD_WAIT: Duration = Duration::from_secs(5);
/// The largest request head read (hyper's smallest allowed buffer is 8 KiB).
const MAX_HEAD: usize = 16 * 1024;
/// No connection lives longer, answer included: a membership change
/// waits up to a minute for Raft.
const CONNECTION_LIMIT: Duration = Duration::from_secs(120);
/// Connections served at once on one listener.
const MAX_CONNECTIONS: usize = 1024;
/// Threads computing answers at once.
const ANSWER_THREADS: usize = 4;
/// How long `request` waits for the daemon's answer.
const ANSWER_WAIT: Duration = Duration::from_secs(60);

/// Binds the Unix socket and, when given, the TCP address, then serves
/// them on a thread of their own. Errors are binding errors.
pub fn serve(state: Arc<AdminState>, socket: &Path, tcp: Option<&str>) -> Result<(), String> {
    let _ = std::fs::remove_file(socket); // left by a killed daemon
    let unix = std::os::unix::net::UnixListener::bind(socket)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
    let tcp = tcp
        .map(|addr| {
            std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|e| {
                    format!(
                        "cannot listen on admin address {addr}: {e} (is another node using it?)"
                    )
                })
        })
        .transpose()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(ANSWER_THREADS)
        .thread_name("admin-answer")
        .build()
        .map_err(|e| format!("cannot start the admin endpoint: {e}"))?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                let unix = match UnixListener::from_std(unix) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!("admin endpoint: {e}"),
                };
                let local = tokio::spawn(accept(unix, state.clone(), Caller::Local));
                if let Some(tcp) = tcp {
                    match TcpListener::from_std(tcp) {
                        Ok(tcp) => accept(tcp, state, Caller::Network).await,
                        Err(e) => tracing::error!("admin address: {e}"),
                    }
                }
                let _ = local.await;
            })
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the admin endpoint: {e}"))
}

/// A listener of either kind.
trait Listener: Send + Sync + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn next_client(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    async fn next_client(&self) -> std::io::Result<UnixStream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    async fn next_client(&self) -> std::io::Result<TcpStream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

async fn accept<L: Listener>(listener: L, state: Arc<AdminState>, from: Caller) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return; // the semaphore is never closed
        };
        match listener.next_client().await {
            Ok(stream) => {
                let state = state.clone();
                tokio::spawn(async move {
                    connection(stream, state, from).await;
                    drop(permit);
                });
            }
            Err(e) => accept_failed(e).await,
        }
    }
}

/// Out of file descriptors, say: do not spin on it.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!("admin endpoint: accepting a connection failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn connection<S>(stream: S, state: Arc<AdminState>, from: Caller)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| answer(state.clone(), from, req));
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_WAIT)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_LIMIT, served).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!("admin endpoint: a client's connection failed: {e}"),
        Err(_) => tracing::debug!("admin endpoint: closed a connection after {CONNECTION_LIMIT:?}"),
    }
}

async fn answer(
    state: Arc<AdminState>,
    from: Caller,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    let reply = tokio::task::spawn_blocking(move || state.answer(&method, &path, from))
        .await
        .unwrap_or_else(|e| {
            tracing::error!("admin endpoint: an answer failed: {e}");
            Reply::text(500, "the answer failed: see the node's log\n".into())
        });
    let mut response = Response::new(Full::new(Bytes::from(reply.body)));
    *response.status_mut() = hyper::StatusCode::from_u16(reply.status)
        .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(reply.content_type),
    );
    Ok(response)
}

/// Asks a running daemon through its socket: `GET path`.
pub fn query(socket: &Path, path: &str) -> Option<String> {
    request(socket, "GET", path).map(|(_, body)| body)
}

/// Sends `method path` to a running daemon: its HTTP status and body, or
/// None when no daemon answers (in `ANSWER_WAIT`).
pub fn request(socket: &Path, method: &str, path: &str) -> Option<(u16, String)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    runtime.block_on(async {
        tokio::time::timeout(ANSWER_WAIT, ask(socket, method, path))
            .await
            .ok()?
    })
}

async fn ask(socket: &Path, method: &str, path: &str) -> Option<(u16, String)> {
    let stream = UnixStream::connect(socket).await.ok()?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(connection);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, "wpfs")
        .body(Empty::<Bytes>::new())
        .ok()?;
    let response = sender.send_request(req).await.ok()?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}
