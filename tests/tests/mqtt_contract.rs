//! The MQTT v1 contract over a real Mosquitto started by the test: a home's online status is
//! retained, its QoS 1 events arrive intact, and when its connection dies the broker delivers
//! the Last Will, exactly `{"state":"offline"}`, retained for anyone who subscribes later.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use std::time::Duration;

use anyhow::{anyhow, Result};
use mamori_protocol::mqtt::{self, Channel, ConnectionState, Event, EventKind, HomeId, Severity, Status};
use mamori_tests::{Deadline, Mosquitto};
use rumqttc::{AsyncClient, Event as MqttEvent, EventLoop, LastWill, MqttOptions, Packet, Publish, QoS};

fn options(id: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    o
}

/// Poll until the next PUBLISH, with a deadline.
async fn next_publish(ev: &mut EventLoop, deadline: Deadline) -> Result<Publish> {
    loop {
        let polled = tokio::time::timeout(deadline.remaining(), ev.poll())
            .await
            .map_err(|_| anyhow!("no publish before the deadline"))?;
        if let MqttEvent::Incoming(Packet::Publish(p)) = polled? {
            return Ok(p);
        }
    }
}

/// Poll until the connection is acknowledged (and, for a subscriber, the SUBACKs arrived).
async fn until_ready(ev: &mut EventLoop, subacks: usize, deadline: Deadline) -> Result<()> {
    let (mut connected, mut acks) = (false, 0);
    while !connected || acks < subacks {
        let polled = tokio::time::timeout(deadline.remaining(), ev.poll())
            .await
            .map_err(|_| anyhow!("not ready before the deadline"))?;
        match polled? {
            MqttEvent::Incoming(Packet::ConnAck(_)) => connected = true,
            MqttEvent::Incoming(Packet::SubAck(_)) => acks += 1,
            _ => {}
        }
    }
    Ok(())
}

#[tokio::test]
async fn status_events_and_last_will_through_a_real_broker() -> Result<()> {
    let broker = Mosquitto::start("")?;
    let home = HomeId::new("test-home-01")?;
    let deadline = Deadline::after(Duration::from_secs(20));

    // The gateway side subscribes to every home's status and events.
    let (gw, mut gw_ev) = AsyncClient::new(options("gateway-test", broker.port()), 16);
    gw.subscribe(Channel::Status.filter(), QoS::AtLeastOnce).await?;
    gw.subscribe(Channel::Event.filter(), QoS::AtLeastOnce).await?;
    until_ready(&mut gw_ev, 2, deadline).await?;

    // The agent side connects with the Last Will, and announces itself online (retained).
    let mut agent_opts = options(home.as_str(), broker.port());
    agent_opts.set_last_will(LastWill::new(
        home.topic(Channel::Status),
        mqtt::encode(&Status::last_will()),
        QoS::AtLeastOnce,
        true,
    ));
    let (agent, mut agent_ev) = AsyncClient::new(agent_opts, 16);
    until_ready(&mut agent_ev, 0, deadline).await?;
    let online = Status {
        state: ConnectionState::Online,
        since: None,
        agent_version: Some("test".into()),
        telemetry_interval_s: Some(10),
        sources: vec![],
        reason: None,
    };
    agent.publish(home.topic(Channel::Status), QoS::AtLeastOnce, true, mqtt::encode(&online)).await?;
    let event = Event {
        id: "boot1:1".into(),
        seq: 1,
        ts: chrono::DateTime::parse_from_rfc3339("2026-11-22T03:04:05.250+09:00")?,
        kind: EventKind::MainsLost,
        severity: Severity::Critical,
        source: Some("ups".into()),
        data: Default::default(),
        clock: None,
    };
    agent.publish(home.topic(Channel::Event), QoS::AtLeastOnce, false, mqtt::encode(&event)).await?;
    // Drive the agent's event loop until both PUBACKs arrived.
    let mut pubacks = 0;
    while pubacks < 2 {
        let polled =
            tokio::time::timeout(deadline.remaining(), agent_ev.poll()).await.map_err(|_| anyhow!("no PUBACK"))?;
        if let MqttEvent::Incoming(Packet::PubAck(_)) = polled? {
            pubacks += 1;
        }
    }

    let p = next_publish(&mut gw_ev, deadline).await?;
    let t = mqtt::Topic::parse(&p.topic)?;
    assert_eq!((t.home.clone(), t.channel), (home.clone(), Channel::Status));
    assert_eq!(mqtt::decode::<Status>(&p.payload)?.state, ConnectionState::Online);
    let p = next_publish(&mut gw_ev, deadline).await?;
    assert_eq!(mqtt::Topic::parse(&p.topic)?.channel, Channel::Event);
    assert_eq!(p.qos, QoS::AtLeastOnce);
    assert_eq!(mqtt::decode::<Event>(&p.payload)?, event);

    // The home's connection dies without a DISCONNECT: the broker publishes the Last Will.
    drop(agent_ev);
    drop(agent);
    let p = next_publish(&mut gw_ev, deadline).await?;
    assert_eq!(mqtt::Topic::parse(&p.topic)?.home, home);
    assert_eq!(&p.payload[..], br#"{"state":"offline"}"#, "broker log:\n{}", broker.log());
    assert_eq!(mqtt::decode::<Status>(&p.payload)?.state, ConnectionState::Offline);

    // A gateway that starts later still learns the home is offline: the will was retained.
    let (late, mut late_ev) = AsyncClient::new(options("gateway-late", broker.port()), 16);
    late.subscribe(home.topic(Channel::Status), QoS::AtLeastOnce).await?;
    let p = next_publish(&mut late_ev, deadline).await?;
    assert!(p.retain);
    assert_eq!(mqtt::decode::<Status>(&p.payload)?, Status::last_will());
    Ok(())
}
