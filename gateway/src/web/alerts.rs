//! The alerts: `GET /alerts` (open alerts across the user's homes, whoever must leave
//! soonest first), an alert's row as the home page shows it too, and acknowledging or clearing
//! one (`POST /alerts/{id}/ack`, `/clear`).

use std::fmt::Write as _;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Form;
use chrono::FixedOffset;
use serde::Deserialize;

use super::auth::{local_path, Viewer};
use super::html::*;
use super::layout::layout;
use super::pages::*;
use super::view::{self, AlertView};
use super::{escape, App, Client, WebRequest};
use crate::domain::homes::Lang;
use crate::domain::message::{kind_text, role_text, tier_text};

fn ack_form(v: &Viewer, a: &AlertView, back: &str) -> String {
    let t = T(v.lang);
    let clear = if v.user.may_clear() {
        format!(
            "<form method=\"post\" action=\"/alerts/{id}/clear\" class=\"inline clear\">{csrf}<input type=\"hidden\" name=\"next\" value=\"{back}\">\
             <label><input type=\"checkbox\" name=\"confirm\" value=\"1\" required> {cc}</label> \
             <button class=\"secondary\">{c}</button></form>",
            id = escape(&a.id),
            csrf = v.csrf_field(),
            back = escape(back),
            cc = t.t("clear_confirm"),
            c = t.t("clear")
        )
    } else {
        String::new()
    };
    format!(
        "<form method=\"post\" action=\"/alerts/{id}/ack\" class=\"ack\">{csrf}<input type=\"hidden\" name=\"next\" value=\"{back}\">\
         <input name=\"note\" maxlength=\"200\" placeholder=\"{note}\" aria-label=\"{note}\"><button>{ack}</button></form>{clear}",
        id = escape(&a.id),
        csrf = v.csrf_field(),
        back = escape(back),
        note = t.t("note"),
        ack = t.t("acknowledge"),
    )
}

fn ack_text(a: &AlertView, t: T, offset: FixedOffset) -> String {
    let mut out = match &a.acknowledged {
        Some(k) => format!(
            "<span class=\"pill ok\">{} {} {}</span>{}",
            t.t("acknowledged"),
            escape(&k.by),
            local(k.at, offset),
            k.said(t.0).map(|n| format!(" <q>{}</q>", escape(&n))).unwrap_or_default()
        ),
        None => String::new(),
    };
    // What was said after the first acknowledgement (a family's 「避難します」): every later
    // acknowledgement that carries a note, with who and when.
    for k in a.acks.iter().filter(|k| Some(*k) != a.acknowledged.as_ref()) {
        let Some(said) = k.said(t.0) else { continue };
        let _ = write!(
            out,
            "<br><small>{} {}{}{}{} <q>{}</q></small>",
            local(k.at, offset),
            escape(&k.by),
            if t.0 == Lang::Ja { "（" } else { " (" },
            role_text(k.role, t.0),
            if t.0 == Lang::Ja { "）" } else { ")" },
            escape(&said)
        );
    }
    out
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
) -> String {
    let t = T(v.lang);
    let home = label
        .map(|l| {
            format!(
                "<td data-label=\"{}\"><a href=\"/homes/{id}\">{}</a></td>",
                t.t("home"),
                escape(l),
                id = escape(&a.home)
            )
        })
        .unwrap_or_default();
    format!(
        "<tr data-alert=\"{id}\">{home}<td data-label=\"{kl}\"><span class=\"pill sev-{sev:?}\">{kind}</span></td>\
         <td data-label=\"{tl}\">{tier}</td>{leave}<td data-label=\"{sl}\">{since}</td><td>{ack}{form}</td></tr>",
        id = escape(&a.id),
        leave = leave.map(|l| format!("<td data-label=\"{}\">{l}</td>", t.t("leave_by"))).unwrap_or_default(),
        kl = t.t("alerts"),
        sev = a.severity,
        kind = escape(kind_text(a.kind, v.lang)),
        tl = t.t("tier"),
        tier = tier_text(a.tier, v.lang),
        sl = t.t("since"),
        since = local(a.since, offset),
        ack = ack_text(a, t, offset),
        form = ack_form(v, a, back),
    )
}

/// `GET /alerts`: open alerts across the user's homes.
pub async fn alerts(State(app): State<App>, v: Viewer, client: Client) -> Response {
    let t = T(v.lang);
    let snap = app.snap();
    let now = crate::edge::clock::now();
    let list = view::open_alerts(&snap.engine, &v.user, now);
    app.audit_view(&v, &client.text(), "list_alerts", "alerts", &format!("{} alerts", list.len())).await;
    let mut body = format!("<h1>{}</h1>", t.t("alerts"));
    if list.is_empty() {
        let _ = write!(body, "<p>{}</p>", t.t("no_alerts"));
    } else {
        let _ = write!(
            body,
            "<table class=\"alerts\"><thead><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr></thead><tbody>",
            t.t("home"),
            t.t("alerts"),
            t.t("tier"),
            t.t("leave_by"),
            t.t("since"),
            t.t("acknowledged"),
        );
        for o in &list {
            let (leave, _) = leave_text(o.leave_in_s, o.has_destination, now, app.style.offset, v.lang);
            body.push_str(&alert_row(&v, Some(&o.label), Some(&leave), &o.alert, "/alerts", app.style.offset));
        }
        body.push_str("</tbody></table>");
    }
    layout(&v, t.t("alerts"), &body).into_response()
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
        Err(e) => {
            (StatusCode::CONFLICT, layout(&v, "409", &format!("<p class=\"error\">{}</p>", escape(&e)))).into_response()
        }
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
        return (StatusCode::FORBIDDEN, Html("<p>forbidden</p>".to_string())).into_response();
    }
    // Not one press away from the acknowledge button: the box must be ticked (the browser
    // asks for it; this holds without the browser's help).
    if f.confirm.as_deref() != Some("1") {
        let t = T(v.lang);
        let back = local_path(f.next.as_deref());
        let body = format!(
            "<p class=\"error\">{}</p><p><a href=\"{}\">{}</a></p>",
            t.t("clear_unconfirmed"),
            escape(&back),
            t.t("back")
        );
        return (StatusCode::BAD_REQUEST, layout(&v, t.t("clear"), &body)).into_response();
    }
    let home = alert.home.as_str().to_string();
    let by = v.user.username.clone();
    match app.ask(|reply| WebRequest::Clear { alert_id: id.clone(), by, reply }).await {
        Ok(()) => {
            app.audit(&v.user.username, &client.text(), "clear", &id, &home).await;
            Redirect::to(&local_path(f.next.as_deref())).into_response()
        }
        Err(e) => {
            (StatusCode::CONFLICT, layout(&v, "409", &format!("<p class=\"error\">{}</p>", escape(&e)))).into_response()
        }
    }
}
