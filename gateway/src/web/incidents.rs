//! A regional incident: its triage list (`GET /incidents/{id}`, and as CSV for the disaster
//! meeting) and its acknowledgement (`POST /incidents/{id}/ack`). A closed incident's page is
//! its after-action record (`review.rs`).

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use chrono::FixedOffset;
use maud::html;

use super::alerts::AckForm;
use super::auth::Viewer;
use super::html::*;
use super::layout::layout;
use super::pages::*;
use super::view;
use super::{App, Client, WebRequest};
use crate::admin::audit;
use crate::domain::engine::Time;
use crate::domain::homes::Lang;
use crate::domain::message::{basis, role_text, tier_text};

/// `POST /incidents/{id}/ack`.
pub async fn ack_incident(
    State(app): State<App>,
    v: Viewer,
    client: Client,
    Path(id): Path<String>,
    Form(f): Form<AckForm>,
) -> Response {
    if let Some(r) = v.csrf_refusal(&f.csrf) {
        return r;
    }
    let snap = app.snap();
    let now = crate::edge::clock::now();
    if !view::incidents(&snap.engine, &v.user, now).iter().any(|i| i.id == id) {
        return not_found(v.lang);
    }
    let note = super::note(&f.note);
    let detail = note.clone().unwrap_or_default();
    let (role, by) = (v.user.role.ack_role(), v.user.username.clone());
    match app.ask(|reply| WebRequest::Ack { alert_id: id.clone(), role, by, note, reply }).await {
        Ok(()) => {
            app.audit(&v.user.username, &client.text(), "ack", &id, &detail).await;
            Redirect::to(&format!("/incidents/{id}")).into_response()
        }
        Err(e) => (StatusCode::CONFLICT, layout(&v, "409", html! { p.error { (e) } })).into_response(),
    }
}

/// One row of a triage list as its page and its CSV both show it.
struct TriageCells {
    power: &'static str,
    power_cls: &'static str,
    row_cls: &'static str,
    left: String,
    basis: &'static str,
    leave: String,
    leave_cls: &'static str,
    tier: &'static str,
    acknowledged: &'static str,
    handling: String,
    destination: String,
    travel: String,
}

/// The columns of a triage list, in order.
fn triage_headings(t: T) -> [&'static str; 9] {
    [
        t.t("home"),
        t.t("power"),
        t.t("time_left"),
        t.t("leave_by"),
        t.t("tier"),
        t.t("acknowledged"),
        t.t("handling"),
        t.t("destination"),
        t.t("travel"),
    ]
}

fn triage_cells(
    r: &crate::domain::engine::TriageRow,
    engine: &crate::domain::engine::Engine,
    now: Time,
    offset: FixedOffset,
    lang: Lang,
) -> TriageCells {
    let t = T(lang);
    let (power, power_cls, row_cls) = if r.silent {
        (t.t("silent"), "bad", "urgent silent")
    } else if r.on_battery {
        (t.t("battery"), "bad", "urgent")
    } else {
        (t.t("mains"), "ok", "")
    };
    let (leave, leave_cls) = if r.on_battery {
        leave_text(r.leave_in_s, r.destination.is_some(), now, offset, lang)
    } else {
        (String::new(), "")
    };
    // Who took the home on, from its open alerts.
    let handling = engine
        .plan(&r.home)
        .map(|plan| view::home_view(plan, engine.home_state(&r.home), now))
        .and_then(|h| view::handler(&h).map(|k| k.by.clone()))
        .unwrap_or_default();
    TriageCells {
        power,
        power_cls,
        row_cls,
        left: r
            .time_left_s
            .map(|s| crate::domain::message::time_left_text(s, r.time_left_range_s, lang))
            .unwrap_or_default(),
        basis: r.basis.as_deref().map(|b| basis(b, lang)).unwrap_or(""),
        leave,
        leave_cls,
        tier: tier_text(r.tier, lang),
        acknowledged: r.acknowledged_by.map(|x| role_text(x, lang)).unwrap_or(""),
        handling,
        destination: r.destination.clone().unwrap_or_default(),
        travel: r.travel_min.map(|m| minutes(m, lang)).unwrap_or_default(),
    }
}

