//! Signed acknowledgement links: `GET /ack/{alert}/{role}/{sig}` shows what is being
//! acknowledged and a form; only the form's `POST` acknowledges, because mail scanners and
//! link previews open links. A bad signature is a 404 that says nothing about whether the
//! alert exists. An acknowledgement is logged with the client's address: the peer's, or the
//! one a trusted reverse proxy names ([`crate::edge::listen::TrustedProxies`]), and written to
//! the audit log.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Form;
use mamori_protocol::mqtt::Role;
use maud::{html, Markup, DOCTYPE};
use serde::Deserialize;

use super::{App, Client, WebRequest};

fn check(app: &App, alert: &str, role: &str, sig: &str) -> Option<Role> {
    let role: Role = role.parse().ok()?;
    (alert.len() <= 64 && app.style.verify(alert, role, sig)).then_some(role)
}

fn page(status: StatusCode, body: Markup) -> Response {
    let page = html! {
        (DOCTYPE)
        html lang="ja" {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width";
            title { "mamori" }
            link rel="stylesheet" href="/static/app.css";
            body.narrow { (body) }
        }
    };
    (status, page).into_response()
}

/// What a signed link is about, in words for the person who got it: an alert or a regional
/// incident, open or over.
struct Subject {
    ja: String,
    en: String,
    over_at: Option<crate::domain::engine::Time>,
}

fn when(t: crate::domain::engine::Time, offset: chrono::FixedOffset, ja: bool) -> String {
    let t = t.with_timezone(&offset);
    if ja {
        t.format("%-m月%-d日 %H:%M").to_string()
    } else {
        t.format("%b %-d, %H:%M").to_string()
    }
}

/// The link's alert or incident: an open one from the engine, or (open or over) from the store.
/// `Err`: the store could not be read (said as "try again", never as "not found").
async fn subject(app: &App, id: &str) -> Result<Option<Subject>, ()> {
    use crate::domain::homes::Lang;
    let snap = app.snap();
    let offset = app.style.offset;
    let active = snap.engine.states().flat_map(|(_, s)| s.alerts.values()).find(|a| a.id == id).cloned();
    let open_incident = snap.engine.incidents().find(|i| i.id == id).cloned();
    let id2 = id.to_string();
    let (alert, incident) = match (active, open_incident) {
        (Some(a), _) => (Some(a), None),
        (None, Some(i)) => (None, Some(i)),
        (None, None) => app.db(move |s| Ok((s.alert(&id2)?, s.incident(&id2)?))).await.map_err(|e| {
            tracing::error!(error = %e, "reading an acknowledgement link's alert");
        })?,
    };
    if let Some(a) = alert {
        let label = snap.engine.plan(&a.home).map_or_else(|| a.home.as_str().to_string(), |p| p.label.clone());
        let kind = |lang| crate::domain::message::kind_text(a.kind, lang).to_string();
        return Ok(Some(Subject {
            ja: format!("{label}：{}（{}から）", kind(Lang::Ja), when(a.since, offset, true)),
            en: format!("{label}: {} (since {})", kind(Lang::En), when(a.since, offset, false)),
            over_at: a.cleared_at,
        }));
    }
    let Some(i) = incident else { return Ok(None) };
    let name = snap.engine.municipality_name(&i.municipality).unwrap_or_else(|| i.municipality.clone());
    Ok(Some(Subject {
        ja: format!("{name}の広域停電（{}から）", when(i.opened_at, offset, true)),
        en: format!("Regional outage in {name} (since {})", when(i.opened_at, offset, false)),
        over_at: i.closed_at,
    }))
}

fn try_again() -> Response {
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        html! { p { "いま読み込めません。少ししてからもう一度開いてください。 / Cannot load this now: open the link again in a moment." } },
    )
}

fn over_page(s: &Subject, offset: chrono::FixedOffset) -> Response {
    let at = s.over_at.unwrap_or_default();
    page(
        StatusCode::OK,
        html! {
            h1 { (s.ja) }
            p { "この知らせは" (when(at, offset, true)) "に終わりました。確認の必要はありません。" }
            p lang="en" { (s.en) br; "This is over since " (when(at, offset, false)) ": nothing to acknowledge." }
        },
    )
}

/// `GET /ack/...`: what the link is about, and the confirmation form while it is open.
pub async fn ack_page(State(app): State<App>, Path((alert, role, sig)): Path<(String, String, String)>) -> Response {
    if check(&app, &alert, &role, &sig).is_none() {
        return page(StatusCode::NOT_FOUND, html! { p { "リンクが無効です / This link is not valid." } });
    }
    let s = match subject(&app, &alert).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return page(
                StatusCode::NOT_FOUND,
                html! { p { "この知らせは見つかりません / This notification was not found." } },
            )
        }
        Err(()) => return try_again(),
    };
    if s.over_at.is_some() {
        return over_page(&s, app.style.offset);
    }
    page(
        StatusCode::OK,
        html! {
            h1 { (s.ja) }
            p lang="en" { (s.en) }
            p { "この知らせを確認しますか？ / Acknowledge it?" }
            form method="post" {
                label { "メモ / Note" br; input name="note" maxlength="200"; }
                p { button type="submit" { "確認しました / Acknowledge" } }
            }
        },
    )
}

#[derive(Deserialize)]
/// The acknowledgement form.
pub struct AckForm {
    #[serde(default)]
    note: String,
}

