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
mod tests;
