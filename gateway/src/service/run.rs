//! `mamori-gateway run`: the service.
//!
//! ## The machine and its runner
//! [`Service`] is a state machine: [`Service::handle`] takes one [`ServiceInput`] (what the
//! broker link reported, a web request, delivery results, or only the time) **with the time
//! passed in**, and returns the [`Effect`]s the world is to carry out (PUBACKs and agents'
//! acknowledgements, sends, operators' notices, the heartbeat, the watchdog);
//! [`Service::next_deadline`] says when it next needs the time alone. It owns the engine and
//! the store, which is its state and is written inside `handle`, in transactions; it reads no
//! clock and opens no socket, so it is tested by driving it (`run/tests.rs`).
//!
//! The runner ([`Service::run_on`]) is the loop around it: it waits for the first input or the
//! deadline, reads the clock, calls `handle`, and carries the effects out without waiting for
//! any of them. Around it:
//! - the MQTT link and outbound tasks ([`crate::edge::mqtt`]);
//! - the HTTP server, on **its own runtime** (two threads), so that however many dashboard
//!   viewers there are, they cannot take the threads that page people;
//! - each send in its own task (handed out by the [`Dispatcher`]: shares per destination,
//!   circuit breakers, leases), which waits for a slot of its destination (`run/lanes.rs`: a send
//!   that ends gives its slot straight to the next, whatever the service is doing), its result
//!   coming back as input through a bounded channel;
//! - the operators' notifier (`notify_operators`): notices about the gateway itself, sent
//!   without the store;
//! - the pruner thread: history older than `telemetry_retention_h`, deleted in small batches
//!   on its own connection, off the loop.
//!
//! The machine's concerns are files of their own under `run/`: `ingest.rs` (the broker's
//! messages), `outbox.rs` (sends and their results), `degraded.rs` (when the store refuses
//! writes), `actions.rs` (what people do), `setup.rs` (opening the store, loading the engine,
//! the web's runtime); and the runner's: `lanes.rs` (the send slots).
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
use crate::edge::store::{OutboxRow, OutboxStatus, Store, StoreError, Tx};
use crate::service::dispatch::{Decision, Dispatcher};
use crate::service::health::{Degraded, Health};
use crate::web::metrics::{Counters, TURN_BUCKETS_S};
use crate::web::{self, SaveRefusal, Snapshot, WebRequest};

mod actions;
mod degraded;
mod ingest;
mod lanes;
mod outbox;
mod setup;

use lanes::{send_one, Lanes, ResultsTx};
pub use setup::{
    empty_engine, load_engine, open_existing_store, open_store, style, web_app, Listener, WebRuntime, HOMES_FILE,
};
use setup::{notify_operators, operators, spawn_pruner};

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

/// What happens to the service: each is given to [`Service::handle`] with the time.
#[derive(Debug)]
pub enum ServiceInput {
    /// What the broker link reported, in order: messages, the connection coming up (with
    /// whether the broker kept a session), the connection lost.
    Broker(Vec<FromMqtt>),
    /// A request from the web; its answer goes back through the request's own channel.
    Web(WebRequest),
    /// Results of sends ([`Effect::Send`]).
    Results(Vec<(OutboxRow, Result<(), Failure>)>),
    /// Only time passed: the deadline [`Service::next_deadline`] gave came.
    Timer,
}

/// What the service asks of the world, returned by [`Service::handle`]. Carrying them out is
/// the runner's: none of them waits for the service.
#[derive(Debug)]
pub enum Effect {
    /// To the broker, without waiting: a PUBACK for a stored message, or an acknowledgement
    /// for a home's agent (see [`OUTBOUND_QUEUE`] for what is dropped when the link is stuck).
    Broker(Outbound),
    /// Send this outbox row under the delivery deadline, when a slot of its destination is
    /// free ([`crate::service::dispatch`]); its result comes back as
    /// [`ServiceInput::Results`]. `link` is the reader's signed acknowledgement link.
    Send {
        /// The row.
        row: Box<OutboxRow>,
        /// Its acknowledgement link.
        link: String,
        /// Its destination's breaker probe: sent even though the destination failed last.
        probe: bool,
    },
    /// Tell the operators, through every channel, without the store.
    Notice(NoticeJob),
    /// Ping the dead-man heartbeat (its `url` or `fail_url`, as the health says).
    Heartbeat(String),
    /// The loop is alive (systemd's watchdog, when it is on).
    Watchdog,
}

