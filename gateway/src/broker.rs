//! The embedded MQTT broker (rumqttd) for one box and the demo.
//!
//! It has no ACLs: any client that reaches it can publish as any home. So it listens on
//! loopback unless the config says `allow_non_loopback = true` (the config check refuses
//! otherwise), and the gateway warns loudly when that override is used. Production uses
//! Mosquitto with TLS and per-home ACLs.

use std::net::{SocketAddr, TcpListener};

/// Why the broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No free port.
    #[error("embedded broker: cannot find a free port on {0}: {1}")]
    Port(SocketAddr, std::io::Error),
    /// A non-loopback address without the override.
    #[error("embedded broker: refusing to listen on {0}: it has no ACLs (allow_non_loopback = true overrides)")]
    NotLoopback(SocketAddr),
    /// rumqttd's config.
    #[error("embedded broker: {0}")]
    Config(String),
}

/// Start rumqttd on `bind` (port 0: a free port) on its own thread; returns the address.
pub fn start(bind: SocketAddr, allow_non_loopback: bool) -> Result<SocketAddr, BrokerError> {
    if !bind.ip().is_loopback() {
        if !allow_non_loopback {
            return Err(BrokerError::NotLoopback(bind));
        }
        tracing::warn!(%bind, "the embedded broker listens beyond loopback and has no ACLs: any client can publish as any home");
    }
    let addr = if bind.port() == 0 {
        let l = TcpListener::bind(bind).map_err(|e| BrokerError::Port(bind, e))?;
        l.local_addr().map_err(|e| BrokerError::Port(bind, e))?
    } else {
        bind
    };
    let text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 30000
max_outgoing_packet_count = 1000
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "{addr}"
next_connection_delay_ms = 0
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = {max}
max_inflight_count = 500
dynamic_filters = true
"#,
        max = mamori_protocol::mqtt::MAX_PAYLOAD_BYTES * 4
    );
    let config: rumqttd::Config = toml::from_str(&text).map_err(|e| BrokerError::Config(e.to_string()))?;
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| BrokerError::Config(e.to_string()))?;
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_public_address_without_the_override() {
        let e = start("0.0.0.0:0".parse().unwrap(), false).unwrap_err();
        assert!(matches!(e, BrokerError::NotLoopback(_)), "{e}");
    }
}
