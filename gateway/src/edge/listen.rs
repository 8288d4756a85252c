//! The HTTP listener: plain HTTP or HTTPS served by the gateway itself, and who the client is
//! when a reverse proxy sits in front.
//!
//! ## Design
//! - One accept loop for both modes. It owns the `TcpListener`, hands each connection to axum
//!   through a channel, and for HTTPS runs every TLS handshake in its own task with a deadline
//!   ([`HANDSHAKE_TIMEOUT`]): a client that opens a connection and says nothing, or speaks
//!   slowly, never stalls the others. A failed handshake (plain HTTP on the TLS port, a client
//!   that does not trust the certificate) is logged at debug level and dropped.
//! - The certificate and key are read once at start; a key file others can read is refused,
//!   as for the broker credentials.
//! - **Nobody can hold the listener.** Every connection counts against a limit per address
//!   (`max_connections_per_address`; not for a listed proxy, through which everyone comes) and
//!   a total (`max_connections`): beyond them it is closed at once, before it costs a file
//!   descriptor for long. Each connection has a deadline for its request headers
//!   (`header_read_timeout_ms`, so a slowloris client is dropped), an idle deadline
//!   (`idle_timeout_s`: no byte either way), and each request a deadline for its whole handling
//!   (`request_timeout_s`, the live stream excepted) — [`serve`]. At start the process raises its
//!   own open-files limit to the hard one.
//! - [`TrustedProxies`] is pure: given the peer address and the request's headers it names the
//!   client. The forwarding header is believed only when the peer is a listed proxy, and then
//!   the client is the right-most address in it that is not itself a listed proxy, so a client
//!   cannot put an address of its choosing in front of the chain. Without a listed proxy the
//!   header is ignored.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

/// How long a client has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the listener cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The certificate or key file.
    #[error("{file}: {why}")]
    File {
        /// The file.
        file: String,
        /// Why.
        why: String,
    },
    /// Binding the address.
    #[error("http.bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

fn file_error(path: &Path, why: impl std::fmt::Display) -> ListenError {
    ListenError::File { file: path.display().to_string(), why: why.to_string() }
}

/// A TLS server config from PEM files: the certificate chain (leaf first) and its key, which
/// must be readable by its owner only.
pub fn tls_config(cert_file: &Path, key_file: &Path) -> Result<rustls::ServerConfig, ListenError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(key_file).map_err(|e| file_error(key_file, e))?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(file_error(key_file, "readable by group or others; chmod 600 it"));
    }
    let certs = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| file_error(cert_file, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(cert_file, e))?;
    if certs.is_empty() {
        return Err(file_error(cert_file, "no certificate in it (expected PEM)"));
    }
    let key =
        PrivateKeyDer::from_pem_file(key_file).map_err(|e| file_error(key_file, format!("no private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| file_error(cert_file, e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| file_error(cert_file, format!("certificate and key do not go together: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A connection: plain TCP or TLS over TCP.
pub type Io = Either<TcpStream, TlsStream<TcpStream>>;

/// Limits on the listener's connections and their requests (from `[http]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections at once.
    pub max_connections: usize,
    /// Connections at once from one address (a listed proxy is not limited).
    pub max_per_address: usize,
    /// A connection's request headers must arrive within this.
    pub header_read: Duration,
    /// A connection with no byte either way for this long is closed.
    pub idle: Duration,
    /// A request must be handled within this (the live stream excepted).
    pub request: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 512,
            max_per_address: 64,
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            request: Duration::from_secs(30),
        }
    }
}

/// Connections counted per address and in all, released when dropped.
#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_address: std::collections::HashMap<IpAddr, usize>,
}

/// A connection's place in the counts; freed when the connection ends.
pub struct Slot {
    counts: Arc<std::sync::Mutex<Counts>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_address.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.by_address.remove(&self.ip);
            }
        }
    }
}

