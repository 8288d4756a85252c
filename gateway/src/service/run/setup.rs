//! Setting up: the service itself ([`Service::new`]), the config's secrets and message style,
//! opening the store (never creating one for `run`) and importing the homes file, the engine loaded
//! from the store, the web's runtime and listener, the operators' notifier and the pruner.

use super::*;

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
pub(super) fn homes_file_changes(
    config: &Config,
    store: &dyn Store,
) -> anyhow::Result<Vec<crate::domain::homes::Home>> {
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

pub(super) fn import_homes(config: &Config, store: &mut dyn Store) -> anyhow::Result<()> {
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
pub(super) fn operators(config: &Config, engine: &Engine) -> Vec<(String, Lang, Vec<ChannelRef>)> {
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

/// The operators' notifier: every channel of every recipient, each retried in memory with
/// back-off for up to an hour (never through the outbox: the store may be what failed).
pub(super) fn notify_operators(sender: Sender, mut rx: mpsc::Receiver<NoticeJob>, public_url: String) {
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
pub(super) fn spawn_pruner(at: crate::edge::store::Location, retention_h: u32) -> std::sync::mpsc::Sender<()> {
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
            counters: Arc::new(Counters::default()),
            health,
            effects: Vec::new(),
            next_housekeeping: now,
            next_heartbeat: now,
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
            log_budget: 100,
            snapshot,
            snapshot_dirty: false,
            snapshot_at: now,
            home_versions: HashMap::new(),
            incident_versions: HashMap::new(),
            changed_homes: BTreeSet::new(),
            stored_alerts: crate::domain::engine::StoredAlerts::new(),
            changed_incidents: BTreeSet::new(),
        })
    }
}