/// A notice for the operators, with who they are now.
#[derive(Debug)]
pub struct NoticeJob {
    /// The notice.
    pub notice: Notice,
    /// Its recipients.
    pub to: Vec<(String, Lang, Vec<ChannelRef>)>,
    /// When it was decided.
    pub at: Time,
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
    counters: Arc<Counters>,
    health: Arc<Health>,
    dispatcher: Dispatcher,
    /// What the world is to do, returned by the next [`Service::handle`].
    effects: Vec<Effect>,
    /// When the housekeeping (acknowledgements from the command line, the standby watch, the
    /// session record, the watchdog) is next due, and the heartbeat.
    next_housekeeping: Time,
    next_heartbeat: Time,
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
    /// The broker connection is up and the broker has taken every subscription.
    broker_up: bool,
    /// Per home: when telemetry history was last stored, and the mains state then.
    history: HashMap<HomeId, (Time, Option<bool>)>,
    log_budget: u32,
    snapshot: watch::Sender<Arc<Snapshot>>,
    snapshot_dirty: bool,
    snapshot_at: Time,
    home_versions: HashMap<HomeId, u64>,
    incident_versions: HashMap<String, u64>,
    changed_homes: BTreeSet<HomeId>,
    /// The version of each active alert the store last committed: a batch writes only the
    /// alerts that differ from it.
    stored_alerts: crate::domain::engine::StoredAlerts,
    changed_incidents: BTreeSet<String>,
}

impl Service {
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

    fn tell_operators(&mut self, notice: Notice, now: Time) {
        if !self.leased() {
            // A deposed gateway has nothing to tell: its store refusing it is its lease, not a
            // failure, and the active one speaks for the cluster.
            tracing::info!(notice = notice.kind(), "not told: this gateway no longer holds the lease");
            return;
        }
        let to = operators(&self.config, &self.engine);
        self.effects.push(Effect::Notice(NoticeJob { notice, to, at: now }));
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
        let acks = self.transaction(now, |s, tx| {
            s.engine.poll(now);
            s.persist(tx, now)
        })?;
        self.polled_at = now;
        self.input_since_poll = false;
        self.poll_due = self.engine.next_deadline(now);
        Ok(acks)
    }

    /// To the outbound task without waiting. When its queue is full (the broker connection is
    /// stuck) a PUBACK is dropped, so the broker sends that message again at the next
    /// connection (stored already: a duplicate, recognised), and an acknowledgement for an
    /// agent's display is dropped (the alert stays acknowledged at the gateway).
    fn outbound(&mut self, out: Outbound) {
        self.effects.push(Effect::Broker(out));
    }

    fn publish_acks(&mut self, acks: Vec<(HomeId, mqtt::Ack)>) {
        for (home, ack) in acks {
            self.outbound(Outbound::AgentAck(home, ack));
        }
    }

    fn ack_to_broker(&mut self, batch: Vec<Publish>) {
        for p in batch {
            self.outbound(Outbound::Ack(p));
        }
    }

