//! A regional incident once it is over: its page, with the after-action record (振り返り).
//!
//! The links in an incident's messages lead here after it closes, so the page keeps what
//! happened: when it began and ended, and for every home that was in it — read from the
//! store, not the engine, which has let the incident go — the outage (from when to when), how
//! far its escalation went, when the first message reached someone and who, when the first
//! acknowledgement came and how long after the alert, what the family and the facility
//! answered, and how long the home was silent. A line above the table counts it up for the
//! disaster meeting: homes on backup, homes whose escalation went to its last step, the
//! median time to the first acknowledgement, homes nobody acknowledged.
//!
//! Below it, the record's notes: coordinators and administrators of the municipality write
//! what went well and what to change (`POST /incidents/{id}/notes`, audited `incident_note`),
//! kept in the store with who and when, in the order written. `/incidents/{id}/review.csv`
//! exports the table in the reader's language (audited `export_review`); printing leaves out
//! the navigation and the form. In scope only: a coordinator sees the incidents of their
//! municipalities, an administrator every one.
//!
//! [`review_row`] is pure (a home's stored alerts and their deliveries in, a row out), so it
//! is tested without a store.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use mamori_protocol::mqtt::{HomeId, Role};
use maud::html;
use serde::Deserialize;

use super::auth::Viewer;
use super::html::{by_text, failed, incident_acks_html, local, not_found, T};
use super::layout::layout;
use super::{App, Client};
use crate::admin::accounts::AccountRole;
use crate::domain::engine::{AckInfo, Alert, AlertKind, Incident, Time};
use crate::domain::homes::Lang;
use crate::domain::message::{duration, role_text, tier_text};
use crate::domain::policy::Tier;
use crate::edge::store::{IncidentNote, OutboxRow};

/// A note's longest text, characters.
pub const NOTE_MAX_CHARS: usize = 2000;

/// What one home went through during an incident.
#[derive(Debug, Clone, PartialEq)]
pub struct ReviewRow {
    /// The home.
    pub home: HomeId,
    /// Its label.
    pub label: String,
    /// The outage: from, and until (None: it had not ended when the incident closed).
    pub outage: Option<(Time, Option<Time>)>,
    /// How far its power alerts escalated.
    pub tier: Option<Tier>,
    /// When its first alert was raised.
    pub first_alert: Option<Time>,
    /// The first message that reached someone: when, and their role.
    pub first_message: Option<(Time, Role)>,
    /// The first acknowledgement (a refusal is none).
    pub first_ack: Option<AckInfo>,
    /// What the family, the facility and the coordinator answered, in order.
    pub answers: Vec<AckInfo>,
    /// How long it was silent, s.
    pub silent_s: i64,
}

/// A home's row, from its stored alerts (any order) and each alert's outbox rows, for an
/// incident open from `opened` to `closed`.
pub fn review_row(
    home: &HomeId,
    label: &str,
    alerts: &[Alert],
    outbox: &BTreeMap<String, Vec<OutboxRow>>,
    opened: Time,
    closed: Time,
) -> ReviewRow {
    let during: Vec<&Alert> = alerts
        .iter()
        .filter(|a| a.kind != AlertKind::Drill)
        .filter(|a| a.raised_at <= closed && a.cleared_at.is_none_or(|c| c >= opened))
        .collect();
    let power: Vec<&&Alert> = during.iter().filter(|a| a.kind.is_power()).collect();
    let outage = power
        .iter()
        .filter(|a| a.kind == AlertKind::Event(mamori_protocol::mqtt::EventKind::MainsLost))
        .min_by_key(|a| a.since)
        .map(|a| (a.since, a.cleared_at));
    let tier = power.iter().map(|a| a.tier()).max();
    let first_message = during
        .iter()
        .flat_map(|a| outbox.get(&a.id).into_iter().flatten())
        .filter_map(|r| r.delivered_at.map(|at| (at, r.role)))
        .min_by_key(|(at, _)| *at);
    let acks: Vec<&AckInfo> = during.iter().flat_map(|a| a.acks.iter()).collect();
    let first_ack = acks.iter().filter(|k| k.acknowledges()).min_by_key(|k| k.at).map(|k| (*k).clone());
    let mut answers: Vec<AckInfo> = acks.iter().filter(|k| k.answer.is_some()).map(|k| (*k).clone()).collect();
    answers.sort_by_key(|k| k.at);
    let silent_s = during
        .iter()
        .filter(|a| a.kind == AlertKind::HomeSilent)
        .map(|a| (a.cleared_at.unwrap_or(closed).min(closed) - a.since.max(opened)).num_seconds().max(0))
        .sum();
    ReviewRow {
        home: home.clone(),
        label: label.to_string(),
        outage,
        tier,
        first_alert: during.iter().map(|a| a.raised_at).min(),
        first_message,
        first_ack,
        answers,
        silent_s,
    }
}

