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
//! - [`TrustedProxies`] is pure: given the peer address and the request's headers it names the
//!   client. The forwarding header is believed only when the peer is a listed proxy, and then
//!   the client is the right-most address in it that is not itself a listed proxy, so a client
//!   cannot put an address of its choosing in front of the chain. Without a listed proxy the
//!   header is ignored.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::http::{HeaderMap, HeaderName};
use axum::serve::{IncomingStream, Listener};
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

/// Connections ready for axum: accepted and, for HTTPS, past their handshake.
pub struct Incoming {
    rx: mpsc::Receiver<(Io, SocketAddr)>,
    local: SocketAddr,
}

/// The peer's socket address, as axum's connect info.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl Connected<IncomingStream<'_, Incoming>> for Peer {
    fn connect_info(stream: IncomingStream<'_, Incoming>) -> Self {
        Peer(*stream.remote_addr())
    }
}

impl Listener for Incoming {
    type Io = Io;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Io, SocketAddr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept loop has stopped (shutdown): accept nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Bind `addr` and start accepting; with `tls`, every connection is a TLS one. Stops at `cancel`.
pub async fn bind(
    addr: SocketAddr,
    tls: Option<rustls::ServerConfig>,
    cancel: CancellationToken,
) -> Result<Incoming, ListenError> {
    let listener = TcpListener::bind(addr).await.map_err(|source| ListenError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(|source| ListenError::Bind { addr, source })?;
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tls.map(|c| TlsAcceptor::from(Arc::new(c)));
    tokio::spawn(accept_loop(listener, acceptor, tx, cancel));
    Ok(Incoming { rx, local })
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    tx: mpsc::Sender<(Io, SocketAddr)>,
    cancel: CancellationToken,
) {
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
        let _ = tcp.set_nodelay(true);
        match &acceptor {
            None => {
                if tx.send((Either::Left(tcp), peer)).await.is_err() {
                    return;
                }
            }
            Some(acceptor) => {
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((Either::Right(tls), peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "tls handshake failed"),
                        Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                    }
                });
            }
        }
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
