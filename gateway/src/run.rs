//! `mamori-gateway run`: the service.
//!
//! One task (the service loop) owns the engine and the store. Around it:
//! - the MQTT task owns the rumqttc event loop (persistent session, manual acks), forwards
//!   each PUBLISH to the loop and resubscribes after every CONNACK; it backs off with jitter
//!   after errors;
//! - the HTTP server answers acknowledgement links through a channel to the loop;
//! - each outbox send runs in its own task (at most `delivery.concurrency` at once) and
//!   reports back to the loop;
//! - an outbound task sends PUBACKs and acknowledgements to agents, so that the loop never
//!   waits on the MQTT client (the MQTT task may be waiting for the loop to take a message,
//!   and only it drains the client's request queue: waiting on it from the loop deadlocked
//!   under load, which the fleet benchmark found).
//!
//! ## A batch
//! The loop takes every message waiting (up to 1,000), and in **one transaction** stores them
//! (events deduplicated by `(home, seq)`), feeds the new ones to the engine, and writes the
//! resulting alerts, home states and outbox rows. After the commit it acknowledges the
//! messages to the broker and publishes acknowledgements to agents. Then the timers run
//! (`Engine::poll`) in a second transaction, and due outbox rows are sent.
//!
//! ## Validation
//! A topic that does not parse, a home that is not registered, a payload over 16 KiB or one
//! that does not decode is counted, logged (rate-limited) and acknowledged to the broker (so
//! it is not redelivered forever), and never reaches the engine.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mamori_protocol::mqtt::{self, Channel, Event, HomeId, Status, Telemetry, Topic};
use rand::Rng;
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, Publish, QoS, TlsConfiguration, Transport};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::delivery::{after_attempt, expand, ResolvedEndpoint, Sender};
use crate::engine::{Engine, Input, Output, Time};
use crate::homes::HomesFile;
use crate::message::Style;
use crate::policy::Policies;
use crate::store::{OutboxRow, SqliteStore, Store, StoreError};
use crate::web::{self, Snapshot, WebRequest};

/// The web's copy of the engine is refreshed at most this often, ms.
pub const SNAPSHOT_EVERY_MS: i64 = 250;
use crate::{broker, clock};

/// Counters since start (logged at shutdown; the dashboard issue exports them as metrics).
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages accepted.
    pub ingested: AtomicU64,
    /// Messages refused (bad topic, payload or schema).
    pub rejected: AtomicU64,
    /// Messages from homes that are not registered.
    pub unknown_home: AtomicU64,
    /// Events already stored.
    pub duplicates: AtomicU64,
    /// Notifications delivered.
    pub delivered: AtomicU64,
    /// Failed delivery attempts.
    pub failed_attempts: AtomicU64,
    /// Outbox row written to the receiver's acceptance, s.
    pub notify_latency: crate::web::metrics::Histogram,
}

/// Where the running gateway can be reached (for the demo and tests).
#[derive(Debug, Clone)]
pub struct Ready {
    /// The broker it connects to.
    pub broker: std::net::SocketAddr,
    /// The HTTP listener.
    pub http: std::net::SocketAddr,
}

/// Resolve a config's secrets and the message style.
pub fn style(config: &Config) -> anyhow::Result<Style> {
    let secret = config.link_secret.resolve().map_err(|e| anyhow::anyhow!("link_secret: {e}"))?;
    Ok(Style {
        public_url: config.public_url.clone(),
        link_secret: secret.into_bytes(),
        offset: config.offset().context("utc_offset")?,
    })
}

/// Open the store and import the config's homes file, if any.
pub fn open_store(config: &Config) -> anyhow::Result<SqliteStore> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
    let mut store = SqliteStore::open(&config.data_dir)?;
    if let Some(path) = &config.homes_file {
        let homes = HomesFile::load(path, &config.known())?;
        store.upsert_homes(&homes.homes)?;
    }
    Ok(store)
}

