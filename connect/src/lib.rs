//! What both ends share about reaching the broker: the home's agent and the centre's gateway
//! read the same `[broker]` keys for secrets and TLS, and must refuse the same unsafe files.
//!
//! - [`Secret`]: a password inline, from a file, or from an environment variable, never
//!   printed ([`std::fmt::Debug`] redacts an inline value).
//! - [`TlsConfig`]: the CA and the client certificate, as files or inline PEM (the one-file
//!   bundle `mamori-gateway homes provision` writes); [`TlsConfig::transport`] reads them into
//!   rumqttc's TLS settings and refuses a private key that group or others can read.
//! - [`credentials`]: the username and the resolved password.
//! - [`parse_host_port`]: a `[broker] failover` entry.
//! - [`BrokerKeys::problems`]: every rule a `[broker]` section keeps on both sides, so the
//!   gateway refuses what the agent refuses. Each side still declares its own `[broker]`
//!   struct, because each has keys the other has not (the gateway's `client_id`, the agent's
//!   reconnect delays) and serde's `flatten` would silently accept unknown keys (it cannot be
//!   combined with `deny_unknown_fields`); the shared keys are borrowed into [`BrokerKeys`].
//!
//! - [`mqtt_options`]: the MQTT options every mamori client starts from (who, where, the
//!   keep-alive's floor, credentials, TLS). Each side adds only what is its own: the agent a
//!   clean session with a Last Will, its probe neither; the gateway a persistent session with
//!   manual acknowledgements, a larger packet limit and window.
//!
//! One error type, [`ConnectError`], names the key that is wrong. No I/O beyond reading the
//! files a config names.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use serde::Deserialize;

/// A keep-alive below this is raised to it: a broker that hears nothing for 1.5 × the
/// keep-alive drops the client, and on a slow mobile link a second or two is not silence.
pub const KEEP_ALIVE_MIN: Duration = Duration::from_secs(5);

/// The MQTT options every mamori client starts from: `client_id` at `host:port`, the
/// keep-alive (at least [`KEEP_ALIVE_MIN`]), the username and password when the config gives
/// them, TLS when it gives it. The session, the Last Will and the flow settings are each
/// side's own, added to what this returns.
pub fn mqtt_options(
    client_id: impl Into<String>,
    host: impl Into<String>,
    port: u16,
    keep_alive: Duration,
    credentials: Option<&(String, String)>,
    tls: Option<&TlsConfiguration>,
) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_keep_alive(keep_alive.max(KEEP_ALIVE_MIN));
    if let Some((user, password)) = credentials {
        o.set_credentials(user.clone(), password.clone());
    }
    if let Some(tls) = tls {
        o.set_transport(Transport::Tls(tls.clone()));
    }
    o
}

/// Why a connection could not be prepared from the config.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnectError {
    /// A broker address is not `host:port`.
    #[error("{0}")]
    Broker(String),
    /// A TLS file could not be read or is unsafe.
    #[error("{0}")]
    Tls(String),
    /// The password could not be resolved.
    #[error("broker.password: {0}")]
    Secret(String),
}

/// TLS to the broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The deployment's CA certificate (PEM) that signed the broker's certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// This side's client certificate (PEM), for certificate authentication.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// Its private key (PEM); must not be readable by others.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// The CA certificate inline (PEM text), instead of `ca_file`: the one-file bundle that
    /// `mamori-gateway homes provision` writes.
    #[serde(default)]
    pub ca_pem: Option<String>,
    /// The client certificate inline (PEM text).
    #[serde(default)]
    pub client_cert_pem: Option<String>,
    /// The client key inline (PEM text): the config file must then not be readable by others.
    #[serde(default)]
    pub client_key_pem: Option<String>,
}

impl TlsConfig {
    /// The CA certificate, from the file or inline.
    pub fn ca(&self) -> Result<Vec<u8>, String> {
        match (&self.ca_pem, &self.ca_file) {
            (Some(pem), _) => Ok(pem.clone().into_bytes()),
            (None, Some(f)) => std::fs::read(f).map_err(|e| format!("cannot read {}: {e}", f.display())),
            (None, None) => Err("no CA certificate (ca_file or ca_pem)".into()),
        }
    }

    /// rumqttc's TLS settings: the CA, and the client certificate and key when both are given
    /// (files first, then inline). A key file that group or others can read is refused.
    pub fn transport(&self) -> Result<TlsConfiguration, ConnectError> {
        let read =
            |p: &Path| std::fs::read(p).map_err(|e| ConnectError::Tls(format!("cannot read {}: {e}", p.display())));
        let ca = self.ca().map_err(ConnectError::Tls)?;
        let client_auth =
            match (&self.client_cert_file, &self.client_key_file, &self.client_cert_pem, &self.client_key_pem) {
                (Some(c), Some(k), _, _) => {
                    check_key_permissions(k)?;
                    Some((read(c)?, read(k)?))
                }
                (_, _, Some(c), Some(k)) => Some((c.clone().into_bytes(), k.clone().into_bytes())),
                _ => None,
            };
        Ok(TlsConfiguration::Simple { ca, alpn: None, client_auth })
    }
}