/// Connections ready for the server: accepted and, for HTTPS, past their handshake.
pub struct Incoming {
    rx: mpsc::Receiver<(Io, SocketAddr, Slot)>,
    local: SocketAddr,
    limits: Limits,
}

/// The peer's socket address, as axum's connect info.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl Incoming {
    /// The address it listens on.
    pub fn local(&self) -> SocketAddr {
        self.local
    }
}

/// Bind `addr` and start accepting; with `tls`, every connection is a TLS one. Stops at
/// `cancel`. Connections beyond `limits` are closed at once (a listed proxy counts only
/// against the total).
pub async fn bind(
    addr: SocketAddr,
    tls: Option<rustls::ServerConfig>,
    limits: Limits,
    proxies: TrustedProxies,
    cancel: CancellationToken,
) -> Result<Incoming, ListenError> {
    let listener = TcpListener::bind(addr).await.map_err(|source| ListenError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(|source| ListenError::Bind { addr, source })?;
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tls.map(|c| TlsAcceptor::from(Arc::new(c)));
    tokio::spawn(accept_loop(listener, acceptor, tx, limits, proxies, cancel));
    Ok(Incoming { rx, local, limits })
}

/// Raise the process's open-files limit to its hard limit (a listener's connections are
/// file descriptors); returns the soft limit now in force.
pub fn raise_open_files() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(_) => soft,
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    tx: mpsc::Sender<(Io, SocketAddr, Slot)>,
    limits: Limits,
    proxies: TrustedProxies,
    cancel: CancellationToken,
) {
    let counts = Arc::new(std::sync::Mutex::new(Counts::default()));
    let mut refused: u64 = 0;
    loop {
        let (tcp, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: say so, back off, go on.
                    tracing::warn!(error = %e, "http accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Count it, or close it at once.
        let ip = peer.ip();
        let slot = {
            let mut c = counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let mine = c.by_address.get(&ip).copied().unwrap_or(0);
            let per_address = proxies.is_proxy(ip) || mine < limits.max_per_address;
            if c.total < limits.max_connections && per_address {
                c.total += 1;
                *c.by_address.entry(ip).or_default() += 1;
                Some(Slot { counts: counts.clone(), ip })
            } else {
                None
            }
        };
        let Some(slot) = slot else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(%peer, refused, "http connection refused: too many at once");
            }
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        match &acceptor {
            None => {
                if tx.send((Either::Left(tcp), peer, slot)).await.is_err() {
                    return;
                }
            }
            Some(acceptor) => {
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((Either::Right(tls), peer, slot)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "tls handshake failed"),
                        Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                    }
                });
            }
        }
    }
}

