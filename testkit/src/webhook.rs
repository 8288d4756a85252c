//! A webhook receiver that records what arrives: a real HTTP server on a free loopback port
//! (std, one thread per connection), checking each request's `X-Mamori-Signature`.
//! It can be switched "down" (it answers 503) to test retries and fallback.

use std::io::{BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::Deadline;

/// One request.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The path (`/family`).
    pub path: String,
    /// The `Idempotency-Key` header.
    pub key: String,
    /// The body as JSON (Null when it was not JSON).
    pub body: serde_json::Value,
    /// The signature matched the secret.
    pub signature_ok: bool,
    /// Whether it was answered 2xx.
    pub accepted: bool,
    /// When it arrived.
    pub at: Instant,
}

/// The receiver.
pub struct WebhookReceiver {
    port: u16,
    log: Arc<Mutex<Vec<Delivery>>>,
    up: Arc<AtomicBool>,
    down_paths: Arc<Mutex<Vec<String>>>,
}

impl WebhookReceiver {
    /// Start on a free loopback port; requests are checked against `secret`.
    pub fn start(secret: &str) -> Result<WebhookReceiver> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let up = Arc::new(AtomicBool::new(true));
        let down_paths = Arc::new(Mutex::new(Vec::new()));
        let (l, u, d, secret) = (log.clone(), up.clone(), down_paths.clone(), secret.as_bytes().to_vec());
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (l, u, d, secret) = (l.clone(), u.clone(), d.clone(), secret.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &l, &u, &d, &secret);
                });
            }
        });
        Ok(WebhookReceiver { port, log, up, down_paths })
    }

    /// The base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Answer 2xx (true) or 503 (false).
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }

    /// Answer 503 on `path` (`/family`) only (down), or 2xx again (up).
    pub fn set_path_up(&self, path: &str, up: bool) {
        let mut d = self.down_paths.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        d.retain(|p| p != path);
        if !up {
            d.push(path.to_string());
        }
    }

    /// Every request so far.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Wait until the requests satisfy `pred`.
    pub fn wait(&self, what: &str, limit: Duration, pred: impl Fn(&[Delivery]) -> bool) -> Result<Vec<Delivery>> {
        let deadline = Deadline::after(limit);
        loop {
            {
                // Checked in place (a copy of thousands of deliveries every 20 ms would cost
                // more than the gateway being measured).
                let log = self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if pred(&log) {
                    return Ok(log.clone());
                }
            }
            if deadline.remaining().is_zero() {
                let d = self.deliveries();
                deadline.check(&format!(
                    "webhook: {what} (got {} requests: {:?})",
                    d.len(),
                    d.iter().map(|x| &x.key).collect::<Vec<_>>()
                ))?;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn serve(
    stream: std::net::TcpStream,
    log: &Mutex<Vec<Delivery>>,
    up: &AtomicBool,
    down_paths: &Mutex<Vec<String>>,
    secret: &[u8],
) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    // One segment per answer, sent at once (Nagle's algorithm against the sender's delayed ACK
    // would add 40 ms to every request on a kept-alive connection).
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    while let Some(req) = crate::http::read_request(&mut reader)? {
        let (path, key, sig, body) =
            (req.path.clone(), req.header("idempotency-key").to_string(), req.header("x-mamori-signature"), &req.body);
        let signature_ok = Hmac::<Sha256>::new_from_slice(secret)
            .map(|mut m| {
                m.update(body);
                format!("sha256={}", hex::encode(m.finalize().into_bytes())) == sig
            })
            .unwrap_or(false);
        let accepted = up.load(Ordering::SeqCst)
            && !down_paths.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(&path);
        log.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(Delivery {
            path,
            key,
            body: serde_json::from_slice(body).unwrap_or(serde_json::Value::Null),
            signature_ok,
            accepted,
            #[allow(clippy::disallowed_methods)] // test harness
            at: Instant::now(),
        });
        let status = if accepted { "200 OK" } else { "503 Service Unavailable" };
        out.write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())?;
        out.flush()?;
    }
    Ok(())
}
