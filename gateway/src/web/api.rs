//! `/api/v1`: JSON for integrations, with bearer tokens (`mamori-gateway users token NAME`).
//! The same roles and scopes as the pages: a home, alert or incident outside the token's
//! scope is a 404, like one that does not exist. `GET /api/v1/openapi.json` describes it
//! (no token needed: it holds no data).

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::{header, request::Parts, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mamori_protocol::mqtt::HomeId;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::auth::ApiUser;
use super::view::{self, AlertView};
use super::{App, Client, WebRequest};
use crate::admin::accounts::User;
use crate::domain::engine::Time;
use crate::edge::store::{OutboxRow, OutboxStatus};

/// The API's routes (nested under `/api/v1`).
pub fn router() -> Router<App> {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/homes", get(homes))
        .route("/homes/{id}", get(home))
        .route("/homes/{id}/telemetry", get(telemetry))
        .route("/homes/{id}/events", get(events))
        .route("/homes/{id}/alerts", get(home_alerts))
        .route("/homes/{id}/drill", post(drill))
        .route("/municipalities/{code}/drill", post(municipality_drill))
        .route("/alerts", get(alerts))
        .route("/alerts/{id}", get(alert))
        .route("/alerts/{id}/ack", post(ack))
        .route("/alerts/{id}/clear", post(clear))
        .route("/incidents", get(incidents))
        .route("/incidents/{id}", get(incident))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
}

fn error(status: StatusCode, msg: &str) -> Response {
    (status, Json(json!({ "error": msg }))).into_response()
}

/// A query string that does not parse is a 400 with a JSON error, like every other refusal.
struct ApiQuery<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(q)) => Ok(ApiQuery(q)),
            Err(e) => Err(error(StatusCode::BAD_REQUEST, &e.body_text())),
        }
    }
}

/// A number from the query within `range`, or the default when absent: a 400 saying the
/// range otherwise (never a silent clamp: the caller would not get what it asked for).
fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    name: &str,
    value: Option<T>,
    default: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, Refusal> {
    match value {
        None => Ok(default),
        Some(v) if range.contains(&v) => Ok(v),
        Some(v) => Err(Refusal(
            StatusCode::BAD_REQUEST,
            format!("{name}={v} is out of range: {} to {}", range.start(), range.end()),
        )),
    }
}

/// A refusal of bad input: its status and what was wrong.
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        error(self.0, &self.1)
    }
}

fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not found")
}

fn failed(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "api");
    error(StatusCode::SERVICE_UNAVAILABLE, "temporarily unavailable")
}

async fn audit_log(app: &App, user: &str, client: &Client, action: &'static str, target: &str, detail: &str) {
    app.audit(&format!("api:{user}"), &client.text(), action, target, detail).await;
}

/// The home's id when the user may see it, with the view audited; `None` is a 404.
async fn visible_home(app: &App, user: &User, client: &Client, id: &str, what: &str) -> Option<HomeId> {
    let home = view::home(&app.snap().engine, user, id)?.id.clone();
    audit_log(app, &user.username, client, "view_home", id, what).await;
    Some(home)
}

async fn homes(State(app): State<App>, ApiUser(user): ApiUser, client: Client) -> Response {
    let snap = app.snap();
    let homes = view::homes(&snap.engine, &user, crate::edge::clock::now());
    audit_log(&app, &user.username, &client, "list_homes", "homes", &format!("{} homes", homes.len())).await;
    Json(json!({ "homes": homes })).into_response()
}

async fn home(State(app): State<App>, ApiUser(user): ApiUser, client: Client, Path(id): Path<String>) -> Response {
    let snap = app.snap();
    let Some(plan) = view::home(&snap.engine, &user, &id) else { return not_found() };
    audit_log(&app, &user.username, &client, "view_home", &id, "").await;
    Json(view::home_view(plan, snap.engine.home_state(&plan.id), crate::edge::clock::now())).into_response()
}

/// `?hours=` (1–168, default 24).
#[derive(Deserialize)]
struct Hours {
    hours: Option<u32>,
}

