//! Holding under attack, over the real gateway process: slow and idle clients, too many
//! connections from one address, a body sent a byte at a time. Every wait is for a condition,
//! with a deadline. (The route-level attacks — the login race, redirects, the audit log —
//! are in `gateway/tests/web.rs`, through the router.)
#![allow(clippy::disallowed_methods)] // the tests time what they cause with their own clock

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mamori_testkit::process::Process;
use mamori_testkit::site::{site, Plan};
use mamori_testkit::webhook::WebhookReceiver;
use mamori_testkit::Mosquitto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_mamori-gateway");

/// A connection to the gateway from another loopback address (`127.0.0.x`).
async fn connect_from(from: [u8; 4], port: u16) -> Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::from((from, 0)))?;
    Ok(s.connect(SocketAddr::from(([127, 0, 0, 1], port))).await?)
}

/// Whether the server closed the connection (EOF or a reset) within `limit`; what it said.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> (bool, String) {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (false, String::from_utf8_lossy(&got).into()),
            Ok(Ok(0)) | Ok(Err(_)) => return (true, String::from_utf8_lossy(&got).into()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

async fn healthz(port: u16) -> Result<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await.context("healthz in time")??;
    Ok(out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0))
}

struct Gateway {
    _broker: Mosquitto,
    _hook: WebhookReceiver,
    _process: Process,
    http: u16,
    _site: mamori_testkit::site::Site,
}

fn gateway(http: &str) -> Result<Gateway> {
    let broker = Mosquitto::start("")?;
    let hook = WebhookReceiver::start("hook-secret")?;
    let s = site(broker.port(), &hook.url(), &hook.url(), &Plan { http, ..Plan::default() })?;
    mamori_testkit::site::init(Path::new(BIN), &s.config)?;
    let p = mamori_testkit::site::start(Path::new(BIN), &s.config)?;
    Ok(Gateway { _broker: broker, _hook: hook, _process: p, http: s.http, _site: s })
}

