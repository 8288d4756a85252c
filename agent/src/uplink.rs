//! The uplink: MQTT to the gateway, through the spool.
//!
//! ## Tasks
//! Both run on the uplink's own thread and one-thread runtime (`crate::run`), so an append's
//! fsync waits there and stalls neither the monitor nor the sources.
//! - The **connection task** owns the rumqttc `EventLoop` and never publishes. For each
//!   connection attempt it builds a fresh client and event loop (client id = home id, Last Will
//!   `{"state":"offline"}` retained on `status`, clean session), hands the client to the uplink
//!   task, and forwards what the broker says (CONNACK, the packet id of each outgoing PUBLISH,
//!   PUBACKs, incoming `ack` messages). On any error it drops that event loop, tells the uplink
//!   task, and waits a jittered, exponentially growing delay before the next attempt.
//! - The **uplink task** owns the [`Spool`]. On every connection it announces `online`
//!   (retained), subscribes to its `ack` topic (so subscriptions are restored after every
//!   reconnect), and replays the spool's pending events in seq order, at most `inflight` at a
//!   time. A new event is appended (and synced) before it is published.
//!
//! ## Delivered means acknowledged
//! rumqttc reports each outgoing PUBLISH's packet id in the order the publishes were requested,
//! so a per-connection FIFO of "what was requested" maps packet ids to seqs; an event leaves
//! the spool only when the PUBACK for its packet id arrives. Because each connection starts
//! from a fresh event loop, nothing is re-sent behind the spool's back: after a reconnect the
//! spool alone decides what is sent again. An event whose PUBACK was lost is sent twice; the
//! gateway de-duplicates by `(home, seq)`.
//!
//! ## Telemetry
//! QoS 0, never spooled while connected. While the broker is unreachable, one snapshot per
//! period is kept in the spool and published after the events on reconnect, marked `kept`
//! (history: its clocks and `ts` say when it was taken).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use mamori_protocol::mqtt::{self, Ack, Channel, ConnectionState, Event, HomeId, SourceInfo, Status, Telemetry};
use rumqttc::{AsyncClient, Event as MqttEvent, LastWill, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{BrokerConfig, TlsConfig};
use crate::spool::{Spool, Storage};

/// Everything needed to connect, resolved from the config (secrets read, files loaded).
#[derive(Clone)]
pub struct Connection {
    /// The home.
    pub home: HomeId,
    /// Broker host (the first of [`Connection::brokers`]).
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Every broker, `host` first, then `[broker] failover` in order.
    pub brokers: Vec<(String, u16)>,
    /// TLS, if configured.
    pub tls: Option<TlsConfiguration>,
    /// Username and password.
    pub credentials: Option<(String, String)>,
    /// Keep-alive.
    pub keep_alive: Duration,
    /// First reconnect delay.
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// An event published this long ago with no PUBACK: the broker took it and is not
    /// answering, so the connection is dropped and the spool sends it again on the next.
    pub puback_timeout: Duration,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No secrets in logs.
        f.debug_struct("Connection")
            .field("home", &self.home)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("brokers", &self.brokers)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Why a connection could not be prepared (shared with the gateway).
pub use mamori_connect::ConnectError as UplinkError;

impl Connection {
    /// Resolve the broker section of the config.
    pub fn from_config(home: HomeId, b: &BrokerConfig) -> Result<Connection, UplinkError> {
        let tls = b.tls.as_ref().map(TlsConfig::transport).transpose()?;
        let credentials = mamori_connect::credentials(b.username.as_ref(), b.password.as_ref())?;
        let mut brokers = vec![(b.host.clone(), b.port)];
        for f in &b.failover {
            brokers.push(host_port(f)?);
        }
        Ok(Connection {
            home,
            host: b.host.clone(),
            port: b.port,
            brokers,
            tls,
            credentials,
            keep_alive: Duration::from_secs(u64::from(b.keep_alive_s.max(5))),
            reconnect_min: Duration::from_millis(b.reconnect_min_ms),
            reconnect_max: Duration::from_millis(b.reconnect_max_ms),
            puback_timeout: Duration::from_secs(u64::from(b.puback_timeout_s)),
        })
    }

    /// The options for the `n`-th broker (round the list).
    fn options(&self, n: usize) -> MqttOptions {
        let (host, port) =
            self.brokers.get(n % self.brokers.len().max(1)).cloned().unwrap_or((self.host.clone(), self.port));
        let mut o = mamori_connect::mqtt_options(
            self.home.as_str(),
            host,
            port,
            self.keep_alive,
            self.credentials.as_ref(),
            self.tls.as_ref(),
        );
        o.set_clean_session(true);
        o.set_last_will(LastWill::new(
            self.home.topic(Channel::Status),
            mqtt::encode(&Status::last_will()),
            QoS::AtLeastOnce,
            true,
        ));
        o
    }
}

fn host_port(s: &str) -> Result<(String, u16), UplinkError> {
    crate::config::parse_host_port(s).map_err(|e| UplinkError::Broker(format!("broker.failover: {e}")))
}

impl Connection {
    /// The installer's check (`probe`): connect once as this home, with its TLS and its
    /// credentials, and say in words whether the broker accepted it. A client id of its own
    /// (`<home>-probe`) and no Last Will, so a running agent is not disconnected and nobody is
    /// told the home went offline.
    ///
    /// Every broker of the list is tried (a cluster's node the homes cannot reach is found at
    /// installation, not in the storm); the answer names each.
    pub async fn check(&self, limit: Duration) -> Result<String, String> {
        let mut ok = Vec::new();
        let mut failed = Vec::new();
        for (host, port) in &self.brokers {
            match self.check_one(host, *port, limit).await {
                Ok(s) => ok.push(s),
                Err(e) => failed.push(e),
            }
        }
        if failed.is_empty() {
            Ok(ok.join("; "))
        } else {
            Err(failed.join("; "))
        }
    }

    async fn check_one(&self, host: &str, port: u16, limit: Duration) -> Result<String, String> {
        let mut o = mamori_connect::mqtt_options(
            format!("{}-probe", self.home.as_str()),
            host,
            port,
            self.keep_alive,
            self.credentials.as_ref(),
            self.tls.as_ref(),
        );
        o.set_clean_session(true);
        let (client, mut events) = AsyncClient::new(o, 4);
        let at = format!("{host}:{port}");
        let how = match (&self.tls, &self.credentials) {
            (Some(_), Some(_)) => "TLS, username and password",
            (Some(_), None) => "TLS",
            (None, Some(_)) => "username and password, no TLS",
            (None, None) => "no TLS, no password",
        };
        let outcome = tokio::time::timeout(limit, async {
            loop {
                match events.poll().await {
                    Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => return Ok(format!("connected to {at} ({how})")),
                    Ok(_) => {}
                    Err(e) => return Err(broker_error(&at, &e)),
                }
            }
        })
        .await
        .unwrap_or_else(|_| {
            Err(format!("{at}: no answer within {} ms (firewall, or the wrong port?)", limit.as_millis()))
        });
        let _ = client.try_disconnect();
        outcome
    }
}

/// A broker connection error in words an installer can act on.
fn broker_error(at: &str, e: &rumqttc::ConnectionError) -> String {
    use rumqttc::{ConnectReturnCode as Code, ConnectionError as E};
    match e {
        // Mosquitto answers a wrong password with "not authorised", as it does an unknown home.
        E::ConnectionRefused(Code::BadUserNamePassword | Code::NotAuthorized) => format!(
            "{at} refused this home's credentials (check [broker] username and password, or the client \
             certificate, and that the home is provisioned on the broker)"
        ),
        E::ConnectionRefused(code) => format!("{at} refused the connection: {code:?}"),
        E::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            format!("{at}: nothing listens there (is the broker running, and is this the right port?)")
        }
        E::Tls(t) => format!("{at}: TLS failed: {t} (the CA file, or the client certificate?)"),
        other => format!("{at}: {other}"),
    }
}

pub use mamori_connect::check_key_permissions;

/// What the connection task tells the uplink task.
#[derive(Debug)]
enum Conn {
    /// A new connection attempt: its client, and a token that drops it when cancelled.
    Session(u64, AsyncClient, CancellationToken),
    Connected(u64, String),
    Outgoing(u64, u16),
    PubAck(u64, u16),
    Message(u64, String, Vec<u8>),
    Disconnected(u64, String),
}

async fn connection_task(conn: Connection, tx: mpsc::UnboundedSender<Conn>, cancel: CancellationToken) {
    let mut delay = conn.reconnect_min;
    let mut session = 0u64;
    // Which broker: the next one after every failed or lost connection, so a dead node of a
    // cluster costs one attempt; the backoff grows only once the whole list has failed.
    let mut at = 0usize;
    loop {
        session += 1;
        let (client, mut ev) = AsyncClient::new(conn.options(at), 128);
        let drop_it = CancellationToken::new();
        if tx.send(Conn::Session(session, client.clone(), drop_it.clone())).is_err() {
            return;
        }
        loop {
            let polled = tokio::select! {
                () = cancel.cancelled() => return,
                () = drop_it.cancelled() => {
                    let _ = tx.send(Conn::Disconnected(session, "dropped: the broker stopped acknowledging events".into()));
                    break;
                }
                p = ev.poll() => p,
            };
            let msg = match polled {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    delay = conn.reconnect_min;
                    let (host, port) = conn.options(at).broker_address();
                    Conn::Connected(session, format!("{host}:{port}"))
                }
                Ok(MqttEvent::Outgoing(Outgoing::Publish(pkid))) => Conn::Outgoing(session, pkid),
                Ok(MqttEvent::Incoming(Packet::PubAck(a))) => Conn::PubAck(session, a.pkid),
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    Conn::Message(session, p.topic.clone(), p.payload.to_vec())
                }
                Ok(_) => continue,
                Err(e) => {
                    let _ = tx.send(Conn::Disconnected(session, e.to_string()));
                    break;
                }
            };
            if tx.send(msg).is_err() {
                return;
            }
        }
        drop(ev);
        at += 1;
        // Full jitter between half and all of the current delay, so a neighbourhood of agents
        // coming back after an outage does not reconnect in lockstep.
        let jittered = delay.mul_f64(0.5 + rand::random::<f64>() * 0.5);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(jittered) => {}
        }
        if at.is_multiple_of(conn.brokers.len().max(1)) {
            delay = (delay * 2).min(conn.reconnect_max);
        }
    }
}

