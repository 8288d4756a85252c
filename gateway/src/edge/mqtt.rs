//! The gateway's MQTT link: one task owns the rumqttc event loop, another sends.
//!
//! - The **link task** owns the event loop (persistent session, manual acks). It forwards each
//!   PUBLISH to the service loop, tells it when the connection comes up (with the broker's
//!   `session present` flag) and when it goes down, resubscribes after every CONNACK, and
//!   backs off with jitter after errors. Every filter goes in one SUBSCRIBE, so the SUBACK's
//!   codes name each filter: a filter the broker refuses (NATS's MQTT answers 0x80 when it
//!   cannot make the subscription's JetStream consumer, and then delivers nothing on that
//!   topic; before this check such a refusal was logged "subscribed") is reported to the service ([`FromMqtt::Subscribed`]) and subscribed again with a backoff,
//!   until the broker takes it. A SUBSCRIBE not answered within [`SUBACK_WITHIN`] is sent
//!   again; only the SUBACK of the latest SUBSCRIBE counts, and one scheduled for a connection
//!   that has since dropped is not sent on the next. The service judges a home's silence only while the
//!   link is up, and from the moment it came up ([`crate::domain::engine::Engine::set_uplink`]): the
//!   centre's own downtime is never taken for the homes' silence.
//! - The **outbound task** sends PUBACKs and acknowledgements to agents, so that the service
//!   loop never waits on the MQTT client (the link task may be waiting for the loop to take a
//!   message, and only it drains the client's request queue: waiting on it from the loop
//!   deadlocked under load, which the fleet benchmark found). Its queue is bounded; the loop
//!   never waits on it (a PUBACK that does not fit is sent again by the broker at the next
//!   connection).

use std::time::Duration;

