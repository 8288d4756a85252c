//! An SMTP receiver that records what arrives: a real SMTP server on a free loopback port
//! (std, one thread per connection) speaking the RFC 5321 subset a relay client uses
//! (EHLO/HELO, MAIL, RCPT, DATA with dot-unstuffing, RSET, NOOP, QUIT). No TLS and no AUTH:
//! the gateway allows `tls = "none"` only to a loopback relay, which is what this is.
//! It can be told to refuse messages (`451` after DATA) to test retries.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
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
    /// Start on a free loopback port.
    pub fn start() -> Result<SmtpReceiver> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let accept = Arc::new(AtomicBool::new(true));
        let (l, a) = (log.clone(), accept.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (l, a) = (l.clone(), a.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &l, &a);
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

fn serve(stream: std::net::TcpStream, log: &Mutex<Vec<Mail>>, accept: &AtomicBool) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    let reply = |out: &mut std::net::TcpStream, text: &str| -> Result<()> {
        out.write_all(text.as_bytes())?;
        out.write_all(b"\r\n")?;
        out.flush()?;
        Ok(())
    };
    reply(&mut out, "220 mamori-test ESMTP")?;
    let (mut from, mut to) = (String::new(), Vec::new());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let line = line.trim_end_matches(['\r', '\n']);
        let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" => reply(&mut out, "250-mamori-test\r\n250-8BITMIME\r\n250 SMTPUTF8")?,
            "HELO" => reply(&mut out, "250 mamori-test")?,
            "MAIL" => {
                from = path_of(arg);
                to.clear();
                reply(&mut out, "250 OK")?;
            }
            "RCPT" => {
                to.push(path_of(arg));
                reply(&mut out, "250 OK")?;
            }
            "DATA" => {
                reply(&mut out, "354 end with <CRLF>.<CRLF>")?;
                let mut data = String::new();
                loop {
                    let mut l = String::new();
                    if reader.read_line(&mut l)? == 0 {
                        return Ok(());
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
                });
                reply(&mut out, if accepted { "250 OK queued" } else { "451 try again later" })?;
            }
            "RSET" => {
                from.clear();
                to.clear();
                reply(&mut out, "250 OK")?;
            }
            "NOOP" => reply(&mut out, "250 OK")?,
            "QUIT" => {
                reply(&mut out, "221 bye")?;
                return Ok(());
            }
            _ => reply(&mut out, "502 command not implemented")?,
        }
    }
}