/// `POST /ack/...`: acknowledge.
pub async fn ack_post(
    State(app): State<App>,
    client: Client,
    Path((alert, role, sig)): Path<(String, String, String)>,
    Form(form): Form<AckForm>,
) -> Response {
    let Some(role) = check(&app, &alert, &role, &sig) else {
        return page(StatusCode::NOT_FOUND, html! { p { "リンクが無効です / This link is not valid." } });
    };
    let note = super::note(&form.note);
    let detail = note.clone().unwrap_or_default();
    let r = app.ask(|reply| WebRequest::Ack { alert_id: alert.clone(), role, by: "link".into(), note, reply }).await;
    match r {
        Ok(()) => {
            let client = client.text();
            tracing::info!(alert = %alert, role = ?role, %client, "acknowledged from a link");
            let actor = format!("link:{}", role.as_str());
            app.audit(&actor, &client, "ack", &alert, &detail).await;
            page(
                StatusCode::OK,
                html! { p { "確認を記録しました。ありがとうございます。 / Acknowledged. Thank you." } },
            )
        }
        Err(e) if e.contains("stopping") => {
            page(StatusCode::SERVICE_UNAVAILABLE, html! { p { "停止中です / The gateway is stopping." } })
        }
        Err(e) => match subject(&app, &alert).await {
            // Over before the press: said in words, not as an error.
            Ok(Some(s)) if s.over_at.is_some() => over_page(&s, app.style.offset),
            _ => page(
                StatusCode::CONFLICT,
                html! { p { "確認を記録できませんでした。 / The acknowledgement was not recorded: " (e) } },
            ),
        },
    }
}

/// What a voice API posts when a key is pressed during a call.
#[derive(Deserialize)]
pub struct VoiceKeys {
    /// The keys pressed.
    #[serde(default, rename = "Digits")]
    digits: String,
}

/// The reader's language, from the action URL.
#[derive(Deserialize)]
pub struct VoiceLang {
    #[serde(default)]
    lang: String,
}

/// TwiML (XML, not a page): `text` goes through maud's escaper, which escapes what XML text
/// needs (`&`, `<`, `>`, `"`).
fn twiml(status: StatusCode, ja: bool, text: &str) -> Response {
    use std::fmt::Write as _;
    let lang = if ja { "ja-JP" } else { "en-US" };
    let mut said = String::new();
    let _ = maud::Escaper::new(&mut said).write_str(text);
    let body =
        format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Say language=\"{lang}\">{said}</Say></Response>");
    (status, [(axum::http::header::CONTENT_TYPE, "application/xml")], body).into_response()
}

/// `POST /voice/ack/{alert}/{role}/{sig}`: a key pressed during a call (the same signature as
/// the link). 1 acknowledges; the answer is what the caller hears next.
pub async fn voice_ack(
    State(app): State<App>,
    client: Client,
    Path((alert, role, sig)): Path<(String, String, String)>,
    axum::extract::Query(q): axum::extract::Query<VoiceLang>,
    Form(keys): Form<VoiceKeys>,
) -> Response {
    let ja = q.lang != "en";
    let Some(role) = check(&app, &alert, &role, &sig) else {
        return twiml(
            StatusCode::NOT_FOUND,
            ja,
            if ja { "この通知は確認できません。" } else { "This cannot be acknowledged." },
        );
    };
    if keys.digits.trim() != "1" {
        return twiml(
            StatusCode::OK,
            ja,
            if ja {
                "確認は記録していません。確認するときは、1を押してください。"
            } else {
                "Not acknowledged. To acknowledge, press 1."
            },
        );
    }
    let r =
        app.ask(|reply| WebRequest::Ack { alert_id: alert.clone(), role, by: "voice".into(), note: None, reply }).await;
    match r {
        Ok(()) => {
            let client = client.text();
            tracing::info!(alert = %alert, role = ?role, %client, "acknowledged by a key pressed in a call");
            let actor = format!("voice:{}", role.as_str());
            app.audit(&actor, &client, "ack", &alert, "").await;
            twiml(
                StatusCode::OK,
                ja,
                if ja {
                    "確認を記録しました。ありがとうございます。"
                } else {
                    "Acknowledged. Thank you."
                },
            )
        }
        Err(e) => {
            tracing::warn!(alert = %alert, error = %e, "a key pressed in a call could not acknowledge");
            twiml(
                StatusCode::OK,
                ja,
                if ja {
                    "確認を記録できませんでした。"
                } else {
                    "The acknowledgement could not be recorded."
                },
            )
        }
    }
}

/// What a voice API posts when a call ends.
#[derive(Deserialize)]
pub struct CallStatus {
    #[serde(default, rename = "CallStatus")]
    status: String,
}

/// `POST /voice/status/{token}`: a call's outcome, handed to the attempt that placed it. The
/// token is random per call and known only to the voice API; an unknown one is a 404.
pub async fn voice_status(State(app): State<App>, Path(token): Path<String>, Form(c): Form<CallStatus>) -> Response {
    // Progress (queued, ringing, in-progress) is not an outcome.
    if matches!(c.status.as_str(), "queued" | "initiated" | "ringing" | "in-progress") {
        return StatusCode::NO_CONTENT.into_response();
    }
    let waiter = app.calls.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&token);
    match waiter {
        Some(tx) => {
            let _ = tx.send(c.status);
            StatusCode::NO_CONTENT.into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
