//! The family's view of their own home, phone first.
//!
//! A family account sees one home, and in an outage it needs one thing: what to do now. So its
//! page says what is happening in one sentence, the time left as a band (the same words as its
//! messages), the request its messages carry for the most urgent alert, then the steps from
//! the care plan (the ventilator's own battery, a power station, the destination and when to
//! leave, 119), who has been told and who has acknowledged, and two answers —
//! 「避難します」 and 「電源を確保しました」 — recorded as the family's acknowledgement with
//! that note, which every coordinator and facility of the home sees on its board at once.
//! No tiers, routing tables, device chips or ids. `/` takes a family to this page.
//!
//! An answer is on the dashboard and in the API (the alert's acknowledgements) and in the
//! audit log, and the engine sends it on as a message to whoever acts on it (the
//! coordinator; 「避難します」 also the facility: `Engine::tell_answer`). A
//! facility answers through the same route from its own page (`facility.rs`), and so does a
//! coordinator taking a home on (「この世帯を担当します」: the latest holds, so handing over is
//! the other coordinator taking it).

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use mamori_protocol::mqtt::Role;
use maud::html;
use serde::Deserialize;

use super::auth::Viewer;
use super::contacts::contacts_html;
use super::html::{clock, failed, local, not_found, T};
use super::layout::layout;
use super::view::{self, main_alert, AlertView, HomeView};
use super::{App, Client};
use crate::admin::accounts::AccountRole;
use crate::domain::engine::{Answer, Time};
use crate::domain::homes::{BackupKind, Home, Lang};
use crate::domain::message::{self, Situation};
use crate::edge::store::{OutboxRow, OutboxStatus};

/// What is happening, in one sentence.
fn situation(h: &HomeView, now: Time, offset: chrono::FixedOffset, lang: Lang) -> (String, &'static str) {
    let ja = lang == Lang::Ja;
    let ago = |t: Time| message::duration((now - t).num_seconds().max(60), lang);
    let battery = h.power == "battery";
    match (h.connectivity, battery) {
        ("never", _) => (
            if ja {
                "まだこの家の見守り機から連絡が届いていません。".into()
            } else {
                "Nothing has been heard from this home's unit yet.".into()
            },
            "muted",
        ),
        ("silent", true) => (
            match (h.last_heard, ja) {
                (Some(t), true) => {
                    format!("{}前から、見守り機から連絡が届いていません。最後に届いたときは停電中でした。", ago(t))
                }
                (Some(t), false) => {
                    format!("Nothing has been heard from the home unit for {}; when last heard, the power was out.", ago(t))
                }
                (None, true) => "見守り機から連絡が届いていません。最後に届いたときは停電中でした。".into(),
                (None, false) => "Nothing is heard from the home unit; when last heard, the power was out.".into(),
            },
            "bad",
        ),
        ("silent", false) => (
            match (h.last_heard, ja) {
                (Some(t), true) => format!(
                    "{}前から、見守り機から連絡が届いていません。見守り機の電源とインターネット接続を確かめてください。",
                    ago(t)
                ),
                (Some(t), false) => format!(
                    "Nothing has been heard from the home unit for {}. Please check its power and internet connection.",
                    ago(t)
                ),
                (None, true) => "見守り機から連絡が届いていません。見守り機の電源とインターネット接続を確かめてください。".into(),
                (None, false) => "Nothing is heard from the home unit. Please check its power and internet connection.".into(),
            },
            "warn",
        ),
        (_, true) if h.on_last_battery => (
            if ja {
                "停電しています。予備の電源は尽き、人工呼吸器の内蔵バッテリーだけで動いています。".into()
            } else {
                "The power is out. The backup has run out: the ventilator runs on its own battery only.".into()
            },
            "bad",
        ),
        (_, true) => {
            let since = h.on_battery_since.map(|t| local(t, offset));
            (
                match (since, ja) {
                    (Some(s), true) => format!("停電しています。{s}から予備の電源で動いています。"),
                    (Some(s), false) => format!("The power is out. The devices have run on backup power since {s}."),
                    (None, true) => "停電しています。予備の電源で動いています。".into(),
                    (None, false) => "The power is out. The devices run on backup power.".into(),
                },
                "bad",
            )
        }
        _ => (
            if ja { "電気は通常どおり届いています。".into() } else { "The power is on as usual.".into() },
            "ok",
        ),
    }
}