/// An I/O stream that fails when no byte has moved either way for its timeout: a client
/// that stops reading (so our writes pend) or stops sending is let go.
pub struct Idle<T> {
    inner: T,
    timeout: Duration,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl<T> Idle<T> {
    /// Wrap `inner`.
    pub fn new(inner: T, timeout: Duration) -> Idle<T> {
        Idle { inner, timeout, deadline: Box::pin(tokio::time::sleep(timeout)) }
    }

    fn moved(&mut self) {
        #[allow(clippy::disallowed_methods)] // a connection's idle deadline, on tokio's clock
        self.deadline.as_mut().reset(tokio::time::Instant::now() + self.timeout);
    }

    fn expired(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        use std::future::Future as _;
        self.deadline.as_mut().poll(cx).is_ready()
    }
}

fn idle_error() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "connection idle")
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Idle<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut self.inner).poll_read(cx, buf) {
            std::task::Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.moved();
                }
                std::task::Poll::Ready(Ok(()))
            }
            std::task::Poll::Pending if self.expired(cx) => std::task::Poll::Ready(Err(idle_error())),
            other => other,
        }
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Idle<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match std::pin::Pin::new(&mut self.inner).poll_write(cx, data) {
            std::task::Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.moved();
                }
                std::task::Poll::Ready(Ok(n))
            }
            std::task::Poll::Pending if self.expired(cx) => std::task::Poll::Ready(Err(idle_error())),
            other => other,
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match std::pin::Pin::new(&mut self.inner).poll_flush(cx) {
            std::task::Poll::Pending if self.expired(cx) => std::task::Poll::Ready(Err(idle_error())),
            other => other,
        }
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serve `router` on `incoming` until `cancel`: HTTP/1.1 with the header-read deadline, each
/// connection behind [`Idle`], each request under `limits.request` (except `/events`, the
/// live stream), the peer's address in the request as [`Peer`] connect info. Gives the
/// listener back when cancelled (a standby hands it to the service at takeover).
pub async fn serve(mut incoming: Incoming, router: axum::Router, cancel: CancellationToken) -> Incoming {
    use axum::extract::ConnectInfo;
    use tower::ServiceExt as _;
    let limits = incoming.limits;
    let request_limit = limits.request;
    let router = router.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| async move {
            if req.uri().path() == "/events" {
                return next.run(req).await;
            }
            match tokio::time::timeout(request_limit, next.run(req)).await {
                Ok(r) => r,
                Err(_) => {
                    use axum::response::IntoResponse as _;
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, "the request took too long\n").into_response()
                }
            }
        },
    ));
    loop {
        let (io, peer, slot) = tokio::select! {
            _ = cancel.cancelled() => return incoming,
            c = incoming.rx.recv() => match c {
                Some(c) => c,
                None => return incoming,
            },
        };
        let svc = router.clone().map_request(move |mut req: axum::extract::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(Peer(peer)));
            req
        });
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let io = hyper_util::rt::TokioIo::new(Idle::new(io, limits.idle));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read)
                .serve_connection(io, hyper_util::service::TowerToHyperService::new(svc));
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "http connection");
                    }
                }
                _ = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
        });
    }
}

/// Reverse proxies whose forwarding header is believed.
#[derive(Debug, Clone)]
pub struct TrustedProxies {
    nets: Vec<(IpAddr, u8)>,
    header: HeaderName,
}

impl Default for TrustedProxies {
    fn default() -> Self {
        TrustedProxies { nets: Vec::new(), header: HeaderName::from_static("x-forwarded-for") }
    }
}

/// An address or a network in CIDR notation (`10.0.0.0/8`, `::1`).
pub fn parse_net(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip.parse::<IpAddr>().ok()?, len.parse::<u8>().ok()?),
        None => {
            let ip = s.parse::<IpAddr>().ok()?;
            (ip, if ip.is_ipv4() { 32 } else { 128 })
        }
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((ip, len))
}

fn in_net(ip: IpAddr, (net, len): (IpAddr, u8)) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

impl TrustedProxies {
    /// From the config's `trusted_proxies` and `client_ip_header`; `Err` names what is wrong.
    pub fn new(nets: &[String], header: &str) -> Result<Self, String> {
        let nets = nets
            .iter()
            .map(|n| parse_net(n).ok_or_else(|| format!("`{n}` is not an address or a network like 10.0.0.0/8")))
            .collect::<Result<Vec<_>, _>>()?;
        let header = HeaderName::try_from(header).map_err(|_| format!("`{header}` is not a header name"))?;
        Ok(TrustedProxies { nets, header })
    }

    /// Whether any proxy is listed.
    pub fn any(&self) -> bool {
        !self.nets.is_empty()
    }

    /// Whether `ip` is a listed proxy.
    pub fn is_proxy(&self, ip: IpAddr) -> bool {
        self.trusted(ip)
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|&n| in_net(ip, n))
    }

    /// The client's address: the peer's, unless the peer is a listed proxy, in which case
    /// the right-most address in the forwarding header that is not a listed proxy.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusted(peer) {
            return peer;
        }
        let mut hops: Vec<IpAddr> = Vec::new();
        for value in headers.get_all(&self.header) {
            let Ok(text) = value.to_str() else { return peer };
            for hop in text.split(',') {
                match parse_hop(hop.trim()) {
                    Some(ip) => hops.push(ip),
                    // A hop we cannot read: nothing to its left can be believed.
                    None => hops.clear(),
                }
            }
        }
        let mut client = peer;
        for ip in hops.into_iter().rev() {
            client = ip;
            if !self.trusted(ip) {
                break;
            }
        }
        client
    }
}

