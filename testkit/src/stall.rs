//! Receivers that misbehave the everyday way: a TCP server on a free loopback port that
//! accepts connections and then never answers, answers one byte a second, or (SMTP) greets
//! and then goes quiet. They count the connections they get, so a test can tell a sender that
//! gave up and tried again from one that is stuck.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

/// How a connection is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Accept, read whatever comes, never write.
    Silent,
    /// Read the HTTP request, then answer `200 OK` one byte a second.
    TrickleHttp,
    /// Greet (`220`), read the client's first command, then never answer again.
    SmtpHangAfterGreeting,
}

/// The server. Connections stay open until the test ends (the process exits).
pub struct Stall {
    port: u16,
    connections: Arc<AtomicUsize>,
}

impl Stall {
    /// Start on a free loopback port.
    pub fn start(mode: Mode) -> Result<Stall> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let connections = Arc::new(AtomicUsize::new(0));
        let c = connections.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                c.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let _ = serve(stream, mode);
                });
            }
        });
        Ok(Stall { port, connections })
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL on it.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

fn serve(mut s: TcpStream, mode: Mode) -> Result<()> {
    let mut buf = [0u8; 4096];
    match mode {
        Mode::Silent => {}
        Mode::TrickleHttp => {
            // Up to the end of the headers (and whatever body came with them).
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                got.extend_from_slice(&buf[..n]);
            }
            for b in b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n" {
                s.write_all(&[*b])?;
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        Mode::SmtpHangAfterGreeting => {
            s.write_all(b"220 stall.example ESMTP\r\n")?;
            let _ = s.read(&mut buf)?;
        }
    }
    // Keep the connection open, reading and discarding, until the peer gives up.
    while s.read(&mut buf)? > 0 {}
    Ok(())
}