    /// Take one input at `now`: store and apply what it brings, then do what is due (the
    /// engine's timers, recording results, the housekeeping second, the heartbeat, sending
    /// due rows, the web's snapshot), and return what the world is to do. Nothing here waits
    /// on a socket; the store is the service's own state, written here in transactions.
    ///
    /// An error is the service refusing to go on ([`RunError`]): nothing after the failing
    /// input was taken.
    pub fn handle(&mut self, input: ServiceInput, now: Time) -> Result<Vec<Effect>, RunError> {
        let timer = matches!(input, ServiceInput::Timer);
        match input {
            ServiceInput::Broker(items) => self.on_broker(items, now)?,
            ServiceInput::Web(req) => self.on_web(req, now),
            ServiceInput::Results(results) => self.record(results, now, true),
            ServiceInput::Timer => {}
        }
        // Anything but the timer brought input (a message, a connection change, a request,
        // a delivery result): the engine's timers are looked at again soon.
        if !timer {
            self.input_since_poll = true;
        }
        self.try_recover(now);
        if self.degraded.is_none() {
            if let Ok(acks) = self.tick(now) {
                self.publish_acks(acks);
            }
        }
        if now >= self.next_housekeeping || self.next_housekeeping - now > chrono::Duration::seconds(1) {
            self.next_housekeeping = now + chrono::Duration::seconds(1);
            self.housekeeping(now);
        }
        if let Some(interval_s) = self.config.heartbeat.as_ref().map(|h| i64::from(h.interval_s)) {
            // (A wall clock set back does not hold the heartbeat up.)
            if now >= self.next_heartbeat || self.next_heartbeat - now > chrono::Duration::seconds(interval_s) {
                self.next_heartbeat = now + chrono::Duration::seconds(interval_s);
                self.ping_heartbeat(now);
            }
        }
        if self.degraded.is_none() && self.record_due(now) {
            self.flush_unrecorded(now);
        }
        self.dispatch(now);
        self.publish_snapshot(now);
        Ok(std::mem::take(&mut self.effects))
    }

    /// Once a second: acknowledgements from the command line, the standby watch, the
    /// session record, the watchdog.
    fn housekeeping(&mut self, now: Time) {
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
        self.effects.push(Effect::Watchdog);
    }

