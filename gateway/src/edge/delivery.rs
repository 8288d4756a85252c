//! Delivery: from a [`Notification`] to outbox rows, and from outbox rows to the world.
//!
//! - [`expand`] (pure) writes one row per recipient × channel, rendered in the recipient's
//!   language, keyed `{notification key}:{role}:{recipient}:{channel}`: that key is the
//!   idempotency key the receiver sees, so a retry or a re-decision after a restart is never a
//!   second page for a receiver that honours it.
//! - [`Sender`] sends one row: a webhook (JSON, `X-Mamori-Signature: sha256=<HMAC of the body>`
//!   with the endpoint's secret, `Idempotency-Key`), an SMS gateway (the endpoint's template,
//!   signed the same way), e-mail over SMTP (lettre; STARTTLS or TLS), LINE (the Messaging
//!   API's push: the text, and the acknowledgement link as a button; see [`line_request`]),
//!   a voice call (a Twilio-compatible `Calls` API: the message spoken, 1 to acknowledge; see
//!   [`voice_twiml`]), or the console (demo). Delivered means a voice call answered, or the receiver's 2xx, LINE's 2xx or its 409 for a
//!   retry key it has already accepted, or the SMTP server's acceptance.
//! - [`after_attempt`] (pure) decides what happens next: delivered; retry with jittered
//!   exponential back-off; after `fallback_after_failures` failures the next recipient in the
//!   chain is told (once) while the original keeps being retried; after `give_up_after_s`,
//!   abandoned.

use std::collections::BTreeMap;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::config::{DeliveryConfig, EndpointKind, SmtpConfig, SmtpTls};
use crate::domain::engine::{Notification, Time};
use crate::domain::homes::ChannelRef;
use crate::domain::message::{render, Style};
use crate::edge::store::{OutboxRow, OutboxStatus};

/// Messages waiting for the console (the demo) before a send to it fails.
pub const CONSOLE_QUEUE: usize = 1024;

/// When a message decided at `at` may reach someone whose quiet hours are `quiet` (minutes
/// after local midnight, from and to): `at` itself outside them, else their end.
pub fn after_quiet_hours(at: Time, quiet: (u32, u32), offset: chrono::FixedOffset) -> Time {
    use chrono::Timelike;
    let local = at.with_timezone(&offset);
    let now_min = local.hour() * 60 + local.minute();
    let (from, to) = quiet;
    let inside = if from < to { now_min >= from && now_min < to } else { now_min >= from || now_min < to };
    if !inside {
        return at;
    }
    let wait_min = (to + 24 * 60 - now_min) % (24 * 60);
    let start_of_minute = at - chrono::Duration::seconds(i64::from(local.second()));
    start_of_minute + chrono::Duration::minutes(i64::from(wait_min))
}

/// Outbox rows for a notification: one per recipient and channel, in the recipient's
/// language. A contact's later channels (`then`) are rows due after their delay and sent only
/// if the role has not acknowledged by then ([`OutboxRow::conditional`]); a message that is
/// not critical waits for the end of the contact's quiet hours.
pub fn expand(n: &Notification, style: &Style) -> Vec<OutboxRow> {
    let content = serde_json::to_value(&n.content).unwrap_or_default();
    let is_alert = !matches!(
        n.content,
        crate::domain::engine::Content::Cleared { .. } | crate::domain::engine::Content::Answer { .. }
    );
    let mut rows = Vec::new();
    for (role, contact) in &n.recipients {
        let (subject, body) = render(&n.content, contact.language, *role, &n.alert_id, style);
        let quiet =
            contact.quiet_hours.as_deref().and_then(crate::domain::homes::parse_quiet_hours).filter(|_| !n.critical);
        let due = quiet.map_or(n.at, |q| after_quiet_hours(n.at, q, style.offset));
        // Held past quiet hours, an alert is sent then only if it still matters.
        let held = due > n.at && is_alert;
        let steps = std::iter::once((0u32, &contact.channels, held))
            .chain(contact.then.iter().filter(|_| is_alert).map(|s| (s.after_min, &s.channels, true)));
        for (after_min, channels, conditional) in steps {
            for ch in channels {
                rows.push(OutboxRow {
                    key: format!("{}:{}:{}:{}", n.key, role.as_str(), contact.name, ch.key()),
                    alert_id: n.alert_id.clone(),
                    home: n.home.clone(),
                    role: *role,
                    recipient: contact.name.clone(),
                    channel: ch.clone(),
                    lang: contact.language,
                    subject: subject.clone(),
                    body: body.clone(),
                    content: content.clone(),
                    created_at: n.at,
                    next_attempt_at: due + chrono::Duration::minutes(i64::from(after_min)),
                    attempts: 0,
                    status: OutboxStatus::Pending,
                    last_error: None,
                    delivered_at: None,
                    fallback_done: false,
                    conditional,
                });
            }
        }
    }
    rows
}

