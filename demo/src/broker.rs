//! The demo's embedded MQTT broker (rumqttd).
//!
//! It has no ACLs: any client that reaches it can publish as any home. So it listens on
//! loopback only, and nothing but the demo starts it. A deployment uses Mosquitto (or a NATS
//! cluster) with TLS and per-home credentials and ACLs: `docs/deployment.md`.

use std::net::{SocketAddr, TcpListener};

/// Why the broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No free port.
    #[error("embedded broker: cannot find a free port on {0}: {1}")]
    Port(SocketAddr, std::io::Error),
    /// A non-loopback address.
    #[error("embedded broker: refusing to listen on {0}: it has no ACLs, so it listens on loopback only")]
    NotLoopback(SocketAddr),
    /// rumqttd's config.
    #[error("embedded broker: {0}")]
    Config(String),
    /// rumqttd did not listen in time.
    #[error("embedded broker: not listening on {0} after {1} s")]
    NotListening(SocketAddr, u64),
}

/// Start rumqttd on `bind`, a loopback address (port 0: a free port), on its own thread;
/// returns the address.
pub fn start(bind: SocketAddr) -> Result<SocketAddr, BrokerError> {
    if !bind.ip().is_loopback() {
        return Err(BrokerError::NotLoopback(bind));
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
    // rumqttd binds on its own thread: wait until it accepts, so the gateway's first connect
    // does not log a "connection refused" that reads as a failure.
    #[allow(clippy::disallowed_methods)] // an I/O edge: a start-up deadline
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200)).is_err() {
        if started.elapsed() > STARTUP {
            return Err(BrokerError::NotListening(addr, STARTUP.as_secs()));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(addr)
}

/// How long rumqttd may take to listen.
const STARTUP: std::time::Duration = std::time::Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_an_address_beyond_loopback() {
        let e = start("0.0.0.0:0".parse().unwrap()).unwrap_err();
        assert!(matches!(e, BrokerError::NotLoopback(_)), "{e}");
    }

    #[test]
    fn returns_once_the_broker_accepts_connections() {
        let addr = start("127.0.0.1:0".parse().unwrap()).unwrap();
        std::net::TcpStream::connect(addr).expect("listening when start returns");
    }
}