/// The line above the table: what a disaster meeting asks first.
pub fn summary(rows: &[ReviewRow], lang: Lang) -> String {
    let on_battery = rows.iter().filter(|r| r.outage.is_some()).count();
    let last_step = rows.iter().filter(|r| r.tier == Some(Tier::T3)).count();
    let mut waits: Vec<i64> =
        rows.iter().filter_map(|r| Some((r.first_ack.as_ref()?.at - r.first_alert?).num_seconds().max(0))).collect();
    waits.sort_unstable();
    let unacked = rows.iter().filter(|r| r.first_alert.is_some() && r.first_ack.is_none()).count();
    let median = waits.get(waits.len() / 2).map(|s| duration(*s, lang));
    match lang {
        Lang::Ja => format!(
            "{}世帯のうち{on_battery}世帯が予備電源で過ごしました。通知が最後の段階まで進んだ世帯: {last_step}。最初の確認までの時間（中央値）: {}。確認のなかった世帯: {unacked}。",
            rows.len(),
            median.unwrap_or_else(|| "なし".into())
        ),
        Lang::En => format!(
            "{on_battery} of {} homes were on backup power. Homes whose notifications went to the last step: {last_step}. Time to the first acknowledgement (median): {}. Homes nobody acknowledged: {unacked}.",
            rows.len(),
            median.unwrap_or_else(|| "none".into())
        ),
    }
}

/// The table's columns, in order.
fn headings(lang: Lang) -> [&'static str; 7] {
    match lang {
        Lang::Ja => ["世帯", "停電", "通知の段階", "最初に届いた通知", "最初の確認", "答え", "通信の途絶"],
        Lang::En => {
            ["Home", "Outage", "Escalated to", "First message reached", "First acknowledgement", "Answers", "Silent"]
        }
    }
}

/// A row's cells as text (the page's template escapes them; the CSV quotes them).
fn cells(r: &ReviewRow, offset: chrono::FixedOffset, lang: Lang) -> [String; 7] {
    let ja = lang == Lang::Ja;
    let at = |t: Time| local(t, offset);
    let outage = match r.outage {
        Some((from, Some(to))) => format!("{}〜{}（{}）", at(from), at(to), duration((to - from).num_seconds(), lang)),
        Some((from, None)) if ja => format!("{}〜（終わる前に広域停電が閉じました）", at(from)),
        Some((from, None)) => format!("{} – (still out when the incident closed)", at(from)),
        None => String::new(),
    };
    let first_message =
        r.first_message.map(|(t, role)| format!("{} {}", at(t), role_text(role, lang))).unwrap_or_default();
    let first_ack = r
        .first_ack
        .as_ref()
        .map(|k| {
            let after = r.first_alert.map(|a| duration((k.at - a).num_seconds().max(0), lang)).unwrap_or_default();
            if ja {
                format!("{} {}（{}、通知から{after}）", at(k.at), role_text(k.role, lang), by_text(&k.by, lang))
            } else {
                format!("{} {} ({}, {after} after the alert)", at(k.at), role_text(k.role, lang), by_text(&k.by, lang))
            }
        })
        .unwrap_or_default();
    let answers = r
        .answers
        .iter()
        .filter_map(|k| {
            let said = k.answer?.text(lang);
            Some(if ja {
                format!("{} {}「{said}」", at(k.at), role_text(k.role, lang))
            } else {
                format!("{} {}: \"{said}\"", at(k.at), role_text(k.role, lang))
            })
        })
        .collect::<Vec<_>>()
        .join(if ja { "、" } else { "; " });
    [
        r.label.clone(),
        outage,
        r.tier.map(|t| tier_text(t, lang).to_string()).unwrap_or_default(),
        first_message,
        first_ack,
        answers,
        if r.silent_s > 0 { duration(r.silent_s, lang) } else { String::new() },
    ]
}