/// One forwarded hop: an address, possibly with a port (`1.2.3.4:5678`, `[::1]:80`).
fn parse_hop(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    s.strip_prefix('[').and_then(|r| r.strip_suffix(']')).and_then(|r| r.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_match() {
        assert_eq!(parse_net("10.0.0.0/8"), Some((ip("10.0.0.0"), 8)));
        assert_eq!(parse_net("::1"), Some((ip("::1"), 128)));
        assert_eq!(parse_net("10.0.0.0/33"), None);
        assert_eq!(parse_net("proxy.local"), None);
        assert!(in_net(ip("10.200.3.4"), (ip("10.0.0.0"), 8)));
        assert!(!in_net(ip("11.0.0.1"), (ip("10.0.0.0"), 8)));
        assert!(in_net(ip("::ffff:10.1.2.3"), (ip("10.0.0.0"), 8)), "v4-mapped peers of a dual-stack socket");
        assert!(in_net(ip("192.0.2.9"), (ip("0.0.0.0"), 0)));
        assert!(in_net(ip("fd00::5"), (ip("fd00::"), 8)));
        assert!(!in_net(ip("fe80::5"), (ip("fd00::"), 8)));
    }

    #[test]
    fn the_header_is_believed_only_from_a_listed_proxy() {
        let none = TrustedProxies::default();
        assert_eq!(none.client(ip("127.0.0.1"), &headers(&["203.0.113.7"])), ip("127.0.0.1"));
        let t = TrustedProxies::new(&["127.0.0.1".into(), "10.0.0.0/8".into()], "X-Forwarded-For").unwrap();
        assert!(t.any());
        // From a stranger the header is ignored.
        assert_eq!(t.client(ip("198.51.100.1"), &headers(&["203.0.113.7"])), ip("198.51.100.1"));
        // From the proxy: the client it names.
        assert_eq!(t.client(ip("127.0.0.1"), &headers(&["203.0.113.7"])), ip("203.0.113.7"));
        // A chain of listed proxies is walked; a forged left-most entry is not believed.
        assert_eq!(t.client(ip("127.0.0.1"), &headers(&["6.6.6.6, 203.0.113.7, 10.1.1.1"])), ip("203.0.113.7"));
        assert_eq!(t.client(ip("127.0.0.1"), &headers(&["6.6.6.6", "203.0.113.7:4431"])), ip("203.0.113.7"));
        assert_eq!(t.client(ip("127.0.0.1"), &headers(&["[2001:db8::1]:443"])), ip("2001:db8::1"));
        // Missing, or nothing but proxies: the peer or the last proxy.
        assert_eq!(t.client(ip("127.0.0.1"), &HeaderMap::new()), ip("127.0.0.1"));
        assert_eq!(t.client(ip("127.0.0.1"), &headers(&["10.2.2.2"])), ip("10.2.2.2"));
        // Garbage after a real client: nothing left of the garbage is believed.
        assert_eq!(t.client(ip("127.0.0.1"), &headers(&["203.0.113.7, nonsense"])), ip("127.0.0.1"));
    }

    #[test]
    fn another_header_can_be_named() {
        let t = TrustedProxies::new(&["127.0.0.1".into()], "X-Real-IP").unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-real-ip", "203.0.113.9".parse().unwrap());
        h.insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
        assert_eq!(t.client(ip("127.0.0.1"), &h), ip("203.0.113.9"));
        assert!(TrustedProxies::new(&["10.0.0.0/99".into()], "X-Real-IP").unwrap_err().contains("10.0.0.0/99"));
        assert!(TrustedProxies::new(&[], "bad header").is_err());
    }
}
