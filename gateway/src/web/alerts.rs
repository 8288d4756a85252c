//! The alerts: `GET /alerts` (open alerts across the user's homes, whoever must leave
//! soonest first), an alert's row as the home page shows it too, and acknowledging or clearing
//! one (`POST /alerts/{id}/ack`, `/clear`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use chrono::FixedOffset;
use maud::{html, Markup};
use serde::Deserialize;

use super::auth::{local_path, Viewer};
use super::html::*;
use super::layout::layout;
use super::pages::*;
use super::view::{self, AlertView};
use super::{App, Client, WebRequest};
use crate::domain::homes::Lang;
use crate::domain::message::{kind_text, role_text, tier_text};

fn ack_form(v: &Viewer, a: &AlertView, back: &str) -> Markup {
    let t = T(v.lang);
    html! {
        form method="post" action={ "/alerts/" (a.id) "/ack" } class="ack" {
            (v.csrf_field())
            input type="hidden" name="next" value=(back);
            input name="note" maxlength="200" placeholder=(t.t("note")) aria-label=(t.t("note"));
            button { (t.t("acknowledge")) }
        }
        @if v.user.may_clear() {
            form method="post" action={ "/alerts/" (a.id) "/clear" } class="inline clear" {
                (v.csrf_field())
                input type="hidden" name="next" value=(back);
                label { input type="checkbox" name="confirm" value="1" required; " " (t.t("clear_confirm")) }
                " "
                button.secondary { (t.t("clear")) }
            }
        }
    }
}

fn ack_text(a: &AlertView, t: T, offset: FixedOffset) -> Markup {
    html! {
        @if let Some(k) = &a.acknowledged {
            span."pill"."ok" { (t.t("acknowledged")) " " (k.by) " " (local(k.at, offset)) }
            @if let Some(n) = k.said(t.0) { " " q { (n) } }
        }
        // What was said after the first acknowledgement (a family's 「避難します」): every later
        // acknowledgement that carries a note, with who and when.
        @for k in a.acks.iter().filter(|k| Some(*k) != a.acknowledged.as_ref()) {
            @if let Some(said) = k.said(t.0) {
                br;
                small {
                    (local(k.at, offset)) " " (k.by)
                    (if t.0 == Lang::Ja { "（" } else { " (" }) (role_text(k.role, t.0)) (if t.0 == Lang::Ja { "）" } else { ")" })
                    " " q { (said) }
                }
            }
        }
    }
}

/// An alert's row: with `label` (the alerts page) its home first, with `leave` (the alerts
/// page) when its child must leave after the tier.
pub(super) fn alert_row(
    v: &Viewer,
    label: Option<&str>,
    leave: Option<&str>,
    a: &AlertView,
    back: &str,
    offset: FixedOffset,
) -> Markup {
    let t = T(v.lang);
    html! {
        tr data-alert=(a.id) {
            @if let Some(l) = label {
                td data-label=(t.t("home")) { a href={ "/homes/" (a.home) } { (l) } }
            }
            td data-label=(t.t("alerts")) {
                span class={ "pill sev-" (format!("{:?}", a.severity)) } { (kind_text(a.kind, v.lang)) }
            }
            td data-label=(t.t("tier")) { (tier_text(a.tier, v.lang)) }
            @if let Some(l) = leave { td data-label=(t.t("leave_by")) { (l) } }
            td data-label=(t.t("since")) { (local(a.since, offset)) }
            td { (ack_text(a, t, offset)) (ack_form(v, a, back)) }
        }
    }
}

/// `GET /alerts`: open alerts across the user's homes.
pub async fn alerts(State(app): State<App>, v: Viewer, client: Client) -> Response {
    let t = T(v.lang);
    let snap = app.snap();
    let now = crate::edge::clock::now();
    let list = view::open_alerts(&snap.engine, &v.user, now);
    app.audit_view(&v, &client.text(), "list_alerts", "alerts", &format!("{} alerts", list.len())).await;
    let body = html! {
        h1 { (t.t("alerts")) }
        @if list.is_empty() {
            p { (t.t("no_alerts")) }
        } @else {
            table.alerts {
                thead {
                    tr {
                        th { (t.t("home")) } th { (t.t("alerts")) } th { (t.t("tier")) }
                        th { (t.t("leave_by")) } th { (t.t("since")) } th { (t.t("acknowledged")) }
                    }
                }
                tbody {
                    @for o in &list {
                        @let (leave, _) = leave_text(o.leave_in_s, o.has_destination, now, app.style.offset, v.lang);
                        (alert_row(&v, Some(&o.label), Some(&leave), &o.alert, "/alerts", app.style.offset))
                    }
                }
            }
        }
    };
    layout(&v, t.t("alerts"), body).into_response()
}

/// An acknowledgement or clear form.
#[derive(Deserialize)]
pub struct AckForm {
    /// The session's CSRF token.
    #[serde(default)]
    pub(super) csrf: String,
    /// A note with the acknowledgement.
    #[serde(default)]
    pub(super) note: String,
    /// Where to go back to.
    pub(super) next: Option<String>,
    /// Clearing: ticked that the condition was checked to be over.
    #[serde(default)]
    pub(super) confirm: Option<String>,
}

/// `POST /alerts/{id}/ack`.
pub async fn ack_alert(
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
    let Some(alert) = view::alert(&snap.engine, &v.user, &id) else { return not_found(v.lang) };
    let note = super::note(&f.note);
    let detail = format!("{} {}", alert.home.as_str(), note.clone().unwrap_or_default());
    let (role, by) = (v.user.role.ack_role(), v.user.username.clone());
    match app.ask(|reply| WebRequest::Ack { alert_id: id.clone(), role, by, note, reply }).await {
        Ok(()) => {
            app.audit(&v.user.username, &client.text(), "ack", &id, detail.trim()).await;
            Redirect::to(&local_path(f.next.as_deref())).into_response()
        }
        Err(e) => (StatusCode::CONFLICT, layout(&v, "409", html! { p.error { (e) } })).into_response(),
    }
}

/// `POST /alerts/{id}/clear`.
pub async fn clear_alert(
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
    let Some(alert) = view::alert(&snap.engine, &v.user, &id) else { return not_found(v.lang) };
    if !v.user.may_clear() {
        return (StatusCode::FORBIDDEN, html! { p { "forbidden" } }).into_response();
    }
    // Not one press away from the acknowledge button: the box must be ticked (the browser
    // asks for it; this holds without the browser's help).
    if f.confirm.as_deref() != Some("1") {
        let t = T(v.lang);
        let back = local_path(f.next.as_deref());
        let body = html! { p.error { (t.t("clear_unconfirmed")) } p { a href=(back) { (t.t("back")) } } };
        return (StatusCode::BAD_REQUEST, layout(&v, t.t("clear"), body)).into_response();
    }
    let home = alert.home.as_str().to_string();
    let by = v.user.username.clone();
    match app.ask(|reply| WebRequest::Clear { alert_id: id.clone(), by, reply }).await {
        Ok(()) => {
            app.audit(&v.user.username, &client.text(), "clear", &id, &home).await;
            Redirect::to(&local_path(f.next.as_deref())).into_response()
        }
        Err(e) => (StatusCode::CONFLICT, layout(&v, "409", html! { p.error { (e) } })).into_response(),
    }
}