use mamori_protocol::mqtt::{self, Channel, HomeId};
use rand::Rng;
use rumqttc::{
    AsyncClient, Event as MqttEvent, MqttOptions, Packet, Publish, QoS, SubscribeFilter, SubscribeReasonCode,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// What the link task tells the service loop.
#[derive(Debug)]
pub enum FromMqtt {
    /// A message (to be stored, then acknowledged with [`Outbound::Ack`]).
    Message(Publish),
    /// Connected (CONNACK). `session_present`: the broker kept a session for this client id.
    Connected {
        /// The broker's session-present flag.
        session_present: bool,
    },
    /// The broker answered the subscription (after every CONNACK, and again after a refusal):
    /// the filters it refused, none when it took them all. Until it takes them all, the link
    /// is not up for the service: what does not arrive is not the homes' silence.
    Subscribed {
        /// The filters refused.
        refused: Vec<String>,
    },
    /// The connection was lost (or could not be made).
    Disconnected,
}

/// What the service sends to the broker.
#[derive(Debug)]
pub enum Outbound {
    /// PUBACK a stored message.
    Ack(Publish),
    /// Tell a home's agent that an alert was acknowledged.
    AgentAck(HomeId, mqtt::Ack),
}

/// The broker options from the config, one per broker: `[broker] host` (on `port`), then
/// each of `[broker] failover`.
pub fn options(config: &Config, port: u16) -> anyhow::Result<Vec<MqttOptions>> {
    let mut all = vec![options_for(config, &config.broker.host, port)?];
    for f in &config.broker.failover {
        let (host, port) = mamori_connect::parse_host_port(f).map_err(|e| anyhow::anyhow!("broker.failover: {e}"))?;
        all.push(options_for(config, &host, port)?);
    }
    Ok(all)
}

fn options_for(config: &Config, host: &str, port: u16) -> anyhow::Result<MqttOptions> {
    let b = &config.broker;
    let credentials = mamori_connect::credentials(b.username.as_ref(), b.password.as_ref())?;
    let tls = b.tls.as_ref().map(|t| t.transport()).transpose().map_err(|e| anyhow::anyhow!("broker.tls: {e}"))?;
    let keep_alive = Duration::from_secs(u64::from(b.keep_alive_s));
    let mut o =
        mamori_connect::mqtt_options(b.client_id.clone(), host, port, keep_alive, credentials.as_ref(), tls.as_ref());
    // A persistent session: QoS 1 events queue at the broker while the gateway is away.
    o.set_clean_session(false);
    o.set_manual_acks(true);
    o.set_max_packet_size(mqtt::MAX_PAYLOAD_BYTES * 4, mqtt::MAX_PAYLOAD_BYTES * 4);
    o.set_inflight(1000);
    Ok(o)
}

/// The subscription filters: every home's status, telemetry and events.
pub fn filters() -> Vec<String> {
    [Channel::Status, Channel::Telemetry, Channel::Event].iter().map(|c| c.filter()).collect()
}

/// Start the outbound task, with a queue of `capacity` (the service never waits on it: see
/// [`crate::service::run`] for what is dropped when it is full).
pub fn spawn_outbound(client: AsyncClient, capacity: usize) -> mpsc::Sender<Outbound> {
    let (tx, mut rx) = mpsc::channel(capacity);
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

/// The first wait before subscribing again to filters the broker refused; it doubles with each
/// refusal in a row, up to [`RESUBSCRIBE_MAX`].
pub const RESUBSCRIBE_FIRST: Duration = Duration::from_millis(500);
/// The longest wait before subscribing again.
pub const RESUBSCRIBE_MAX: Duration = Duration::from_secs(10);
/// A SUBSCRIBE not answered within this is sent again (rumqttc waits for a SUBACK for ever).
pub const SUBACK_WITHIN: Duration = Duration::from_secs(10);

/// The filters a SUBACK refused, from its codes in the order the filters were sent (a code
/// missing from a short SUBACK counts as refused).
fn refused_filters(filters: &[String], codes: &[SubscribeReasonCode]) -> Vec<String> {
    filters
        .iter()
        .enumerate()
        .filter(|(i, _)| !matches!(codes.get(*i), Some(SubscribeReasonCode::Success(_))))
        .map(|(_, f)| f.clone())
        .collect()
}

/// Start the link task. `brokers`: the options for each broker (the event loop starts on
/// the first); after every failed or lost connection the next one is tried, the session's
/// unacknowledged messages going with it.
pub fn spawn_link(
    client: AsyncClient,
    mut eventloop: rumqttc::EventLoop,
    brokers: Vec<MqttOptions>,
    filters: Vec<String>,
    tx: mpsc::Sender<FromMqtt>,
    cancel: CancellationToken,
) {
    // Every filter in one SUBSCRIBE (so the SUBACK's codes are the filters', in order), after
    // `after`. From another task: the link task must keep polling the event loop, or a full
    // request queue would wait on itself.
    // A subscription scheduled for one connection is not sent on the next: each connection
    // (and each loss of one) moves the generation on.
    let generation = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let subscribe = {
        let generation = generation.clone();
        move |client: &AsyncClient, filters: &[String], after: Duration| {
            let (client, filters) = (client.clone(), filters.to_vec());
            let generation = generation.clone();
            let mine = generation.load(std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                if generation.load(std::sync::atomic::Ordering::SeqCst) != mine {
                    return;
                }
                let all = filters.into_iter().map(|f| SubscribeFilter::new(f, QoS::AtLeastOnce));
                if let Err(e) = client.subscribe_many(all).await {
                    tracing::warn!(error = %e, "subscribe");
                }
            });
        }
    };
    let next_generation = {
        let generation = generation.clone();
        move || generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    };
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(250);
        let mut resubscribe = RESUBSCRIBE_FIRST;
        let mut up = false;
        let mut at = 0usize;
        // The SUBSCRIBE this connection waits on, and until when: only its SUBACK counts, and
        // a broker that never answers it is asked again.
        let mut awaiting: Option<u16> = None;
        let mut suback_by: std::pin::Pin<Box<tokio::time::Sleep>> = Box::pin(tokio::time::sleep(SUBACK_WITHIN));
        loop {
            let ev = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = &mut suback_by, if awaiting.is_some() => {
                    tracing::warn!(
                        within_s = SUBACK_WITHIN.as_secs(),
                        "the broker did not answer the subscription: subscribing again"
                    );
                    awaiting = None;
                    subscribe(&client, &filters, Duration::ZERO);
                    continue;
                }
                ev = eventloop.poll() => ev,
            };
            match ev {
                Ok(MqttEvent::Outgoing(rumqttc::Outgoing::Subscribe(pkid))) => {
                    awaiting = Some(pkid);
                    suback_by = Box::pin(tokio::time::sleep(SUBACK_WITHIN));
                }
                Ok(MqttEvent::Incoming(Packet::ConnAck(c))) => {
                    next_generation();
                    awaiting = None;
                    delay = Duration::from_millis(250);
                    let (host, port) = eventloop.mqtt_options.broker_address();
                    tracing::info!(session_present = c.session_present, broker = %format!("{host}:{port}"), "connected to the broker");
                    subscribe(&client, &filters, Duration::ZERO);
                    resubscribe = RESUBSCRIBE_FIRST;
                    up = true;
                    if tx.send(FromMqtt::Connected { session_present: c.session_present }).await.is_err() {
                        return;
                    }
                }
                Ok(MqttEvent::Incoming(Packet::SubAck(ack))) => {
                    if awaiting != Some(ack.pkid) {
                        continue; // the answer to a SUBSCRIBE since superseded
                    }
                    awaiting = None;
                    let refused = refused_filters(&filters, &ack.return_codes);
                    if refused.is_empty() {
                        tracing::info!("subscribed");
                    } else {
                        tracing::warn!(
                            ?refused,
                            retry_ms = resubscribe.as_millis() as u64,
                            "the broker refused to subscribe: nothing on these topics arrives until it takes them; subscribing again"
                        );
                        subscribe(&client, &filters, resubscribe);
                        resubscribe = (resubscribe * 2).min(RESUBSCRIBE_MAX);
                    }
                    if tx.send(FromMqtt::Subscribed { refused }).await.is_err() {
                        return;
                    }
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    if tx.send(FromMqtt::Message(p)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    next_generation();
                    awaiting = None;
                    let (host, port) = eventloop.mqtt_options.broker_address();
                    tracing::warn!(error = %e, broker = %format!("{host}:{port}"), retry_ms = delay.as_millis() as u64, "broker connection");
                    if std::mem::take(&mut up) && tx.send(FromMqtt::Disconnected).await.is_err() {
                        return;
                    }
                    let jitter = rand::rng().random_range(0.8..1.2);
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay.mul_f64(jitter)) => {}
                    }
                    at += 1;
                    if let Some(next) = brokers.get(at % brokers.len().max(1)) {
                        eventloop.mqtt_options = next.clone();
                    }
                    // The backoff grows once the whole list has failed.
                    if at.is_multiple_of(brokers.len().max(1)) {
                        delay = (delay * 2).min(Duration::from_secs(10));
                    }
                }
            }
        }
    });
}