/// A home's stored alerts and their deliveries.
type Stored = (HomeId, Vec<Alert>, BTreeMap<String, Vec<OutboxRow>>);

/// What a closed incident's page shows: the incident, the rows of the homes the viewer may
/// see, how many others there were, and the notes.
struct Loaded {
    incident: Incident,
    rows: Vec<ReviewRow>,
    hidden: usize,
    notes: Vec<IncidentNote>,
}

/// The incident, its rows and its notes, when the viewer may see it and it is over. A member
/// home the viewer may not see (consent) has no row: it is counted, not shown; a home no
/// longer registered is shown to administrators only.
async fn load(app: &App, v: &Viewer, id: &str) -> Result<Option<Loaded>, Response> {
    let id2 = id.to_string();
    let loaded = app
        .db(move |s| {
            let Some(i) = s.incident(&id2)? else { return Ok(None) };
            let Some(closed) = i.closed_at else { return Ok(None) };
            let mut homes: Vec<Stored> = Vec::new();
            for h in &i.members {
                let alerts = s.alerts_for(h, 500)?;
                let mut outbox = BTreeMap::new();
                for a in
                    alerts.iter().filter(|a| a.raised_at <= closed && a.cleared_at.is_none_or(|c| c >= i.opened_at))
                {
                    outbox.insert(a.id.clone(), s.outbox_for(&a.id)?);
                }
                homes.push((h.clone(), alerts, outbox));
            }
            let notes = s.incident_notes(&i.id)?;
            Ok(Some((i, homes, notes)))
        })
        .await;
    let (i, homes, notes) = match loaded {
        Ok(Some(x)) if v.user.may_see_municipality(&x.0.municipality) => x,
        Ok(_) => return Ok(None),
        Err(e) => return Err(failed(e)),
    };
    let snap = app.snap();
    let closed = i.closed_at.unwrap_or(i.opened_at);
    let shown = |h: &HomeId| match snap.engine.plan(h) {
        Some(p) => super::view::sees(&snap.engine, &v.user, p),
        None => v.user.role == AccountRole::Admin,
    };
    let hidden = homes.iter().filter(|(h, _, _)| !shown(h)).count();
    let mut rows: Vec<ReviewRow> = homes
        .iter()
        .filter(|(h, _, _)| shown(h))
        .map(|(h, alerts, outbox)| {
            let label = snap.engine.plan(h).map_or_else(|| h.as_str().to_string(), |p| p.label.clone());
            review_row(h, &label, alerts, outbox, i.opened_at, closed)
        })
        .collect();
    // The longest escalation first, then the earliest alert.
    rows.sort_by(|a, b| b.tier.cmp(&a.tier).then(a.first_alert.cmp(&b.first_alert)).then(a.label.cmp(&b.label)));
    Ok(Some(Loaded { incident: i, rows, hidden, notes }))
}

fn may_write(v: &Viewer) -> bool {
    matches!(v.user.role, AccountRole::Admin | AccountRole::Coordinator)
}

