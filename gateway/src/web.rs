//! HTTP: acknowledgement links and `/healthz`. (The dashboard and API are the next issue.)
//!
//! `GET /ack/{alert}/{role}/{sig}` shows what is being acknowledged and a form; only the
//! form's `POST` acknowledges, because mail scanners and link previews open links. A bad
//! signature is a 404 that says nothing about whether the alert exists. An acknowledgement
//! is logged with the client's address: the peer's, or the one a trusted reverse proxy
//! names ([`crate::listen::TrustedProxies`]).

use std::net::IpAddr;

use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Form, Router};
use mamori_protocol::mqtt::Role;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use crate::listen::{Peer, TrustedProxies};
use crate::message::{parse_role, Style};

/// A request for the service loop.
#[derive(Debug)]
pub enum WebRequest {
    /// Acknowledge.
    Ack {
        /// Alert or incident id.
        alert_id: String,
        /// Role (from the signed link).
        role: Role,
        /// Note.
        note: Option<String>,
        /// The answer.
        reply: oneshot::Sender<Result<(), String>>,
    },
}

#[derive(Clone)]
struct App {
    style: Style,
    proxies: TrustedProxies,
    tx: mpsc::Sender<WebRequest>,
}

/// The router. Serve it with connect info ([`Peer`]) so that the client's address is known.
pub fn router(style: Style, proxies: TrustedProxies, tx: mpsc::Sender<WebRequest>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/ack/{alert}/{role}/{sig}", get(ack_page).post(ack_post))
        .with_state(App { style, proxies, tx })
}

/// The client's address, when the router is served with connect info.
struct Client(Option<IpAddr>);

impl FromRequestParts<App> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<ConnectInfo<Peer>>().map(|c| c.0 .0.ip());
        Ok(Client(peer.map(|p| app.proxies.client(p, &parts.headers))))
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn check(app: &App, alert: &str, role: &str, sig: &str) -> Option<Role> {
    let role = parse_role(role)?;
    (alert.len() <= 64 && app.style.verify(alert, role, sig)).then_some(role)
}

fn page(status: StatusCode, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"ja\"><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
         <title>mamori</title><body style=\"font-family:sans-serif;max-width:40em;margin:2em auto;padding:0 1em\">{body}</body></html>"
    );
    (status, Html(html)).into_response()
}

async fn ack_page(State(app): State<App>, Path((alert, role, sig)): Path<(String, String, String)>) -> Response {
    if check(&app, &alert, &role, &sig).is_none() {
        return page(StatusCode::NOT_FOUND, "<p>リンクが無効です / This link is not valid.</p>");
    }
    page(
        StatusCode::OK,
        &format!(
            "<h1>確認 / Acknowledge</h1><p>通知 {a} を確認しますか？ / Acknowledge alert {a}?</p>\
             <form method=\"post\"><label>メモ / Note<br><input name=\"note\" maxlength=\"200\" style=\"width:100%\"></label>\
             <p><button type=\"submit\">確認しました / Acknowledge</button></p></form>",
            a = escape(&alert)
        ),
    )
}

#[derive(Deserialize)]
struct AckForm {
    #[serde(default)]
    note: String,
}

async fn ack_post(
    State(app): State<App>,
    client: Client,
    Path((alert, role, sig)): Path<(String, String, String)>,
    Form(form): Form<AckForm>,
) -> Response {
    let Some(role) = check(&app, &alert, &role, &sig) else {
        return page(StatusCode::NOT_FOUND, "<p>リンクが無効です / This link is not valid.</p>");
    };
    let note = Some(form.note.trim().chars().take(200).collect::<String>()).filter(|n| !n.is_empty());
    let (reply, rx) = oneshot::channel();
    if app.tx.send(WebRequest::Ack { alert_id: alert.clone(), role, note, reply }).await.is_err() {
        return page(StatusCode::SERVICE_UNAVAILABLE, "<p>停止中です / The gateway is stopping.</p>");
    }
    match rx.await {
        Ok(Ok(())) => {
            let client = client.0.map(|c| c.to_string()).unwrap_or_else(|| "unknown".into());
            tracing::info!(alert = %alert, role = ?role, %client, "acknowledged from a link");
            page(StatusCode::OK, "<p>確認を記録しました。ありがとうございます。 / Acknowledged. Thank you.</p>")
        }
        Ok(Err(e)) => page(StatusCode::CONFLICT, &format!("<p>{}</p>", escape(&e))),
        Err(_) => page(StatusCode::SERVICE_UNAVAILABLE, "<p>停止中です / The gateway is stopping.</p>"),
    }
}