/// What to do after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Next {
    /// The row, updated.
    pub row: OutboxRow,
    /// Tell the next recipient in the chain (the row's `fallback_done` is now set).
    pub fallback: bool,
}

/// The retry delay after `attempts` failures, with `jitter` in 0..1 (±25 %).
pub fn backoff(attempts: u32, cfg: &DeliveryConfig, jitter: f64) -> Duration {
    let exp = cfg.backoff_initial_ms.saturating_mul(1u64 << attempts.saturating_sub(1).min(20));
    let base = exp.min(cfg.backoff_max_ms) as f64;
    Duration::from_millis((base * (0.75 + 0.5 * jitter.clamp(0.0, 1.0))) as u64)
}

/// Update a row after an attempt.
pub fn after_attempt(
    mut row: OutboxRow,
    result: Result<(), String>,
    now: Time,
    cfg: &DeliveryConfig,
    jitter: f64,
) -> Next {
    row.attempts += 1;
    match result {
        Ok(()) => {
            row.status = OutboxStatus::Delivered;
            row.delivered_at = Some(now);
            row.last_error = None;
            Next { row, fallback: false }
        }
        Err(e) => {
            row.last_error = Some(e);
            let fallback = !row.fallback_done && row.attempts >= cfg.fallback_after_failures;
            row.fallback_done |= fallback;
            if now - row.created_at >= chrono::Duration::seconds(cfg.give_up_after_s as i64) {
                row.status = OutboxStatus::Abandoned;
            } else {
                let d = backoff(row.attempts, cfg, jitter);
                row.next_attempt_at = now + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::seconds(60));
            }
            Next { row, fallback }
        }
    }
}

/// A resolved endpoint.
#[derive(Debug, Clone)]
pub struct ResolvedEndpoint {
    /// Webhook or SMS.
    pub kind: EndpointKind,
    /// URL.
    pub url: String,
    /// HMAC key.
    pub secret: Vec<u8>,
    /// SMS template.
    pub template: Option<String>,
}

/// LINE's Messaging API, resolved.
#[derive(Debug, Clone)]
pub struct LineApi {
    /// `https://api.line.me`, or a local test server.
    pub base_url: String,
    /// The channel access token.
    pub token: String,
}

/// The longest text message LINE takes, characters.
pub const LINE_TEXT_MAX: usize = 5000;
/// The longest `altText` of a template message (what a phone's notification shows).
pub const LINE_ALT_TEXT_MAX: usize = 400;

fn truncate_chars(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
    t.push('…');
    t
}

/// `X-Line-Retry-Key` for a row: a UUID (the form LINE requires) derived from the row's key,
/// so every attempt of one row carries the same key and LINE executes it once.
pub fn line_retry_key(row_key: &str) -> String {
    let h = Sha256::digest(row_key.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x40; // version 4 (random-looking)
    b[8] = (b[8] & 0x3f) | 0x80; // the RFC 4122 variant
    let x = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &x[..8], &x[8..12], &x[12..16], &x[16..20], &x[20..])
}

/// The push request for a row: the subject and body as one text message (the link line
/// taken out), and, when the body ends with the acknowledgement link, a buttons template
/// whose one button opens it.
pub fn line_request(to: &str, row: &OutboxRow, ack_url: &str) -> serde_json::Value {
    let ja = row.lang == crate::domain::homes::Lang::Ja;
    let mut lines: Vec<&str> = row.body.lines().collect();
    let has_link = lines.last().is_some_and(|l| l.ends_with(ack_url));
    if has_link {
        lines.pop();
    }
    let text = truncate_chars(&format!("{}\n{}", row.subject, lines.join("\n").trim_end()), LINE_TEXT_MAX);
    let mut messages = vec![serde_json::json!({ "type": "text", "text": text })];
    if has_link {
        let (label, prompt) = if ja {
            ("確認（既読）", "見たら押してください。同じ通知の繰り返しが止まります。")
        } else {
            ("Acknowledge", "Tap once you have seen this: the repeats stop.")
        };
        messages.push(serde_json::json!({
            "type": "template",
            "altText": truncate_chars(&row.subject, LINE_ALT_TEXT_MAX),
            "template": {
                "type": "buttons",
                "text": prompt,
                "actions": [{ "type": "uri", "label": label, "uri": ack_url }],
            },
        }));
    }
    serde_json::json!({ "to": to, "messages": messages })
}

/// What LINE's answer means. 2xx: accepted. 409: this retry key was accepted before (an
/// earlier attempt landed and its answer was lost), so delivered. 400: this request (an id
/// that is not a friend or does not exist, a bad message): the row's. 401/403 (the token),
/// 429 (rate or monthly limit) and 5xx: the account or the platform, so the destination's.
pub fn line_outcome(status: u16, body: &str) -> Result<(), Failure> {
    if (200..300).contains(&status) || status == 409 {
        return Ok(());
    }
    let said = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_string))
        .unwrap_or_default();
    let text = match status {
        401 => format!("LINE: the channel access token was refused (HTTP 401: {said})"),
        403 => format!("LINE: the channel may not use the push API (HTTP 403: {said})"),
        429 => format!("LINE: too many requests or the monthly message limit (HTTP 429: {said})"),
        _ => format!("LINE: HTTP {status}: {said}"),
    };
    match status {
        401 | 403 | 429 | 500..=599 => Err(Failure::destination(text)),
        _ => Err(Failure::row(text)),
    }
}

