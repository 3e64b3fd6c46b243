//! TLS with mutual authentication between the nodes of one cluster.
//!
//! The cluster CA is derived from the cluster secret: its Ed25519 key is
//! `derive_key("wpfs cluster CA v1", secret)`, and its certificate is built
//! from fixed parameters, so every node that holds the secret (from `wpfs
//! init` or the join token) rebuilds the same CA without a file to copy or
//! lose. Each node makes a fresh key and a certificate signed by that CA at
//! every start; a peer's certificate is accepted only if the cluster CA
//! signed it, in both directions (TLS 1.3, rustls on ring). A node with a
//! wrong secret fails the handshake and is logged by the node it called.
//!
//! `TlsStream` lets one thread read while others write the same connection:
//! rustls' state is under a lock that is never held while blocking on the
//! socket. Writers never block either (`send_now`): what the socket does
//! not take at once waits, in order, in a backlog that the link's own
//! thread writes out (`flush`). So the Raft driver can put its messages on
//! the wire itself, without a hand-off to another thread per message, and
//! a peer that stops reading (frozen, or its network cut) fills a bounded
//! backlog and is then reported unreachable instead of stalling the sender.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use parking_lot::Mutex;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ED25519,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection,
};

/// The name every node certificate carries and every dialer expects: the
/// CA, not the name, is what identifies a member.
const PEER_NAME: &str = "peer.wpfs.invalid";

/// The TLS settings of this node, both as a server and as a client.
#[derive(Clone)]
pub struct PeerTls {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl PeerTls {
    pub fn new(cluster_id: &str, secret: &str, node_id: u64) -> Result<PeerTls, String> {
        let tls_err = |e: &dyn std::fmt::Display| format!("setting up TLS: {e}");
        let seed = blake3::derive_key("wpfs cluster CA v1", secret.as_bytes());
        let ca_key = KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(ed25519_pkcs8(&seed)),
            &PKCS_ED25519,
        )
        .map_err(|e| tls_err(&e))?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(|e| tls_err(&e))?;
        ca.distinguished_name
            .push(DnType::CommonName, format!("wpfs cluster {cluster_id}"));
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca.serial_number = Some(1u64.into());
        let ca_cert = ca.self_signed(&ca_key).map_err(|e| tls_err(&e))?;
        let issuer = Issuer::new(ca, &ca_key);

        let node_key = KeyPair::generate_for(&PKCS_ED25519).map_err(|e| tls_err(&e))?;
        let mut node =
            CertificateParams::new(vec![PEER_NAME.to_string()]).map_err(|e| tls_err(&e))?;
        node.distinguished_name
            .push(DnType::CommonName, format!("wpfs node {node_id}"));
        node.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let node_cert = node
            .signed_by(&node_key, &issuer)
            .map_err(|e| tls_err(&e))?;

        let mut roots = RootCertStore::empty();
        roots.add(ca_cert.der().clone()).map_err(|e| tls_err(&e))?;
        let roots = Arc::new(roots);
        let chain: Vec<CertificateDer<'static>> = vec![node_cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(node_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| tls_err(&e))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err(&e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| tls_err(&e))?;
        server.send_tls13_tickets = 0;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err(&e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| tls_err(&e))?;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(PeerTls {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// Runs the client handshake on a connected socket.
    pub fn connect(&self, sock: TcpStream) -> io::Result<Arc<TlsStream>> {
        let name = ServerName::try_from(PEER_NAME).expect("a valid DNS name");
        let conn = ClientConnection::new(self.client.clone(), name).map_err(io::Error::other)?;
        TlsStream::handshake(sock, conn.into())
    }

    /// Runs the server handshake on an accepted socket.
    pub fn accept(&self, sock: TcpStream) -> io::Result<Arc<TlsStream>> {
        let conn = ServerConnection::new(self.server.clone()).map_err(io::Error::other)?;
        TlsStream::handshake(sock, conn.into())
    }
}

/// An Ed25519 private key as PKCS#8 v1 DER (RFC 8410): a fixed prefix and
/// the 32-byte seed.
fn ed25519_pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(seed);
    der
}

/// Encrypted bytes a peer has not taken yet, beyond which `send_now`
/// refuses more: it is not reading.
const BACKLOG_LIMIT: usize = 32 << 20;

/// One TLS connection, readable and writable from different threads.
pub struct TlsStream {
    sock: TcpStream,
    state: Mutex<TlsState>,
    /// Held while bytes are encrypted and handed to the socket, so records
    /// stay in order on the wire. Lock order: `out`, then `state`.
    out: Mutex<Outbox>,
}

/// Encrypted bytes that the socket would not take without blocking.
#[derive(Default)]
struct Outbox {
    backlog: Vec<u8>,
    /// A `flush` is writing (part of) the backlog out right now.
    flushing: bool,
}

/// Where the bytes given to `send_now` are.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// All handed to the kernel.
    Done,
    /// Some wait in the backlog: `flush` must run.
    Queued,
}

struct TlsState {
    conn: Connection,
    /// Encrypted bytes read from the socket that rustls has not taken yet.
    received: Vec<u8>,
}

impl TlsStream {
    fn handshake(mut sock: TcpStream, mut conn: Connection) -> io::Result<Arc<TlsStream>> {
        conn.set_buffer_limit(None);
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        while conn.wants_write() {
            conn.write_tls(&mut sock)?;
        }
        Ok(Arc::new(TlsStream {
            sock,
            state: Mutex::new(TlsState {
                conn,
                received: Vec::new(),
            }),
            out: Mutex::new(Outbox::default()),
        }))
    }

    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    pub fn shutdown(&self) {
        let _ = self.sock.shutdown(Shutdown::Both);
    }