fn mqtt_options(config: &Config, port: u16) -> anyhow::Result<MqttOptions> {
    let b = &config.broker;
    let mut o = MqttOptions::new(b.client_id.clone(), b.host.clone(), port);
    o.set_keep_alive(Duration::from_secs(u64::from(b.keep_alive_s.max(5))));
    // A persistent session: QoS 1 events queue at the broker while the gateway is away.
    o.set_clean_session(false);
    o.set_manual_acks(true);
    o.set_max_packet_size(mqtt::MAX_PAYLOAD_BYTES * 4, mqtt::MAX_PAYLOAD_BYTES * 4);
    o.set_inflight(1000);
    if let Some(user) = &b.username {
        let pass = match &b.password {
            Some(p) => p.resolve().map_err(|e| anyhow::anyhow!("broker.password: {e}"))?,
            None => String::new(),
        };
        o.set_credentials(user.clone(), pass);
    }
    if let Some(t) = &b.tls {
        let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let client_auth = match (&t.client_cert_file, &t.client_key_file, &t.client_cert_pem, &t.client_key_pem) {
            (Some(c), Some(k), _, _) => {
                mamori_agent::uplink::check_key_permissions(k)?;
                Some((read(c)?, read(k)?))
            }
            (_, _, Some(c), Some(k)) => Some((c.clone().into_bytes(), k.clone().into_bytes())),
            _ => None,
        };
        let ca = t.ca().map_err(|e| anyhow::anyhow!("broker.tls: {e}"))?;
        o.set_transport(Transport::Tls(TlsConfiguration::Simple { ca, alpn: None, client_auth }));
    }
    Ok(o)
}

enum FromMqtt {
    Message(Publish),
    Connected,
}

/// What the service sends to the broker. It goes through an unbounded queue to its own task,
/// so the service loop never waits on the MQTT client: the MQTT task may be waiting for the
/// service to take a message, and the client's request queue is drained by that task.
enum Outbound {
    /// PUBACK a stored message.
    Ack(Publish),
    /// Tell a home's agent that an alert was acknowledged.
    AgentAck(HomeId, mqtt::Ack),
}

fn spawn_outbound(client: AsyncClient) -> mpsc::UnboundedSender<Outbound> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            let result = match out {
                Outbound::Ack(p) => client.ack(&p).await,
                Outbound::AgentAck(home, ack) => {
                    client.publish(home.topic(Channel::Ack), QoS::AtLeastOnce, false, mqtt::encode(&ack)).await
                }
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "to the broker");
            }
        }
    });
    tx
}

/// The MQTT task: owns the event loop.
fn spawn_mqtt(
    client: AsyncClient,
    mut eventloop: rumqttc::EventLoop,
    filters: Vec<String>,
    tx: mpsc::Sender<FromMqtt>,
    cancel: CancellationToken,
) {
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(250);
        loop {
            let ev = tokio::select! {
                _ = cancel.cancelled() => return,
                ev = eventloop.poll() => ev,
            };
            match ev {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    delay = Duration::from_millis(250);
                    tracing::info!("connected to the broker");
                    // From another task: this one must keep polling the event loop, or a full
                    // request queue would wait on itself.
                    let (client, filters) = (client.clone(), filters.clone());
                    tokio::spawn(async move {
                        for f in filters {
                            if let Err(e) = client.subscribe(f, QoS::AtLeastOnce).await {
                                tracing::warn!(error = %e, "subscribe");
                            }
                        }
                    });
                    let _ = tx.send(FromMqtt::Connected).await;
                }
                Ok(MqttEvent::Incoming(Packet::SubAck(_))) => tracing::info!("subscribed"),
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    if tx.send(FromMqtt::Message(p)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, retry_ms = delay.as_millis() as u64, "broker connection");
                    let jitter = rand::rng().random_range(0.8..1.2);
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay.mul_f64(jitter)) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    });
}

/// The service.
pub struct Service {
    config: Config,
    store: SqliteStore,
    engine: Engine,
    style: Style,
    sender: Sender,
    outbound: Option<mpsc::UnboundedSender<Outbound>>,
    counters: Arc<Counters>,
    in_flight: HashSet<String>,
    results_tx: mpsc::UnboundedSender<(OutboxRow, Result<(), String>)>,
    results_rx: mpsc::UnboundedReceiver<(OutboxRow, Result<(), String>)>,
    log_budget: u32,
    snapshot: watch::Sender<Arc<Snapshot>>,
    snapshot_dirty: bool,
    snapshot_at: Time,
}

impl Service {
    /// Build the service: open the store, load homes and state, resolve secrets.
    pub fn new(config: Config, console: mpsc::UnboundedSender<String>) -> anyhow::Result<Service> {
        let style = style(&config)?;
        let store = open_store(&config)?;
        let mut engine = Engine::new(config.escalation.clone(), Policies { config: config.policy.clone() });
        let homes = store.homes()?;
        for h in homes {
            engine.upsert_home(h);
        }
        for (id, st) in store.states()? {
            if engine.knows(&id) {
                engine.restore_state(id, st);
            }
        }
        for i in store.open_incidents()? {
            engine.restore_incident(i);
        }
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
        let sender = Sender::new(
            endpoints,
            config.smtp.as_ref().map(|s| (s, smtp_password)),
            Duration::from_millis(config.delivery.timeout_ms),
            console,
        )
        .map_err(|e| anyhow::anyhow!(e))?;
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        let (snapshot, _) = watch::channel(Arc::new(Snapshot { engine: engine.clone(), version: 0 }));
        Ok(Service {
            config,
            store,
            engine,
            style,
            sender,
            outbound: None,
            counters: Arc::new(Counters::default()),
            in_flight: HashSet::new(),
            results_tx,
            results_rx,
            log_budget: 100,
            snapshot,
            snapshot_dirty: false,
            snapshot_at: clock::now(),
        })
    }

