//! TLS to PostgreSQL with rustls, the TLS stack the rest of the gateway uses.
//!
//! `[store] postgres_ca_file` names the CA that signed the database server's certificate. With
//! it every connection is TLS (`sslmode=require`: never a plain fallback) and the server's
//! certificate must chain to that CA and name the host the settings connect to — libpq's
//! `verify-full`. Without it the connection is plain, which the config allows only to a
//! database on loopback (or with `postgres_plain = true`, a decision for a private network).
//!
//! The `postgres` crate takes any [`MakeTlsConnect`]; this is a small one over `tokio-rustls`
//! (no channel binding: SCRAM without `-PLUS`).

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ::postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Makes a TLS connection per PostgreSQL connection, verifying the server against one CA.
#[derive(Clone)]
pub struct RustlsConnect(Arc<rustls::ClientConfig>);

impl RustlsConnect {
    /// Trusting only the CA certificates in `ca_file` (PEM).
    pub fn from_ca_file(ca_file: &Path) -> Result<RustlsConnect, String> {
        let pem = std::fs::read(ca_file).map_err(|e| format!("postgres_ca_file {}: {e}", ca_file.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        let mut n = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert =
                cert.map_err(|e| format!("postgres_ca_file {}: not PEM certificates ({e})", ca_file.display()))?;
            roots.add(cert).map_err(|e| format!("postgres_ca_file {}: {e}", ca_file.display()))?;
            n += 1;
        }
        if n == 0 {
            return Err(format!("postgres_ca_file {}: no certificate in it", ca_file.display()));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS to PostgreSQL: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // PostgreSQL's protocol name: what a server that takes TLS first (17's direct
        // negotiation) asks for; older servers ignore it.
        let mut config = config;
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(RustlsConnect(Arc::new(config)))
    }
}

impl<S> MakeTlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnectOne;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnectOne> {
        let name = ServerName::try_from(domain.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("the database host {domain:?}: {e}")))?;
        Ok(RustlsConnectOne { config: self.0.clone(), name })
    }
}

/// One connection's TLS handshake.
pub struct RustlsConnectOne {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnectOne
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let tls = tokio_rustls::TlsConnector::from(self.config).connect(self.name, stream).await?;
            Ok(RustlsStream(tls))
        })
    }
}

/// A TLS stream to the database.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}