/// A secret: inline, from a file, or from an environment variable.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Secret {
    /// `{ value = "..." }` (discouraged outside tests).
    Value(String),
    /// `{ file = "/etc/mamori/broker-password" }`.
    File(PathBuf),
    /// `{ env = "MAMORI_BROKER_PASSWORD" }`.
    Env(String),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::Value(_) => f.write_str("Secret(<inline, redacted>)"),
            Secret::File(p) => write!(f, "Secret(file {})", p.display()),
            Secret::Env(v) => write!(f, "Secret(env {v})"),
        }
    }
}

impl Secret {
    /// Resolve the secret's value (a file's trailing newline is not part of it).
    pub fn resolve(&self) -> Result<String, String> {
        match self {
            Secret::Value(v) => Ok(v.clone()),
            Secret::File(p) => std::fs::read_to_string(p)
                .map(|s| s.trim_end().to_string())
                .map_err(|e| format!("cannot read {}: {e}", p.display())),
            Secret::Env(name) => std::env::var(name).map_err(|_| format!("environment variable {name} is not set")),
        }
    }
}

/// The username and resolved password (an empty password when only a username is given).
pub fn credentials(
    username: Option<&String>,
    password: Option<&Secret>,
) -> Result<Option<(String, String)>, ConnectError> {
    Ok(match (username, password) {
        (Some(u), Some(p)) => Some((u.clone(), p.resolve().map_err(ConnectError::Secret)?)),
        (Some(u), None) => Some((u.clone(), String::new())),
        (None, _) => None,
    })
}

/// Refuse a private key that group or others can read: it is this side's identity.
pub fn check_key_permissions(path: &Path) -> Result<(), ConnectError> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(path).map_err(|e| ConnectError::Tls(format!("cannot read {}: {e}", path.display())))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(ConnectError::Tls(format!("{} is readable by group or others; chmod 600 it", path.display())));
    }
    Ok(())
}

/// `host:port` (a host name or an IPv4 address, and a port from 1 to 65535).
pub fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    let bad = || format!("`{s}`: expected host:port, e.g. mqtt2.example.lg.jp:8883");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == ':' || c == '/') {
        return Err(bad());
    }
    let port = port.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad)?;
    Ok((host.to_string(), port))
}

/// Whether `host` is this machine (`localhost` or a loopback address), where plain MQTT is
/// allowed.
pub fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The `[broker]` keys both sides have, borrowed from either side's config.
#[derive(Debug, Clone, Copy)]
pub struct BrokerKeys<'a> {
    /// `host`.
    pub host: &'a str,
    /// `port`.
    pub port: u16,
    /// `failover`.
    pub failover: &'a [String],
    /// `[broker.tls]`.
    pub tls: Option<&'a TlsConfig>,
    /// `username`.
    pub username: Option<&'a String>,
    /// `password`.
    pub password: Option<&'a Secret>,
    /// `keep_alive_s`.
    pub keep_alive_s: u16,
}

/// At most this many `failover` brokers.
pub const MAX_FAILOVER: usize = 16;

