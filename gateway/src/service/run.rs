//! `mamori-gateway run`: the service.
//!
//! One task (the service loop) owns the engine and the store. Around it:
//! - the MQTT link and outbound tasks ([`crate::edge::mqtt`]);
//! - the HTTP server, on **its own runtime** (two threads), so that however many dashboard
//!   viewers there are, they cannot take the threads that page people;
//! - each outbox send in its own task, given a slot by the [`Dispatcher`] (shared per
//!   destination, circuit breakers, leases), reporting back through a channel bounded by the
//!   number of slots;
//! - the operators' notifier (`notify_operators`): notices about the gateway itself, sent
//!   without the store;
//! - the pruner thread: history older than `telemetry_retention_h`, deleted in small batches
//!   on its own connection, off the loop.
//!
//! ## A batch
//! The loop takes every message waiting (up to 1,000), and in **one transaction** stores them
//! (events deduplicated by `(home, seq)`; telemetry history at most one snapshot per home per
//! `telemetry_history_every_s`), feeds the new ones to the engine, and writes the resulting
//! alerts, home states and outbox rows. After the commit it acknowledges the messages to the
//! broker and publishes acknowledgements to agents. Then the timers run (`Engine::poll`) in a
//! second transaction, and due outbox rows are sent. The loop sleeps until the earliest real
//! deadline: the engine's, the next outbox row that is not due yet (rows due now are sent,
//! leased, or wait for a slot, whose result wakes the loop), the snapshot, the housekeeping
//! second.
//!
//! ## When the store refuses writes
//! A store error (disk full, read-only, I/O error) does not end the process. The transaction
//! is rolled back and the engine reloaded from the store (which holds exactly what was
//! committed), and the gateway is *degraded*:
//! - messages it could not store are **not** acknowledged to the broker; QoS 1 ones are held in
//!   memory (up to [`HELD_MAX`]) and stored, then acknowledged, once writes work again (the
//!   broker stops sending more once its in-flight window is full; QoS 0 telemetry is dropped);
//! - rows already in the outbox keep being sent; their results are kept in memory and
//!   recorded later (a delivered row is never sent again meanwhile);
//! - no new decisions are made (the timers wait), and acknowledgements from the dashboard are
//!   refused with a clear message;
//! - `/healthz` fails and says why, `/metrics` shows it, the heartbeat goes to its `fail_url`,
//!   and the operators are told ([`Notice::StoreDegraded`]) through every channel, none of
//!   which needs the store;
//! - every [`PROBE_EVERY_S`] a small write is tried; when it works, the held messages and
//!   results go in, and the operators are told it recovered.
//!
//! ## Refusing the wrong store
//! `run` never creates a database: an empty `data_dir` is far more often a data volume that is
//! not mounted than a new installation (`init` creates one). The store records when it first
//! connected to the broker (which then keeps a session for the gateway's client id). A store
//! with no such record and no stored message, connecting to a broker that holds a session for
//! this gateway (`session present`), is not the store that session belongs to: the gateway
//! stops with a clear message (exit 2) before acknowledging anything, unless
//! `init --adopt-broker-session` said otherwise. And while the
//! store has no homes at all, no message is acknowledged (they would all be dropped as
//! unregistered).
//!
//! ## Validation
//! A topic that does not parse, a home that is not registered, a payload over 16 KiB or one
//! that does not decode is counted, logged (rate-limited) and acknowledged to the broker (so
//! it is not redelivered forever), and never reaches the engine.
//!
//! Over 800 lines, and not for a good reason: this loop still interleaves ingest, web
//! requests, delivery results, timers and pruning; issue 20 asks for it as `handle(input, now)
//! -> effects` around the engine, which would split it. Until then, each concern is a method
//! of [`Service`] taking `now`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mamori_protocol::mqtt::{self, Channel, Event, HomeId, Role, Status, Telemetry, Topic};
use rand::Rng;
use rumqttc::{AsyncClient, Publish, QoS};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::domain::engine::{Engine, Input, Output, Time};
use crate::domain::homes::{ChannelRef, HomesFile, Lang};
use crate::domain::message::Style;
use crate::domain::notice::{Notice, StoreProblem};
use crate::domain::policy::Policies;
use crate::edge::clock;
use crate::edge::delivery::{after_attempt, expand, Failure, Next, ResolvedEndpoint, Sender};
use crate::edge::mqtt::{FromMqtt, Outbound};
use crate::edge::store::{OutboxRow, OutboxStatus, Store, StoreError};
use crate::service::dispatch::{Decision, Dispatcher};
use crate::service::health::{Degraded, Health};
use crate::web::metrics::Counters;
use crate::web::{self, SaveRefusal, Snapshot, WebRequest};

/// The web's copy of the engine is refreshed at most this often, ms.
pub const SNAPSHOT_EVERY_MS: i64 = 250;

/// After new input the engine's timers are looked at within this long, ms (not after every
/// batch: with 20,000 homes each look is a pass over them all). Timers already due are looked
/// at when they fall due, as before.
pub const POLL_EVERY_MS: i64 = 100;

/// Delivery results are recorded together, at most this long after the first of them, ms (or
/// at once when [`RECORD_BATCH`] wait): one commit for a storm's results, not one each (on
/// PostgreSQL each commit waits for its WAL flush: one per result made a storm's pages
/// seconds late). A result not yet recorded only means the same message, with its key, may be
/// sent again after a crash.
pub const RECORD_EVERY_MS: i64 = 50;

/// Delivery results waiting that are recorded at once.
pub const RECORD_BATCH: usize = 500;

/// Whether `every_ms` has passed since `then`. A wall clock set back (now before then) counts
/// as passed: otherwise nothing would happen until the clock caught up again.
pub fn passed(now: Time, then: Time, every_ms: i64) -> bool {
    now < then || now - then >= chrono::Duration::milliseconds(every_ms)
}

/// When `every_ms` will have passed since `then` (now, when the clock was set back).
pub fn when_passed(now: Time, then: Time, every_ms: i64) -> Time {
    if now < then {
        now
    } else {
        then + chrono::Duration::milliseconds(every_ms)
    }
}
/// Messages held in memory while the store refuses writes (QoS 1 only; more stay at the
/// broker, unacknowledged, and come back at the next connection).
pub const HELD_MAX: usize = 10_000;
/// While degraded, a write is tried this often, s.
pub const PROBE_EVERY_S: i64 = 2;
/// Notices for the operators waiting to be sent (more are dropped, and logged).
pub const NOTICES_QUEUE: usize = 256;
/// PUBACKs and agent acknowledgements waiting for the outbound task.
pub const OUTBOUND_QUEUE: usize = 20_000;
/// History pruning: rows per transaction.
pub const PRUNE_BATCH: usize = 2_000;

/// Where the running gateway can be reached (for the demo and tests).
#[derive(Debug, Clone)]
pub struct Ready {
    /// The broker it connects to.
    pub broker: std::net::SocketAddr,
    /// The HTTP listener.
    pub http: std::net::SocketAddr,
}

/// Why the service stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The store is not the one the broker's session belongs to.
    #[error(
        "the broker holds a session for client id `{client_id}`, but this database ({path}) has never \
         connected with it nor stored a message: it is not the store that session belongs to (is the data volume \
         mounted?). Nothing was acknowledged. If this new database is meant to take over, run `mamori-gateway init \
         --config <file> --adopt-broker-session` once"
    )]
    WrongStore {
        /// The database.
        path: String,
        /// The gateway's client id.
        client_id: String,
    },
}

/// Resolve a config's secrets and the message style.
pub fn style(config: &Config) -> anyhow::Result<Style> {
    let secret = config.link_secret.resolve().map_err(|e| anyhow::anyhow!("link_secret: {e}"))?;
    if let Some(why) = crate::config::weak_secret(&secret) {
        anyhow::bail!("link_secret: expected a random secret of at least 16 characters ({why})");
    }
    Ok(Style {
        public_url: config.public_url.clone(),
        link_secret: secret.into_bytes(),
        offset: config.offset().context("utc_offset")?,
    })
}

/// Open the store for an admin command, creating it if needed, and import what changed in
/// the config's homes file, if any (as `run` does: a plan edited in the dashboard is kept).
pub fn open_store(config: &Config) -> anyhow::Result<Box<dyn Store>> {
    let at = config.store_location().map_err(anyhow::Error::msg)?;
    if let Some(dir) = at.sqlite_dir() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create data_dir {}", dir.display()))?;
    }
    let mut store = crate::edge::store::open(&at)?;
    import_homes(config, store.as_mut())?;
    Ok(store)
}