    /// The counters.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// The snapshots the web reads.
    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    /// Publish a copy of the engine for the web, at most every [`SNAPSHOT_EVERY_MS`].
    fn publish_snapshot(&mut self, now: Time) {
        if !self.snapshot_dirty || now - self.snapshot_at < chrono::Duration::milliseconds(SNAPSHOT_EVERY_MS) {
            return;
        }
        let version = self.snapshot.borrow().version + 1;
        self.snapshot.send_replace(Arc::new(Snapshot { engine: self.engine.clone(), version }));
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
        self.transaction(|s| s.ingest_tx(batch, now))
    }

    fn ingest_tx(&mut self, batch: &[Publish], now: Time) -> Result<Vec<(HomeId, mqtt::Ack)>, StoreError> {
        for p in batch {
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
                        self.store.insert_status(&parsed.home, &s, now)?;
                        Input::Status(parsed.home, s)
                    }
                    Err(e) => {
                        self.reject(topic, &e.to_string());
                        continue;
                    }
                },
                Channel::Telemetry => match mqtt::decode::<Telemetry>(&p.payload) {
                    Ok(t) => {
                        self.store.insert_telemetry(&parsed.home, &t, now)?;
                        Input::Telemetry(parsed.home, t)
                    }
                    Err(e) => {
                        self.reject(topic, &e.to_string());
                        continue;
                    }
                },
                Channel::Event => match mqtt::decode::<Event>(&p.payload) {
                    Ok(e) => {
                        if !self.store.insert_event(&parsed.home, &e, now)? {
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
            self.counters.ingested.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.engine.handle(input, now) {
                tracing::warn!(error = %e, "not applied");
            }
        }
        self.persist()
    }

    /// Write the engine's outputs and dirty state (inside a transaction).
    fn persist(&mut self) -> Result<Vec<(HomeId, mqtt::Ack)>, StoreError> {
        let mut acks = Vec::new();
        let outputs = self.engine.take_outputs();
        let dirty = self.engine.take_dirty();
        if !outputs.is_empty() || !dirty.is_empty() {
            self.snapshot_dirty = true;
        }
        for out in outputs {
            match out {
                Output::Alert(a) => self.store.save_alert(&a)?,
                Output::Incident(i) => self.store.save_incident(&i)?,
                Output::AgentAck(h, a) => acks.push((h, a)),
                Output::Notify(n) => {
                    for row in expand(&n, &self.style) {
                        self.store.enqueue(&row)?;
                    }
                }
            }
        }
        for (h, st) in dirty {
            self.store.save_state(&h, &st)?;
        }
        Ok(acks)
    }

    fn transaction<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.store.begin()?;
        match f(self) {
            Ok(v) => {
                self.store.commit()?;
                Ok(v)
            }
            Err(e) => {
                self.store.rollback();
                Err(e)
            }
        }
    }

    /// Run the timers.
    fn tick(&mut self, now: Time) -> Result<Vec<(HomeId, mqtt::Ack)>, StoreError> {
        self.transaction(|s| {
            s.engine.poll(now);
            s.persist()
        })
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
        let input = Input::Ack { alert_id: alert_id.to_string(), role, by: by.to_string(), note };
        self.engine.handle(input, now).map_err(|e| e.to_string())?;
        tracing::info!(alert = alert_id, ?role, by, "acknowledged");
        self.transaction(|s| s.persist()).map_err(|e| e.to_string())
    }

    /// Clear an alert by hand.
    pub fn clear(&mut self, alert_id: &str, by: &str, now: Time) -> Result<Vec<(HomeId, mqtt::Ack)>, String> {
        let input = Input::Clear { alert_id: alert_id.to_string(), by: by.to_string() };
        self.engine.handle(input, now).map_err(|e| e.to_string())?;
        tracing::info!(alert = alert_id, by, "cleared by hand");
        self.transaction(|s| s.persist()).map_err(|e| e.to_string())
    }