/// The steps from the care plan, while the home is on battery (text).
fn steps(plan: &Home, h: &HomeView, leave_by: Option<&str>, request: &str, lang: Lang) -> Vec<String> {
    let ja = lang == Lang::Ja;
    let mut out = Vec::new();
    if let Some(m) = plan.backup.iter().find(|b| b.kind == BackupKind::VentilatorInternal).and_then(|b| b.runtime_min) {
        let m = message::duration((m * 60.0) as i64, lang);
        out.push(if ja {
            format!("予備の電源が尽きても、人工呼吸器は内蔵バッテリーで{m}ほど動きます。呼吸器の画面で電源の表示を確かめてください。")
        } else {
            format!("When the backup runs out, the ventilator runs on its own battery for about {m}. Check the power indication on its screen.")
        });
    }
    let external: Vec<&BackupKind> =
        plan.backup.iter().map(|b| &b.kind).filter(|k| **k != BackupKind::VentilatorInternal).collect();
    if external.contains(&&BackupKind::PowerStation) && external.len() > 1 {
        out.push(if ja {
            "ポータブル電源は、すぐにつなげるよう手元に用意してください。".into()
        } else {
            "Keep the portable power station at hand, ready to plug in.".into()
        });
    }
    // The destination, unless the request above already names it.
    if h.evacuation.as_ref().is_some_and(|(d, _)| request.contains(d.as_str())) {
        return out;
    }
    out.push(match (&h.evacuation, leave_by, ja) {
        (Some((d, m)), Some(l), true) => {
            format!("{d}（移動{m}分）へ向かう準備をしてください。遅くとも{l}には出発してください。")
        }
        (Some((d, m)), Some(l), false) => {
            format!("Get ready to go to {d} ({m} min away). Leave by {l} at the latest.")
        }
        (Some((d, m)), None, true) => format!("{d}（移動{m}分）へ向かう準備をしてください。"),
        (Some((d, m)), None, false) => format!("Get ready to go to {d} ({m} min away)."),
        (None, _, true) => {
            "避難先が決まっていません。電源をどこで確保するか、コーディネーターに相談してください。".into()
        }
        (None, _, false) => "No destination is set: ask the coordinator where to get power.".into(),
    });
    out
}

/// Who has been told of the alert, and who acknowledged: one line (text) per person.
fn told(alert: &AlertView, rows: &[OutboxRow], lang: Lang) -> Vec<String> {
    let ja = lang == Lang::Ja;
    // (name, role) -> the best status reached.
    let mut people: BTreeMap<(String, Role), u8> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.role != Role::Family) {
        let rank = match r.status {
            OutboxStatus::Delivered => 3,
            OutboxStatus::Pending => 2,
            OutboxStatus::Abandoned => 1,
            OutboxStatus::NotNeeded => 0,
        };
        let e = people.entry((r.recipient.clone(), r.role)).or_default();
        *e = (*e).max(rank);
    }
    people
        .into_iter()
        .filter(|(_, rank)| *rank > 0)
        .map(|((name, role), rank)| {
            // What the role said last: a facility that said yes and then no has refused.
            let last = alert.acks.iter().rev().find(|a| a.role == role);
            let acked = last.is_some_and(|a| a.acknowledges());
            let refused = last.is_some_and(|a| !a.acknowledges());
            let status = match (rank, ja) {
                (3, true) => "届きました",
                (3, false) => "reached",
                (2, true) => "送っています",
                (2, false) => "being sent",
                (_, true) => "届いていません",
                (_, false) => "not reached",
            };
            let ack = match (acked, refused, ja) {
                (true, _, true) => "・確認済み",
                (true, _, false) => ", acknowledged",
                (false, true, true) => "・受け入れられないとの答え",
                (false, true, false) => ", answered they cannot take the child",
                _ => "",
            };
            let role = message::role_text(role, lang);
            if ja {
                format!("{name}（{role}）: {status}{ack}")
            } else {
                format!("{name} ({role}): {status}{ack}")
            }
        })
        .collect()
}