    /// When [`Service::handle`] must next be given [`ServiceInput::Timer`] if nothing else
    /// comes first: the engine's next deadline, the next outbox row falling due, recording
    /// results, the web's snapshot, the housekeeping second, the heartbeat.
    pub fn next_deadline(&self, now: Time) -> Time {
        // A wall clock set back leaves the next housekeeping far ahead: it is due now.
        let mut wake =
            if self.next_housekeeping - now > chrono::Duration::seconds(1) { now } else { self.next_housekeeping };
        if let Some(h) = &self.config.heartbeat {
            if self.next_heartbeat - now <= chrono::Duration::seconds(i64::from(h.interval_s)) {
                wake = wake.min(self.next_heartbeat);
            } else {
                wake = now;
            }
        }
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

    fn ping_heartbeat(&mut self, now: Time) {
        let Some(h) = &self.config.heartbeat else { return };
        if !self.leased() {
            return; // only the active gateway says the cluster is alive
        }
        let problems = self.health.problems(now);
        let url = if problems.is_empty() { Some(h.url.clone()) } else { h.fail_url.clone() };
        if let Some(url) = url {
            self.effects.push(Effect::Heartbeat(url));
        }
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
        // Room for the result of every row handed out: a send never waits to give it back.
        let (all_slots, per_destination) = self.dispatcher.slots();
        let (results_tx, mut results_rx) = mpsc::channel(all_slots * crate::service::dispatch::SEND_AHEAD);
        let (notices_tx, notices_rx) = mpsc::channel(NOTICES_QUEUE);
        notify_operators(self.sender.clone(), notices_rx, self.config.public_url.clone());
        let watchdog = sd_notify::watchdog_enabled().is_some();
        let mut world = World {
            outbound: crate::edge::mqtt::spawn_outbound(client.clone(), OUTBOUND_QUEUE),
            notices: notices_tx,
            results: results_tx,
            sender: self.sender.clone(),
            lease: self.lease.clone(),
            counters: self.counters.clone(),
            watchdog,
            lanes: Lanes::new(all_slots, per_destination, self.dispatcher.breaker_failures()),
        };
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

        let mut failure = None;
        let lease_lost = self.lease.as_ref().map_or_else(CancellationToken::new, |l| l.lost());
        loop {
            let now = clock::now();
            let sleep = (self.next_deadline(now) - now).to_std().unwrap_or(Duration::ZERO);
            let input = tokio::select! {
                _ = cancel.cancelled() => break,
                _ = lease_lost.cancelled() => break,
                m = mqtt_rx.recv() => {
                    let Some(m) = m else { break };
                    // Everything waiting, up to a thousand, in one transaction.
                    let mut items = vec![m];
                    while items.len() < 1000 {
                        match mqtt_rx.try_recv() {
                            Ok(m) => items.push(m),
                            Err(_) => break,
                        }
                    }
                    ServiceInput::Broker(items)
                }
                Some(req) = web_rx.recv() => ServiceInput::Web(req),
                Some(first) = results_rx.recv() => {
                    let mut results = vec![first];
                    while let Ok(r) = results_rx.try_recv() {
                        results.push(r);
                    }
                    ServiceInput::Results(results)
                }
                _ = tokio::time::sleep(sleep) => ServiceInput::Timer,
            };
            #[allow(clippy::disallowed_methods)] // a duration for the metrics, on the monotonic clock
            let began = std::time::Instant::now();
            let turn = self.handle(input, clock::now());
            self.counters.service_turn.observe_in(&TURN_BUCKETS_S, began.elapsed().as_secs_f64());
            match turn {
                Ok(effects) => world.carry_out(effects),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        // Shutdown: let sends in flight finish (bounded), record them, disconnect.
        #[allow(clippy::disallowed_methods)] // the shutdown's I/O deadline, on tokio's clock
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.dispatcher.in_flight() > 0 {
            match tokio::time::timeout_at(deadline, results_rx.recv()).await {
                Ok(Some(r)) => self.record(vec![r], clock::now(), true),
                _ => break,
            }
        }
        if self.degraded.is_none() {
            self.flush_unrecorded(clock::now());
        }
        // What recording them asked for: agents' acknowledgements and notices (no new sends
        // start now; a row still due is sent by whichever gateway runs next).
        let last: Vec<Effect> = std::mem::take(&mut self.effects)
            .into_iter()
            .filter(|e| matches!(e, Effect::Broker(Outbound::AgentAck(..)) | Effect::Notice(_)))
            .collect();
        world.carry_out(last);
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

/// The runner's side of the effects: the channels and tasks that carry them out.
struct World {
    outbound: mpsc::Sender<Outbound>,
    notices: mpsc::Sender<NoticeJob>,
    results: ResultsTx,
    sender: Sender,
    lease: Option<Arc<crate::service::lease::Lease>>,
    counters: Arc<Counters>,
    watchdog: bool,
    lanes: Lanes,
}

impl World {
    /// Carry out effects without waiting for any of them: each send and each heartbeat in a
    /// task of its own, the rest into bounded queues whose policy when full is stated.
    fn carry_out(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Broker(out) => {
                    // Full (the broker connection is stuck): a PUBACK is dropped, so the broker
                    // sends that message again at the next connection (stored already: a
                    // duplicate, recognised); an acknowledgement for an agent's display is
                    // dropped (the alert stays acknowledged at the gateway).
                    if self.outbound.try_send(out).is_err() {
                        self.counters.outbound_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Effect::Send { row, link, probe } => {
                    let ctx = (self.sender.clone(), self.results.clone(), self.lease.clone());
                    let lane = self.lanes.lane(row.channel.destination());
                    let (all, failures) = (self.lanes.all.clone(), self.lanes.breaker_failures);
                    tokio::spawn(send_one(*row, link, probe, lane, all, failures, ctx));
                }
                Effect::Notice(job) => {
                    if self.notices.try_send(job).is_err() {
                        tracing::error!("operators' notices are backed up: this one is dropped (it is logged)");
                    }
                }
                Effect::Heartbeat(url) => {
                    let sender = self.sender.clone();
                    tokio::spawn(async move {
                        if let Err(e) = sender.ping(&url).await {
                            tracing::warn!(error = %e, "heartbeat");
                        }
                    });
                }
                Effect::Watchdog => {
                    if self.watchdog {
                        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