    fn publish_acks(&self, acks: Vec<(HomeId, mqtt::Ack)>) {
        let Some(out) = &self.outbound else { return };
        for (home, ack) in acks {
            let _ = out.send(Outbound::AgentAck(home, ack));
        }
    }

    fn dispatch(&mut self, now: Time) -> Result<(), StoreError> {
        let room = self.config.delivery.concurrency.saturating_sub(self.in_flight.len());
        if room == 0 {
            return Ok(());
        }
        for row in self.store.due(now, room + self.in_flight.len())? {
            if self.in_flight.len() >= self.config.delivery.concurrency {
                break;
            }
            if !self.in_flight.insert(row.key.clone()) {
                continue;
            }
            let sender = self.sender.clone();
            let tx = self.results_tx.clone();
            let link = self.style.ack_link(&row.alert_id, row.role);
            tokio::spawn(async move {
                let result = sender.send(&row, clock::now(), &link).await;
                let _ = tx.send((row, result));
            });
        }
        Ok(())
    }

    /// Record the results of sends, all in one transaction (one `fsync` for a whole burst).
    fn record(&mut self, results: Vec<(OutboxRow, Result<(), String>)>, now: Time) -> Result<(), StoreError> {
        let mut delivered = Vec::new();
        let mut next_rows = Vec::new();
        for (row, result) in results {
            self.in_flight.remove(&row.key);
            match &result {
                Ok(()) => {
                    self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                    let latency = (now - row.created_at).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
                    self.counters.notify_latency.observe(latency);
                    delivered.push(row.key.clone());
                }
                Err(e) => {
                    self.counters.failed_attempts.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(key = %row.key, attempt = row.attempts + 1, error = %e, "delivery failed");
                }
            }
            let jitter = rand::rng().random_range(0.0..1.0);
            next_rows.push(after_attempt(row, result, now, &self.config.delivery, jitter));
        }
        self.transaction(|s| {
            let mut fallback = false;
            for next in &next_rows {
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
                s.persist()?;
            }
            Ok(())
        })?;
        for key in delivered {
            tracing::info!(key = %key, "delivered"); // after the commit: a crash from here on resends nothing
        }
        Ok(())
    }

