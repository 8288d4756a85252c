//! HTTP: the dashboard, the JSON API, metrics and acknowledgement links.
//!
//! ## Where the data comes from
//! The service loop owns the engine. After anything changes it publishes a copy
//! ([`Snapshot`], at most four times a second) on a `watch` channel; pages, the API and live
//! streams read that copy, never the loop's own state, so a slow page cannot hold up ingest.
//! History (telemetry for the charts, events, cleared alerts, delivery attempts) and the
//! accounts and audit tables are read from the gateway's SQLite file through a second
//! connection (WAL: readers do not block the writer). Acknowledging and clearing go to the
//! loop as requests ([`WebRequest`]), exactly like acknowledgement links.
//!
//! ## Access
//! Pages use a session cookie (`HttpOnly`, `SameSite=Strict`, `Secure` unless configured for
//! a loopback demo) and a per-session CSRF token in every form; the API uses bearer tokens
//! (no cookies, so no CSRF). Every handler that names a home, alert or incident looks it up
//! through the user's scope ([`crate::admin::accounts::User::may_see`]); outside the scope the
//! answer is the same 404 as for an id that does not exist. Logins, failed logins, views of
//! a home, acknowledgements, clears and account changes go to the audit log
//! ([`crate::admin::audit`]) with the client's address ([`crate::edge::listen::TrustedProxies`]).
//!
//! | module | what |
//! |---|---|
//! | [`ack`] | signed acknowledgement links (no account) |
//! | [`auth`] | login, logout, sessions, CSRF, bearer tokens |
//! | [`view`] | what a user may see, as plain data (pages and API share it) |
//! | [`html`] | the ground floor of the pages: the ja/en words, times, the bare page, 404; how pages are written (maud templates, escaped by default) |
//! | [`layout`] | the page around every signed-in page (navigation, language, logout) |
//! | [`pages`] | the overview (`GET /`) and the cells a home's row shows |
//! | [`alerts`] | the alerts page, an alert's row, acknowledging and clearing |
//! | [`incidents`] | a regional incident's triage list (page and CSV), its acknowledgement |
//! | [`home`] | a home's page: state, charts, history, delivery; [`contacts`] its contacts |
//! | [`family`], [`facility`] | the family's phone page and the facility's page, with their answers |
//! | [`plan`], [`review`], [`readiness`], [`admin`] | the care-plan editor, a closed incident's record, the council's readiness report, accounts and administration |
//! | [`live`] | the live stream (`/events`) and the static CSS and JavaScript |
//! | [`api`] | `/api/v1` and its OpenAPI document |
//! | [`metrics`] | Prometheus `/metrics` |
//!
//! The pages depend downwards only: `html` ← `auth` ← `layout` ← the pages, and no two
//! modules here import each other; the service (`crate::service::run`) uses this module, never the
//! other way round (the counters `/metrics` shows live in [`metrics`]).

pub mod ack;
pub mod admin;
pub mod alerts;
pub mod api;
pub mod auth;
pub mod contacts;
pub mod facility;
pub mod family;
pub mod home;
pub mod html;
pub mod incidents;
pub mod layout;
pub mod live;
pub mod metrics;
pub mod pages;
pub mod plan;
pub mod readiness;
pub mod review;
pub mod view;

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use mamori_protocol::mqtt::Role;
use tokio::sync::{mpsc, oneshot, watch};

use crate::admin::accounts::Throttle;
use crate::domain::engine::Engine;
use crate::domain::message::Style;
use crate::edge::listen::{Peer, TrustedProxies};
use crate::edge::store::Store;

