//! A local LINE Messaging API: `POST /v2/bot/message/push` as LINE documents it, on a free
//! loopback port (std, one thread per connection), so the gateway's LINE channel is tested
//! against the contract rather than a stub.
//!
//! What it checks, as LINE does: the `Authorization: Bearer` channel access token (401), a JSON
//! body (400), `X-Line-Retry-Key` as a hexadecimal UUID (400) executed once (a key already
//! accepted answers 409 with `x-line-accepted-request-id`), `to` as a user, group or room id
//! (400), 1–5 messages, a text message of 1–5000 characters, a buttons template with `altText`
//! of at most 400, `text` of at most 160 and 1–4 actions whose `label` is at most 20 characters
//! and whose `uri` is http(s) or tel (400). An id in [`LineServer::set_unknown`] answers 400
//! "Failed to send messages" (not a friend of the account).
//!
//! What it can be told to do to the next requests, in order ([`LineServer::script`]): answer
//! 429 (throttled), answer 500, take the message and then answer 500 (delivered, but the answer
//! lost), or take the request and never answer.

use std::collections::{HashSet, VecDeque};
use std::io::{BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;

use crate::Deadline;

/// What the server does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Answer 429 Too Many Requests.
    Throttle,
    /// Answer 500.
    Fail,
    /// Deliver it, then answer 500: the sender cannot know it landed.
    LoseAnswer,
    /// Read it and never answer (the connection stays open for a minute).
    Hang,
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Push {
    /// `X-Line-Retry-Key`.
    pub retry_key: String,
    /// The body (Null when it was not JSON).
    pub body: serde_json::Value,
    /// The status it was answered with (0: never answered).
    pub status: u16,
    /// It was delivered to the user (counted once per retry key).
    pub delivered: bool,
}

#[derive(Default)]
struct State {
    log: Vec<Push>,
    script: VecDeque<Behaviour>,
    accepted: HashSet<String>,
    unknown: HashSet<String>,
}

/// The server.
pub struct LineServer {
    port: u16,
    state: Arc<Mutex<State>>,
}

fn lock(s: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl LineServer {
    /// Start on a free loopback port, taking `token` as the channel access token.
    pub fn start(token: &str) -> Result<LineServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(Mutex::new(State::default()));
        let (s, token) = (state.clone(), token.to_string());
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (s, token) = (s.clone(), token.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &s, &token);
                });
            }
        });
        Ok(LineServer { port, state })
    }

    /// The API's base URL (for `[line] api_base_url`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What to do with the next requests, one behaviour each, in order; then normal again.
    pub fn script(&self, behaviours: &[Behaviour]) {
        lock(&self.state).script.extend(behaviours.iter().copied());
    }

    /// Ids that are not friends of the account: pushes to them answer 400.
    pub fn set_unknown(&self, ids: &[&str]) {
        lock(&self.state).unknown = ids.iter().map(|s| s.to_string()).collect();
    }

    /// Every request so far.
    pub fn pushes(&self) -> Vec<Push> {
        lock(&self.state).log.clone()
    }

    /// Wait until the requests satisfy `pred`.
    pub fn wait(&self, what: &str, limit: Duration, pred: impl Fn(&[Push]) -> bool) -> Result<Vec<Push>> {
        let deadline = Deadline::after(limit);
        loop {
            {
                let s = lock(&self.state);
                if pred(&s.log) {
                    return Ok(s.log.clone());
                }
            }
            if deadline.remaining().is_zero() {
                let p = self.pushes();
                deadline.check(&format!(
                    "LINE: {what} (got {} requests: {:?})",
                    p.len(),
                    p.iter().map(|x| x.status).collect::<Vec<_>>()
                ))?;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12]) && parts.iter().all(|p| p.chars().all(|c| c.is_ascii_hexdigit()))
}