/// Open the existing store for `run` (never creating one), and import the homes file: the
/// plans that changed only, and when the store refuses the write (a full disk), the stored
/// plans are used and the gateway starts degraded rather than not at all.
///
/// "Changed" means changed in the file since the file last stored it: a plan edited in the
/// dashboard since then is kept (a restart never undoes it), and an entry edited in the file
/// replaces it, as a new version like any other.
pub fn open_existing_store(config: &Config) -> anyhow::Result<Box<dyn Store>> {
    let mut store = crate::edge::store::open_existing(&config.store_location().map_err(anyhow::Error::msg)?)?;
    let changed = homes_file_changes(config, store.as_ref())?;
    if !changed.is_empty() {
        if let Err(e) = store.upsert_homes(&changed, HOMES_FILE) {
            tracing::error!(error = %e, homes = changed.len(), "the homes file's changes cannot be stored: using the stored plans");
        }
    }
    Ok(store)
}

/// The config's homes file's plans that changed in the file since the file last stored them
/// (none without a homes file).
fn homes_file_changes(config: &Config, store: &dyn Store) -> anyhow::Result<Vec<crate::domain::homes::Home>> {
    let Some(path) = &config.homes_file else { return Ok(Vec::new()) };
    let file = HomesFile::load(path, &config.known())?;
    let stored: BTreeMap<HomeId, crate::domain::homes::Home> =
        store.homes()?.into_iter().map(|h| (h.id.clone(), h)).collect();
    // The plans stored before versions were kept count as the file's (they came from it or
    // from `homes import`, and either way the file has not changed since if they match).
    let from_file: BTreeMap<HomeId, crate::domain::homes::Home> = store
        .latest_plans_by("")?
        .into_iter()
        .chain(store.latest_plans_by(HOMES_FILE)?)
        .map(|h| (h.id.clone(), h))
        .collect();
    Ok(file.homes.into_iter().filter(|h| stored.get(&h.id) != Some(h) && from_file.get(&h.id) != Some(h)).collect())
}

/// Who stored a plan read from the config's `homes_file`, in the version history.
pub const HOMES_FILE: &str = "homes file";

fn import_homes(config: &Config, store: &mut dyn Store) -> anyhow::Result<()> {
    let changed = homes_file_changes(config, store)?;
    if !changed.is_empty() {
        store.upsert_homes(&changed, HOMES_FILE)?;
    }
    Ok(())
}

/// An engine with the config's settings and nothing in it.
pub fn empty_engine(config: &Config) -> Engine {
    let settings = crate::domain::engine::Settings {
        require_consent: config.privacy.require_consent,
        local_offset_s: config.offset().map_or(0, |o| o.local_minus_utc()),
        ..config.escalation.clone()
    };
    Engine::new(settings, Policies { config: config.policy.clone() })
}

/// The engine as the store has it.
pub fn load_engine(config: &Config, store: &dyn Store) -> Result<Engine, StoreError> {
    let mut engine = empty_engine(config);
    for h in store.homes()? {
        engine.upsert_home(h);
    }
    for (id, st) in store.states()? {
        if engine.knows(&id) {
            engine.restore_state(id, st);
        }
    }
    // Newest first: of two rows left active for one home and kind, the newer is kept.
    for a in store.alerts(true, i64::MAX as usize)? {
        engine.restore_alert(a);
    }
    for i in store.open_incidents()? {
        engine.restore_incident(i);
    }
    Ok(engine)
}

/// Who hears the operators' notices: the config's `[[operators]]`, or else every distinct
/// support-centre contact of the homes.
fn operators(config: &Config, engine: &Engine) -> Vec<(String, Lang, Vec<ChannelRef>)> {
    if !config.operators.is_empty() {
        return config.operators.iter().map(|o| (o.name.clone(), o.language, o.channels.clone())).collect();
    }
    let mut seen = BTreeSet::new();
    engine
        .states_and_plans()
        .flat_map(|(p, _)| p.contacts_for(Role::SupportCentre))
        .filter(|c| seen.insert(c.channels.clone()))
        .map(|c| (c.name.clone(), c.language, c.channels.clone()))
        .collect()
}

/// A notice for the operators, with who they are now.
pub struct NoticeJob {
    /// The notice.
    pub notice: Notice,
    /// Its recipients.
    pub to: Vec<(String, Lang, Vec<ChannelRef>)>,
    /// When it was decided.
    pub at: Time,
}

/// The operators' notifier: every channel of every recipient, each retried in memory with
/// back-off for up to an hour (never through the outbox: the store may be what failed).
fn notify_operators(sender: Sender, mut rx: mpsc::Receiver<NoticeJob>, public_url: String) {
    tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(job) = rx.recv().await {
            n += 1;
            tracing::warn!(notice = job.notice.kind(), recipients = job.to.len(), "notice to the operators");
            if job.to.is_empty() {
                tracing::error!(notice = job.notice.kind(), "no operators to tell: add [[operators]] to the config");
            }
            for (name, lang, channels) in job.to {
                let (subject, body) = job.notice.render(lang);
                for channel in channels {
                    let row = OutboxRow {
                        key: format!(
                            "notice:{}:{n}:{}:{name}:{}",
                            job.at.timestamp(),
                            job.notice.kind(),
                            channel.key()
                        ),
                        alert_id: "gateway".into(),
                        home: None,
                        role: Role::SupportCentre,
                        recipient: name.clone(),
                        channel,
                        lang,
                        subject: subject.clone(),
                        body: body.clone(),
                        content: serde_json::to_value(&job.notice).unwrap_or_default(),
                        created_at: job.at,
                        next_attempt_at: job.at,
                        attempts: 0,
                        status: OutboxStatus::Pending,
                        last_error: None,
                        delivered_at: None,
                        fallback_done: false,
                        conditional: false,
                    };
                    let (sender, url) = (sender.clone(), public_url.clone());
                    tokio::spawn(async move {
                        let mut delay = Duration::from_secs(1);
                        for attempt in 1..=60 {
                            match sender.send(&row, clock::now(), &url).await {
                                Ok(()) => {
                                    tracing::info!(key = %row.key, attempt, "notice delivered");
                                    return;
                                }
                                Err(e) => tracing::warn!(key = %row.key, attempt, error = %e, "notice not delivered"),
                            }
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(60));
                        }
                    });
                }
            }
        }
    });
}

/// The history pruner: on its own thread and connection, in small batches, every ten minutes.
fn spawn_pruner(at: crate::edge::store::Location, retention_h: u32) -> std::sync::mpsc::Sender<()> {
    let (stop, rx) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("mamori-prune".into())
        .spawn(move || {
            let mut store = match crate::edge::store::open_existing(&at) {
                Ok(s) => s,
                Err(e) => return tracing::warn!(error = %e, "pruner: cannot open the store"),
            };
            loop {
                let before = clock::now() - chrono::Duration::hours(i64::from(retention_h));
                let mut total = 0;
                loop {
                    match store.prune_history(before, PRUNE_BATCH) {
                        Ok(n) => total += n,
                        Err(e) => {
                            tracing::warn!(error = %e, "pruning history");
                            break;
                        }
                    }
                    if total % PRUNE_BATCH != 0 || total == 0 {
                        break;
                    }
                    // Let the service loop write between batches.
                    if rx.recv_timeout(Duration::from_millis(20)) != Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                        return;
                    }
                }
                if total > 0 {
                    tracing::info!(rows = total, "history pruned");
                }
                if rx.recv_timeout(Duration::from_secs(600)) != Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                    return;
                }
            }
        })
        .ok();
    stop
}

/// The web's runtime, shut down without waiting when dropped (a runtime dropped inside
/// another one's task would panic).
pub struct WebRuntime(Option<tokio::runtime::Runtime>);

/// The HTTP listener and the runtime it runs on. A standby binds it at start and serves the
/// dashboard on it; at takeover the same listener goes to the service, so the port is never
/// closed and never taken by anyone else in between.
pub struct Listener {
    /// The web's runtime.
    pub rt: WebRuntime,
    /// Connections accepted, for [`crate::edge::listen::serve`].
    pub incoming: crate::edge::listen::Incoming,
}