/// A voice API, resolved.
#[derive(Debug, Clone)]
pub struct VoiceApi {
    /// `https://api.twilio.com`, or a local test server.
    pub base_url: String,
    /// The account id.
    pub account_sid: String,
    /// The auth token.
    pub auth_token: String,
    /// The calling number.
    pub from: String,
    /// Ring this long, s.
    pub ring_timeout_s: u32,
    /// One call's deadline, from dialling to its outcome.
    pub call_deadline: Duration,
    /// The gateway's public URL, for the callbacks.
    pub public_url: String,
}

/// Calls waiting for their outcome, by callback token: the web's `/voice/status/{token}`
/// hands the call's final status (`completed`, `busy`, `no-answer`, `failed`, `canceled`)
/// to the attempt waiting for it.
pub type CallWaiters =
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, tokio::sync::oneshot::Sender<String>>>>;

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&apos;")
}

/// The longest text a call speaks, characters (a voice API takes about 4,000 of TwiML).
pub const VOICE_TEXT_MAX: usize = 1200;

/// Where a pressed key goes: the acknowledgement link's `/ack/` as `/voice/ack/`.
pub fn voice_ack_url(ack_url: &str) -> Option<String> {
    let at = ack_url.rfind("/ack/")?;
    Some(format!("{}/voice{}", &ack_url[..at], &ack_url[at..]))
}

/// What a call says: the message (without its link line), then, when it can be acknowledged,
/// "press 1" inside a `<Gather>` whose action is [`voice_ack_url`], asked twice.
pub fn voice_twiml(row: &OutboxRow, ack_url: &str) -> String {
    let ja = row.lang == crate::domain::homes::Lang::Ja;
    let lang = if ja { "ja-JP" } else { "en-US" };
    let mut lines: Vec<&str> = row.body.lines().collect();
    let has_link = lines.last().is_some_and(|l| l.ends_with(ack_url));
    if has_link {
        lines.pop();
    }
    let mut text = format!("{}。{}", row.subject, lines.join(" "));
    if ja {
        // Read as a word, not spelled out.
        text = text.replace("mamori", "まもり");
    } else {
        text = text.replacen('。', ". ", 1);
    }
    let say = |t: &str| format!("<Say language=\"{lang}\">{}</Say>", xml_escape(&truncate_chars(t, VOICE_TEXT_MAX)));
    let prompt = if ja { "確認したら、1を押してください。" } else { "To acknowledge, press 1." };
    match voice_ack_url(ack_url).filter(|_| has_link) {
        Some(action) => {
            let action = xml_escape(&format!("{action}?lang={}", if ja { "ja" } else { "en" }));
            let gather = |inner: String| {
                format!("<Gather numDigits=\"1\" timeout=\"8\" action=\"{action}\" method=\"POST\">{inner}</Gather>")
            };
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response>{}{}</Response>",
                gather(format!("{}{}", say(&text), say(prompt))),
                gather(format!("{}{}", say(&text), say(prompt)))
            )
        }
        None => format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response>{}</Response>", say(&text)),
    }
}

/// What a voice API's answer to "place this call" means: 200/201 queued; 401/403 (the
/// account), 429 and 5xx are the destination's; 400/404 (a number it cannot call) the row's.
pub fn voice_created(status: u16, body: &str) -> Result<(), Failure> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let said = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_string))
        .unwrap_or_default();
    let text = match status {
        401 | 403 => format!("voice: the account was refused (HTTP {status}: {said})"),
        _ => format!("voice: HTTP {status}: {said}"),
    };
    match status {
        401 | 403 | 429 | 500..=599 => Err(Failure::destination(text)),
        _ => Err(Failure::row(text)),
    }
}

/// What a call's final status means: answered, or why not (each the row's failure: one
/// person not answering says nothing about the others).
pub fn call_outcome(status: &str) -> Result<(), Failure> {
    match status {
        "completed" => Ok(()),
        "busy" => Err(Failure::row("voice: the line was busy")),
        "no-answer" => Err(Failure::row("voice: not answered")),
        "canceled" => Err(Failure::row("voice: the call was cancelled")),
        other => Err(Failure::row(format!("voice: the call failed ({other})"))),
    }
}

/// Sends rows. Cheap to clone.
#[derive(Clone)]
pub struct Sender {
    http: reqwest::Client,
    endpoints: std::sync::Arc<BTreeMap<String, ResolvedEndpoint>>,
    line: Option<std::sync::Arc<LineApi>>,
    voice: Option<std::sync::Arc<VoiceApi>>,
    calls: CallWaiters,
    smtp: Option<std::sync::Arc<(lettre::AsyncSmtpTransport<lettre::Tokio1Executor>, String)>>,
    console: tokio::sync::mpsc::Sender<String>,
    /// The deadline of one whole attempt.
    timeout: Duration,
}