/// `GET /incidents/{id}` once it is over.
pub(super) async fn page(app: &App, v: &Viewer, client: &Client, id: &str) -> Response {
    let Loaded { incident: i, rows, hidden, notes } = match load(app, v, id).await {
        Ok(Some(x)) => x,
        Ok(None) => return not_found(v.lang),
        Err(r) => return r,
    };
    app.audit_view(v, &client.text(), "view_incident", id, &i.municipality).await;
    let t = T(v.lang);
    let ja = v.lang == Lang::Ja;
    let offset = app.style.offset;
    let name = app.snap().engine.municipality_name(&i.municipality).unwrap_or_else(|| i.municipality.clone());
    let heads = headings(v.lang);
    let body = html! {
        h1 { (t.t("incident")) " " (name) }
        p.muted { (t.t("incident_over")) }
        p {
            (t.t("since")) " " (local(i.opened_at, offset)) " — " (t.t("ended")) " "
            (i.closed_at.map(|c| local(c, offset)).unwrap_or_default())
        }
        h2 { (if ja { "振り返り" } else { "After-action record" }) }
        p { (summary(&rows, v.lang)) }
        p.noprint { a href={ "/incidents/" (i.id) "/review.csv" } { "CSV" } }
        table.triage {
            thead {
                tr {
                    // Inside the table's head, as the page always put it; browsers move it above.
                    @if hidden > 0 {
                        p.notice { (T(v.lang).t("withheld").replace("{n}", &hidden.to_string())) }
                    }
                    @for h in heads { th { (h) } }
                }
            }
            tbody {
                @for r in &rows {
                    @let cls = match r.tier {
                        Some(Tier::T3) => "urgent",
                        _ if r.first_alert.is_some() && r.first_ack.is_none() => "urgent",
                        _ => "",
                    };
                    tr class=(cls) {
                        @for (k, (h, cell)) in heads.iter().zip(cells(r, offset, v.lang)).enumerate() {
                            @let cell = if cell.is_empty() { "—".to_string() } else { cell };
                            td data-label=(h) {
                                @if k == 0 { a href={ "/homes/" (r.home) } { (cell) } } @else { (cell) }
                            }
                        }
                    }
                }
            }
        }
        h2 { (if ja { "記録" } else { "Notes" }) }
        @if notes.is_empty() {
            p.muted { (if ja { "まだ記録はありません。" } else { "No notes yet." }) }
        }
        @for n in &notes {
            blockquote.note {
                p {
                    @for (k, line) in n.text.split('\n').enumerate() {
                        @if k > 0 { br; }
                        (line)
                    }
                }
                cite { (n.by) " " (local(n.at, offset)) }
            }
        }
        @if may_write(v) {
            form method="post" action={ "/incidents/" (i.id) "/notes" } class="stack" {
                (v.csrf_field())
                label {
                    (if ja {
                        "記録を書く（うまくいったこと、次に変えること）"
                    } else {
                        "Write a note (what went well, what to change next time)"
                    })
                    textarea name="text" rows="4" maxlength=(NOTE_MAX_CHARS) required {}
                }
                button type="submit" { (if ja { "記録する" } else { "Save the note" }) }
            }
        }
        (incident_acks_html(&i.acks, v.lang, offset))
    };
    layout(v, t.t("incident"), body).into_response()
}

/// The note form.
#[derive(Deserialize)]
pub struct NoteForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    text: String,
}

/// `POST /incidents/{id}/notes`: add a note to a closed incident's record.
pub async fn add_note(
    State(app): State<App>,
    v: Viewer,
    client: Client,
    Path(id): Path<String>,
    Form(f): Form<NoteForm>,
) -> Response {
    if let Some(r) = v.csrf_refusal(&f.csrf) {
        return r;
    }
    let ja = v.lang == Lang::Ja;
    let i = match load(&app, &v, &id).await {
        Ok(Some(l)) => l.incident,
        Ok(None) => return not_found(v.lang),
        Err(r) => return r,
    };
    if !may_write(&v) {
        return not_found(v.lang);
    }
    let text = f.text.trim().to_string();
    if text.is_empty() || text.chars().count() > NOTE_MAX_CHARS {
        let why = if ja {
            format!("記録は1〜{NOTE_MAX_CHARS}文字で書いてください。")
        } else {
            format!("A note is 1 to {NOTE_MAX_CHARS} characters.")
        };
        return (StatusCode::UNPROCESSABLE_ENTITY, layout(&v, "422", html! { p.error { (why) } })).into_response();
    }
    let (incident, by, now, note) = (i.id.clone(), v.user.username.clone(), crate::edge::clock::now(), text.clone());
    if let Err(e) = app.db(move |s| Ok(s.add_incident_note(&incident, now, &by, &note)?)).await {
        return failed(e);
    }
    app.audit(&v.user.username, &client.text(), "incident_note", &id, &format!("{} characters", text.chars().count()))
        .await;
    Redirect::to(&format!("/incidents/{id}")).into_response()
}