impl Listener {
    /// Build the web's runtime and bind `[http]` on it, until `cancel`.
    pub async fn bind(config: &Config, cancel: CancellationToken) -> anyhow::Result<Listener> {
        let http = &config.http;
        let tls = match (&http.tls_cert_file, &http.tls_key_file) {
            (Some(cert), Some(key)) => Some(crate::edge::listen::tls_config(cert, key)?),
            _ => None,
        };
        let limits = http.limits();
        let proxies = http.proxies().map_err(|e| anyhow::anyhow!("http.trusted_proxies: {e}"))?;
        let open_files = crate::edge::listen::raise_open_files();
        if open_files < (limits.max_connections as u64) + 256 {
            tracing::warn!(
                open_files,
                max_connections = limits.max_connections,
                "the open-files limit is low for http.max_connections: raise LimitNOFILE"
            );
        }
        let rt = WebRuntime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("mamori-web")
                .enable_all()
                .build()
                .context("the web runtime")?,
        ));
        let bind = http.bind;
        let incoming = rt
            .handle()
            .spawn(async move { crate::edge::listen::bind(bind, tls, limits, proxies, cancel).await })
            .await
            .context("the web runtime")?
            .context("http listener")?;
        Ok(Listener { rt, incoming })
    }
}

/// What the web's handlers share, for the active's service or a standby.
#[allow(clippy::too_many_arguments)]
pub fn web_app(
    config: &Config,
    style: &Style,
    tx: mpsc::Sender<WebRequest>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    db: Box<dyn Store>,
    counters: Arc<Counters>,
    health: Arc<Health>,
    calls: crate::edge::delivery::CallWaiters,
) -> anyhow::Result<web::App> {
    let http = &config.http;
    Ok(web::App {
        style: style.clone(),
        known: Arc::new(config.known()),
        proxies: http.proxies().map_err(|e| anyhow::anyhow!("http.trusted_proxies: {e}"))?,
        tx,
        snapshot,
        db: Arc::new(std::sync::Mutex::new(db)),
        throttle: Default::default(),
        counters,
        health,
        sessions: web::SessionSettings {
            secure_cookies: http.cookies_secure(&config.public_url),
            idle: chrono::Duration::minutes(i64::from(http.session_idle_min)),
            max_age: chrono::Duration::hours(i64::from(http.session_max_h)),
        },
        live_streams: Default::default(),
        live_audit: Default::default(),
        totp_key: crate::admin::accounts::TotpKey::derive(&style.link_secret),
        argon2: Arc::new(tokio::sync::Semaphore::new(web::ARGON2_AT_ONCE)),
        calls,
    })
}

impl WebRuntime {
    /// Its handle (the current runtime's in a test without one of its own).
    pub fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(rt) => rt.handle().clone(),
            None => tokio::runtime::Handle::current(),
        }
    }
}

impl Drop for WebRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The service.
pub struct Service {
    config: Config,
    store: Box<dyn Store>,
    /// The active gateway's lease, when several share the store: nothing is sent without it.
    lease: Option<Arc<crate::service::lease::Lease>>,
    /// Whether the operators were told that no standby is seen.
    standby_watch: crate::domain::notice::StandbyWatch,
    /// Where the store is, for the web's and the pruner's own connections.
    store_at: crate::edge::store::Location,
    engine: Engine,
    style: Style,
    sender: Sender,
    outbound: Option<mpsc::Sender<Outbound>>,
    counters: Arc<Counters>,
    health: Arc<Health>,
    dispatcher: Dispatcher,
    results_tx: mpsc::Sender<(OutboxRow, Result<(), Failure>)>,
    results_rx: mpsc::Receiver<(OutboxRow, Result<(), Failure>)>,
    /// Attempt results not in the store yet (the store refused them), by row key: the latest
    /// state of each row. A delivered row stays leased (never sent again); a failed one is
    /// retried from this copy at its next attempt time.
    unrecorded: BTreeMap<String, Next>,
    /// Messages not stored yet, in arrival order (not acknowledged to the broker).
    held: VecDeque<Publish>,
    degraded: Option<Degraded>,
    next_probe: Time,
    /// The engine could not be reloaded after a failed transaction.
    engine_stale: bool,
    /// When the engine's timers next need a look (its `next_deadline`, computed after each
    /// look, not at every wake).
    poll_due: Option<Time>,
    /// When they were last looked at.
    polled_at: Time,
    /// Input reached the engine since (it may have made a timer due sooner).
    input_since_poll: bool,
    /// When delivery results were last recorded.
    recorded_at: Time,
    first_message_stored: bool,
    adopt_session: bool,
    /// The store has connected to the broker with this client id before (in memory at once;
    /// in the store as soon as it takes the write).
    session_recorded: bool,
    session_written: bool,
    /// The broker connection is up.
    broker_up: bool,
    /// Per home: when telemetry history was last stored, and the mains state then.
    history: HashMap<HomeId, (Time, Option<bool>)>,
    notices: mpsc::Sender<NoticeJob>,
    notices_rx: Option<mpsc::Receiver<NoticeJob>>,
    log_budget: u32,
    snapshot: watch::Sender<Arc<Snapshot>>,
    snapshot_dirty: bool,
    snapshot_at: Time,
    home_versions: HashMap<HomeId, u64>,
    incident_versions: HashMap<String, u64>,
    changed_homes: BTreeSet<HomeId>,
    changed_incidents: BTreeSet<String>,
}

impl Service {
    /// Build the service: open the existing store, load homes and state, resolve secrets.
    pub fn new(config: Config, console: mpsc::Sender<String>) -> anyhow::Result<Service> {
        let style = style(&config)?;
        let store_at = config.store_location().map_err(anyhow::Error::msg)?;
        let mut store = open_existing_store(&config)?;
        let engine = load_engine(&config, store.as_ref())?;
        let mut endpoints = BTreeMap::new();
        for (name, e) in &config.endpoints {
            let secret = e.secret.resolve().map_err(|err| anyhow::anyhow!("endpoints.{name}.secret: {err}"))?;
            endpoints.insert(
                name.clone(),
                ResolvedEndpoint {
                    kind: e.kind,
                    url: e.url.clone(),
                    secret: secret.into_bytes(),
                    template: e.template.clone(),
                },
            );
        }
        let smtp_password = match config.smtp.as_ref().and_then(|s| s.password.as_ref()) {
            Some(p) => Some(p.resolve().map_err(|e| anyhow::anyhow!("smtp.password: {e}"))?),
            None => None,
        };
        let line = match &config.line {
            Some(l) => Some(crate::edge::delivery::LineApi {
                base_url: l.api_base_url.trim_end_matches('/').to_string(),
                token: l
                    .channel_access_token
                    .resolve()
                    .map_err(|e| anyhow::anyhow!("line.channel_access_token: {e}"))?,
            }),
            None => None,
        };
        let voice = match &config.voice {
            Some(v) => Some(crate::edge::delivery::VoiceApi {
                base_url: v.api_base_url.trim_end_matches('/').to_string(),
                account_sid: v.account_sid.clone(),
                auth_token: v.auth_token.resolve().map_err(|e| anyhow::anyhow!("voice.auth_token: {e}"))?,
                from: v.from.clone(),
                ring_timeout_s: v.ring_timeout_s,
                call_deadline: Duration::from_secs(u64::from(v.call_deadline_s)),
                public_url: config.public_url.trim_end_matches('/').to_string(),
            }),
            None => None,
        };
        let sender = Sender::new(
            endpoints,
            config.smtp.as_ref().map(|s| (s, smtp_password)),
            line,
            voice,
            Duration::from_millis(config.delivery.timeout_ms),
            console,
        )
        .map_err(|e| anyhow::anyhow!(e))?;
        let (results_tx, results_rx) = mpsc::channel(config.delivery.concurrency.max(1));
        let (notices, notices_rx) = mpsc::channel(NOTICES_QUEUE);
        let now = clock::now();
        let snap = Snapshot {
            engine: engine.clone(),
            version: 0,
            home_versions: Default::default(),
            incident_versions: Default::default(),
        };
        let (snapshot, _) = watch::channel(Arc::new(snap));
        let first_message_stored =
            store.meta(crate::edge::store::META_FIRST_MESSAGE_AT)?.is_some() || store.has_messages()?;
        let adopt_session = store.meta(crate::edge::store::META_ADOPT_SESSION)?.is_some();
        let session_recorded = store.meta(crate::edge::store::META_BROKER_SESSION_AT)?.is_some();
        // TOTP secrets stored in clear by an older version are sealed now.
        let key = crate::admin::accounts::TotpKey::derive(&style.link_secret);
        match crate::admin::accounts::Accounts::new(store.as_mut()).seal_totp_secrets(&key) {
            Ok(0) => {}
            Ok(n) => tracing::info!(accounts = n, "two-factor secrets encrypted at rest"),
            Err(e) => {
                tracing::warn!(error = %e, "two-factor secrets still in clear (will try again at the next start)")
            }
        }
        let health = Arc::new(Health::new(now));
        health.set_no_homes(engine.home_count() == 0);
        Ok(Service {
            dispatcher: Dispatcher::new(&config.delivery),
            config,
            store,
            lease: None,
            standby_watch: Default::default(),
            store_at,
            engine,
            style,
            sender,
            outbound: None,
            counters: Arc::new(Counters::default()),
            health,
            results_tx,
            results_rx,
            unrecorded: BTreeMap::new(),
            held: VecDeque::new(),
            degraded: None,
            next_probe: now,
            engine_stale: false,
            poll_due: None,
            polled_at: Time::MIN_UTC,
            input_since_poll: true,
            recorded_at: Time::MIN_UTC,
            first_message_stored,
            adopt_session,
            session_recorded,
            session_written: session_recorded,
            broker_up: false,
            history: HashMap::new(),
            notices,
            notices_rx: Some(notices_rx),
            log_budget: 100,
            snapshot,
            snapshot_dirty: false,
            snapshot_at: now,
            home_versions: HashMap::new(),
            incident_versions: HashMap::new(),
            changed_homes: BTreeSet::new(),
            changed_incidents: BTreeSet::new(),
        })
    }