/// The HMAC-SHA256 signature header value of a body.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else { return String::new() };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn json_escape(s: &str) -> String {
    let quoted = serde_json::to_string(s).unwrap_or_default();
    quoted[1..quoted.len().saturating_sub(1)].to_string()
}

impl Sender {
    /// A sender. Console messages go to `console`.
    pub fn new(
        endpoints: BTreeMap<String, ResolvedEndpoint>,
        smtp: Option<(&SmtpConfig, Option<String>)>,
        line: Option<LineApi>,
        voice: Option<VoiceApi>,
        timeout: Duration,
        console: tokio::sync::mpsc::Sender<String>,
    ) -> Result<Sender, String> {
        // One TLS provider for the process (rumqttc and lettre use aws-lc-rs; an error here
        // means one is installed already).
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        // The whole attempt's deadline is [`Sender::send`]'s own, around everything; the
        // client's connect timeout only names the cause sooner when nothing answers at all.
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        let smtp = match smtp {
            None => None,
            Some((c, password)) => {
                use lettre::transport::smtp::authentication::Credentials;
                use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
                use lettre::{AsyncSmtpTransport, Tokio1Executor};
                let params = || -> Result<TlsParameters, String> {
                    let mut b = TlsParameters::builder(c.host.clone());
                    if let Some(path) = &c.ca_file {
                        let pem = std::fs::read(path).map_err(|e| format!("smtp.ca_file {}: {e}", path.display()))?;
                        let cert =
                            Certificate::from_pem(&pem).map_err(|e| format!("smtp.ca_file {}: {e}", path.display()))?;
                        b = b.add_root_certificate(cert);
                    }
                    b.build_rustls().map_err(|e| format!("smtp TLS: {e}"))
                };
                let tls = match c.tls {
                    SmtpTls::Starttls => Tls::Required(params()?),
                    SmtpTls::Tls => Tls::Wrapper(params()?),
                    SmtpTls::None => Tls::None,
                };
                let builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&c.host)
                    .port(c.port)
                    .tls(tls)
                    .timeout(Some(timeout));
                let builder = match (&c.username, password) {
                    (Some(u), Some(p)) => builder.credentials(Credentials::new(u.clone(), p)),
                    _ => builder,
                };
                Some(std::sync::Arc::new((builder.build(), c.from.clone())))
            }
        };
        let (line, voice) = (line.map(std::sync::Arc::new), voice.map(std::sync::Arc::new));
        let calls = CallWaiters::default();
        Ok(Sender { http, endpoints: std::sync::Arc::new(endpoints), line, voice, calls, smtp, console, timeout })
    }

    /// Calls waiting for their outcome (the web's `/voice/status/{token}` completes them).
    pub fn calls(&self) -> CallWaiters {
        self.calls.clone()
    }

    /// Send one row; Ok only when the receiver accepted it. The whole exchange (connect, TLS,
    /// request and response; or the whole SMTP dialogue) has one deadline: a receiver that
    /// accepts and never answers, or answers a byte a second, fails the attempt when it passes.
    /// A call's deadline runs from dialling to its outcome (`voice.call_deadline_s`).
    pub async fn send(&self, row: &OutboxRow, now: Time, ack_url: &str) -> Result<(), Failure> {
        let limit = match (&row.channel, &self.voice) {
            (ChannelRef::Voice(_), Some(v)) => v.call_deadline,
            _ => self.timeout,
        };
        match tokio::time::timeout(limit, self.attempt(row, now, ack_url)).await {
            Ok(result) => result,
            Err(_) => Err(Failure::destination(format!(
                "{}: no complete answer within {} ms",
                row.channel.destination(),
                limit.as_millis()
            ))),
        }
    }

    /// A dead-man heartbeat: GET `url`, Ok on a 2xx within the attempt deadline.
    pub async fn ping(&self, url: &str) -> Result<(), String> {
        let resp = tokio::time::timeout(self.timeout, self.http.get(url).send())
            .await
            .map_err(|_| format!("{url}: no answer within {} ms", self.timeout.as_millis()))?
            .map_err(|e| format!("{url}: {}", error_chain(&e)))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("{url}: HTTP {}", resp.status()))
        }
    }

    async fn attempt(&self, row: &OutboxRow, now: Time, ack_url: &str) -> Result<(), Failure> {
        match &row.channel {
            ChannelRef::Console(name) => {
                let text = format!(
                    "── to {} ({:?}) via console:{name}\n{}\n{}",
                    row.recipient, row.role, row.subject, row.body
                );
                // Full (nobody reads it): a failed attempt, retried like any other.
                self.console.try_send(text).map_err(|_| Failure::destination("console: full or closed"))
            }
            ChannelRef::Webhook(name) => {
                let ep = self
                    .endpoints
                    .get(name)
                    .ok_or_else(|| Failure::row(format!("endpoint `{name}` is not configured")))?;
                let body = serde_json::json!({
                    "key": row.key,
                    "alert_id": row.alert_id,
                    "home": row.home,
                    "role": row.role,
                    "recipient": row.recipient,
                    "lang": row.lang,
                    "subject": row.subject,
                    "text": row.body,
                    "ack_url": ack_url,
                    "content": row.content,
                    "sent_at": now.to_rfc3339(),
                    "attempt": row.attempts + 1,
                });
                self.post(ep, &row.key, serde_json::to_vec(&body).unwrap_or_default()).await
            }
            ChannelRef::Sms(to) => {
                let ep = self
                    .endpoints
                    .get("sms")
                    .ok_or_else(|| Failure::row("no SMS gateway endpoint `sms` is configured"))?;
                let template = ep.template.as_deref().unwrap_or("{\"to\":\"{to}\",\"text\":\"{text}\"}");
                // SMS is short: the subject and the link.
                let link = row.body.lines().last().unwrap_or_default();
                let text = format!("{}\n{link}", row.subject);
                let body = template.replace("{to}", &json_escape(to)).replace("{text}", &json_escape(&text));
                self.post(ep, &row.key, body.into_bytes()).await
            }
            ChannelRef::Line(to) => {
                let api = self.line.as_deref().ok_or_else(|| Failure::row("no [line] is configured"))?;
                let body = serde_json::to_vec(&line_request(to, row, ack_url)).unwrap_or_default();
                let resp = self
                    .http
                    .post(format!("{}/v2/bot/message/push", api.base_url))
                    .header("content-type", "application/json")
                    .header("authorization", format!("Bearer {}", api.token))
                    .header("x-line-retry-key", line_retry_key(&row.key))
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| Failure::destination(format!("LINE: {}", error_chain(&e))))?;
                let status = resp.status().as_u16();
                // The answer's body is small (an error's message); the attempt's deadline
                // bounds a slow one.
                let text = resp.text().await.unwrap_or_default();
                line_outcome(status, &text)
            }
            ChannelRef::Voice(to) => {
                let api = self.voice.as_deref().ok_or_else(|| Failure::row("no [voice] is configured"))?;
                let token = hex::encode(rand::random::<[u8; 16]>());
                let (tx, rx) = tokio::sync::oneshot::channel();
                // Unregistered however the attempt ends (its deadline drops this future).
                struct Waiting(CallWaiters, String);
                impl Drop for Waiting {
                    fn drop(&mut self) {
                        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&self.1);
                    }
                }
                self.calls.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(token.clone(), tx);
                let _waiting = Waiting(self.calls.clone(), token.clone());
                let form = [
                    ("To", to.clone()),
                    ("From", api.from.clone()),
                    ("Twiml", voice_twiml(row, ack_url)),
                    ("Timeout", api.ring_timeout_s.to_string()),
                    ("StatusCallback", format!("{}/voice/status/{token}", api.public_url)),
                    ("StatusCallbackMethod", "POST".to_string()),
                ];
                let resp = self
                    .http
                    .post(format!("{}/2010-04-01/Accounts/{}/Calls.json", api.base_url, api.account_sid))
                    .basic_auth(&api.account_sid, Some(&api.auth_token))
                    .form(&form)
                    .send()
                    .await
                    .map_err(|e| Failure::destination(format!("voice: {}", error_chain(&e))))?;
                let status = resp.status().as_u16();
                voice_created(status, &resp.text().await.unwrap_or_default())?;
                // Ringing, perhaps answered: the outcome arrives at the status callback.
                let outcome = rx.await.map_err(|_| Failure::destination("voice: the gateway is stopping"))?;
                call_outcome(&outcome)
            }
            ChannelRef::Email(to) => {
                use lettre::AsyncTransport;
                let (transport, from) = self.smtp.as_deref().ok_or_else(|| Failure::row("no [smtp] is configured"))?;
                let id = hex::encode(&Sha256::digest(row.key.as_bytes())[..16]);
                let msg = lettre::Message::builder()
                    .from(from.parse().map_err(|e| Failure::row(format!("from address: {e}")))?)
                    .to(to.parse().map_err(|e| Failure::row(format!("to address: {e}")))?)
                    .subject(row.subject.clone())
                    .message_id(Some(format!("<{id}@mamori>")))
                    .header(lettre::message::header::ContentType::TEXT_PLAIN)
                    .body(row.body.clone())
                    .map_err(|e| Failure::row(format!("message: {e}")))?;
                transport.send(msg).await.map(|_| ()).map_err(|e| {
                    // A permanent refusal (5xx: no such mailbox) is this row's; anything else
                    // (no answer, a 4xx, the connection) is the relay's.
                    let text = format!("smtp: {e}");
                    if e.is_permanent() {
                        Failure::row(text)
                    } else {
                        Failure::destination(text)
                    }
                })
            }
        }
    }

    async fn post(&self, ep: &ResolvedEndpoint, key: &str, body: Vec<u8>) -> Result<(), Failure> {
        let resp = self
            .http
            .post(&ep.url)
            .header("content-type", "application/json")
            .header("x-mamori-signature", signature(&ep.secret, &body))
            .header("idempotency-key", key)
            .body(body)
            .send()
            .await
            .map_err(|e| Failure::destination(format!("{}: {}", ep.url, error_chain(&e))))?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            // 5xx, 408 and 429 say the receiver is in trouble; another 4xx (a bad number, an
            // unknown recipient) is about this row only.
            let text = format!("{}: HTTP {status}", ep.url);
            if status.is_server_error() || matches!(status.as_u16(), 408 | 429) {
                Err(Failure::destination(text))
            } else {
                Err(Failure::row(text))
            }
        }
    }
}

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What happened, for the log and the row's `last_error`.
    pub text: String,
    /// The destination itself failed (no answer, a 5xx, the connection): it counts toward the
    /// destination's breaker. A refusal of this row alone (a 4xx, a 5xx SMTP reply for one
    /// mailbox) does not, so one bad number cannot stop everyone's messages.
    pub destination: bool,
}

