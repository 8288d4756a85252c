//! A local voice API with Twilio's `Calls` contract: `POST
//! /2010-04-01/Accounts/{AccountSid}/Calls.json`, form-encoded `To`, `From`, `Twiml`,
//! `Timeout`, `StatusCallback`, HTTP Basic with the account id and auth token; `201` with the
//! call's `sid` and `status: queued`; errors as `{code, message, status}` (401 for the
//! credentials, 400 code 21211 for a number that cannot be called, 429 when throttled).
//!
//! It then plays the call as [`LineOfPhone`] says, one behaviour per call in order: answered
//! and a key pressed (it posts the key to the `<Gather>`'s `action`, as the voice API does,
//! and records what the gateway answers), answered with no key, busy, not answered, or never
//! a word back. The outcome goes to the call's `StatusCallback` as `CallStatus`.

use std::collections::VecDeque;
use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::Deadline;

/// What happens to one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineOfPhone {
    /// Answered; these keys pressed.
    Answer(String),
    /// Answered; nothing pressed.
    AnswerSilently,
    /// The line is busy.
    Busy,
    /// Nobody answers.
    NoAnswer,
    /// The API takes the call and never reports on it.
    Vanish,
    /// The API refuses with 429 (throttled).
    Throttle,
}

/// One call as placed.
#[derive(Debug, Clone, Default)]
pub struct Call {
    /// `To`.
    pub to: String,
    /// `From`.
    pub from: String,
    /// The TwiML to speak.
    pub twiml: String,
    /// The status it was answered with.
    pub status: u16,
    /// What the gateway answered the pressed key with: (HTTP status, TwiML).
    pub key_reply: Option<(u16, String)>,
    /// The outcome reported to the status callback, and the gateway's HTTP status for it.
    pub reported: Option<(String, u16)>,
}

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    script: VecDeque<LineOfPhone>,
}

/// The server.
pub struct VoiceServer {
    port: u16,
    state: Arc<Mutex<State>>,
}