const LIMITS: &str = "header_read_timeout_ms = 1000\nidle_timeout_s = 20\nmax_connections = 64\n\
                      max_connections_per_address = 16\nrequest_timeout_s = 2\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_clients_are_dropped_at_the_header_deadline() -> Result<()> {
    let g = gateway(LIMITS)?;
    // Sixteen clients that send their headers a few bytes at a time, never finishing.
    let mut slow = Vec::new();
    for _ in 0..16 {
        let mut s = connect_from([127, 0, 0, 2], g.http).await?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await?;
        slow.push(s);
    }
    let started = Instant::now();
    let drip = async {
        for i in 0..30 {
            for s in slow.iter_mut() {
                let _ = s.write_all(format!("X-{i}: y\r\n").as_bytes()).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await; // the attacker's pace
        }
    };
    // Meanwhile the gateway answers everyone else.
    let (_, status) = tokio::join!(drip, healthz(g.http));
    assert_eq!(status?, 200);
    for s in slow.iter_mut() {
        let (closed, said) = closed_within(s, Duration::from_secs(5)).await;
        assert!(closed, "a slow client still connected after {:?}: {said}", started.elapsed());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_connection() -> Result<()> {
    let g = gateway(LIMITS)?;
    // Forty idle connections from one address: sixteen are kept, the rest closed at once.
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(connect_from([127, 0, 0, 3], g.http).await?);
    }
    // (All watched at once, for less than the 1 s header deadline that ends the kept ones too.)
    let watched = futures_util::future::join_all(idle.iter_mut().map(|s| closed_within(s, Duration::from_millis(300))));
    let closed = watched.await.into_iter().filter(|(c, _)| *c).count();
    assert_eq!(closed, 40 - 16, "the per-address limit is 16");
    // Another address is served meanwhile.
    assert_eq!(healthz(g.http).await?, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_let_go_and_a_body_at_a_byte_at_a_time_is_cut_off() -> Result<()> {
    let g = gateway(LIMITS)?;
    // A kept-alive connection that goes quiet after its request.
    let mut quiet = connect_from([127, 0, 0, 4], g.http).await?;
    quiet.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    // A form whose body comes a byte every 200 ms (it would take 200 s).
    let mut trickle = connect_from([127, 0, 0, 5], g.http).await?;
    trickle
        .write_all(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n")
        .await?;
    let sent = Instant::now();
    let drip = async {
        for _ in 0..40 {
            if trickle.write_all(b"a").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await; // the attacker's pace
        }
        closed_within(&mut trickle, Duration::from_secs(5)).await
    };
    let (closed, said) = drip.await;
    assert!(said.starts_with("HTTP/1.1 503") || closed, "{said}");
    assert!(sent.elapsed() < Duration::from_secs(10), "cut off at the 2 s request deadline, not after the whole body");
    // The quiet one: its answer, then closed after the idle deadline (20 s).
    let (closed, said) = closed_within(&mut quiet, Duration::from_secs(30)).await;
    assert!(said.starts_with("HTTP/1.1 200"), "{said}");
    assert!(closed, "an idle connection was kept");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_https_the_same_deadlines_and_limits_hold() -> Result<()> {
    use rustls::pki_types::pem::PemObject;
    let pki = tempfile::tempdir()?;
    mamori_testkit::pki::make(pki.path())?;
    let broker = Mosquitto::start("")?;
    let hook = WebhookReceiver::start("hook-secret")?;
    let http = format!(
        "{LIMITS}tls_cert_file = \"{p}/server.pem\"\ntls_key_file = \"{p}/server.key\"\n",
        p = pki.path().display()
    );
    let s = site(broker.port(), &hook.url(), &hook.url(), &Plan { http: &http, ..Plan::default() })?;
    let text = std::fs::read_to_string(&s.config)?.replace("public_url = \"http://", "public_url = \"https://");
    std::fs::write(&s.config, text)?;
    mamori_testkit::site::init(Path::new(BIN), &s.config)?;
    let _p = mamori_testkit::site::start(Path::new(BIN), &s.config)?;

    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(pki.path().join("ca.pem"))? {
        roots.add(c?)?;
    }
    let tls = std::sync::Arc::new(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth());
    let connector = tokio_rustls::TlsConnector::from(tls);
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?.to_owned();

    // Connections that never start their handshake, from one address: sixteen are kept (until
    // the handshake deadline), the rest closed at once.
    let mut mute = Vec::new();
    for _ in 0..40 {
        mute.push(connect_from([127, 0, 0, 6], s.http).await?);
    }
    let watched = futures_util::future::join_all(mute.iter_mut().map(|c| closed_within(c, Duration::from_millis(300))));
    assert_eq!(watched.await.into_iter().filter(|(c, _)| *c).count(), 40 - 16, "the per-address limit is 16");

    // A client that completes its handshake and then sends its headers slowly is dropped at
    // the header deadline (1 s), as over plain HTTP.
    let tcp = connect_from([127, 0, 0, 7], s.http).await?;
    let mut slow = connector.connect(name.clone(), tcp).await.context("the handshake")?;
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await?;
    let started = Instant::now();
    let mut cut = false;
    for i in 0..25 {
        if slow.write_all(format!("X-{i}: y\r\n").as_bytes()).await.is_err() || slow.flush().await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await; // the attacker's pace
    }
    if !cut {
        let mut buf = [0u8; 256];
        let r = tokio::time::timeout(Duration::from_secs(3), slow.read(&mut buf)).await;
        cut = matches!(r, Ok(Ok(0)) | Ok(Err(_)));
    }
    assert!(cut, "a slow TLS client still connected after {:?}", started.elapsed());

    // Meanwhile an ordinary client is answered.
    let tcp = TcpStream::connect(("127.0.0.1", s.http)).await?;
    let mut ok = connector.connect(name, tcp).await?;
    ok.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), ok.read_to_string(&mut out)).await.context("healthz in time")??;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    drop(mute);
    Ok(())
}