impl BrokerKeys<'_> {
    /// Every rule broken, as (the key under `broker.`, what is expected), in the order of the
    /// keys; empty when the section is sound. Reads no file: the files are read on connecting.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut bad = |key: String, expected: &str| out.push((format!("broker.{key}"), expected.to_string()));
        if self.host.is_empty() || self.host.contains(|c: char| c.is_whitespace() || c == '/') {
            bad("host".into(), "a host name or address, e.g. mqtt.example.lg.jp");
        }
        if self.port == 0 {
            bad("port".into(), "a port from 1 to 65535");
        }
        // Without TLS the broker's password would cross the network in clear.
        if self.tls.is_none() && !is_loopback(self.host) {
            bad("tls".into(), "a [broker.tls] section: plain MQTT is only allowed to a loopback broker");
        }
        for (i, f) in self.failover.iter().enumerate() {
            match parse_host_port(f) {
                Err(e) => bad(format!("failover[{i}]"), &e),
                Ok((host, _)) if self.tls.is_none() && !is_loopback(&host) => bad(
                    format!("failover[{i}]"),
                    "a loopback broker, or a [broker.tls] section: plain MQTT is only allowed on loopback",
                ),
                Ok(_) => {}
            }
        }
        if self.failover.len() > MAX_FAILOVER {
            bad("failover".into(), "at most 16 more brokers");
        }
        if let Some(tls) = self.tls {
            if tls.ca_file.is_some() == tls.ca_pem.is_some() {
                bad("tls.ca_file".into(), "the CA certificate: ca_file or ca_pem (one of them)");
            }
            let cert = u8::from(tls.client_cert_file.is_some()) + u8::from(tls.client_cert_pem.is_some());
            let key = u8::from(tls.client_key_file.is_some()) + u8::from(tls.client_key_pem.is_some());
            if cert > 1 || key > 1 || cert != key {
                bad(
                    "tls.client_key_file".into(),
                    "one client certificate and one key (each as _file or _pem), or neither",
                );
            }
        }
        if self.password.is_some() && self.username.is_none() {
            bad("username".into(), "a username with the password");
        }
        if !(5..=3600).contains(&self.keep_alive_s) {
            bad("keep_alive_s".into(), "between 5 and 3600");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_key_readable_by_others_is_refused_and_a_private_one_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, "CERT").unwrap();
        std::fs::write(&key, "KEY").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let tls = TlsConfig {
            ca_file: None,
            client_cert_file: Some(cert),
            client_key_file: Some(key.clone()),
            ca_pem: Some("CA".into()),
            client_cert_pem: None,
            client_key_pem: None,
        };
        let e = tls.transport().unwrap_err().to_string();
        assert!(e.contains("readable by group or others") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        match tls.transport().unwrap() {
            TlsConfiguration::Simple { ca, client_auth, .. } => {
                assert_eq!(ca, b"CA");
                assert_eq!(client_auth, Some((b"CERT".to_vec(), b"KEY".to_vec())));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_broken_broker_rule_is_named_by_its_key() {
        let tls = TlsConfig {
            ca_file: Some("ca.pem".into()),
            client_cert_file: None,
            client_key_file: None,
            ca_pem: None,
            client_cert_pem: None,
            client_key_pem: None,
        };
        let sound = BrokerKeys {
            host: "mqtt.example.lg.jp",
            port: 8883,
            failover: &[],
            tls: Some(&tls),
            username: None,
            password: None,
            keep_alive_s: 15,
        };
        assert_eq!(sound.problems(), Vec::<(String, String)>::new());
        let keys = |b: BrokerKeys| b.problems().into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(keys(BrokerKeys { tls: None, ..sound }), ["broker.tls"]);
        assert_eq!(keys(BrokerKeys { tls: None, host: "127.0.0.1", ..sound }), Vec::<String>::new());
        assert_eq!(keys(BrokerKeys { host: "", port: 0, ..sound }), ["broker.host", "broker.port"]);
        let plain = ["127.0.0.1:1884".to_string(), "mqtt2.example:1883".into(), "nocolon".into()];
        assert_eq!(
            keys(BrokerKeys { tls: None, host: "localhost", failover: &plain, ..sound }),
            ["broker.failover[1]", "broker.failover[2]"]
        );
        let many = vec!["m.example:8883".to_string(); 17];
        assert_eq!(keys(BrokerKeys { failover: &many, ..sound }), ["broker.failover"]);
        let both_ca = TlsConfig { ca_pem: Some("CA".into()), ..tls.clone() };
        assert_eq!(keys(BrokerKeys { tls: Some(&both_ca), ..sound }), ["broker.tls.ca_file"]);
        let cert_only = TlsConfig { client_cert_file: Some("c.pem".into()), ..tls.clone() };
        assert_eq!(keys(BrokerKeys { tls: Some(&cert_only), ..sound }), ["broker.tls.client_key_file"]);
        let pass = Secret::Value("p".into());
        assert_eq!(keys(BrokerKeys { password: Some(&pass), ..sound }), ["broker.username"]);
        for k in [0, 4, 3601, u16::MAX] {
            assert_eq!(keys(BrokerKeys { keep_alive_s: k, ..sound }), ["broker.keep_alive_s"], "{k}");
        }
    }

    #[test]
    fn no_ca_and_a_missing_file_are_said_in_words() {
        let none = TlsConfig {
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            ca_pem: None,
            client_cert_pem: None,
            client_key_pem: None,
        };
        assert_eq!(none.transport().unwrap_err(), ConnectError::Tls("no CA certificate (ca_file or ca_pem)".into()));
        let missing = TlsConfig { ca_file: Some("/nonexistent/ca.pem".into()), ..none };
        assert!(missing.transport().unwrap_err().to_string().contains("cannot read /nonexistent/ca.pem"));
    }

    #[test]
    fn secrets_resolve_without_being_printed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "from-file\n").unwrap();
        assert_eq!(Secret::File(f).resolve().unwrap(), "from-file");
        assert_eq!(format!("{:?}", Secret::Value("hunter2".into())), "Secret(<inline, redacted>)");
        let e = credentials(Some(&"u".to_string()), Some(&Secret::Env("MAMORI_CONNECT_TEST_UNSET".into())))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "broker.password: environment variable MAMORI_CONNECT_TEST_UNSET is not set");
        assert_eq!(credentials(Some(&"u".to_string()), None).unwrap(), Some(("u".into(), String::new())));
        assert_eq!(credentials(None, Some(&Secret::Value("x".into()))).unwrap(), None);
    }

    #[test]
    fn broker_addresses_need_a_host_and_a_port() {
        assert_eq!(parse_host_port("mqtt2.example.lg.jp:8883").unwrap(), ("mqtt2.example.lg.jp".into(), 8883));
        for bad in ["mqtt2", ":8883", "a:0", "a:70000", "a b:1", "[::1]:1", "mqtt://a:1"] {
            assert!(parse_host_port(bad).is_err(), "{bad}");
        }
    }
}