/// A request for the service loop.
#[derive(Debug)]
pub enum WebRequest {
    /// Acknowledge an alert or incident.
    Ack {
        /// Alert or incident id.
        alert_id: String,
        /// The role it counts as.
        role: Role,
        /// Who (`link`, or an account's username).
        by: String,
        /// Note.
        note: Option<String>,
        /// The answer.
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// A family's or a facility's answer about a home's alert.
    Answer {
        /// Alert id.
        alert_id: String,
        /// Who (an account's username).
        by: String,
        /// The answer.
        answer: crate::domain::engine::Answer,
        /// Who was sent it ([`Told`]).
        reply: oneshot::Sender<Result<Told, String>>,
    },
    /// Start a drill at a home; the answer is the drill's alert id.
    Drill {
        /// The home.
        home: mamori_protocol::mqtt::HomeId,
        /// Who (an account's username).
        by: String,
        /// The answer.
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// Store a care plan from the dashboard's editor (validated there); the answer is its
    /// version.
    SavePlan {
        /// The plan.
        home: Box<crate::domain::homes::Home>,
        /// Who (an account's username).
        by: String,
        /// The version the editor started from; 0 for a new home.
        based_on: u32,
        /// The answer.
        reply: oneshot::Sender<Result<u32, SaveRefusal>>,
    },
    /// Clear an alert by hand.
    Clear {
        /// Alert id.
        alert_id: String,
        /// Who (an account's username).
        by: String,
        /// The answer.
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// What became of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Told {
    /// Recorded, and sent on to these roles.
    Sent(Vec<mamori_protocol::mqtt::Role>),
    /// Recorded, but nobody may be sent it (no contact of the roles that act on it, or no
    /// consent in force for them); or it is a coordinator taking the home on.
    Nobody,
    /// The same answer was already the last word: nothing new, nobody told again.
    Again,
}

impl Told {
    /// For a redirect's query (`told=coordinator,facility`, `none`, `again`).
    pub fn query(&self) -> String {
        match self {
            Told::Sent(roles) => roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(","),
            Told::Nobody => "none".into(),
            Told::Again => "again".into(),
        }
    }

    /// From a redirect's query.
    pub fn from_query(q: &str) -> Option<Told> {
        match q {
            "none" => Some(Told::Nobody),
            "again" => Some(Told::Again),
            _ => {
                let roles: Option<Vec<_>> = q.split(',').map(|r| r.parse().ok()).collect();
                roles.filter(|r| !r.is_empty()).map(Told::Sent)
            }
        }
    }

    /// The notice the person who answered reads.
    pub fn notice(&self, lang: crate::domain::homes::Lang) -> String {
        use crate::domain::homes::Lang;
        match (self, lang) {
            (Told::Sent(roles), Lang::Ja) => format!(
                "{}に伝えました。",
                roles.iter().map(|r| crate::domain::message::role_text(*r, lang)).collect::<Vec<_>>().join("と")
            ),
            (Told::Sent(roles), Lang::En) => {
                let who: Vec<&str> = roles.iter().map(|r| crate::domain::message::role_text(*r, lang)).collect();
                format!("Sent to {}.", who.join(" and "))
            }
            (Told::Nobody, Lang::Ja) => {
                "記録しましたが、知らせる相手がいません（連絡先か保護者の同意が登録されていません）。急ぐときは電話してください。".into()
            }
            (Told::Nobody, Lang::En) => "Recorded, but there is nobody to send it to (no contact, or no consent from the guardian, is registered). Call if it is urgent.".into(),
            (Told::Again, Lang::Ja) => "同じ答えはすでに伝えています。".into(),
            (Told::Again, Lang::En) => "You already gave this answer; it was passed on then.".into(),
        }
    }
}

/// Record an answer in the engine and say who it was sent to (the service loop does this; a
/// test's stand-in for the loop does the same).
pub fn record_answer(
    engine: &mut crate::domain::engine::Engine,
    alert_id: &str,
    by: &str,
    answer: crate::domain::engine::Answer,
    now: crate::domain::engine::Time,
) -> Result<Told, crate::domain::engine::EngineError> {
    let before = engine.alert_by_id(alert_id).map(|a| (a.home.clone(), a.acks.len()));
    engine.handle(
        crate::domain::engine::Input::Answer { alert_id: alert_id.to_string(), by: by.to_string(), answer },
        now,
    )?;
    let after = engine.alert_by_id(alert_id).map(|a| a.acks.len());
    Ok(match before {
        Some((_, n)) if after == Some(n) => Told::Again,
        Some((home, _)) => match engine.answer_roles(&home, answer, now) {
            roles if roles.is_empty() => Told::Nobody,
            roles => Told::Sent(roles),
        },
        None => Told::Nobody,
    })
}

/// Why a care plan from the dashboard was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaveRefusal {
    /// Another version was stored since the editor opened (the newest is `now`).
    Changed {
        /// The newest version.
        now: u32,
    },
    /// A new home's id is taken.
    Exists,
    /// The store or the service refused (degraded, stopping).
    Failed(String),
}

/// What the loop publishes for the web: a copy of the engine after a change.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The engine (plans, states, alerts, incidents).
    pub engine: Engine,
    /// Increases with every publication.
    pub version: u64,
    /// The version at which each home last changed (a live stream compares these numbers,
    /// never the homes' content).
    pub home_versions: std::collections::HashMap<mamori_protocol::mqtt::HomeId, u64>,
    /// The version at which each municipality's incident last changed.
    pub incident_versions: std::collections::HashMap<String, u64>,
}

impl Snapshot {
    /// A snapshot of an engine with nothing marked as changed (tests, the first publication).
    pub fn of(engine: Engine) -> Snapshot {
        Snapshot { engine, version: 0, home_versions: Default::default(), incident_versions: Default::default() }
    }
}

/// Session settings.
#[derive(Debug, Clone, Copy)]
pub struct SessionSettings {
    /// Mark cookies `Secure`.
    pub secure_cookies: bool,
    /// Idle limit.
    pub idle: chrono::Duration,
    /// Absolute limit.
    pub max_age: chrono::Duration,
}

/// Everything the handlers share.
#[derive(Clone)]
pub struct App {
    /// Message style (link signing, time zone).
    pub style: Style,
    /// What the config offers a care plan (endpoints and channels), for the plan editor's
    /// validation: the same as the homes file's.
    pub known: Arc<crate::domain::homes::Known>,
    /// Proxies whose client header is believed.
    pub proxies: TrustedProxies,
    /// To the service loop.
    pub tx: mpsc::Sender<WebRequest>,
    /// The latest snapshot.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// The web's own connection to the gateway's database.
    pub db: Arc<Mutex<Box<dyn Store>>>,
    /// Failed logins.
    pub throttle: Arc<Mutex<Throttle>>,
    /// The service's counters.
    pub counters: Arc<metrics::Counters>,
    /// The gateway's own health.
    pub health: Arc<crate::service::health::Health>,
    /// Sessions.
    pub sessions: SessionSettings,
    /// Live streams open now (bounded by [`MAX_LIVE_STREAMS`]).
    pub live_streams: Arc<std::sync::atomic::AtomicUsize>,
    /// Live refreshes per (session, action, target): when one was last written to the audit
    /// log, and how many came since.
    pub live_audit: Arc<Mutex<LiveAudit>>,
    /// The key TOTP secrets are sealed with.
    pub totp_key: crate::admin::accounts::TotpKey,
    /// Password verifications at once (argon2 is ~50 ms of CPU and 19 MiB each).
    pub argon2: Arc<tokio::sync::Semaphore>,
    /// Voice calls waiting for their outcome.
    pub calls: crate::edge::delivery::CallWaiters,
}

/// Live refreshes of a page are written to the audit log at most once per this many minutes
/// per session and page.
pub const LIVE_AUDIT_EVERY_MIN: i64 = 10;

/// Password verifications at once.
pub const ARGON2_AT_ONCE: usize = 2;

/// How long a login waits for a verification slot before it is told to try again.
pub const ARGON2_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Every verification slot was taken for [`ARGON2_WAIT`].
#[derive(Debug)]
pub struct Busy;

/// At most this many live streams at once; more get a 503 and the page refreshes itself
/// once a minute instead.
pub const MAX_LIVE_STREAMS: usize = 1000;

impl App {
    /// Run a database call off the async threads.
    pub async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Store) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = db.lock().map_err(|_| anyhow::anyhow!("the web's database connection is poisoned"))?;
            f(guard.as_mut())
        })
        .await
        .map_err(|e| anyhow::anyhow!("database task: {e}"))?
    }

    /// Verify a password against its hash on the bounded pool, never while the database
    /// connection is held: a burst of logins costs the pool's slots, not every page's database.
    pub async fn verify_password(&self, hash: String, password: String) -> Result<bool, Busy> {
        let permit = tokio::time::timeout(ARGON2_WAIT, self.argon2.clone().acquire_owned())
            .await
            .map_err(|_| Busy)?
            .map_err(|_| Busy)?;
        let ok = tokio::task::spawn_blocking(move || crate::admin::accounts::verify_password(&hash, &password))
            .await
            .unwrap_or(false);
        drop(permit);
        Ok(ok)
    }

    /// The latest snapshot.
    pub fn snap(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// Append to the audit log (a failure is logged, never shown to the user: the action
    /// it records has already happened).
    pub async fn audit(&self, actor: &str, ip: &str, action: &'static str, target: &str, detail: &str) {
        let (actor, ip, target, detail, now) =
            (actor.to_string(), ip.to_string(), target.to_string(), detail.to_string(), crate::edge::clock::now());
        let r = self.db(move |s| Ok(crate::admin::audit::append(s, now, &actor, &ip, action, &target, &detail)?)).await;
        if let Err(e) = r {
            tracing::error!(error = %e, "audit log");
        }
    }

    /// Audit a read of personal data by a logged-in browser. A page the live updater fetches
    /// again (`X-Mamori-Live`) is written too, aggregated: one entry per session and page per
    /// [`LIVE_AUDIT_EVERY_MIN`] minutes, with the count of refreshes since the last one. No
    /// header leaves a read out of the log.
    pub async fn audit_view(&self, v: &auth::Viewer, ip: &str, action: &'static str, target: &str, detail: &str) {
        if !v.live {
            return self.audit(&v.user.username, ip, action, target, detail).await;
        }
        let now = crate::edge::clock::now();
        let write = {
            let mut m = self.live_audit.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if m.len() > 100_000 {
                m.retain(|_, (at, _)| now - *at < chrono::Duration::minutes(LIVE_AUDIT_EVERY_MIN));
            }
            let e = m
                .entry((v.session.clone(), action, target.to_string()))
                .or_insert((chrono::DateTime::<chrono::Utc>::MIN_UTC, 0));
            e.1 += 1;
            if now - e.0 >= chrono::Duration::minutes(LIVE_AUDIT_EVERY_MIN) {
                let n = e.1;
                *e = (now, 0);
                Some(n)
            } else {
                None
            }
        };
        if let Some(n) = write {
            let d =
                format!("live refresh ({n} since the last entry; one entry per {LIVE_AUDIT_EVERY_MIN} min) {detail}");
            self.audit(&v.user.username, ip, action, target, d.trim_end()).await;
        }
    }

    /// Ask the loop and wait for its answer.
    pub async fn ask(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), String>>) -> WebRequest,
    ) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| "the gateway is stopping".to_string())?;
        rx.await.map_err(|_| "the gateway is stopping".to_string())?
    }

    /// Start a drill at a home through the service loop: the drill's id.
    pub async fn drill(&self, home: mamori_protocol::mqtt::HomeId, by: String) -> Result<String, String> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(WebRequest::Drill { home, by, reply }).await.map_err(|_| "the gateway is stopping".to_string())?;
        rx.await.map_err(|_| "the gateway is stopping".to_string())?
    }

    /// Record an answer through the service loop: who was sent it.
    pub async fn answer(
        &self,
        alert_id: String,
        by: String,
        answer: crate::domain::engine::Answer,
    ) -> Result<Told, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(WebRequest::Answer { alert_id, by, answer, reply })
            .await
            .map_err(|_| "the gateway is stopping".to_string())?;
        rx.await.map_err(|_| "the gateway is stopping".to_string())?
    }

    /// Store a care plan through the service loop; its version.
    pub async fn save_plan(
        &self,
        home: crate::domain::homes::Home,
        by: String,
        based_on: u32,
    ) -> Result<u32, SaveRefusal> {
        let stopping = || SaveRefusal::Failed("the gateway is stopping".into());
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(WebRequest::SavePlan { home: Box::new(home), by, based_on, reply })
            .await
            .map_err(|_| stopping())?;
        rx.await.map_err(|_| stopping())?
    }
}