/// The family's page for its home.
pub(super) async fn page(
    app: &App,
    v: &Viewer,
    plan: &Home,
    h: HomeView,
    now: Time,
    answered: Option<super::Told>,
) -> Response {
    let lang = v.lang;
    let ja = lang == Lang::Ja;
    let offset = app.style.offset;
    let main = main_alert(&h).cloned();
    let rows = match &main {
        Some(a) => {
            let id = a.id.clone();
            match app.db(move |s| Ok(s.outbox_for(&id)?)).await {
                Ok(r) => r,
                Err(e) => return failed(e),
            }
        }
        None => Vec::new(),
    };
    let (sentence, cls) = situation(&h, now, offset, lang);
    let on_battery = h.power == "battery";
    let band = h.time_left_s.filter(|_| on_battery).map(|mid| message::time_left_text(mid, h.time_left_range_s, lang));
    let leave_by = match (&h.runs_out, &h.evacuation) {
        (Some(b), Some((_, m))) => Some(clock(b.p10 - chrono::Duration::minutes(i64::from(*m)), now, offset)),
        _ => None,
    };
    let request = main.as_ref().map(|a| {
        let leave_in_s = h
            .runs_out
            .as_ref()
            .zip(h.evacuation.as_ref())
            .map(|(b, (_, m))| (b.p10 - chrono::Duration::minutes(i64::from(*m)) - now).num_seconds());
        let s = Situation {
            destination: h.evacuation.as_ref().map(|(d, m)| (d.as_str(), *m)),
            leave_by: leave_by.clone(),
            devices: &[],
            leave_in_s,
        };
        message::request(Role::Family, a.kind, a.tier, &s, lang)
    });
    let steps = if on_battery {
        steps(plan, &h, leave_by.as_deref(), request.as_deref().unwrap_or(""), lang)
    } else {
        Vec::new()
    };
    let body = html! {
        section.family {
            h1 { (h.label) }
            p class={ "situation " (cls) } { (sentence) }
            @if let Some(outcome) = answered {
                p.notice role="status" { (outcome.notice(lang)) }
            }
            @if let Some(band) = band {
                p.left {
                    @if ja {
                        "電気が使えるのは、あと" strong { (band) } "の見込みです。"
                    } @else {
                        "Power should last " strong { (band) } " more."
                    }
                }
                @if h.forecast_verified == Some(false) {
                    p.muted { small { (message::unverified(lang)) } }
                }
            }
            @if let Some(request) = &request {
                h2 { (if ja { "今すること" } else { "What to do now" }) }
                p.request { (request) }
            }
            @if on_battery {
                ol.steps { @for s in &steps { li { (s) } } }
            }
            p.call {
                a class="button call119" href="tel:119" { (if ja { "119番に電話する" } else { "Call 119" }) }
                " "
                (if ja {
                    "お子さんの様子がいつもと違うとき、呼吸器のアラームが止まらないときは、ためらわず電話してください。"
                } else {
                    "If your child is not as usual, or the ventilator's alarm does not stop, call at once."
                })
            }
            @if let Some(a) = &main {
                h2 { (if ja { "コーディネーターに伝える" } else { "Tell the coordinator" }) }
                form method="post" action={ "/homes/" (plan.id) "/answer" } class="answers" {
                    (v.csrf_field())
                    button type="submit" name="answer" value=(Answer::Evacuating.as_str()) { (Answer::Evacuating.text(lang)) }
                    button type="submit" name="answer" value=(Answer::PowerSecured.as_str()) class="secondary" {
                        (Answer::PowerSecured.text(lang))
                    }
                }
                @let lines = told(a, &rows, lang);
                h2 { (if ja { "知らせた人" } else { "Who has been told" }) }
                @if lines.is_empty() {
                    p { (if ja { "まだだれにも知らせていません。" } else { "Nobody yet." }) }
                } @else {
                    ul.told { @for l in &lines { li { (l) } } }
                }
            }
            (contacts_html(plan, T(lang), &app.snap().engine))
        }
    };
    layout(v, &h.label, body).into_response()
}

