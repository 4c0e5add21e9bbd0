//! The one listener of the API (HTTP JSON and gRPC): plain TCP, or TLS (rustls) when a
//! certificate is given. Connections are accepted and their TLS handshakes done in the
//! background, so a slow client never holds up the others; each gets TCP_NODELAY, because
//! small messages (assignments, acks) must not wait for Nagle's algorithm.
//!
//! Connections cost a file descriptor and memory before anyone is authenticated, so they
//! are bounded: at most [`max_connections`] at once (from the file limit, which the binary
//! raises at start), a connection must send its first byte within [`FIRST_BYTE`] and an
//! HTTP/1 request its headers within [`HEADER_READ`], and HTTP/2 connections answer pings
//! or are closed. Authenticated long-lived streams (workers, followers) are not cut.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

/// A connection, plain or TLS.
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// The peer of a request (`ConnectInfo<PeerAddr>`).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// How long a new connection may stay silent before its first byte.
pub const FIRST_BYTE: Duration = Duration::from_secs(10);
/// How long an HTTP/1 request may take to send its headers.
pub const HEADER_READ: Duration = Duration::from_secs(10);
/// HTTP/2 pings: a connection that does not answer one within this is closed.
const H2_KEEPALIVE: Duration = Duration::from_secs(20);
/// Descriptors kept for everything but API connections (the database, log files, workers
/// started by providers, …).
const RESERVED_FDS: u64 = 256;

/// Connections served at once: the soft file limit less what the rest of the process needs.
pub fn max_connections() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct it is given.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    };
    soft.saturating_sub(RESERVED_FDS).clamp(64, 1 << 20) as usize
}

/// Raises the soft limit on open files to the hard one (the default soft limit, 1,024, is
/// a few hundred idle connections away from refusing everything). Returns the new limit.
pub fn raise_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    limit.rlim_cur
}

/// A connection holding its place among [`max_connections`]: the place is given back when
/// the connection is dropped.
struct Limited<C> {
    conn: C,
    _place: OwnedSemaphorePermit,
}

impl<C: AsyncRead + Unpin> AsyncRead for Limited<C> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.conn).poll_read(cx, buf)
    }
}

impl<C: AsyncWrite + Unpin> AsyncWrite for Limited<C> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.conn).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.conn).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.conn).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.conn).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.conn.is_write_vectored()
    }
}

/// Serves `app` on every connection of `listener` until `shutdown` resolves, then lets the
/// open connections finish what they are doing (their streams are closed by the caller).
pub async fn serve(
    mut listener: ApiListener,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use tower::ServiceExt;
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(H2_KEEPALIVE))
        .keep_alive_timeout(H2_KEEPALIVE)
        .enable_connect_protocol();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (io, peer) = tokio::select! {
            conn = axum::serve::Listener::accept(&mut listener) => conn,
            _ = &mut shutdown => break,
        };
        let service =
            app.clone()
                .map_request(move |req: axum::http::Request<hyper::body::Incoming>| {
                    let mut req = req.map(axum::body::Body::new);
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(PeerAddr(peer)));
                    req
                });
        let service = hyper_util::service::TowerToHyperService::new(service);
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!(peer = %peer, error = %e, "connection ended");
            }
        });
    }
    graceful.shutdown().await;
}

pub struct ApiListener {
    local: SocketAddr,
    incoming: mpsc::Receiver<(Box<dyn Conn>, SocketAddr)>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Drop for ApiListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path} holds no certificate")]
    NoCertificate { path: String },
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A TLS configuration from PEM files (a certificate chain and its private key), offering
/// HTTP/2 (gRPC) and HTTP/1.1.
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let read_err = |path: &Path, e: rustls_pki_types::pem::Error| TlsError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| read_err(cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_err(cert, e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.display().to_string(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| read_err(key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

impl ApiListener {
    pub fn new(tcp: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, incoming) = mpsc::channel::<(Box<dyn Conn>, SocketAddr)>(1024);
        let acceptor = tls.map(TlsAcceptor::from);
        let places = Arc::new(Semaphore::new(max_connections()));
        let accepting = tokio::spawn(async move {
            loop {
                // At the limit, wait for a connection to end; the kernel's backlog holds
                // the callers meanwhile.
                let Ok(place) = places.clone().acquire_owned().await else {
                    return;
                };
                let (stream, peer) = match tcp.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little, go on.
                        tracing::warn!(error = %e, "cannot accept a connection");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                // Off the accept loop: a silent caller holds up nobody.
                tokio::spawn(async move {
                    let mut first = [0u8; 1];
                    match tokio::time::timeout(FIRST_BYTE, stream.peek(&mut first)).await {
                        Ok(Ok(n)) if n > 0 => {}
                        _ => {
                            tracing::debug!(peer = %peer, "connection closed: nothing sent");
                            return;
                        }
                    }
                    match acceptor {
                        None => {
                            let conn = Limited {
                                conn: stream,
                                _place: place,
                            };
                            let _ = tx.send((Box::new(conn), peer)).await;
                        }
                        Some(acceptor) => {
                            match tokio::time::timeout(FIRST_BYTE, acceptor.accept(stream)).await {
                                Ok(Ok(tls)) => {
                                    let conn = Limited {
                                        conn: tls,
                                        _place: place,
                                    };
                                    let _ = tx.send((Box::new(conn), peer)).await;
                                }
                                Ok(Err(e)) => {
                                    tracing::debug!(peer = %peer, error = %e, "TLS handshake failed")
                                }
                                Err(_) => tracing::debug!(peer = %peer, "TLS handshake timed out"),
                            }
                        }
                    }
                });
            }
        });
        Ok(Self {
            local,
            incoming,
            accepting,
        })
    }
}

impl axum::serve::Listener for ApiListener {
    type Io = Box<dyn Conn>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(conn) => conn,
            // The accept loop ended (only when this listener is dropped): wait forever.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