/// What the rest of the agent sends the uplink.
#[derive(Debug)]
pub enum ToUplink {
    /// A new event (not yet spooled; the uplink gives it its seq).
    Event(Event),
    /// A telemetry snapshot.
    Telemetry(Telemetry),
}

/// What the uplink tells the rest of the agent.
#[derive(Debug, Clone, PartialEq)]
pub enum FromUplink {
    /// The broker accepted the connection (`true`) or it was lost (`false`).
    Connected(bool),
    /// Someone acknowledged an alert about this home.
    Ack(Ack),
    /// The spool is holding events in memory (`true`) or writes again (`false`).
    SpoolDegraded(bool),
    /// An event was made durable (or held) and given its seq.
    Spooled(Event),
}

/// Uplink settings.
#[derive(Debug, Clone)]
pub struct UplinkSettings {
    /// Events published and awaiting PUBACK at once.
    pub inflight: usize,
    /// The telemetry period (one snapshot per period is kept while offline).
    pub telemetry_interval: Duration,
    /// What `status` announces.
    pub online: Status,
    /// How long to wait for PUBACKs on shutdown.
    pub shutdown_grace: Duration,
}

#[derive(Debug)]
enum Sent {
    Event(u64),
    Other,
}

struct Session {
    id: u64,
    client: AsyncClient,
    /// Cancelled to drop this connection (see [`Connection::puback_timeout`]).
    drop_it: CancellationToken,
    connected: bool,
    fifo: VecDeque<Sent>,
    /// Packet id → the event's seq, and when it went out.
    inflight: BTreeMap<u16, (u64, tokio::time::Instant)>,
    published: BTreeSet<u64>,
}