/// Live refreshes per (session, action, target): when the last entry was written, and how
/// many refreshes came since.
pub type LiveAudit = std::collections::HashMap<(String, &'static str, String), (chrono::DateTime<chrono::Utc>, u64)>;

/// The router. Serve it with connect info ([`Peer`]) so that the client's address is known.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics::metrics))
        .route("/ack/{alert}/{role}/{sig}", get(ack::ack_page).post(ack::ack_post))
        .route("/voice/ack/{alert}/{role}/{sig}", post(ack::voice_ack))
        .route("/voice/status/{token}", post(ack::voice_status))
        .route("/login", get(auth::login_page).post(auth::login_post))
        .route("/logout", post(auth::logout))
        .route("/lang/{lang}", get(auth::set_lang))
        .route("/", get(pages::overview))
        .route("/alerts", get(alerts::alerts))
        .route("/alerts/{id}/ack", post(alerts::ack_alert))
        .route("/alerts/{id}/clear", post(alerts::clear_alert))
        .route("/homes/{id}", get(home::home))
        .route("/homes/{id}/drill", post(home::drill_home))
        .route("/homes/{id}/answer", post(family::answer))
        .route("/homes/{id}/plan", get(plan::edit).post(plan::save))
        .route("/plans/new", get(plan::new).post(plan::create))
        .route("/incidents/{id}", get(incidents::incident))
        .route("/incidents/{id}/ack", post(incidents::ack_incident))
        .route("/incidents/{id}/triage.csv", get(incidents::incident_csv))
        .route("/incidents/{id}/notes", post(review::add_note))
        .route("/incidents/{id}/review.csv", get(review::csv))
        .route("/readiness", get(readiness::page))
        .route("/readiness.csv", get(readiness::csv))
        .route("/account", get(admin::account))
        .route("/account/password", post(admin::account_password))
        .route("/account/totp", post(admin::account_totp))
        .route("/admin/users", get(admin::admin_users).post(admin::admin_add_user))
        .route("/admin/users/{name}", post(admin::admin_change_user))
        .route("/admin/audit", get(admin::admin_audit))
        .route("/admin/audit.csv", get(admin::admin_audit_csv))
        .route("/admin/delivery", get(admin::admin_delivery))
        .route("/events", get(live::live))
        .route("/static/app.css", get(live::css))
        .route("/static/app.js", get(live::js))
        .nest("/api/v1", api::router())
        .layer(axum::middleware::map_response(security_headers))
        .with_state(app)
}