fn lock(s: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl VoiceServer {
    /// Start on a free loopback port for the account `sid` with `token`.
    pub fn start(sid: &str, token: &str) -> Result<VoiceServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(Mutex::new(State::default()));
        let (s, sid, token) = (state.clone(), sid.to_string(), token.to_string());
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (s, sid, token) = (s.clone(), sid.clone(), token.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &s, &sid, &token);
                });
            }
        });
        Ok(VoiceServer { port, state })
    }

    /// The API's base URL (for `[voice] api_base_url`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What happens to the next calls, in order; after them every call is answered with 1.
    pub fn script(&self, calls: &[LineOfPhone]) {
        lock(&self.state).script.extend(calls.iter().cloned());
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.state).calls.clone()
    }

    /// Wait until the calls satisfy `pred`.
    pub fn wait(&self, what: &str, limit: Duration, pred: impl Fn(&[Call]) -> bool) -> Result<Vec<Call>> {
        let deadline = Deadline::after(limit);
        loop {
            {
                let s = lock(&self.state);
                if pred(&s.calls) {
                    return Ok(s.calls.clone());
                }
            }
            if deadline.remaining().is_zero() {
                let c = self.calls();
                deadline.check(&format!("voice: {what} (got {} calls: {:?})", c.len(), c))?;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `application/x-www-form-urlencoded` → pairs.
fn form(body: &str) -> Vec<(String, String)> {
    fn unescape(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                    if let Ok(v) = u8::from_str_radix(hex, 16) {
                        out.push(v);
                        i += 2;
                    } else {
                        out.push(b'%');
                    }
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (unescape(k), unescape(v))
        })
        .collect()
}

fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// POST a form to `url` (http on loopback), as the voice API calls back: (status, body).
fn post_form(url: &str, fields: &[(&str, &str)]) -> Result<(u16, String)> {
    let rest = url.strip_prefix("http://").context("an http URL")?;
    let (authority, path) = rest.split_once('/').map(|(a, p)| (a, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let body: String =
        fields.iter().map(|(k, v)| format!("{}={}", percent(k), percent(v))).collect::<Vec<_>>().join("&");
    let mut s = TcpStream::connect(authority)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nhost: {authority}\r\ncontent-type: application/x-www-form-urlencoded\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let status = reply.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// The first `<Gather … action="…">`'s action, unescaped.
fn gather_action(twiml: &str) -> Option<String> {
    let g = &twiml[twiml.find("<Gather")?..];
    let a = &g[g.find("action=\"")? + 8..];
    Some(a[..a.find('"')?].replace("&amp;", "&"))
}

fn reply(out: &mut TcpStream, status: u16, body: &str) -> Result<()> {
    let reason = match status {
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        _ => "Error",
    };
    out.write_all(
        format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )?;
    Ok(out.flush()?)
}

fn serve(stream: TcpStream, state: &Arc<Mutex<State>>, sid: &str, token: &str) -> Result<()> {
    use base64::Engine as _;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    while let Some(req) = crate::http::read_request(&mut reader)? {
        let (path, auth) = (req.path.as_str(), req.header("authorization"));
        let fields = form(&String::from_utf8_lossy(&req.body));
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default();
        let expected = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{sid}:{token}")));
        if path != format!("/2010-04-01/Accounts/{sid}/Calls.json") {
            reply(&mut out, 404, r#"{"code":20404,"message":"The requested resource was not found","status":404}"#)?;
            continue;
        }
        if auth != expected {
            reply(&mut out, 401, r#"{"code":20003,"message":"Authenticate","status":401}"#)?;
            continue;
        }
        let phone = |p: &str| {
            p.strip_prefix('+').is_some_and(|d| (7..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()))
        };
        let mut call = Call { to: get("To"), from: get("From"), twiml: get("Twiml"), ..Call::default() };
        if !phone(&call.to) || !phone(&call.from) {
            call.status = 400;
            lock(state).calls.push(call);
            reply(
                &mut out,
                400,
                r#"{"code":21211,"message":"The 'To' number is not a valid phone number.","status":400}"#,
            )?;
            continue;
        }
        let behaviour = lock(state).script.pop_front().unwrap_or(LineOfPhone::Answer("1".into()));
        if behaviour == LineOfPhone::Throttle {
            call.status = 429;
            lock(state).calls.push(call);
            reply(&mut out, 429, r#"{"code":20429,"message":"Too Many Requests","status":429}"#)?;
            continue;
        }
        if !call.twiml.contains("<Response>") || get("StatusCallback").is_empty() {
            call.status = 400;
            lock(state).calls.push(call);
            reply(&mut out, 400, r#"{"code":21205,"message":"Url or Twiml is required.","status":400}"#)?;
            continue;
        }
        call.status = 201;
        let index = {
            let mut s = lock(state);
            s.calls.push(call.clone());
            s.calls.len() - 1
        };
        let call_sid = format!("CA{index:032x}");
        reply(&mut out, 201, &format!(r#"{{"sid":"{call_sid}","status":"queued"}}"#))?;
        // The call itself, after the API has answered.
        let (state, callback) = (state.clone(), get("StatusCallback"));
        std::thread::spawn(move || {
            let outcome = match &behaviour {
                LineOfPhone::Answer(keys) => {
                    if let Some(action) = gather_action(&call.twiml) {
                        let r = post_form(&action, &[("CallSid", &call_sid), ("Digits", keys), ("To", &call.to)]);
                        lock(&state).calls[index].key_reply = r.ok();
                    }
                    "completed"
                }
                LineOfPhone::AnswerSilently => "completed",
                LineOfPhone::Busy => "busy",
                LineOfPhone::NoAnswer => "no-answer",
                LineOfPhone::Vanish | LineOfPhone::Throttle => return,
            };
            let r = post_form(&callback, &[("CallSid", &call_sid), ("CallStatus", outcome)]);
            lock(&state).calls[index].reported = Some((outcome.to_string(), r.map(|(s, _)| s).unwrap_or(0)));
        });
    }
    Ok(())
}