/// The uplink task's state.
pub struct Uplink<S: Storage> {
    conn: Connection,
    settings: UplinkSettings,
    spool: Spool<S>,
    session: Option<Session>,
    last_kept_telemetry: Option<tokio::time::Instant>,
    /// Connections dropped in a row for an unacknowledged event (see
    /// [`Uplink::check_pubacks`]): each doubles the wait before the next drop.
    puback_drops: u32,
    /// When the PUBACK deadline was last looked at.
    last_puback_check: Option<tokio::time::Instant>,
}

impl<S: Storage> Uplink<S> {
    /// An uplink over `spool`.
    pub fn new(conn: Connection, settings: UplinkSettings, spool: Spool<S>) -> Self {
        Uplink {
            conn,
            settings,
            spool,
            session: None,
            last_kept_telemetry: None,
            puback_drops: 0,
            last_puback_check: None,
        }
    }

    /// The sources announced in `status`.
    pub fn announce(sources: Vec<SourceInfo>, interval_s: u32, since: mqtt::Timestamp) -> Status {
        Status {
            state: ConnectionState::Online,
            since: Some(since),
            agent_version: Some(env!("CARGO_PKG_VERSION").to_string()),
            telemetry_interval_s: Some(interval_s),
            sources,
            reason: None,
        }
    }