async fn telemetry(
    State(app): State<App>,
    ApiUser(user): ApiUser,
    client: Client,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<Hours>,
) -> Response {
    let hours = match in_range("hours", q.hours, 24, 1..=168) {
        Ok(h) => h,
        Err(r) => return r.into_response(),
    };
    let Some(home) = visible_home(&app, &user, &client, &id, "telemetry").await else { return not_found() };
    let since = crate::edge::clock::now() - chrono::Duration::hours(i64::from(hours));
    match app.db(move |s| Ok(s.telemetry_since(&home, since, 2000)?)).await {
        Ok(t) => Json(json!({ "telemetry": t })).into_response(),
        Err(e) => failed(e),
    }
}

/// `?limit=` (1–1000, default 100).
#[derive(Deserialize)]
struct Limit {
    limit: Option<usize>,
}

async fn events(
    State(app): State<App>,
    ApiUser(user): ApiUser,
    client: Client,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<Limit>,
) -> Response {
    let limit = match in_range("limit", q.limit, 100, 1..=1000) {
        Ok(l) => l,
        Err(r) => return r.into_response(),
    };
    let Some(home) = visible_home(&app, &user, &client, &id, "events").await else { return not_found() };
    match app.db(move |s| Ok(s.events_for(&home, limit)?)).await {
        Ok(e) => Json(json!({ "events": e })).into_response(),
        Err(e) => failed(e),
    }
}

/// One notification to one recipient's channel, and how its delivery went.
#[derive(Debug, Serialize)]
pub struct Delivery {
    /// Idempotency key.
    pub key: String,
    /// The recipient's role.
    pub role: mamori_protocol::mqtt::Role,
    /// The recipient.
    pub recipient: String,
    /// The channel (`webhook:NAME`, `sms:NAME`, `email`, `console:NAME`).
    pub channel: String,
    /// `pending` (waiting or retrying), `delivered`, `abandoned`.
    pub status: OutboxStatus,
    /// Attempts so far.
    pub attempts: u32,
    /// The last failure.
    pub last_error: Option<String>,
    /// When it was written.
    pub created_at: Time,
    /// When it was delivered.
    pub delivered_at: Option<Time>,
    /// The next recipient was notified because this one could not be reached.
    pub fallback_done: bool,
}

impl Delivery {
    fn of(r: &OutboxRow) -> Delivery {
        Delivery {
            key: r.key.clone(),
            role: r.role,
            recipient: r.recipient.clone(),
            channel: r.channel.key(),
            status: r.status,
            attempts: r.attempts,
            last_error: r.last_error.clone(),
            created_at: r.created_at,
            delivered_at: r.delivered_at,
            fallback_done: r.fallback_done,
        }
    }
}

#[derive(Serialize)]
struct AlertWithDeliveries {
    #[serde(flatten)]
    alert: AlertView,
    deliveries: Vec<Delivery>,
}

async fn home_alerts(
    State(app): State<App>,
    ApiUser(user): ApiUser,
    client: Client,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<Limit>,
) -> Response {
    let limit = match in_range("limit", q.limit, 50, 1..=500) {
        Ok(l) => l,
        Err(r) => return r.into_response(),
    };
    let Some(home) = visible_home(&app, &user, &client, &id, "alerts").await else { return not_found() };
    let r = app
        .db(move |s| {
            let mut out = Vec::new();
            for a in s.alerts_for(&home, limit)? {
                let deliveries = s.outbox_for(&a.id)?.iter().map(Delivery::of).collect();
                out.push(AlertWithDeliveries { alert: AlertView::of(&a), deliveries });
            }
            Ok(out)
        })
        .await;
    match r {
        Ok(a) => Json(json!({ "alerts": a })).into_response(),
        Err(e) => failed(e),
    }
}

async fn alerts(State(app): State<App>, ApiUser(user): ApiUser, client: Client) -> Response {
    let snap = app.snap();
    let list: Vec<AlertView> =
        view::open_alerts(&snap.engine, &user, crate::edge::clock::now()).into_iter().map(|o| o.alert).collect();
    audit_log(&app, &user.username, &client, "list_alerts", "alerts", &format!("{} alerts", list.len())).await;
    Json(json!({ "alerts": list })).into_response()
}

