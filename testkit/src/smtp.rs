//! An SMTP receiver that records what arrives: a real SMTP server on a free loopback port
//! (std, one thread per connection) speaking the RFC 5321 subset a relay client uses
//! (EHLO/HELO, MAIL, RCPT, DATA with dot-unstuffing, RSET, NOOP, QUIT), plain or with
//! STARTTLS (RFC 3207, rustls) when started with a certificate. No AUTH.
//! It can be told to refuse messages (`451` after DATA) to test retries.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;

use crate::Deadline;

/// One accepted (or refused) message.
#[derive(Debug, Clone)]
pub struct Mail {
    /// The envelope sender.
    pub from: String,
    /// The envelope recipients.
    pub to: Vec<String>,
    /// The message: headers and body, CRLF line ends, dot-unstuffed.
    pub data: String,
    /// Whether it was answered 250.
    pub accepted: bool,
    /// Whether it came over TLS (after STARTTLS).
    pub tls: bool,
}

impl Mail {
    /// A header's value (the first one with that name, unfolded).
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.data.split("\r\n\r\n").next()?;
        let mut value: Option<String> = None;
        for line in head.split("\r\n") {
            if let Some(v) = value.as_mut() {
                if line.starts_with([' ', '\t']) {
                    v.push_str(line.trim_start());
                    continue;
                }
                break;
            }
            if let Some((n, v)) = line.split_once(':') {
                if n.eq_ignore_ascii_case(name) {
                    value = Some(v.trim().to_string());
                }
            }
        }
        value
    }

    /// The body (after the blank line).
    pub fn body(&self) -> &str {
        self.data.split_once("\r\n\r\n").map_or("", |(_, b)| b)
    }
}

/// The receiver.
pub struct SmtpReceiver {
    port: u16,
    log: Arc<Mutex<Vec<Mail>>>,
    accept: Arc<AtomicBool>,
}

impl SmtpReceiver {
    /// Start on a free loopback port, plain SMTP only.
    pub fn start() -> Result<SmtpReceiver> {
        SmtpReceiver::start_with(None)
    }

    /// Start on a free loopback port offering STARTTLS with this certificate chain and key
    /// (PEM files, e.g. [`crate::pki::make`]'s `server.pem` and `server.key`).
    pub fn start_tls(cert_pem: &Path, key_pem: &Path) -> Result<SmtpReceiver> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(cert_pem)?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(key_pem)?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        SmtpReceiver::start_with(Some(Arc::new(config)))
    }

    fn start_with(tls: Option<Arc<rustls::ServerConfig>>) -> Result<SmtpReceiver> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let accept = Arc::new(AtomicBool::new(true));
        let (l, a) = (log.clone(), accept.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (l, a, tls) = (l.clone(), a.clone(), tls.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &l, &a, tls);
                });
            }
        });
        Ok(SmtpReceiver { port, log, accept })
    }

    /// The port (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Accept messages (250) or refuse them (451) after DATA.
    pub fn set_accept(&self, accept: bool) {
        self.accept.store(accept, Ordering::SeqCst);
    }

    /// Every message so far.
    pub fn mails(&self) -> Vec<Mail> {
        self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Wait until the messages satisfy `pred`.
    pub fn wait(&self, what: &str, limit: Duration, pred: impl Fn(&[Mail]) -> bool) -> Result<Vec<Mail>> {
        let deadline = Deadline::after(limit);
        loop {
            let m = self.mails();
            if pred(&m) {
                return Ok(m);
            }
            deadline.check(&format!("smtp: {what} (got {} messages)", m.len()))?;
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn path_of(arg: &str) -> String {
    // "FROM:<a@b> SIZE=1" → "a@b"
    let a = arg.split_once(':').map_or(arg, |(_, v)| v).trim();
    let a = a.split_whitespace().next().unwrap_or("");
    a.trim_start_matches('<').trim_end_matches('>').to_string()
}

enum End {
    Closed,
    StartTls,
}

fn serve(
    mut stream: TcpStream,
    log: &Mutex<Vec<Mail>>,
    accept: &AtomicBool,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(b"220 mamori-test ESMTP\r\n")?;
    match (dialogue(&mut stream, log, accept, tls.is_some(), false)?, tls) {
        (End::StartTls, Some(config)) => {
            let mut s = rustls::StreamOwned::new(rustls::ServerConnection::new(config)?, stream);
            dialogue(&mut s, log, accept, false, true)?;
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The SMTP conversation over `stream` until QUIT, the end of the stream, or STARTTLS.
fn dialogue<S: Read + Write>(
    stream: &mut S,
    log: &Mutex<Vec<Mail>>,
    accept: &AtomicBool,
    offer_tls: bool,
    secure: bool,
) -> Result<End> {
    let mut reader = BufReader::new(stream);
    let reply = |r: &mut BufReader<&mut S>, text: &str| -> Result<()> {
        let out = r.get_mut();
        out.write_all(text.as_bytes())?;
        out.write_all(b"\r\n")?;
        out.flush()?;
        Ok(())
    };
    let (mut from, mut to) = (String::new(), Vec::new());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(End::Closed);
        }
        let line = line.trim_end_matches(['\r', '\n']);
        let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" if offer_tls => {
                reply(&mut reader, "250-mamori-test\r\n250-8BITMIME\r\n250-STARTTLS\r\n250 SMTPUTF8")?
            }
            "EHLO" => reply(&mut reader, "250-mamori-test\r\n250-8BITMIME\r\n250 SMTPUTF8")?,
            "HELO" => reply(&mut reader, "250 mamori-test")?,
            "STARTTLS" if offer_tls => {
                reply(&mut reader, "220 go ahead")?;
                return Ok(End::StartTls);
            }
            "MAIL" => {
                from = path_of(arg);
                to.clear();
                reply(&mut reader, "250 OK")?;
            }
            "RCPT" => {
                to.push(path_of(arg));
                reply(&mut reader, "250 OK")?;
            }
            "DATA" => {
                reply(&mut reader, "354 end with <CRLF>.<CRLF>")?;
                let mut data = String::new();
                loop {
                    let mut l = String::new();
                    if reader.read_line(&mut l)? == 0 {
                        return Ok(End::Closed);
                    }
                    if l == ".\r\n" || l == ".\n" {
                        break;
                    }
                    data.push_str(l.strip_prefix('.').unwrap_or(&l));
                }
                let accepted = accept.load(Ordering::SeqCst);
                log.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(Mail {
                    from: from.clone(),
                    to: to.clone(),
                    data,
                    accepted,
                    tls: secure,
                });
                reply(&mut reader, if accepted { "250 OK queued" } else { "451 try again later" })?;
            }
            "RSET" => {
                from.clear();
                to.clear();
                reply(&mut reader, "250 OK")?;
            }
            "NOOP" => reply(&mut reader, "250 OK")?,
            "QUIT" => {
                reply(&mut reader, "221 bye")?;
                return Ok(End::Closed);
            }
            _ => reply(&mut reader, "502 command not implemented")?,
        }
    }
}