    /// Run until `cancel`, then shut down cleanly: publish `offline` (retained), wait for the
    /// outstanding PUBACKs up to the grace period, flush the spool.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<ToUplink>,
        tx: mpsc::Sender<FromUplink>,
        cancel: CancellationToken,
    ) -> Spool<S> {
        let (ctx, mut crx) = mpsc::unbounded_channel();
        let conn_cancel = CancellationToken::new();
        let conn_task = tokio::spawn(connection_task(self.conn.clone(), ctx, conn_cancel.clone()));
        let mut retry = tokio::time::interval(Duration::from_secs(5));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                Some(msg) = rx.recv() => match msg {
                    ToUplink::Event(e) => self.on_event(e, &tx).await,
                    ToUplink::Telemetry(t) => self.on_telemetry(t).await,
                },
                Some(c) = crx.recv() => self.on_conn(c, &tx).await,
                _ = retry.tick() => {
                    self.check_pubacks();
                    let was = self.spool.degraded();
                    if was && self.spool.retry_held() {
                        let _ = tx.send(FromUplink::SpoolDegraded(false)).await;
                    }
                }
            }
        }
        // Events queued before the cancellation (agent_stopping among them) are spooled first.
        while let Ok(msg) = rx.try_recv() {
            match msg {
                ToUplink::Event(e) => self.on_event(e, &tx).await,
                ToUplink::Telemetry(_) => {}
            }
        }
        self.shutdown(&mut crx).await;
        conn_cancel.cancel();
        let _ = conn_task.await;
        let _ = self.spool.flush();
        self.spool
    }

    async fn on_event(&mut self, event: Event, tx: &mpsc::Sender<FromUplink>) {
        let was_degraded = self.spool.degraded();
        let spooled = self.spool.append(event).event.clone();
        if self.spool.degraded() != was_degraded {
            let _ = tx.send(FromUplink::SpoolDegraded(self.spool.degraded())).await;
        }
        let _ = tx.send(FromUplink::Spooled(spooled)).await;
        self.pump().await;
    }

    async fn on_telemetry(&mut self, mut t: Telemetry) {
        // Only the uplink knows the spool's state.
        t.spool = Some(self.spool.status());
        let payload = mqtt::encode(&t);
        match &mut self.session {
            Some(s) if s.connected => {
                s.fifo.push_back(Sent::Other);
                if s.client
                    .publish(self.conn.home.topic(Channel::Telemetry), QoS::AtMostOnce, false, payload)
                    .await
                    .is_err()
                {
                    s.fifo.pop_back();
                }
            }
            _ => {
                #[allow(clippy::disallowed_methods)] // an I/O timer on tokio's clock
                let now = tokio::time::Instant::now();
                let due =
                    self.last_kept_telemetry.is_none_or(|t| now.duration_since(t) >= self.settings.telemetry_interval);
                if due {
                    self.last_kept_telemetry = Some(now);
                    // Published later: marked as history, so that the gateway does not take
                    // it for the present (its clocks then place it where it belongs).
                    t.kept = true;
                    self.spool.keep_telemetry(mqtt::encode(&t));
                }
            }
        }
    }

    async fn on_conn(&mut self, c: Conn, tx: &mpsc::Sender<FromUplink>) {
        let current = self.session.as_ref().map(|s| s.id);
        match c {
            Conn::Session(id, client, drop_it) => {
                self.session = Some(Session {
                    id,
                    client,
                    drop_it,
                    connected: false,
                    fifo: VecDeque::new(),
                    inflight: BTreeMap::new(),
                    published: BTreeSet::new(),
                });
            }
            Conn::Connected(id, broker) if current == Some(id) => {
                tracing::info!(%broker, "connected to the broker");
                let home = self.conn.home.clone();
                let online = mqtt::encode(&self.settings.online);
                if let Some(s) = &mut self.session {
                    s.connected = true;
                    s.fifo.push_back(Sent::Other);
                    let _ = s.client.publish(home.topic(Channel::Status), QoS::AtLeastOnce, true, online).await;
                    let _ = s.client.subscribe(home.topic(Channel::Ack), QoS::AtLeastOnce).await;
                }
                let _ = tx.send(FromUplink::Connected(true)).await;
                self.pump().await;
            }
            Conn::Outgoing(id, pkid) if current == Some(id) => {
                if let Some(s) = &mut self.session {
                    if let Some(Sent::Event(seq)) = s.fifo.pop_front() {
                        #[allow(clippy::disallowed_methods)] // an I/O deadline on tokio's clock
                        s.inflight.insert(pkid, (seq, tokio::time::Instant::now()));
                    }
                }
            }
            Conn::PubAck(id, pkid) if current == Some(id) => {
                let seq = self.session.as_mut().and_then(|s| s.inflight.remove(&pkid));
                if let Some((seq, _)) = seq {
                    self.spool.ack(seq);
                    self.pump().await;
                }
            }
            Conn::Message(id, topic, payload)
                if current == Some(id)
                    && mqtt::Topic::parse(&topic)
                        .is_ok_and(|t| t.home == self.conn.home && t.channel == Channel::Ack) =>
            {
                match mqtt::decode::<Ack>(&payload) {
                    Ok(ack) => {
                        tracing::info!(alert = %ack.alert_id, kind = %ack.alert_kind, role = ?ack.role, "an alert about this home was acknowledged");
                        let _ = tx.send(FromUplink::Ack(ack)).await;
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring an ack message that does not parse"),
                }
            }
            Conn::Disconnected(id, reason) if current == Some(id) => {
                let was = self.session.take().is_some_and(|s| s.connected);
                tracing::warn!(%reason, "broker connection lost");
                if was {
                    let _ = tx.send(FromUplink::Connected(false)).await;
                }
            }
            _ => {} // a message from a connection that is already gone
        }
    }

    /// A broker that took an event and, [`Connection::puback_timeout`] later, has still not
    /// acknowledged it (while answering pings, so the keep-alive does not notice) would hold
    /// the event until the next reconnect, which may be never. Drop the connection instead:
    /// the next one sends the event again from the spool (the gateway de-duplicates it).
    ///
    /// Looked at on the uplink's 5 s tick. A broker that keeps doing it is not hammered: each
    /// drop in a row doubles the wait (up to 32 times), and a connection on which every event
    /// was acknowledged starts the count again. A tick that came late (this thread was held,
    /// by a long fsync) is skipped once, since PUBACKs may be waiting unread.
    fn check_pubacks(&mut self) {
        #[allow(clippy::disallowed_methods)] // an I/O deadline on tokio's clock
        let now = tokio::time::Instant::now();
        let late = self.last_puback_check.is_some_and(|at| now.duration_since(at) > Duration::from_secs(10));
        self.last_puback_check = Some(now);
        let Some(s) = &self.session else { return };
        if !s.connected || late || s.drop_it.is_cancelled() {
            return;
        }
        let Some((seq, at)) = s.inflight.values().min_by_key(|(_, at)| *at) else {
            if s.published.is_empty() {
                self.puback_drops = 0; // everything sent on this connection was acknowledged
            }
            return;
        };
        let waited = now.duration_since(*at);
        let limit = self.conn.puback_timeout * 2u32.pow(self.puback_drops.min(5));
        if waited >= limit {
            tracing::warn!(
                seq,
                waited_s = waited.as_secs(),
                "the broker has not acknowledged an event; reconnecting so that the spool sends it again"
            );
            s.drop_it.cancel();
            self.puback_drops = self.puback_drops.saturating_add(1);
        }
    }

    /// Publish pending events not yet sent on this connection, within the in-flight window;
    /// then the telemetry kept during an outage.
    async fn pump(&mut self) {
        let Some(s) = &mut self.session else { return };
        if !s.connected {
            return;
        }
        let topic = self.conn.home.topic(Channel::Event);
        s.published.retain(|q| self.spool.is_pending(*q));
        let outstanding = s.published.len();
        let room = self.settings.inflight.saturating_sub(outstanding);
        let next: Vec<(u64, Vec<u8>)> = self
            .spool
            .pending()
            .filter(|p| !s.published.contains(&p.event.seq))
            .take(room)
            .map(|p| (p.event.seq, p.payload.clone()))
            .collect();
        for (seq, payload) in next {
            s.fifo.push_back(Sent::Event(seq));
            if s.client.publish(topic.clone(), QoS::AtLeastOnce, false, payload).await.is_err() {
                s.fifo.pop_back();
                return;
            }
            s.published.insert(seq);
        }
        if self.spool.pending().next().is_none() {
            let kept = self.spool.take_telemetry();
            let ttopic = self.conn.home.topic(Channel::Telemetry);
            for t in kept {
                s.fifo.push_back(Sent::Other);
                let _ = s.client.publish(ttopic.clone(), QoS::AtMostOnce, false, t).await;
            }
        }
    }

    async fn shutdown(&mut self, crx: &mut mpsc::UnboundedReceiver<Conn>) {
        let Some(s) = &mut self.session else { return };
        if !s.connected {
            return;
        }
        let offline = Status { reason: Some("shutdown".into()), ..Status::last_will() };
        s.fifo.push_back(Sent::Other);
        let _ = s
            .client
            .publish(self.conn.home.topic(Channel::Status), QoS::AtLeastOnce, true, mqtt::encode(&offline))
            .await;
        #[allow(clippy::disallowed_methods)] // an I/O deadline on tokio's clock
        let deadline = tokio::time::Instant::now() + self.settings.shutdown_grace;
        // Wait for the PUBACKs of what is in flight (the agent_stopping event among them).
        while self.session.as_ref().is_some_and(|s| !s.inflight.is_empty() || !s.fifo.is_empty()) {
            match tokio::time::timeout_at(deadline, crx.recv()).await {
                Ok(Some(c)) => self.on_conn(c, &mpsc::channel(1).0).await,
                _ => break,
            }
        }
        if let Some(s) = &self.session {
            let _ = s.client.disconnect().await;
            // Let the connection task write the DISCONNECT before it is cancelled.
            let _ = tokio::time::timeout(Duration::from_millis(200), async {
                while let Some(c) = crx.recv().await {
                    if matches!(c, Conn::Disconnected(..)) {
                        break;
                    }
                }
            })
            .await;
        }
    }
}