    /// Encrypted bytes waiting to go out, taken from rustls.
    fn pending(conn: &mut Connection) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out)?;
        }
        Ok(out)
    }

    fn read_plain(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let reply;
            {
                let mut st = self.state.lock();
                let st = &mut *st;
                // Decrypt what has arrived, as far as rustls takes it.
                while !st.received.is_empty() && st.conn.wants_read() {
                    let taken = st.conn.read_tls(&mut &st.received[..])?;
                    st.received.drain(..taken);
                    st.conn.process_new_packets().map_err(io::Error::other)?;
                    if taken == 0 {
                        break;
                    }
                }
                match st.conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                // Rare replies of TLS itself (alerts, key updates).
                reply = st.conn.wants_write();
            }
            if reply {
                self.write_all(&[])?;
            }
            // Wait for the socket without holding the lock: writers go on.
            let mut raw = [0u8; 16 * 1024];
            let n = (&self.sock).read(&mut raw)?;
            if n == 0 {
                return Ok(0);
            }
            self.state.lock().received.extend_from_slice(&raw[..n]);
        }
    }

    /// Encrypts `plain` and hands the kernel what it takes without
    /// blocking; the rest waits for `flush`. Refuses (`WouldBlock`) while
    /// the backlog is over its limit: the peer is not reading.
    pub fn send_now(&self, plain: &[u8]) -> io::Result<Sent> {
        let mut out = self.out.lock();
        if out.backlog.len() > BACKLOG_LIMIT {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "the peer is not reading (send backlog full)",
            ));
        }
        let bytes = {
            let mut st = self.state.lock();
            st.conn.writer().write_all(plain)?;
            Self::pending(&mut st.conn)?
        };
        if out.flushing || !out.backlog.is_empty() {
            out.backlog.extend_from_slice(&bytes);
            return Ok(Sent::Queued);
        }
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            // SAFETY: a valid socket and a valid buffer of that length.
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
        if rest.is_empty() {
            return Ok(Sent::Done);
        }
        out.backlog.extend_from_slice(rest);
        Ok(Sent::Queued)
    }

    /// Writes the backlog out, blocking; returns at once if another thread
    /// is doing it (that one writes what is queued meanwhile too).
    pub fn flush(&self) -> io::Result<()> {
        let mut out = self.out.lock();
        if out.flushing {
            return Ok(());
        }
        loop {
            if out.backlog.is_empty() {
                out.flushing = false;
                return Ok(());
            }
            let bytes = std::mem::take(&mut out.backlog);
            out.flushing = true;
            drop(out);
            let written = (&self.sock).write_all(&bytes);
            out = self.out.lock();
            if let Err(e) = written {
                out.flushing = false;
                return Err(e);
            }
        }
    }

    /// Sends `plain`, blocking until it is on the wire (or another thread
    /// is writing the backlog that holds it).
    pub fn write_all(&self, plain: &[u8]) -> io::Result<()> {
        if self.send_now(plain)? == Sent::Queued {
            self.flush()?;
        }
        Ok(())
    }
}

/// A handle on a shared `TlsStream` for `BufReader`/`BufWriter`.
#[derive(Clone)]
pub struct TlsHalf(pub Arc<TlsStream>);

impl Read for TlsHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read_plain(buf)
    }
}

impl Write for TlsHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(buf).map(|_| buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Connects a client made from `client_secret` to a server made from
    /// "s3cret"; returns what the client read back after writing "ping".
    fn exchange(client_secret: &str) -> io::Result<Vec<u8>> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let server = std::thread::spawn(move || -> io::Result<()> {
            let (sock, _) = listener.accept()?;
            let tls = PeerTls::new("c1", "s3cret", 1).unwrap().accept(sock)?;
            let mut buf = [0u8; 4];
            TlsHalf(tls.clone()).read_exact(&mut buf)?;
            TlsHalf(tls).write_all(b"pong")
        });
        let sock = TcpStream::connect(addr)?;
        sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        let result = (|| {
            let tls = PeerTls::new("c1", client_secret, 2)
                .unwrap()
                .connect(sock)?;
            TlsHalf(tls.clone()).write_all(b"ping")?;
            let mut buf = vec![0u8; 4];
            TlsHalf(tls).read_exact(&mut buf)?;
            Ok(buf)
        })();
        let _ = server.join();
        result
    }

    #[test]
    fn nodes_with_the_same_secret_talk_and_others_are_refused() {
        assert_eq!(exchange("s3cret").unwrap(), b"pong");
        let err = exchange("wrong").expect_err("a wrong secret must fail the handshake");
        assert!(err.to_string().contains("certificate"), "{err}");
    }
}