impl Failure {
    /// The destination failed.
    pub fn destination(text: impl Into<String>) -> Failure {
        Failure { text: text.into(), destination: true }
    }

    /// This row was refused.
    pub fn row(text: impl Into<String>) -> Failure {
        Failure { text: text.into(), destination: false }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s += &format!(": {c}");
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::engine::Content;
    use crate::domain::homes::{Contact, Lang};
    use chrono::{DateTime, FixedOffset};
    use mamori_protocol::mqtt::Role;

    fn t(s: i64) -> Time {
        DateTime::from_timestamp(1_790_000_000 + s, 0).unwrap()
    }

    fn style() -> Style {
        Style { public_url: "http://x".into(), link_secret: b"k".to_vec(), offset: FixedOffset::east_opt(0).unwrap() }
    }

    fn line_row(body: String) -> OutboxRow {
        let n = Notification {
            key: "a1:s0:r0".into(),
            alert_id: "a1".into(),
            home: None,
            recipients: vec![(
                Role::Family,
                Contact {
                    role: Role::Family,
                    name: "母".into(),
                    language: Lang::Ja,
                    channels: vec![ChannelRef::Line(format!("U{}", "a".repeat(32)))],
                    quiet_hours: None,
                    phone: None,
                    consent: None,
                    then: vec![],
                },
            )],
            content: Content::Cleared {
                label: "K".into(),
                kind: crate::domain::engine::AlertKind::Event(mamori_protocol::mqtt::EventKind::MainsLost),
                since: t(0),
                at: t(60),
            },
            at: t(60),
            critical: true,
        };
        let mut row = expand(&n, &style()).remove(0);
        row.body = body;
        row
    }

    #[test]
    fn a_line_push_is_the_text_and_a_button_that_opens_the_acknowledgement_link() {
        let link = "http://x/ack/a1/family/00";
        let row = line_row(format!("K: 停電。\nお願い: 確認してください。\n確認（既読）: {link}"));
        let req = line_request("Uaaaa", &row, link);
        assert_eq!(req["to"], "Uaaaa");
        let text = req["messages"][0]["text"].as_str().unwrap();
        assert!(text.starts_with(&row.subject) && text.contains("お願い: 確認してください。"), "{text}");
        assert!(!text.contains("/ack/"), "the link is a button, not text: {text}");
        let button = &req["messages"][1];
        assert_eq!(button["type"], "template");
        assert_eq!(button["template"]["actions"][0]["uri"], link);
        assert!(button["template"]["actions"][0]["label"].as_str().unwrap().chars().count() <= 20);
        assert!(button["template"]["text"].as_str().unwrap().chars().count() <= 160);
        // A cleared message has no link: text only. An enormous body is cut to LINE's limits.
        let long = line_row("停".repeat(9000));
        let req = line_request("Uaaaa", &long, link);
        assert_eq!(req["messages"].as_array().unwrap().len(), 1);
        assert_eq!(req["messages"][0]["text"].as_str().unwrap().chars().count(), LINE_TEXT_MAX);
    }

    #[test]
    fn a_call_speaks_the_message_escaped_and_asks_for_1_only_when_it_can_be_acknowledged() {
        let link = "http://x/ack/a1/family/00";
        let row = line_row(format!("K: 停電 <&>。\nお願い: 確認してください。\n確認（既読）: {link}"));
        let twiml = voice_twiml(&row, link);
        assert!(twiml.contains("<Say language=\"ja-JP\">") && twiml.contains("停電 &lt;&amp;&gt;"), "{twiml}");
        assert!(
            !twiml.contains("/ack/a1/family/00<") && !twiml.contains("確認（既読）"),
            "the link is not read out: {twiml}"
        );
        assert_eq!(twiml.matches("action=\"http://x/voice/ack/a1/family/00?lang=ja\"").count(), 2, "{twiml}");
        assert!(twiml.contains("1を押してください"));
        // Without a link (a cleared message): spoken once, nothing to press.
        let plain = voice_twiml(&line_row("K: 電源が復旧しました。".into()), link);
        assert!(!plain.contains("<Gather") && plain.contains("電源が復旧しました"), "{plain}");
        assert_eq!(
            voice_ack_url("https://m.example/base/ack/a/b/c").as_deref(),
            Some("https://m.example/base/voice/ack/a/b/c")
        );
    }

    #[test]
    fn call_outcomes_and_refusals_are_classified() {
        assert!(call_outcome("completed").is_ok());
        for o in ["busy", "no-answer", "failed", "canceled"] {
            assert!(!call_outcome(o).unwrap_err().destination, "{o}: one person's line");
        }
        assert!(voice_created(201, "{}").is_ok());
        assert!(!voice_created(400, r#"{"code":21211,"message":"not a valid phone number"}"#).unwrap_err().destination);
        for status in [401, 403, 429, 500] {
            assert!(voice_created(status, "").unwrap_err().destination, "{status}");
        }
    }

    #[test]
    fn later_channels_wait_their_turn_and_quiet_hours_hold_only_what_is_not_critical() {
        use crate::domain::homes::ChannelStep;
        let family = Contact {
            role: Role::Family,
            name: "母".into(),
            language: Lang::Ja,
            channels: vec![ChannelRef::Line(format!("U{}", "a".repeat(32)))],
            then: vec![ChannelStep { after_min: 5, channels: vec![ChannelRef::Voice("+819012345678".into())] }],
            quiet_hours: Some("22:00-07:00".into()),
            phone: None,
            consent: None,
        };
        let alert = |critical: bool, at: Time| Notification {
            key: "a1:s0:r0".into(),
            alert_id: "a1".into(),
            home: None,
            recipients: vec![(Role::Family, family.clone())],
            content: Content::Cleared {
                label: "K".into(),
                kind: crate::domain::engine::AlertKind::Drill,
                since: at,
                at,
            },
            at,
            critical,
        };
        // An alert (not a clearance); the style's offset is UTC here.
        let mut n = alert(true, t(0));
        n.content = serde_json::from_value(serde_json::json!({"type": "alert", "label": "K", "kind": "device_lost",
            "since": t(0), "tier": "T0", "repeat": 0, "forecast": null, "time_left_s": null, "silent": false,
            "evacuation": null, "data": {}}))
        .unwrap();
        let rows = expand(&n, &style());
        let when: Vec<(bool, i64)> =
            rows.iter().map(|r| (r.conditional, (r.next_attempt_at - t(0)).num_minutes())).collect();
        assert_eq!(when, [(false, 0), (true, 5)], "LINE at once, the call 5 min later if still unacknowledged");
        // At 23:00 local, not critical: held until 07:00, and then sent only if still needed.
        let late = DateTime::parse_from_rfc3339("2026-11-30T23:00:00Z").unwrap().to_utc();
        let mut quiet = n.clone();
        (quiet.at, quiet.critical) = (late, false);
        let rows = expand(&quiet, &style());
        assert_eq!((rows[0].next_attempt_at - late).num_minutes(), 8 * 60);
        assert!(rows[0].conditional && rows[1].next_attempt_at > rows[0].next_attempt_at);
        // Critical: never held.
        quiet.critical = true;
        assert_eq!(expand(&quiet, &style())[0].next_attempt_at, late);
        // An all-clear is not chased by a call.
        let cleared = expand(&alert(false, t(0)), &style());
        assert_eq!(cleared.len(), 1);
        assert!(!cleared[0].conditional);
    }

    #[test]
    fn quiet_hours_over_midnight_end_at_their_end() {
        let utc = FixedOffset::east_opt(0).unwrap();
        let at = |h: u32, m: u32| DateTime::from_timestamp(i64::from(h * 3600 + m * 60), 0).unwrap();
        assert_eq!(after_quiet_hours(at(23, 30), (22 * 60, 7 * 60), utc), at(31, 0));
        assert_eq!(after_quiet_hours(at(3, 0), (22 * 60, 7 * 60), utc), at(7, 0));
        assert_eq!(after_quiet_hours(at(7, 0), (22 * 60, 7 * 60), utc), at(7, 0), "the end is not inside");
        assert_eq!(after_quiet_hours(at(12, 0), (13 * 60, 14 * 60), utc), at(12, 0));
        assert_eq!(after_quiet_hours(at(13, 10), (13 * 60, 14 * 60), utc), at(14, 0));
    }

    #[test]
    fn a_line_retry_key_is_a_uuid_fixed_per_row() {
        let k = line_retry_key("a1:s0:r0:family:母:line:U0");
        assert_eq!(k, line_retry_key("a1:s0:r0:family:母:line:U0"));
        assert_ne!(k, line_retry_key("a1:s0:r1:family:母:line:U0"));
        let parts: Vec<usize> = k.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12], "{k}");
        assert!(k.chars().all(|c| c == '-' || c.is_ascii_hexdigit()), "{k}");
        assert_eq!(&k[14..15], "4", "version 4: {k}");
    }

    #[test]
    fn lines_answers_are_classified_for_the_breaker() {
        assert!(line_outcome(200, "{}").is_ok());
        assert!(line_outcome(409, r#"{"message":"The retry key is already accepted"}"#).is_ok(), "landed before");
        let e = line_outcome(400, r#"{"message":"The property, 'to', in the request body is invalid"}"#).unwrap_err();
        assert!(!e.destination && e.text.contains("'to'"), "{e:?}");
        for status in [401, 403, 429, 500, 503] {
            assert!(line_outcome(status, "").unwrap_err().destination, "{status}");
        }
        assert!(line_outcome(401, "{}").unwrap_err().text.contains("access token"));
    }

    #[test]
    fn one_row_per_recipient_and_channel_in_their_language_with_stable_keys() {
        let n = Notification {
            key: "a1:s0:r0".into(),
            alert_id: "a1".into(),
            home: None,
            recipients: vec![
                (
                    Role::Family,
                    Contact {
                        role: Role::Family,
                        name: "母".into(),
                        language: Lang::Ja,
                        channels: vec![ChannelRef::Sms("+819000000000".into()), ChannelRef::Webhook("f".into())],
                        quiet_hours: None,
                        phone: None,
                        consent: None,
                        then: vec![],
                    },
                ),
                (
                    Role::Coordinator,
                    Contact {
                        role: Role::Coordinator,
                        name: "Sato".into(),
                        language: Lang::En,
                        channels: vec![ChannelRef::Webhook("c".into())],
                        quiet_hours: None,
                        phone: None,
                        consent: None,
                        then: vec![],
                    },
                ),
            ],
            content: Content::Cleared {
                label: "K".into(),
                kind: crate::domain::engine::AlertKind::Event(mamori_protocol::mqtt::EventKind::MainsLost),
                since: t(0),
                at: t(60),
            },
            at: t(60),
            critical: true,
        };
        let rows = expand(&n, &style());
        let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "a1:s0:r0:family:母:sms:+819000000000",
                "a1:s0:r0:family:母:webhook:f",
                "a1:s0:r0:coordinator:Sato:webhook:c"
            ]
        );
        assert!(rows[0].subject.contains("解消") && rows[0].body.contains("電源が復旧しました"), "{:?}", rows[0]);
        assert!(rows[2].subject.contains("resolved") && rows[2].body.contains("mains power is back"), "{:?}", rows[2]);
        assert_eq!(expand(&n, &style()), rows, "the same notification gives the same rows");
    }

    #[test]
    fn failures_back_off_fall_back_once_and_are_abandoned_when_too_old() {
        let cfg = DeliveryConfig::default();
        let n = Notification {
            key: "k".into(),
            alert_id: "a".into(),
            home: None,
            recipients: vec![(
                Role::Family,
                Contact {
                    role: Role::Family,
                    name: "m".into(),
                    language: Lang::En,
                    channels: vec![ChannelRef::Console("c".into())],
                    quiet_hours: None,
                    phone: None,
                    consent: None,
                    then: vec![],
                },
            )],
            content: Content::Cleared {
                label: "K".into(),
                kind: crate::domain::engine::AlertKind::Drill,
                since: t(0),
                at: t(0),
            },
            at: t(0),
            critical: true,
        };
        let mut row = expand(&n, &style()).remove(0);
        let mut fallbacks = 0;
        let mut delays = vec![];
        for i in 0..5 {
            let next = after_attempt(row, Err("down".into()), t(i * 10), &cfg, 0.5);
            fallbacks += usize::from(next.fallback);
            delays.push((next.row.next_attempt_at - t(i * 10)).num_milliseconds());
            row = next.row;
        }
        assert_eq!(fallbacks, 1, "the next recipient is told once");
        assert_eq!(delays, [1000, 2000, 4000, 8000, 16000]);
        assert_eq!(row.status, OutboxStatus::Pending);
        let done = after_attempt(row.clone(), Ok(()), t(100), &cfg, 0.5).row;
        assert_eq!((done.status, done.delivered_at, done.attempts), (OutboxStatus::Delivered, Some(t(100)), 6));
        let old = after_attempt(row, Err("down".into()), t(24 * 3600), &cfg, 0.5).row;
        assert_eq!(old.status, OutboxStatus::Abandoned);
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let cfg = DeliveryConfig::default();
        assert_eq!(backoff(30, &cfg, 0.5), Duration::from_millis(60_000));
        assert_eq!(backoff(1, &cfg, 0.0), Duration::from_millis(750));
        assert_eq!(backoff(1, &cfg, 1.0), Duration::from_millis(1250));
    }

    #[test]
    fn signatures_are_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(json_escape("a\"b\n"), "a\\\"b\\n");
    }
}