fn is_id(s: &str) -> bool {
    s.len() == 33
        && matches!(s.as_bytes()[0], b'U' | b'C' | b'R')
        && s[1..].chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

/// What is wrong with a push body, as LINE would say it.
fn invalid(body: &serde_json::Value) -> Option<String> {
    let chars = |v: &serde_json::Value| v.as_str().map(|s| s.chars().count());
    if !body["to"].as_str().is_some_and(is_id) {
        return Some("The property, 'to', in the request body is invalid (line: -)".into());
    }
    let Some(messages) = body["messages"].as_array().filter(|m| (1..=5).contains(&m.len())) else {
        return Some("Size must be between 1 and 5".into());
    };
    for (i, m) in messages.iter().enumerate() {
        let bad = match m["type"].as_str() {
            Some("text") => !chars(&m["text"]).is_some_and(|n| (1..=5000).contains(&n)),
            Some("template") => {
                let t = &m["template"];
                let actions = t["actions"].as_array();
                !chars(&m["altText"]).is_some_and(|n| (1..=400).contains(&n))
                    || t["type"] != "buttons"
                    || !chars(&t["text"]).is_some_and(|n| (1..=160).contains(&n))
                    || !actions.is_some_and(|a| {
                        (1..=4).contains(&a.len())
                            && a.iter().all(|x| {
                                x["type"] == "uri"
                                    && chars(&x["label"]).is_some_and(|n| (1..=20).contains(&n))
                                    && x["uri"].as_str().is_some_and(|u| {
                                        u.starts_with("http://") || u.starts_with("https://") || u.starts_with("tel:")
                                    })
                            })
                    })
            }
            _ => true,
        };
        if bad {
            return Some(format!("A message (messages[{i}]) in the request body is invalid"));
        }
    }
    None
}

fn serve(stream: std::net::TcpStream, state: &Mutex<State>, token: &str) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    while let Some(req) = crate::http::read_request(&mut reader)? {
        let (method, path, auth) = (req.method.as_str(), req.path.as_str(), req.header("authorization"));
        let retry_key = req.header("x-line-retry-key").to_string();
        let json = req.header("content-type").starts_with("application/json");
        let raw = &req.body;
        let body: serde_json::Value = serde_json::from_slice(raw).unwrap_or(serde_json::Value::Null);
        let behaviour = lock(state).script.pop_front();
        if behaviour == Some(Behaviour::Hang) {
            lock(state).log.push(Push { retry_key, body, status: 0, delivered: false });
            std::thread::sleep(Duration::from_secs(60));
            return Ok(());
        }
        let (status, message, delivered, accepted_id) = {
            let mut s = lock(state);
            let to = body["to"].as_str().unwrap_or("").to_string();
            if method != "POST" || path != "/v2/bot/message/push" {
                (404, "Not found".to_string(), false, None)
            } else if auth != format!("Bearer {token}") {
                (
                    401,
                    "Authentication failed. Confirm that the access token in the authorization header is valid.".into(),
                    false,
                    None,
                )
            } else if behaviour == Some(Behaviour::Throttle) {
                (429, "Too Many Requests".into(), false, None)
            } else if behaviour == Some(Behaviour::Fail) {
                (500, "Internal Server Error".into(), false, None)
            } else if !json || body.is_null() {
                (400, "The request body has 1 error(s)".into(), false, None)
            } else if !retry_key.is_empty() && !is_uuid(&retry_key) {
                (400, "The retry key must be a hexadecimal UUID".into(), false, None)
            } else if !retry_key.is_empty() && s.accepted.contains(&retry_key) {
                (409, "The retry key is already accepted".into(), false, Some(retry_key.clone()))
            } else if let Some(why) = invalid(&body) {
                (400, why, false, None)
            } else if s.unknown.contains(&to) {
                (400, "Failed to send messages".into(), false, None)
            } else {
                if !retry_key.is_empty() {
                    s.accepted.insert(retry_key.clone());
                }
                let status = if behaviour == Some(Behaviour::LoseAnswer) { 500 } else { 200 };
                (status, String::new(), true, None)
            }
        };
        lock(state).log.push(Push { retry_key, body, status, delivered });
        let reply =
            if status == 200 { "{}".to_string() } else { serde_json::json!({ "message": message }).to_string() };
        let reason = match status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            409 => "Conflict",
            429 => "Too Many Requests",
            _ => "Internal Server Error",
        };
        let extra = accepted_id.map(|id| format!("x-line-accepted-request-id: {id}\r\n")).unwrap_or_default();
        out.write_all(
            format!(
                "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\n\r\n{reply}",
                reply.len()
            )
            .as_bytes(),
        )?;
        out.flush()?;
    }
    Ok(())
}