async fn alert(State(app): State<App>, ApiUser(user): ApiUser, client: Client, Path(id): Path<String>) -> Response {
    if id.len() > 64 {
        return not_found();
    }
    let snap = app.snap();
    // Active alerts are in the snapshot; cleared ones only in the store.
    let active = view::alert(&snap.engine, &user, &id).cloned();
    let r = app.db(move |s| {
        let Some(a) = active.map_or_else(|| s.alert(&id), |a| Ok(Some(a)))? else { return Ok(None) };
        let d: Vec<Delivery> = s.outbox_for(&a.id)?.iter().map(Delivery::of).collect();
        Ok(Some((a, d)))
    });
    let (a, deliveries) = match r.await {
        Ok(Some(x)) => x,
        Ok(None) => return not_found(),
        Err(e) => return failed(e),
    };
    // Scope: the alert's home must be one the user may see.
    if !snap.engine.plan(&a.home).is_some_and(|p| super::view::sees(&snap.engine, &user, p)) {
        return not_found();
    }
    // The deliveries name their recipients and channels: personal data.
    audit_log(&app, &user.username, &client, "view_alert", &a.id, a.home.as_str()).await;
    Json(AlertWithDeliveries { alert: AlertView::of(&a), deliveries }).into_response()
}

/// `{"note": "..."}` (optional).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AckBody {
    note: Option<String>,
}

/// The acknowledgement's body: none at all, or JSON. Bad JSON is a 400, JSON of the wrong
/// shape a 422, another content type a 415, each with a JSON error saying why.
fn ack_body(headers: &HeaderMap, body: &[u8]) -> Result<AckBody, Refusal> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(AckBody::default());
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(Refusal(StatusCode::UNSUPPORTED_MEDIA_TYPE, "the body must be application/json".into()));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let not_json = |e: &serde_json::Error| Refusal(StatusCode::BAD_REQUEST, format!("the body is not JSON: {e}"));
    let b = serde_path_to_error::deserialize::<_, AckBody>(&mut de).map_err(|e| match e.inner().classify() {
        // The field's path first (`note: invalid type...`).
        serde_json::error::Category::Data => Refusal(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        _ => not_json(e.inner()),
    })?;
    de.end().map_err(|e| not_json(&e))?;
    if b.note.as_ref().is_some_and(|n| n.chars().count() > MAX_NOTE_CHARS) {
        return Err(Refusal(StatusCode::UNPROCESSABLE_ENTITY, format!("note: at most {MAX_NOTE_CHARS} characters")));
    }
    Ok(b)
}

/// The longest note an acknowledgement may carry (the pages cut theirs to this).
const MAX_NOTE_CHARS: usize = 200;