/// `GET /incidents/{id}/review.csv`: the after-action table, in the reader's language.
pub async fn csv(State(app): State<App>, v: Viewer, client: Client, Path(id): Path<String>) -> Response {
    let Loaded { incident: i, rows, .. } = match load(&app, &v, &id).await {
        Ok(Some(x)) => x,
        Ok(None) => return not_found(v.lang),
        Err(r) => return r,
    };
    app.audit(&v.user.username, &client.text(), "export_review", &id, &i.municipality).await;
    let mut out = String::from("\u{feff}");
    out.push_str(&crate::admin::audit::csv_row(headings(v.lang)));
    for r in &rows {
        out.push_str(&crate::admin::audit::csv_row(cells(r, app.style.offset, v.lang).iter().map(String::as_str)));
    }
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (header::CONTENT_DISPOSITION, "attachment; filename=\"mamori-review.csv\""),
        ],
        out,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::engine::Answer;
    use mamori_protocol::mqtt::EventKind;

    fn t(m: i64) -> Time {
        chrono::DateTime::from_timestamp(1_780_000_000 + m * 60, 0).unwrap()
    }

    fn alert(id: &str, kind: AlertKind, raised: i64, cleared: Option<i64>) -> Alert {
        Alert {
            id: id.into(),
            home: HomeId::new("h").unwrap(),
            kind,
            severity: mamori_protocol::mqtt::Severity::Critical,
            since: t(raised),
            raised_at: t(raised),
            acknowledged: None,
            acks: Vec::new(),
            cleared_at: cleared.map(t),
            cleared_by: None,
            dedup_key: "h/x".into(),
            // No steps: the tier is the last one.
            policy: crate::domain::policy::Policy {
                steps: Vec::new(),
                notify_after_s: 0,
                reescalate_after_ack_s: 1800,
                follows_forecast: false,
            },
            step: 0,
            sent_in_step: 0,
            step_entered_at: t(raised),
            last_sent_at: None,
            notified: Default::default(),
            hold_until: None,
            source: None,
            data: Default::default(),
        }
    }

    fn ack(role: Role, by: &str, at: i64, answer: Option<Answer>) -> AckInfo {
        AckInfo { role, by: by.into(), at: t(at), note: None, answer }
    }

    #[test]
    fn a_homes_row_says_what_happened_during_the_incident_only() {
        let h = HomeId::new("h").unwrap();
        let mut outage = alert("a1", AlertKind::Event(EventKind::MainsLost), 0, Some(150));
        outage.acks = vec![
            ack(Role::Facility, "hospital", 20, Some(Answer::CannotAccept)),
            ack(Role::Family, "mother", 30, Some(Answer::Evacuating)),
            ack(Role::Coordinator, "link", 25, None),
        ];
        let silent = alert("a2", AlertKind::HomeSilent, 60, Some(90));
        // Before the incident: not part of it.
        let earlier = alert("a0", AlertKind::Event(EventKind::MainsLost), -600, Some(-500));
        let mut outbox = BTreeMap::new();
        let mut row = crate::edge::store::contract::row("k", 0);
        row.role = Role::Family;
        row.delivered_at = Some(t(1));
        outbox.insert("a1".to_string(), vec![row]);
        let r = review_row(&h, "K-01", &[earlier, outage, silent], &outbox, t(5), t(200));
        assert_eq!(r.outage, Some((t(0), Some(t(150)))));
        assert_eq!(r.first_alert, Some(t(0)));
        assert_eq!(r.first_message, Some((t(1), Role::Family)));
        assert_eq!(
            r.first_ack.as_ref().map(|k| (k.role, k.at)),
            Some((Role::Coordinator, t(25))),
            "a refusal is no acknowledgement"
        );
        assert_eq!(
            r.answers.iter().map(|k| k.answer).collect::<Vec<_>>(),
            [Some(Answer::CannotAccept), Some(Answer::Evacuating)]
        );
        assert_eq!(r.silent_s, 30 * 60);
        let c = cells(&r, chrono::FixedOffset::east_opt(9 * 3600).unwrap(), Lang::Ja);
        assert!(c[4].contains("コーディネーター") && c[4].contains("通知から約25分"), "{}", c[4]);
        assert!(c[5].contains("受け入れ先「受け入れられません」") && c[5].contains("ご家族「避難します」"), "{}", c[5]);
        let s = summary(&[r], Lang::Ja);
        assert!(s.starts_with("1世帯のうち1世帯が予備電源で過ごしました。") && s.contains("中央値）: 約25分"), "{s}");
    }
}