/// `GET /incidents/{id}`: the triage list.
pub async fn incident(State(app): State<App>, v: Viewer, client: Client, Path(id): Path<String>) -> Response {
    let t = T(v.lang);
    let snap = app.snap();
    let now = crate::edge::clock::now();
    let offset = app.style.offset;
    let Some(i) = view::incidents(&snap.engine, &v.user, now).into_iter().find(|i| i.id == id) else {
        return super::review::page(&app, &v, &client, &id).await;
    };
    app.audit_view(&v, &client.text(), "view_incident", &id, &i.municipality).await;
    let headings = triage_headings(t);
    let dash = |s: &str| if s.is_empty() { "—".to_string() } else { s.to_string() };
    let body = html! {
        h1 { (t.t("incident")) " " (i.municipality_name.as_deref().unwrap_or(&i.municipality)) }
        p { (t.t("since")) " " (local(i.opened_at, offset)) " · " a href={ "/incidents/" (i.id) "/triage.csv" } { "CSV" } }
        table.triage {
            thead { tr { @for h in &headings { th { (h) } } } }
            tbody {
                @for r in &i.rows {
                    @let c = triage_cells(r, &snap.engine, now, offset, v.lang);
                    @let cells = [
                        html! { a href={ "/homes/" (r.home) } { (r.label) } },
                        html! { span class={ "pill " (c.power_cls) } { (c.power) } },
                        html! {
                            strong { (if c.left.is_empty() { "?" } else { &c.left }) } br; small { (c.basis) }
                        },
                        html! { (c.leave) },
                        html! { (c.tier) },
                        html! { (dash(c.acknowledged)) },
                        html! { (dash(&c.handling)) },
                        html! { (dash(&c.destination)) },
                        html! { (dash(&c.travel)) },
                    ];
                    tr class={ (c.row_cls) " " (c.leave_cls) } {
                        @for (h, cell) in headings.iter().zip(cells) { td data-label=(h) { (cell) } }
                    }
                }
            }
        }
        (incident_acks_html(&i.acks, v.lang, offset))
        form method="post" action={ "/incidents/" (i.id) "/ack" } class="ack" {
            (v.csrf_field())
            input name="note" maxlength="200" placeholder=(t.t("note")) aria-label=(t.t("note"));
            button { (t.t("acknowledge")) }
        }
    };
    layout(&v, t.t("incident"), body).into_response()
}

/// `GET /incidents/{id}/triage.csv`: the triage list for the disaster meeting, in the
/// reader's language, in the page's order (whoever must leave soonest first), with the same
/// cells as the page. Open incidents in scope only; audited.
pub async fn incident_csv(State(app): State<App>, v: Viewer, client: Client, Path(id): Path<String>) -> Response {
    let t = T(v.lang);
    let snap = app.snap();
    let now = crate::edge::clock::now();
    let offset = app.style.offset;
    let Some(i) = view::incidents(&snap.engine, &v.user, now).into_iter().find(|i| i.id == id) else {
        return not_found(v.lang);
    };
    app.audit(&v.user.username, &client.text(), "export_triage", &id, &i.municipality).await;
    let mut out = String::from("\u{feff}");
    out.push_str(&audit::csv_row(triage_headings(t)));
    for r in &i.rows {
        let c = triage_cells(r, &snap.engine, now, offset, v.lang);
        out.push_str(&audit::csv_row([
            r.label.as_str(),
            c.power,
            &c.left,
            &c.leave,
            c.tier,
            c.acknowledged,
            &c.handling,
            &c.destination,
            &c.travel,
        ]));
    }
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (header::CONTENT_DISPOSITION, "attachment; filename=\"mamori-triage.csv\""),
        ],
        out,
    )
        .into_response()
}