/// `GET /healthz`: 200 `ok`, or 503 with one line per problem (the store refusing writes,
/// no homes, no broker connection).
async fn healthz(axum::extract::State(app): axum::extract::State<App>) -> Response {
    use axum::response::IntoResponse;
    let problems = app.health.problems(crate::edge::clock::now());
    if problems.is_empty() {
        "ok\n".into_response()
    } else {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy\n{}\n", problems.join("\n"))).into_response()
    }
}

async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    let set = |h: &mut axum::http::HeaderMap, k: header::HeaderName, v: &'static str| {
        h.entry(k).or_insert(HeaderValue::from_static(v));
    };
    // Everything is served by the gateway itself: nothing may load from anywhere else.
    set(
        h,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; \
         frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    );
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::REFERRER_POLICY, "no-referrer");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::CACHE_CONTROL, "no-store");
    r
}

/// The client's address, when the router is served with connect info.
pub struct Client(pub Option<IpAddr>);

impl Client {
    /// For the audit log.
    pub fn text(&self) -> String {
        self.0.map_or_else(|| "-".into(), |c| c.to_string())
    }
}

impl FromRequestParts<App> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<ConnectInfo<Peer>>().map(|c| c.0 .0.ip());
        Ok(Client(peer.map(|p| app.proxies.client(p, &parts.headers))))
    }
}

/// An acknowledgement's note as stored: trimmed, at most 200 characters, none when empty.
pub fn note(text: &str) -> Option<String> {
    Some(text.trim().chars().take(200).collect::<String>()).filter(|n| !n.is_empty())
}