    fn apply_cli_acks(&mut self, now: Time) -> Result<Vec<(HomeId, mqtt::Ack)>, StoreError> {
        let mut all = Vec::new();
        for req in self.store.pending_acks()? {
            let result = self.acknowledge(&req.alert_id, req.role, &req.by, req.note.clone(), now);
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

    /// Run until cancelled.
    pub async fn run(
        mut self,
        cancel: CancellationToken,
        ready: Option<tokio::sync::oneshot::Sender<Ready>>,
    ) -> anyhow::Result<()> {
        // The broker.
        let mut port = self.config.broker.port;
        if let Some(e) = &self.config.embedded_broker {
            let addr = broker::start(e.bind, e.allow_non_loopback)?;
            tracing::info!(%addr, "embedded broker started");
            port = addr.port();
        }
        let options = mqtt_options(&self.config, port)?;
        let (client, eventloop) = AsyncClient::new(options, 1000);
        let filters: Vec<String> = [Channel::Status, Channel::Telemetry, Channel::Event]
            .iter()
            .map(|c| match &self.config.broker.share_group {
                Some(g) => c.shared_filter(g),
                None => c.filter(),
            })
            .collect();
        let (mqtt_tx, mut mqtt_rx) = mpsc::channel(4096);
        spawn_mqtt(client.clone(), eventloop, filters, mqtt_tx, cancel.clone());
        self.outbound = Some(spawn_outbound(client.clone()));

        // HTTP.
        let (web_tx, mut web_rx) = mpsc::channel(64);
        let http = &self.config.http;
        let tls = match (&http.tls_cert_file, &http.tls_key_file) {
            (Some(cert), Some(key)) => Some(crate::listen::tls_config(cert, key)?),
            _ => None,
        };
        let proxies = http.proxies().map_err(|e| anyhow::anyhow!("http.trusted_proxies: {e}"))?;
        let listener = crate::listen::bind(http.bind, tls, cancel.clone()).await?;
        let http_addr = axum::serve::Listener::local_addr(&listener)?;
        let app = web::router(web::App {
            style: self.style.clone(),
            proxies,
            tx: web_tx,
            snapshot: self.snapshot.subscribe(),
            db: Arc::new(std::sync::Mutex::new(SqliteStore::open(&self.config.data_dir)?)),
            throttle: Default::default(),
            counters: self.counters.clone(),
            sessions: web::SessionSettings {
                secure_cookies: http.cookies_secure(&self.config.public_url),
                idle: chrono::Duration::minutes(i64::from(http.session_idle_min)),
                max_age: chrono::Duration::hours(i64::from(http.session_max_h)),
            },
        })
        .into_make_service_with_connect_info::<crate::listen::Peer>();
        let http_cancel = cancel.clone();
        tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move { http_cancel.cancelled().await });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "http server");
            }
        });
        let broker_addr = format!("{}:{port}", self.config.broker.host)
            .parse()
            .unwrap_or_else(|_| std::net::SocketAddr::from(([127, 0, 0, 1], port)));
        tracing::info!(
            homes = self.engine.states().count(),
            http = %http_addr,
            https = self.config.http.tls(),
            "gateway ready"
        );
        if let Some(r) = ready {
            let _ = r.send(Ready { broker: broker_addr, http: http_addr });
        }

        let mut next_housekeeping = clock::now();
        let mut next_prune = clock::now();
        loop {
            let now = clock::now();
            let mut wake = now + chrono::Duration::seconds(1);
            if let Some(d) = self.engine.next_deadline(now) {
                wake = wake.min(d);
            }
            if let Some(d) = self.store.next_due()? {
                if self.in_flight.len() < self.config.delivery.concurrency {
                    wake = wake.min(d);
                }
            }
            if self.snapshot_dirty {
                wake = wake.min(self.snapshot_at + chrono::Duration::milliseconds(SNAPSHOT_EVERY_MS));
            }
            let sleep = (wake - now).to_std().unwrap_or(Duration::ZERO);
            tokio::select! {
                _ = cancel.cancelled() => break,
                m = mqtt_rx.recv() => {
                    let Some(m) = m else { break };
                    let mut batch = Vec::new();
                    if let FromMqtt::Message(p) = m { batch.push(p) }
                    while batch.len() < 1000 {
                        match mqtt_rx.try_recv() {
                            Ok(FromMqtt::Message(p)) => batch.push(p),
                            Ok(FromMqtt::Connected) => {}
                            Err(_) => break,
                        }
                    }
                    if !batch.is_empty() {
                        let acks = self.ingest(&batch, clock::now())?;
                        // Stored: now the broker may forget them.
                        if let Some(out) = &self.outbound {
                            for p in batch {
                                let _ = out.send(Outbound::Ack(p));
                            }
                        }
                        self.publish_acks(acks);
                    }
                }
                Some(req) = web_rx.recv() => {
                    let (r, reply) = match req {
                        WebRequest::Ack { alert_id, role, by, note, reply } => {
                            (self.acknowledge(&alert_id, role, &by, note, clock::now()), reply)
                        }
                        WebRequest::Clear { alert_id, by, reply } => (self.clear(&alert_id, &by, clock::now()), reply),
                    };
                    let r = match r {
                        Ok(acks) => { self.publish_acks(acks); Ok(()) }
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(r);
                }
                Some(first) = self.results_rx.recv() => {
                    let mut results = vec![first];
                    while let Ok(r) = self.results_rx.try_recv() {
                        results.push(r);
                    }
                    self.record(results, clock::now())?;
                }
                _ = tokio::time::sleep(sleep) => {}
            }
            let now = clock::now();
            let acks = self.tick(now)?;
            self.publish_acks(acks);
            if now >= next_prune {
                next_prune = now + chrono::Duration::hours(1);
                let before = now - chrono::Duration::hours(i64::from(self.config.telemetry_retention_h));
                let pruned = self.store.prune_telemetry(before)?;
                tracing::debug!(pruned, "telemetry history pruned");
            }
            if now >= next_housekeeping {
                next_housekeeping = now + chrono::Duration::seconds(1);
                let acks = self.apply_cli_acks(now)?;
                self.publish_acks(acks);
            }
            self.dispatch(now)?;
            self.publish_snapshot(now);
        }
        // Shutdown: let sends in flight finish (bounded), record them, disconnect.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !self.in_flight.is_empty() {
            match tokio::time::timeout_at(deadline, self.results_rx.recv()).await {
                Ok(Some(r)) => self.record(vec![r], clock::now())?,
                _ => break,
            }
        }
        let _ = client.disconnect().await;
        let c = &self.counters;
        tracing::info!(
            ingested = c.ingested.load(Ordering::Relaxed),
            rejected = c.rejected.load(Ordering::Relaxed),
            unknown_home = c.unknown_home.load(Ordering::Relaxed),
            duplicates = c.duplicates.load(Ordering::Relaxed),
            delivered = c.delivered.load(Ordering::Relaxed),
            "gateway stopped"
        );
        Ok(())
    }
}