/// The answer form.
#[derive(Deserialize)]
pub struct AnswerForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    answer: String,
}

/// `POST /homes/{id}/answer`: a family answers 「避難します」 or 「電源を確保しました」, a
/// facility 「受け入れられます」 or 「受け入れられません」, a coordinator
/// 「この世帯を担当します」. It is recorded with the home's most urgent alert's
/// acknowledgements as a typed answer; every answer but a refusal acknowledges. Only an
/// account of the home whose role gives that answer; nothing to answer is a 409.
pub async fn answer(
    State(app): State<App>,
    v: Viewer,
    client: Client,
    Path(id): Path<String>,
    Form(f): Form<AnswerForm>,
) -> Response {
    if let Some(r) = v.csrf_refusal(&f.csrf) {
        return r;
    }
    if !matches!(v.user.role, AccountRole::Family | AccountRole::Facility | AccountRole::Coordinator) {
        return not_found(v.lang);
    }
    let snap = app.snap();
    let Some(plan) = view::home(&snap.engine, &v.user, &id) else { return not_found(v.lang) };
    let Some(answer) = Answer::parse(&f.answer).filter(|a| a.role() == v.user.role.ack_role()) else {
        let text = if v.lang == Lang::Ja { "この答えは選べません。" } else { "Not an answer you can give." };
        return (StatusCode::BAD_REQUEST, layout(&v, "400", html! { p.error { (text) } })).into_response();
    };
    let h = view::home_view(plan, snap.engine.home_state(&plan.id), crate::edge::clock::now());
    let nothing = if v.lang == Lang::Ja {
        "いま知らせていることはありません。"
    } else {
        "Nothing is being notified now."
    };
    let Some(alert) = main_alert(&h) else {
        return (StatusCode::CONFLICT, layout(&v, "409", html! { p.error { (nothing) } })).into_response();
    };
    let alert_id = alert.id.clone();
    let by = v.user.username.clone();
    let detail = format!("{id} {}", answer.as_str());
    match app.answer(alert_id.clone(), by, answer).await {
        Ok(told) => {
            let back = match v.user.role {
                AccountRole::Facility => format!("/?answered={}&told={}", plan.id.as_str(), told.query()),
                AccountRole::Coordinator => format!("/homes/{}", plan.id.as_str()),
                _ => format!("/homes/{}?told={}", plan.id.as_str(), told.query()),
            };
            let action = match v.user.role {
                AccountRole::Facility => "facility_answer",
                AccountRole::Coordinator => "home_claim",
                _ => "family_answer",
            };
            app.audit(&v.user.username, &client.text(), action, &alert_id, &detail).await;
            Redirect::to(&back).into_response()
        }
        // The alert ended, or the store is refusing writes, between the page and the answer.
        Err(e) => {
            tracing::warn!(error = %e, alert = %alert_id, "an answer was not recorded");
            let text = if v.lang == Lang::Ja {
                "いま記録できませんでした。ページを開き直して、もう一度お試しください。"
            } else {
                "It could not be recorded now. Open the page again and try once more."
            };
            (StatusCode::CONFLICT, layout(&v, "409", html! { p.error { (text) } })).into_response()
        }
    }
}