    /// The counters.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// The gateway's health.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// The snapshots the web reads.
    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    /// Publish a copy of the engine for the web, at most every [`SNAPSHOT_EVERY_MS`], with the
    /// version at which each home and incident last changed (so a live stream compares
    /// numbers, never content).
    fn publish_snapshot(&mut self, now: Time) {
        if !self.snapshot_dirty || !passed(now, self.snapshot_at, SNAPSHOT_EVERY_MS) {
            return;
        }
        let version = self.snapshot.borrow().version + 1;
        for h in std::mem::take(&mut self.changed_homes) {
            self.home_versions.insert(h, version);
        }
        for m in std::mem::take(&mut self.changed_incidents) {
            self.incident_versions.insert(m, version);
        }
        self.snapshot.send_replace(Arc::new(Snapshot {
            engine: self.engine.clone(),
            version,
            home_versions: self.home_versions.clone(),
            incident_versions: self.incident_versions.clone(),
        }));
        self.snapshot_dirty = false;
        self.snapshot_at = now;
    }

    fn reject(&mut self, topic: &str, why: &str) {
        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
        if self.log_budget > 0 {
            self.log_budget -= 1;
            tracing::warn!(topic = %topic.chars().take(120).collect::<String>(), reason = why, "message refused");
        }
    }

    /// Store and apply one batch of messages in one transaction.
    fn ingest(&mut self, batch: &[Publish], now: Time) -> Result<Vec<(HomeId, mqtt::Ack)>, StoreError> {
        let (acks, stored) = self.transaction(|s| s.ingest_tx(batch, now))?;
        self.first_message_stored |= stored;
        Ok(acks)
    }

    /// Whether a telemetry snapshot goes into the history (at most one per home per
    /// `telemetry_history_every_s`, and every change of mains).
    fn keep_history(&mut self, home: &HomeId, t: &Telemetry, now: Time) -> bool {
        let every = chrono::Duration::seconds(i64::from(self.config.telemetry_history_every_s));
        match self.history.get(home) {
            Some((at, mains)) if now - *at < every && *mains == t.mains_present => false,
            _ => {
                self.history.insert(home.clone(), (now, t.mains_present));
                true
            }
        }
    }