async fn ack(
    State(app): State<App>,
    ApiUser(user): ApiUser,
    client: Client,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = match ack_body(&headers, &body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let snap = app.snap();
    let now = crate::edge::clock::now();
    let visible = view::alert(&snap.engine, &user, &id).is_some()
        || view::incidents(&snap.engine, &user, now).iter().any(|i| i.id == id);
    if !visible {
        return not_found();
    }
    let note = body.note.and_then(|n| super::note(&n));
    let detail = note.clone().unwrap_or_default();
    let (role, by) = (user.role.ack_role(), format!("api:{}", user.username));
    match app.ask(|reply| WebRequest::Ack { alert_id: id.clone(), role, by, note, reply }).await {
        Ok(()) => {
            audit_log(&app, &user.username, &client, "ack", &id, &detail).await;
            Json(json!({ "acknowledged": id })).into_response()
        }
        Err(e) => error(StatusCode::CONFLICT, &e),
    }
}

async fn clear(State(app): State<App>, ApiUser(user): ApiUser, client: Client, Path(id): Path<String>) -> Response {
    let snap = app.snap();
    let Some(alert) = view::alert(&snap.engine, &user, &id) else { return not_found() };
    if !user.may_clear() {
        return error(StatusCode::FORBIDDEN, "this role may acknowledge but not clear");
    }
    let home = alert.home.as_str().to_string();
    let by = format!("api:{}", user.username);
    match app.ask(|reply| WebRequest::Clear { alert_id: id.clone(), by, reply }).await {
        Ok(()) => {
            audit_log(&app, &user.username, &client, "clear", &id, &home).await;
            Json(json!({ "cleared": id })).into_response()
        }
        Err(e) => error(StatusCode::CONFLICT, &e),
    }
}

/// `POST /homes/{id}/drill`: a labelled test message to every contact of the home; the answer
/// names the drill, whose report (who received it on which channel, who acknowledged) is
/// `GET /alerts/{drill}`.
async fn drill(State(app): State<App>, ApiUser(user): ApiUser, client: Client, Path(id): Path<String>) -> Response {
    let snap = app.snap();
    let Some(plan) = view::home(&snap.engine, &user, &id) else { return not_found() };
    if !user.may_drill() {
        return error(StatusCode::FORBIDDEN, "only coordinators and administrators may start a drill");
    }
    match app.drill(plan.id.clone(), format!("api:{}", user.username)).await {
        Ok(drill) => {
            audit_log(&app, &user.username, &client, "drill", &drill, &id).await;
            (StatusCode::ACCEPTED, Json(json!({ "drill": drill, "report": format!("/api/v1/alerts/{drill}") })))
                .into_response()
        }
        Err(e) => error(StatusCode::CONFLICT, &e),
    }
}

/// `POST /municipalities/{code}/drill`: a drill at every home of the municipality (its
/// coordinators and administrators); homes with a drill already open are listed apart.
async fn municipality_drill(
    State(app): State<App>,
    ApiUser(user): ApiUser,
    client: Client,
    Path(code): Path<String>,
) -> Response {
    if !user.may_see_municipality(&code) {
        return not_found();
    }
    if !user.may_drill() {
        return error(StatusCode::FORBIDDEN, "only coordinators and administrators may start a drill");
    }
    let snap = app.snap();
    let homes: Vec<mamori_protocol::mqtt::HomeId> = snap
        .engine
        .states_and_plans()
        .filter(|(p, _)| p.municipality == code && super::view::sees(&snap.engine, &user, p))
        .map(|(p, _)| p.id.clone())
        .collect();
    if homes.is_empty() {
        return not_found();
    }
    let (mut drills, mut refused) = (Vec::new(), Vec::new());
    for home in homes {
        match app.drill(home.clone(), format!("api:{}", user.username)).await {
            Ok(d) => drills.push(json!({ "home": home.as_str(), "drill": d, "report": format!("/api/v1/alerts/{d}") })),
            Err(e) => refused.push(json!({ "home": home.as_str(), "error": e })),
        }
    }
    audit_log(&app, &user.username, &client, "drill", &code, &format!("{} homes", drills.len())).await;
    (StatusCode::ACCEPTED, Json(json!({ "drills": drills, "refused": refused }))).into_response()
}

async fn incidents(State(app): State<App>, ApiUser(user): ApiUser, client: Client) -> Response {
    let snap = app.snap();
    let list = view::incidents(&snap.engine, &user, crate::edge::clock::now());
    audit_log(&app, &user.username, &client, "list_incidents", "incidents", &format!("{} incidents", list.len())).await;
    Json(json!({ "incidents": list })).into_response()
}

async fn incident(State(app): State<App>, ApiUser(user): ApiUser, client: Client, Path(id): Path<String>) -> Response {
    let snap = app.snap();
    match view::incidents(&snap.engine, &user, crate::edge::clock::now()).into_iter().find(|i| i.id == id) {
        Some(i) => {
            audit_log(&app, &user.username, &client, "view_incident", &id, &i.municipality).await;
            Json(i).into_response()
        }
        None => not_found(),
    }
}

async fn openapi() -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], include_str!("openapi.json")).into_response()
}