    /// The acknowledgements for agents, and whether anything was stored.
    fn ingest_tx(&mut self, batch: &[Publish], now: Time) -> Result<(Vec<(HomeId, mqtt::Ack)>, bool), StoreError> {
        let mut stored = false;
        // The batch's events are stored first, all at once, to know which are new (one
        // statement, not one per event); a duplicate is not applied.
        let events: Vec<(usize, HomeId, Event)> = batch
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let t = Topic::parse(p.topic.as_str()).ok()?;
                if t.channel != Channel::Event || !self.engine.knows(&t.home) {
                    return None;
                }
                mqtt::decode::<Event>(&p.payload).ok().map(|e| (i, t.home, e))
            })
            .collect();
        let pairs: Vec<(HomeId, Event)> = events.iter().map(|(_, h, e)| (h.clone(), e.clone())).collect();
        let new: HashMap<usize, bool> =
            events.iter().map(|(i, _, _)| *i).zip(self.store.insert_events(&pairs, now)?).collect();
        let (mut statuses, mut telemetry) = (Vec::new(), Vec::new());
        for (i, p) in batch.iter().enumerate() {
            let topic = p.topic.as_str();
            let parsed = match Topic::parse(topic) {
                Ok(t) => t,
                Err(e) => {
                    self.reject(topic, &e.to_string());
                    continue;
                }
            };
            if !self.engine.knows(&parsed.home) {
                self.counters.unknown_home.fetch_add(1, Ordering::Relaxed);
                if self.log_budget > 0 {
                    self.log_budget -= 1;
                    tracing::warn!(home = parsed.home.as_str(), "message from a home that is not registered");
                }
                continue;
            }
            let input = match parsed.channel {
                Channel::Status => match mqtt::decode::<Status>(&p.payload) {
                    Ok(s) => {
                        statuses.push((parsed.home.clone(), s.clone()));
                        if p.retain {
                            Input::RetainedStatus(parsed.home, s)
                        } else {
                            Input::Status(parsed.home, s)
                        }
                    }
                    Err(e) => {
                        self.reject(topic, &e.to_string());
                        continue;
                    }
                },
                Channel::Telemetry => match mqtt::decode::<Telemetry>(&p.payload) {
                    Ok(t) => {
                        if self.keep_history(&parsed.home, &t, now) {
                            telemetry.push((parsed.home.clone(), t.clone()));
                        }
                        Input::Telemetry(parsed.home, t)
                    }
                    Err(e) => {
                        self.reject(topic, &e.to_string());
                        continue;
                    }
                },
                Channel::Event => match mqtt::decode::<Event>(&p.payload) {
                    Ok(e) => {
                        if !new.get(&i).copied().unwrap_or(false) {
                            self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        Input::Event(parsed.home, e)
                    }
                    Err(e) => {
                        self.reject(topic, &e.to_string());
                        continue;
                    }
                },
                Channel::Ack => continue, // our own acknowledgements, if a filter ever matches them
            };
            stored = true;
            self.counters.ingested.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.engine.handle(input, now) {
                tracing::warn!(error = %e, "not applied");
            }
        }
        self.store.insert_statuses(&statuses, now)?;
        self.store.insert_telemetry_many(&telemetry, now)?;
        if stored && !self.first_message_stored {
            self.store.set_meta(crate::edge::store::META_FIRST_MESSAGE_AT, &now.to_rfc3339())?;
        }
        Ok((self.persist()?, stored))
    }

    /// Write the engine's outputs and dirty state (inside a transaction).
    fn persist(&mut self) -> Result<Vec<(HomeId, mqtt::Ack)>, StoreError> {
        let mut acks = Vec::new();
        let outputs = self.engine.take_outputs();
        let dirty = self.engine.take_dirty();
        if !outputs.is_empty() || !dirty.is_empty() {
            self.snapshot_dirty = true;
        }
        // Written a table at a time (one statement each where the store can), each alert once
        // as it is last.
        let alerts = crate::domain::engine::alerts_to_store(&outputs, &dirty);
        let mut rows = Vec::new();
        let mut incidents: Vec<crate::domain::engine::Incident> = Vec::new();
        let mut incident_at: HashMap<String, usize> = HashMap::new();
        for out in outputs {
            match out {
                Output::Alert(a) => {
                    self.changed_homes.insert(a.home);
                }
                Output::Incident(i) => {
                    self.changed_incidents.insert(i.municipality.clone());
                    // Each incident once, as it is last.
                    match incident_at.get(&i.id) {
                        Some(&n) => incidents[n] = i,
                        None => {
                            incident_at.insert(i.id.clone(), incidents.len());
                            incidents.push(i);
                        }
                    }
                }
                Output::AgentAck(h, a) => acks.push((h, a)),
                Output::Notify(n) => rows.extend(expand(&n, &self.style)),
                // Not stored: told at once (if the transaction then fails, the engine is
                // reloaded and decides again; a notice twice is better than none).
                Output::Notice(notice) => self.tell_operators(notice, clock::now()),
            }
        }
        for i in &incidents {
            self.store.save_incident(i)?;
        }
        self.store.save_alerts(&alerts)?;
        self.store.enqueue_many(&rows)?;
        self.store.save_states(&dirty)?;
        self.changed_homes.extend(dirty.into_iter().map(|(h, _)| h));
        Ok(acks)
    }

    fn tell_operators(&self, notice: Notice, now: Time) {
        if !self.leased() {
            // A deposed gateway has nothing to tell: its store refusing it is its lease, not a
            // failure, and the active one speaks for the cluster.
            tracing::info!(notice = notice.kind(), "not told: this gateway no longer holds the lease");
            return;
        }
        let to = operators(&self.config, &self.engine);
        if self.notices.try_send(NoticeJob { notice, to, at: now }).is_err() {
            tracing::error!("operators' notices are backed up: this one is dropped (it is logged)");
        }
    }

    /// Run `f` in a transaction; on a store error roll back, reload the engine from the store
    /// (which holds exactly what was committed) and become degraded.
    fn transaction<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let result = self.store.begin().and_then(|()| f(self)).and_then(|v| self.store.commit().map(|()| v));
        if let Err(e) = &result {
            self.store.rollback();
            let text = e.to_string();
            self.store_failed(&text, clock::now());
        }
        result
    }

    fn store_failed(&mut self, error: &str, now: Time) {
        self.health.store_errors.fetch_add(1, Ordering::Relaxed);
        // Whatever the engine decided in the failed transaction did not happen.
        let _ = self.engine.take_outputs();
        match load_engine(&self.config, self.store.as_ref()) {
            Ok(mut e) => {
                e.carry_uplink(&self.engine);
                self.engine = e;
                self.engine_stale = false;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot reload the engine from the store; retrying");
                self.engine_stale = true;
            }
        }
        self.next_probe = now + chrono::Duration::seconds(PROBE_EVERY_S);
        // While degraded no message is taken in: that time is the centre's downtime, not the
        // homes' silence.
        self.engine.set_uplink(false, now);
        if self.degraded.is_none() {
            let problem = StoreProblem::of(error);
            tracing::error!(
                error,
                ?problem,
                "the store refuses writes: degraded (sending what is committed, holding new messages at the broker)"
            );
            let d = Degraded { since: now, problem, detail: error.to_string() };
            self.health.set_degraded(Some(d.clone()));
            self.degraded = Some(d);
            self.tell_operators(Notice::StoreDegraded { problem, detail: error.to_string() }, now);
        }
    }

    /// While degraded: try a small write; when it works, store what was held and recover.
    fn try_recover(&mut self, now: Time) {
        if self.degraded.is_none() || now < self.next_probe {
            return;
        }
        self.next_probe = now + chrono::Duration::seconds(PROBE_EVERY_S);
        if let Err(e) = self.store.probe_write(now) {
            tracing::debug!(error = %e, "the store still refuses writes");
            return;
        }
        if self.engine_stale {
            match load_engine(&self.config, self.store.as_ref()) {
                Ok(mut e) => {
                    e.carry_uplink(&self.engine);
                    self.engine = e;
                    self.engine_stale = false;
                    self.input_since_poll = true;
                }
                Err(_) => return,
            }
        }
        let since = self.degraded.as_ref().map_or(now, |d| d.since);
        if !self.flush_unrecorded(now) {
            return;
        }
        while !self.held.is_empty() {
            let n = self.held.len().min(1000);
            let batch: Vec<Publish> = self.held.iter().take(n).cloned().collect();
            match self.ingest(&batch, now) {
                Ok(acks) => {
                    self.held.drain(..n);
                    self.ack_to_broker(batch);
                    self.publish_acks(acks);
                }
                Err(_) => return,
            }
        }
        self.degraded = None;
        if self.broker_up {
            self.engine.set_uplink(true, now);
        }
        self.health.held_messages.store(0, Ordering::Relaxed);
        self.health.set_degraded(None);
        tracing::warn!(after_s = (now - since).num_seconds(), "the store takes writes again: recovered");
        self.tell_operators(Notice::StoreRecovered { after_s: (now - since).num_seconds() }, now);
        self.snapshot_dirty = true;
    }

    /// Whether this gateway may act: always, unless it is one of several and its lease is no
    /// longer valid (then it neither sends nor writes; the loop ends when the keeper says so).
    fn leased(&self) -> bool {
        self.lease.as_ref().is_none_or(|l| l.valid())
    }

    /// Whether the engine's timers need a look now: one fell due, or input came in and the
    /// last look is [`POLL_EVERY_MS`] old.
    fn poll_needed(&self, now: Time) -> bool {
        self.poll_due.is_some_and(|d| now >= d) || (self.input_since_poll && passed(now, self.polled_at, POLL_EVERY_MS))
    }

    /// Run the timers, when they need a look.
    fn tick(&mut self, now: Time) -> Result<Vec<(HomeId, mqtt::Ack)>, StoreError> {
        if !self.leased() {
            // Nothing may be done until the keeper ends the service: no looking again at
            // once (the loop would spin), the housekeeping's second is soon enough.
            self.input_since_poll = false;
            self.polled_at = now;
            return Ok(Vec::new());
        }
        if !self.poll_needed(now) {
            return Ok(Vec::new());
        }
        let acks = self.transaction(|s| {
            s.engine.poll(now);
            s.persist()
        })?;
        self.polled_at = now;
        self.input_since_poll = false;
        self.poll_due = self.engine.next_deadline(now);
        Ok(acks)
    }

    fn degraded_refusal(&self) -> Option<String> {
        self.degraded
            .as_ref()
            .map(|d| format!("the gateway cannot record right now ({}); try again shortly", d.problem.text(Lang::En)))
    }

    /// Apply an acknowledgement.
    pub fn acknowledge(
        &mut self,
        alert_id: &str,
        role: mqtt::Role,
        by: &str,
        note: Option<String>,
        now: Time,
    ) -> Result<Vec<(HomeId, mqtt::Ack)>, String> {
        if let Some(why) = self.degraded_refusal() {
            return Err(why);
        }
        let input = Input::Ack { alert_id: alert_id.to_string(), role, by: by.to_string(), note };
        self.engine.handle(input, now).map_err(|e| e.to_string())?;
        tracing::info!(alert = alert_id, ?role, by, "acknowledged");
        self.transaction(|s| s.persist()).map_err(|e| e.to_string())
    }

    /// Record a family's or a facility's answer.
    pub fn answer(
        &mut self,
        alert_id: &str,
        by: &str,
        answer: crate::domain::engine::Answer,
        now: Time,
    ) -> Result<(Vec<(HomeId, mqtt::Ack)>, web::Told), String> {
        if let Some(why) = self.degraded_refusal() {
            return Err(why);
        }
        let told = web::record_answer(&mut self.engine, alert_id, by, answer, now).map_err(|e| e.to_string())?;
        tracing::info!(alert = alert_id, answer = answer.as_str(), by, told = %told.query(), "answered");
        let acks = self.transaction(|s| s.persist()).map_err(|e| e.to_string())?;
        Ok((acks, told))
    }

    /// A request from the web, answered.
    fn on_web(&mut self, req: WebRequest) {
        let (r, reply) = match req {
            WebRequest::Ack { alert_id, role, by, note, reply } => {
                (self.acknowledge(&alert_id, role, &by, note, clock::now()), reply)
            }
            WebRequest::Answer { alert_id, by, answer, reply } => {
                let r = self.answer(&alert_id, &by, answer, clock::now()).map(|(acks, told)| {
                    self.publish_acks(acks);
                    told
                });
                let _ = reply.send(r);
                return;
            }
            WebRequest::Clear { alert_id, by, reply } => (self.clear(&alert_id, &by, clock::now()), reply),
            WebRequest::Drill { home, by, reply } => {
                let _ = reply.send(self.drill(&home, &by, clock::now()));
                return;
            }
            WebRequest::SavePlan { home, by, based_on, reply } => {
                let _ = reply.send(self.save_plan(*home, &by, based_on));
                return;
            }
        };
        let r = match r {
            Ok(acks) => {
                self.publish_acks(acks);
                Ok(())
            }
            Err(e) => Err(e),
        };
        let _ = reply.send(r);
    }

    /// Store a care plan changed (or created) in the dashboard, already validated there, and
    /// use it from now on; its new version number (the same as before when nothing changed).
    /// `based_on` is the version the editor started from (0: a new home); when another
    /// version was stored meanwhile, nothing is stored.
    pub fn save_plan(&mut self, home: crate::domain::homes::Home, by: &str, based_on: u32) -> Result<u32, SaveRefusal> {
        if let Some(why) = self.degraded_refusal() {
            return Err(SaveRefusal::Failed(why));
        }
        if !self.leased() {
            return Err(SaveRefusal::Failed("this gateway is not the active one any more".into()));
        }
        let id = home.id.clone();
        let known = self.engine.plan(&id).is_some();
        let version = web::plan::store_plan(self.store.as_mut(), known, &home, by, based_on)?;
        tracing::info!(home = %id.as_str(), by, version, "care plan saved");
        self.engine.upsert_home(home);
        self.changed_homes.insert(id);
        self.snapshot_dirty = true;
        Ok(version)
    }

    /// Start a drill at a home: every contact gets a labelled test message. The drill's id.
    pub fn drill(&mut self, home: &HomeId, by: &str, now: Time) -> Result<String, String> {
        if let Some(why) = self.degraded_refusal() {
            return Err(why);
        }
        self.engine.handle(Input::Drill { home: home.clone(), by: by.to_string() }, now).map_err(|e| e.to_string())?;
        let id = self
            .engine
            .home_state(home)
            .and_then(|s| s.alerts.get(&crate::domain::engine::AlertKind::Drill))
            .map(|a| a.id.clone())
            .ok_or_else(|| "the drill did not start".to_string())?;
        tracing::info!(home = %home.as_str(), by, drill = %id, "drill started");
        self.transaction(|s| s.persist()).map_err(|e| e.to_string())?;
        Ok(id)
    }

    /// Clear an alert by hand.
    pub fn clear(&mut self, alert_id: &str, by: &str, now: Time) -> Result<Vec<(HomeId, mqtt::Ack)>, String> {
        if let Some(why) = self.degraded_refusal() {
            return Err(why);
        }
        let input = Input::Clear { alert_id: alert_id.to_string(), by: by.to_string() };
        self.engine.handle(input, now).map_err(|e| e.to_string())?;
        tracing::info!(alert = alert_id, by, "cleared by hand");
        self.transaction(|s| s.persist()).map_err(|e| e.to_string())
    }

    /// To the outbound task without waiting. When its queue is full (the broker connection is
    /// stuck) a PUBACK is dropped, so the broker sends that message again at the next
    /// connection (stored already: a duplicate, recognised), and an acknowledgement for an
    /// agent's display is dropped (the alert stays acknowledged at the gateway).
    fn outbound(&self, out: Outbound) {
        let Some(tx) = &self.outbound else { return };
        if tx.try_send(out).is_err() {
            self.counters.outbound_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn publish_acks(&self, acks: Vec<(HomeId, mqtt::Ack)>) {
        for (home, ack) in acks {
            self.outbound(Outbound::AgentAck(home, ack));
        }
    }

    fn ack_to_broker(&self, batch: Vec<Publish>) {
        for p in batch {
            self.outbound(Outbound::Ack(p));
        }
    }

    /// A batch from the broker: store and apply it, then acknowledge it; or hold it.
    fn on_batch(&mut self, batch: Vec<Publish>, now: Time) {
        if !self.leased() {
            // Not acknowledged: the broker gives them to the gateway that holds the lease.
            return;
        }
        if self.engine.home_count() == 0 {
            // A store without homes is not the deployment's: do not acknowledge (and so drop)
            // the homes' messages; the broker keeps them for the right store.
            self.health.set_no_homes(true);
            if self.log_budget > 0 {
                self.log_budget -= 1;
                tracing::error!(messages = batch.len(), "no homes in the store: messages not acknowledged");
            }
            return;
        }
        if self.degraded.is_some() || !self.held.is_empty() {
            self.hold(batch);
            return;
        }
        match self.ingest(&batch, now) {
            Ok(acks) => {
                // Stored: now the broker may forget them.
                self.ack_to_broker(batch);
                self.publish_acks(acks);
            }
            Err(_) => self.hold(batch),
        }
    }

    fn hold(&mut self, batch: Vec<Publish>) {
        for p in batch {
            if p.qos == QoS::AtMostOnce {
                self.counters.dropped_degraded.fetch_add(1, Ordering::Relaxed);
            } else if self.held.len() < HELD_MAX {
                self.held.push_back(p);
            }
            // Beyond that: not acknowledged, so the broker sends it again at the next connection.
        }
        self.health.held_messages.store(self.held.len() as u64, Ordering::Relaxed);
    }

    /// Give due rows their slots. Rows for destinations whose breaker is open are skipped in
    /// bulk first, apart, so that they never take the place of rows that can be sent.
    fn dispatch(&mut self, now: Time) {
        // Several gateways: only the holder of a valid lease sends (crate::service::lease), checked
        // here, again after the store's reads and in each send's task just before it goes.
        if !self.leased() {
            return;
        }
        let closed = self.dispatcher.open_breakers(now);
        let mut rows = Vec::new();
        if !closed.is_empty() {
            match self.store.due_only(now, 1000 + self.dispatcher.leased() + self.unrecorded.len(), &closed) {
                Ok(r) => rows = r,
                Err(e) => tracing::warn!(error = %e, "reading due notifications"),
            }
        }
        let room = self.dispatcher.room();
        if room > 0 {
            let mut skip = self.dispatcher.saturated();
            skip.extend(closed);
            // Rows whose latest copy is in `unrecorded` (not yet due again) can fill the
            // window: ask for that many more.
            match self.store.due(now, room + self.dispatcher.leased() + self.unrecorded.len(), &skip) {
                Ok(r) => rows.extend(r),
                Err(e) => tracing::warn!(error = %e, "reading due notifications"),
            }
        }
        if rows.is_empty() {
            return;
        }
        // Rows whose last result is not recorded yet: their latest copy is here.
        let rows: Vec<OutboxRow> = rows
            .into_iter()
            .filter_map(|row| match self.unrecorded.get(&row.key) {
                None => Some(row),
                Some(next) if next.row.status == OutboxStatus::Pending && next.row.next_attempt_at <= now => {
                    Some(next.row.clone())
                }
                Some(_) => None,
            })
            .collect();
        // A contact's later channel, or a message held past quiet hours: not sent when its
        // role has acknowledged meanwhile or the alert is over.
        // And, with consent required, a message whose recipient no longer has a consent in
        // force (withdrawn, or taken out of the plan) since it was queued.
        let (rows, moot): (Vec<OutboxRow>, Vec<OutboxRow>) = rows.into_iter().partition(|row| {
            (!row.conditional || self.engine.still_needed(row.home.as_ref(), &row.alert_id, row.role, row.created_at))
                && self.engine.may_send(row.home.as_ref(), row.role, &row.recipient, &row.channel, now)
        });
        if !moot.is_empty() {
            for mut row in moot {
                let consent = !self.engine.may_send(row.home.as_ref(), row.role, &row.recipient, &row.channel, now);
                let why = if consent {
                    "not sent: no consent in force for this recipient any more"
                } else {
                    "not sent: acknowledged meanwhile, or the alert is over"
                };
                tracing::info!(key = %row.key, why, "not sent");
                row.status = OutboxStatus::NotNeeded;
                row.last_error = Some(why.into());
                self.unrecorded.insert(row.key.clone(), crate::edge::delivery::Next { row, fallback: false });
            }
            if self.degraded.is_none() {
                self.flush_unrecorded(now);
            }
        }
        if !self.leased() {
            return;
        }
        let mut skipped = Vec::new();
        for d in self.dispatcher.choose(rows, now) {
            match d {
                Decision::Send(row) => {
                    let (sender, tx) = (self.sender.clone(), self.results_tx.clone());
                    let link = self.style.ack_link(&row.alert_id, row.role);
                    let lease = self.lease.clone();
                    tokio::spawn(async move {
                        if lease.is_some_and(|l| !l.valid()) {
                            let _ = tx.send((row, Err(Failure::destination("not sent: the lease ended")))).await;
                            return;
                        }
                        let result = sender.send(&row, clock::now(), &link).await;
                        let _ = tx.send((row, result)).await;
                    });
                }
                Decision::Skip(row, why) => {
                    self.counters.skipped_attempts.fetch_add(1, Ordering::Relaxed);
                    skipped.push((row, Err(Failure::destination(why))));
                }
            }
        }
        self.health.open_breakers.store(self.dispatcher.open_breakers(now).len() as u64, Ordering::Relaxed);
        if !skipped.is_empty() {
            self.record(skipped, now, false);
        }
    }

    /// Record the results of attempts, all in one transaction (one `fsync` for a whole burst).
    fn record(&mut self, results: Vec<(OutboxRow, Result<(), Failure>)>, now: Time, attempted: bool) {
        if !self.leased() {
            // The store is the new active's now: what this one sent last may be sent again
            // (the same idempotency key), never lost.
            return;
        }
        for (row, result) in results {
            if attempted {
                let destination_failed = result.as_ref().is_err_and(|f| f.destination);
                self.dispatcher.finished(&row.key, result.is_ok(), destination_failed, now);
            }
            let result = result.map_err(|f| f.text);
            match &result {
                Ok(()) => {
                    self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                    let latency = (now - row.created_at).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
                    self.counters.notify_latency.observe(latency);
                    tracing::info!(key = %row.key, "delivered");
                }
                Err(e) if attempted => {
                    self.counters.failed_attempts.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(key = %row.key, attempt = row.attempts + 1, error = %e, "delivery failed");
                }
                Err(_) => {}
            }
            let jitter = rand::rng().random_range(0.0..1.0);
            let mut next = after_attempt(row, result, now, &self.config.delivery, jitter);
            let key = next.row.key.clone();
            if let Some(prev) = self.unrecorded.get(&key) {
                next.fallback |= prev.fallback; // told once, when it is recorded
            }
            if next.row.status == OutboxStatus::Pending {
                // Retried from the copy kept here until its result can be recorded.
                self.dispatcher.recorded(&key);
            }
            self.unrecorded.insert(key, next);
        }
        if self.degraded.is_none() && self.record_due(now) {
            self.flush_unrecorded(now);
        }
        self.health.unrecorded_results.store(self.unrecorded.len() as u64, Ordering::Relaxed);
    }

    /// Whether the delivery results waiting are to be recorded now.
    fn record_due(&self, now: Time) -> bool {
        !self.unrecorded.is_empty()
            && (self.unrecorded.len() >= RECORD_BATCH || passed(now, self.recorded_at, RECORD_EVERY_MS))
    }

    /// Write the results waiting to be recorded; false when the store refused.
    fn flush_unrecorded(&mut self, now: Time) -> bool {
        if self.unrecorded.is_empty() {
            return true;
        }
        self.recorded_at = now;
        let rows = std::mem::take(&mut self.unrecorded);
        let result = self.transaction(|s| {
            let mut fallback = false;
            for next in rows.values() {
                s.store.record_attempt(&next.row)?;
                if !next.fallback {
                    continue;
                }
                fallback = true;
                if let Ok(content) = serde_json::from_value(next.row.content.clone()) {
                    let input = Input::DeliveryFailed {
                        key: next.row.key.clone(),
                        alert_id: next.row.alert_id.clone(),
                        home: next.row.home.clone(),
                        role: next.row.role,
                        name: next.row.recipient.clone(),
                        content,
                    };
                    let _ = s.engine.handle(input, now);
                }
            }
            if fallback {
                // A later channel was raised: the engine's timers are looked at again soon.
                s.input_since_poll = true;
                s.persist()?;
            }
            Ok(())
        });
        match result {
            Ok(()) => {
                for key in rows.keys() {
                    self.dispatcher.recorded(key);
                }
                // After the commit: from here a restart does not send these again.
                tracing::info!(results = rows.len(), "delivery results recorded");
                self.health.unrecorded_results.store(0, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.unrecorded = rows;
                false
            }
        }
    }

    fn apply_cli_acks(&mut self, now: Time) -> Result<Vec<(HomeId, mqtt::Ack)>, StoreError> {
        let mut all = Vec::new();
        for req in self.store.pending_acks()? {
            let result = match req.role {
                Ok(role) => self.acknowledge(&req.alert_id, role, &req.by, req.note.clone(), now),
                Err(unknown) => Err(format!("refused: `{unknown}` is not a role")),
            };
            let text = match result {
                Ok(acks) => {
                    all.extend(acks);
                    "ok".to_string()
                }
                Err(e) => e,
            };
            self.store.finish_ack(req.id, &text)?;
        }
        Ok(all)
    }

    /// When the loop must next wake up.
    fn next_wake(&self, now: Time, housekeeping: Time) -> Time {
        let mut wake = housekeeping;
        if self.degraded.is_some() {
            wake = wake.min(self.next_probe);
        } else {
            if let Some(d) = self.poll_due {
                wake = wake.min(d);
            }
            if self.input_since_poll {
                wake = wake.min(when_passed(now, self.polled_at, POLL_EVERY_MS));
            }
        }
        if let Some(t) = self
            .unrecorded
            .values()
            .filter(|n| n.row.status == OutboxStatus::Pending && n.row.next_attempt_at > now)
            .map(|n| n.row.next_attempt_at)
            .min()
        {
            wake = wake.min(t);
        }
        if self.dispatcher.room() > 0 {
            match self.store.next_due_after(now) {
                Ok(Some(d)) => wake = wake.min(d),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "reading the next due notification"),
            }
        }
        if self.snapshot_dirty {
            wake = wake.min(when_passed(now, self.snapshot_at, SNAPSHOT_EVERY_MS));
        }
        if self.degraded.is_none() && !self.unrecorded.is_empty() {
            wake = wake.min(when_passed(now, self.recorded_at, RECORD_EVERY_MS));
        }
        wake
    }

    /// The broker says whether it holds a session for this gateway's client id. A store that
    /// has no record of that session (never connected with it, never stored a message) is not
    /// the store the session belongs to.
    fn check_session(&mut self, session_present: bool, now: Time) -> Result<(), RunError> {
        let known = self.first_message_stored || self.adopt_session || self.session_recorded;
        if session_present && !known {
            return Err(RunError::WrongStore {
                path: self.store.location(),
                client_id: self.config.broker.client_id.clone(),
            });
        }
        // This store now owns the session the broker keeps for it (known at once; written as
        // soon as the store takes it).
        self.session_recorded = true;
        self.write_session_record(now);
        Ok(())
    }

    fn write_session_record(&mut self, now: Time) {
        if self.session_recorded && !self.session_written {
            match self.store.set_meta(crate::edge::store::META_BROKER_SESSION_AT, &now.to_rfc3339()) {
                Ok(()) => self.session_written = true,
                Err(e) => tracing::warn!(error = %e, "recording the broker session (will try again)"),
            }
        }
    }

    fn ping_heartbeat(&self, now: Time) {
        let Some(h) = &self.config.heartbeat else { return };
        if !self.leased() {
            return; // only the active gateway says the cluster is alive
        }
        let problems = self.health.problems(now);
        let url = if problems.is_empty() { Some(h.url.clone()) } else { h.fail_url.clone() };
        let Some(url) = url else { return };
        let sender = self.sender.clone();
        tokio::spawn(async move {
            if let Err(e) = sender.ping(&url).await {
                tracing::warn!(error = %e, "heartbeat");
            }
        });
    }

    /// Several gateways: tell the operators when the active has no standby (and when it has
    /// one again), after three leases' time (a standby may be restarting).
    fn watch_standbys(&mut self, now: Time) {
        let (Some(lease), Some(cluster)) = (&self.lease, &self.config.cluster) else { return };
        let Some(standbys) = lease.standbys() else { return };
        self.health.standbys.store(standbys.len() as u64, Ordering::Relaxed);
        let grace = chrono::Duration::seconds(3 * i64::from(cluster.lease_s));
        if let Some(n) = self.standby_watch.update(&lease.holder, &standbys, grace, now) {
            tracing::warn!(notice = n.kind(), standbys = standbys.len(), "standby watch");
            self.tell_operators(n, now);
        }
    }

    /// Run as the active gateway of several: nothing is sent unless the lease is valid, and
    /// [`Service::run`] ends (with an error) when it is lost.
    pub fn with_lease(mut self, lease: Arc<crate::service::lease::Lease>) -> Service {
        // The store refuses this gateway's writes once its token is not the lease's.
        self.store.fence(Some((lease.holder.clone(), lease.token)));
        self.lease = Some(lease);
        self
    }

    /// Run until cancelled.
    pub async fn run(
        self,
        cancel: CancellationToken,
        ready: Option<tokio::sync::oneshot::Sender<Ready>>,
    ) -> anyhow::Result<()> {
        self.run_on(None, cancel, ready).await
    }

    /// Run until cancelled, serving HTTP on `listener` (a standby's, handed over at takeover)
    /// or on a new one.
    pub async fn run_on(
        mut self,
        listener: Option<Listener>,
        cancel: CancellationToken,
        ready: Option<tokio::sync::oneshot::Sender<Ready>>,
    ) -> anyhow::Result<()> {
        // The broker.
        let port = self.config.broker.port;
        // HTTP, on its own runtime: the standby's listener when this gateway was one (the
        // same port, never closed between), or a new one.
        let listener = match listener {
            Some(l) => l,
            None => Listener::bind(&self.config, cancel.clone()).await?,
        };
        let (web_tx, mut web_rx) = mpsc::channel(64);
        let app = web_app(
            &self.config,
            &self.style,
            web_tx,
            self.snapshot.subscribe(),
            crate::edge::store::open_existing(&self.store_at)?,
            self.counters.clone(),
            self.health.clone(),
            self.sender.calls(),
        )?;
        let http_addr = listener.incoming.local();
        let Listener { rt: web_rt, incoming } = listener;
        let http_cancel = cancel.clone();
        web_rt.handle().spawn(async move {
            crate::edge::listen::serve(incoming, web::router(app), http_cancel).await;
        });
        let brokers = crate::edge::mqtt::options(&self.config, port)?;
        let first = brokers.first().cloned().context("no broker")?;
        let (client, eventloop) = AsyncClient::new(first, 1000);
        let (mqtt_tx, mut mqtt_rx) = mpsc::channel(4096);
        crate::edge::mqtt::spawn_link(
            client.clone(),
            eventloop,
            brokers,
            crate::edge::mqtt::filters(),
            mqtt_tx,
            cancel.clone(),
        );
        self.outbound = Some(crate::edge::mqtt::spawn_outbound(client.clone(), OUTBOUND_QUEUE));
        if let Some(rx) = self.notices_rx.take() {
            notify_operators(self.sender.clone(), rx, self.config.public_url.clone());
        }
        // Silence is not judged until the broker connection is up, and everything before it
        // (this gateway was not running) is the centre's downtime.
        self.engine.set_uplink(false, Time::MIN_UTC);

        let pruner = spawn_pruner(self.store_at.clone(), self.config.telemetry_retention_h);
        let broker_addr = format!("{}:{port}", self.config.broker.host)
            .parse()
            .unwrap_or_else(|_| std::net::SocketAddr::from(([127, 0, 0, 1], port)));
        tracing::info!(
            homes = self.engine.home_count(),
            http = %http_addr,
            https = self.config.http.tls(),
            "gateway ready"
        );
        if self.engine.home_count() == 0 {
            tracing::error!("no homes in the store: import them (`homes import` or `homes_file`); messages are not acknowledged meanwhile");
        }
        if let Some(r) = ready {
            let _ = r.send(Ready { broker: broker_addr, http: http_addr });
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        let watchdog = sd_notify::watchdog_enabled();

        let mut next_housekeeping = clock::now();
        let mut next_heartbeat = clock::now();
        let mut failure = None;
        let lease_lost = self.lease.as_ref().map_or_else(CancellationToken::new, |l| l.lost());
        loop {
            let now = clock::now();
            // A wall clock set back leaves the next housekeeping far ahead: it is due now.
            if next_housekeeping - now > chrono::Duration::seconds(1) {
                next_housekeeping = now;
            }
            let wake = self.next_wake(now, next_housekeeping);
            let sleep = (wake - now).to_std().unwrap_or(Duration::ZERO);
            let mut woke_by_timer = false;
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = lease_lost.cancelled() => break,
                m = mqtt_rx.recv() => {
                    let Some(m) = m else { break };
                    let now = clock::now();
                    let mut batch = Vec::new();
                    let mut first = Some(m);
                    loop {
                        match first.take() {
                            None => break,
                            Some(FromMqtt::Message(p)) => batch.push(p),
                            Some(FromMqtt::Connected { session_present }) => {
                                if !batch.is_empty() {
                                    self.on_batch(std::mem::take(&mut batch), now);
                                }
                                if let Err(e) = self.check_session(session_present, now) {
                                    failure = Some(e);
                                    break;
                                }
                                self.broker_up = true;
                                if self.degraded.is_none() {
                                    self.engine.set_uplink(true, now);
                                }
                                self.health.set_broker(true, now);
                            }
                            Some(FromMqtt::Disconnected) => {
                                if !batch.is_empty() {
                                    self.on_batch(std::mem::take(&mut batch), now);
                                }
                                self.broker_up = false;
                                self.engine.set_uplink(false, now);
                                self.health.set_broker(false, now);
                            }
                        }
                        if batch.len() >= 1000 {
                            break;
                        }
                        first = mqtt_rx.try_recv().ok();
                    }
                    if failure.is_some() {
                        break;
                    }
                    if !batch.is_empty() {
                        self.on_batch(batch, now);
                    }
                }
                Some(req) = web_rx.recv() => self.on_web(req),
                Some(first) = self.results_rx.recv() => {
                    let mut results = vec![first];
                    while let Ok(r) = self.results_rx.try_recv() {
                        results.push(r);
                    }
                    self.record(results, clock::now(), true);
                }
                _ = tokio::time::sleep(sleep) => woke_by_timer = true,
            }
            // Anything but the timer brought input (a message, a connection change, a request,
            // a delivery result): the engine's timers are looked at again soon.
            if !woke_by_timer {
                self.input_since_poll = true;
            }
            let now = clock::now();
            self.try_recover(now);
            if self.degraded.is_none() {
                if let Ok(acks) = self.tick(now) {
                    self.publish_acks(acks);
                }
            }
            if now >= next_housekeeping {
                next_housekeeping = now + chrono::Duration::seconds(1);
                // Acknowledgements from the command line and the housekeeping are input too.
                self.input_since_poll = true;
                if self.degraded.is_none() {
                    match self.apply_cli_acks(now) {
                        Ok(acks) => self.publish_acks(acks),
                        Err(e) => tracing::warn!(error = %e, "acknowledgements from the command line"),
                    }
                }
                self.health.set_no_homes(self.engine.home_count() == 0);
                self.watch_standbys(now);
                if self.degraded.is_none() {
                    self.write_session_record(now);
                }
                if watchdog.is_some() {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
            }
            if let Some(h) = &self.config.heartbeat {
                // (A wall clock set back does not hold the heartbeat up.)
                if now >= next_heartbeat || next_heartbeat - now > chrono::Duration::seconds(i64::from(h.interval_s)) {
                    next_heartbeat = now + chrono::Duration::seconds(i64::from(h.interval_s));
                    self.ping_heartbeat(now);
                }
            }
            if self.degraded.is_none() && self.record_due(now) {
                self.flush_unrecorded(now);
            }
            self.dispatch(now);
            self.publish_snapshot(now);
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        // Shutdown: let sends in flight finish (bounded), record them, disconnect.
        #[allow(clippy::disallowed_methods)] // the shutdown's I/O deadline, on tokio's clock
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.dispatcher.in_flight() > 0 {
            match tokio::time::timeout_at(deadline, self.results_rx.recv()).await {
                Ok(Some(r)) => self.record(vec![r], clock::now(), true),
                _ => break,
            }
        }
        if self.degraded.is_none() {
            self.flush_unrecorded(clock::now());
        }
        let _ = client.disconnect().await;
        drop(pruner);
        drop(web_rt);
        let c = &self.counters;
        tracing::info!(
            ingested = c.ingested.load(Ordering::Relaxed),
            rejected = c.rejected.load(Ordering::Relaxed),
            unknown_home = c.unknown_home.load(Ordering::Relaxed),
            duplicates = c.duplicates.load(Ordering::Relaxed),
            delivered = c.delivered.load(Ordering::Relaxed),
            "gateway stopped"
        );
        match failure {
            Some(e) => Err(e.into()),
            None if lease_lost.is_cancelled() => Err(anyhow::anyhow!(
                "this gateway's lease was lost: it stopped sending and exits to start again as a standby"
            )),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wall_clock_set_back_never_holds_up_what_waits_for_time_to_pass() {
        let t = |ms: i64| chrono::DateTime::from_timestamp_millis(1_790_000_000_000 + ms).unwrap();
        assert!(!passed(t(50), t(0), 100));
        assert!(passed(t(100), t(0), 100));
        assert_eq!(when_passed(t(50), t(0), 100), t(100));
        // Set back an hour: at once, not an hour later.
        assert!(passed(t(-3_600_000), t(0), 100));
        assert_eq!(when_passed(t(-3_600_000), t(0), 100), t(-3_600_000));
        assert!(passed(t(0), Time::MIN_UTC, 100), "never done yet");
    }

    #[test]
    fn the_engine_gets_the_privacy_settings_and_the_local_offset_from_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let text = r#"
data_dir = "data"
public_url = "http://127.0.0.1:8080"
link_secret = { value = "a-test-secret-long-enough" }
utc_offset = "+09:00"
[broker]
host = "127.0.0.1"
port = 1883
[privacy]
require_consent = true
"#;
        let config = Config::parse(text, &dir.path().join("gateway.toml")).unwrap();
        let store = open_store(&config).unwrap();
        let engine = load_engine(&config, store.as_ref()).unwrap();
        assert!(engine.require_consent());
        assert_eq!(engine.settings().local_offset_s, 9 * 3600);
        // 15:00 UTC is the next day in Japan: the day a consent is read against.
        let at = chrono::DateTime::parse_from_rfc3339("2026-11-30T15:00:00Z").unwrap().with_timezone(&chrono::Utc);
        assert_eq!(engine.today(at), chrono::NaiveDate::from_ymd_opt(2026, 12, 1).unwrap());
    }
}
