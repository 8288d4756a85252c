//! The gateway config: one TOML file (see `deploy/gateway/gateway.toml`).
//!
//! Unknown keys are refused, units are in key names, secrets are given inline, as a file path
//! or as an environment variable (`{ file = "..." }`, `{ env = "..." }`) and never printed.
//! [`Config::load`] reports every problem it finds, each with the file, the key and what was
//! expected; `mamori-gateway check-config` prints them.
//!
//! Over 800 lines for a reason: every key of the gateway's config with its unit, default and
//! check in one place, so that a key and the words of its error cannot drift apart.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use chrono::FixedOffset;
pub use mamori_connect::{Secret, TlsConfig};
use serde::Deserialize;

use crate::domain::engine::Settings;
use crate::domain::homes::Known;
use crate::domain::policy::Policy;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the store lives.
    pub data_dir: PathBuf,
    /// A homes file imported at every start (optional: `homes import` also works).
    #[serde(default)]
    pub homes_file: Option<PathBuf>,
    /// Times in messages are shown at this UTC offset (`+09:00`).
    #[serde(default = "default_offset")]
    pub utc_offset: String,
    /// The dashboard's public URL, for acknowledgement links (no trailing slash).
    pub public_url: String,
    /// The secret signing acknowledgement links.
    pub link_secret: Secret,
    /// The MQTT broker.
    pub broker: BrokerConfig,
    /// The HTTP listener (acknowledgement links).
    #[serde(default)]
    pub http: HttpConfig,
    /// Engine settings: staleness, incidents, tier thresholds.
    #[serde(default)]
    pub escalation: Settings,
    /// Personal data: whether a recipient needs the guardian's consent.
    #[serde(default)]
    pub privacy: PrivacyConfig,
    /// Policy overrides by alert kind (`default` for every kind without its own).
    #[serde(default)]
    pub policy: BTreeMap<String, Policy>,
    /// Delivery: retries and fallback.
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// Webhook and SMS-gateway endpoints, by name.
    #[serde(default)]
    pub endpoints: BTreeMap<String, Endpoint>,
    /// E-mail.
    #[serde(default)]
    pub smtp: Option<SmtpConfig>,
    /// LINE (the Messaging API).
    #[serde(default)]
    pub line: Option<LineConfig>,
    /// Voice calls (a Twilio-compatible `Calls` API).
    #[serde(default)]
    pub voice: Option<VoiceConfig>,
    /// Telemetry history kept, h.
    #[serde(default = "default_retention_h")]
    pub telemetry_retention_h: u32,
    /// The deployment's PKI and broker credentials (`pki init`, `homes provision|revoke`).
    #[serde(default)]
    pub pki: PkiConfig,
    /// Who hears about the gateway itself: its database refusing writes and recovering, many
    /// homes falling silent at once. Without any, the support-centre contacts of the homes.
    #[serde(default)]
    pub operators: Vec<Operator>,
    /// A dead-man heartbeat to a monitor outside the centre.
    #[serde(default)]
    pub heartbeat: Option<HeartbeatConfig>,
    /// Telemetry history: at most one snapshot per home this often is stored, s (every
    /// snapshot still updates the home's state; a change of mains is always stored).
    #[serde(default = "default_history_every_s")]
    pub telemetry_history_every_s: u32,
    /// Where the store is: SQLite in `data_dir` unless `[store] postgres` names a database.
    #[serde(default)]
    pub store: StoreConfig,
    /// Several gateways on one PostgreSQL store, one of them active ([`crate::service::lease`]).
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: this gateway is one of several sharing a PostgreSQL store; the one holding
/// the lease is active, the others wait as standbys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This gateway's name among them (letters, digits, `-`), in logs and the lease.
    pub name: String,
    /// How long a lease lasts without renewal, s: a killed or frozen active is replaced
    /// within about this plus a second. Renewed every third of it.
    #[serde(default = "default_lease_s")]
    pub lease_s: u32,
    /// Where each gateway of the cluster serves HTTP, by name (`gw-a = "https://10.0.0.1:8443"`).
    /// A standby serves the dashboard and the API from the store and passes every action (a
    /// login, an acknowledgement, an answer, an edit) to the active one's address here.
    /// List the gateways' own addresses in `[http] trusted_proxies` too, so the active records
    /// each person's address, not the standby's. Without it a standby refuses actions.
    #[serde(default)]
    pub peers: BTreeMap<String, String>,
    /// The CA that signed the other gateways' HTTPS certificates (PEM), when it is not a public
    /// one (the deployment's own, from `pki init`).
    #[serde(default)]
    pub peer_ca_file: Option<PathBuf>,
}

/// A peer's base URL: `http(s)://host[:port]` with nothing after it; `None` if it is not one.
pub fn peer_url(s: &str) -> Option<reqwest::Url> {
    let u = reqwest::Url::parse(s).ok()?;
    let bare = matches!(u.path(), "" | "/") && u.query().is_none() && u.fragment().is_none();
    (matches!(u.scheme(), "http" | "https") && u.host().is_some() && u.username().is_empty() && bare).then_some(u)
}

fn default_lease_s() -> u32 {
    6
}

/// `[store]`: SQLite (the default, in `data_dir`) or PostgreSQL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// A PostgreSQL database, as libpq connection settings
    /// (`host=db.example port=5432 user=mamori dbname=mamori`) or a `postgresql://` URL,
    /// without its password.
    pub postgres: Option<String>,
    /// The database password (`{ file = ... }` or `{ env = ... }`).
    pub postgres_password: Option<Secret>,
    /// The longest one store call may take, s (PostgreSQL's `statement_timeout` as well).
    pub timeout_s: u32,
    /// The CA that signed the database server's certificate (PEM): with it the connection is
    /// TLS, and the server must present a certificate from this CA for the host it is reached
    /// by (libpq's `verify-full`).
    pub postgres_ca_file: Option<PathBuf>,
    /// Accept an unencrypted connection to a database off this machine (a private network the
    /// operator vouches for). Without it, such a database needs `postgres_ca_file`.
    pub postgres_plain: bool,
}

impl Default for StoreConfig {
    fn default() -> StoreConfig {
        StoreConfig {
            postgres: None,
            postgres_password: None,
            timeout_s: 10,
            postgres_ca_file: None,
            postgres_plain: false,
        }
    }
}

/// Someone who hears about the gateway itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operator {
    /// Their name or desk.
    pub name: String,
    /// Message language.
    #[serde(default)]
    pub language: crate::domain::homes::Lang,
    /// Channels (as in the homes file), all of which are used.
    pub channels: Vec<crate::domain::homes::ChannelRef>,
}

/// The dead-man heartbeat: a monitor outside the centre (healthchecks.io, Uptime Kuma, a
/// municipality's own) that alarms when the pings stop.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatConfig {
    /// Pinged (HTTP GET) every `interval_s` while the gateway is healthy.
    pub url: String,
    /// Pinged instead while it is not (its store refuses writes, it has no homes, or its
    /// broker connection is down); without it, nothing is pinged then.
    #[serde(default)]
    pub fail_url: Option<String>,
    /// How often, s.
    #[serde(default = "default_heartbeat_s")]
    pub interval_s: u32,
}

fn default_heartbeat_s() -> u32 {
    60
}
fn default_history_every_s() -> u32 {
    60
}

/// Where the PKI lives and how to make the broker re-read its password file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PkiConfig {
    /// The PKI folder (default `data_dir/pki`).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Run after `homes revoke` (and `homes provision`) so that the broker re-reads its
    /// password file without a restart; default `["pkill", "-HUP", "-x", "mosquitto"]`.
    #[serde(default)]
    pub reload_command: Option<Vec<String>>,
}

impl Config {
    /// Where the store is (the password read now, from its file or variable).
    pub fn store_location(&self) -> Result<crate::edge::store::Location, String> {
        let Some(conn) = &self.store.postgres else {
            return Ok(crate::edge::store::Location::Sqlite(self.data_dir.clone()));
        };
        let password = self.store.postgres_password.as_ref().map(|p| p.resolve()).transpose()?;
        let timeout = std::time::Duration::from_secs(u64::from(self.store.timeout_s));
        let at = crate::edge::store::pg::PgLocation::parse(conn, password.as_deref(), timeout)
            .map_err(|e| format!("store.postgres: {e}"))?;
        let at = match &self.store.postgres_ca_file {
            Some(ca) => at.with_tls(ca).map_err(|e| format!("store: {e}"))?,
            None => at,
        };
        Ok(crate::edge::store::Location::Postgres(Box::new(at)))
    }

    /// The PKI folder.
    pub fn pki_dir(&self) -> PathBuf {
        self.pki.dir.clone().unwrap_or_else(|| self.data_dir.join("pki"))
    }

    /// The broker reload command.
    pub fn reload_command(&self) -> Vec<String> {
        self.pki
            .reload_command
            .clone()
            .unwrap_or_else(|| ["pkill", "-HUP", "-x", "mosquitto"].map(String::from).to_vec())
    }
}

fn default_offset() -> String {
    "+09:00".into()
}
fn default_retention_h() -> u32 {
    48
}

/// `[privacy]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyConfig {
    /// A contact other than the family is sent nothing about a child, and an account other
    /// than an administrator sees nothing of it, without a current consent naming them in the
    /// care plan (要配慮個人情報 is shared only with consent). Off by default, so that turning
    /// it on is a decision taken with the consent forms in hand: `check-config` lists who
    /// would stop hearing.
    #[serde(default)]
    pub require_consent: bool,
}

/// The broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// The gateway's client id (a persistent session: QoS 1 events queue while it is away).
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// More brokers, `host:port`, tried in turn when the connection fails or is lost (the
    /// other nodes of a NATS cluster). Same TLS and credentials.
    #[serde(default)]
    pub failover: Vec<String>,
    /// No longer supported (refused with a reason): a shared subscription splits one home's
    /// messages between gateways that each keep their own state.
    #[serde(default)]
    pub share_group: Option<String>,
    /// TLS; required unless the broker is on loopback.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Username.
    #[serde(default)]
    pub username: Option<String>,
    /// Password.
    #[serde(default)]
    pub password: Option<Secret>,
    /// MQTT keep-alive, s.
    #[serde(default = "default_keep_alive_s")]
    pub keep_alive_s: u16,
}

impl BrokerConfig {
    /// The keys the agent's `[broker]` has too, for the rules both keep.
    pub fn keys(&self) -> mamori_connect::BrokerKeys<'_> {
        mamori_connect::BrokerKeys {
            host: &self.host,
            port: self.port,
            failover: &self.failover,
            tls: self.tls.as_ref(),
            username: self.username.as_ref(),
            password: self.password.as_ref(),
            keep_alive_s: self.keep_alive_s,
        }
    }
}

fn default_client_id() -> String {
    "mamori-gateway".into()
}
fn default_keep_alive_s() -> u16 {
    15
}

/// The HTTP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listen address (port 0: a free port).
    pub bind: SocketAddr,
    /// Serve HTTPS with this certificate chain (PEM, leaf first); with `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// The certificate's private key (PEM), readable by its owner only.
    pub tls_key_file: Option<PathBuf>,
    /// Reverse proxies (addresses or networks, `10.0.0.0/8`) whose `client_ip_header` is
    /// believed. Empty: the header is ignored.
    pub trusted_proxies: Vec<String>,
    /// The header a trusted proxy names the client in.
    pub client_ip_header: String,
    /// A dashboard session ends after this long without a request, min.
    pub session_idle_min: u32,
    /// A dashboard session ends this long after login whatever happens, h.
    pub session_max_h: u32,
    /// Mark cookies `Secure` (sent over HTTPS only). Default: when the gateway serves HTTPS
    /// or `public_url` is `https://`. Only a loopback demo should turn it off.
    pub secure_cookies: Option<bool>,
    /// Connections at once; more are closed at once.
    pub max_connections: usize,
    /// Connections at once from one address (a listed proxy counts only against the total).
    pub max_connections_per_address: usize,
    /// A connection's request headers must arrive within this, ms (slow clients are dropped).
    pub header_read_timeout_ms: u64,
    /// A connection with no byte either way for this long is closed, s.
    pub idle_timeout_s: u64,
    /// A request must be answered within this, s (the live stream excepted).
    pub request_timeout_s: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tls_cert_file: None,
            tls_key_file: None,
            trusted_proxies: Vec::new(),
            client_ip_header: "X-Forwarded-For".into(),
            session_idle_min: 30,
            session_max_h: 12,
            secure_cookies: None,
            max_connections: 512,
            max_connections_per_address: 64,
            header_read_timeout_ms: 10_000,
            idle_timeout_s: 60,
            request_timeout_s: 30,
        }
    }
}

impl HttpConfig {
    /// Whether cookies are marked `Secure`.
    pub fn cookies_secure(&self, public_url: &str) -> bool {
        self.secure_cookies.unwrap_or(self.tls() || public_url.starts_with("https://"))
    }

    /// Whether the gateway serves HTTPS itself.
    pub fn tls(&self) -> bool {
        self.tls_cert_file.is_some()
    }

    /// The trusted proxies, parsed.
    pub fn proxies(&self) -> Result<crate::edge::listen::TrustedProxies, String> {
        crate::edge::listen::TrustedProxies::new(&self.trusted_proxies, &self.client_ip_header)
    }

    /// The listener's limits.
    pub fn limits(&self) -> crate::edge::listen::Limits {
        crate::edge::listen::Limits {
            max_connections: self.max_connections,
            max_per_address: self.max_connections_per_address,
            header_read: std::time::Duration::from_millis(self.header_read_timeout_ms),
            idle: std::time::Duration::from_secs(self.idle_timeout_s),
            request: std::time::Duration::from_secs(self.request_timeout_s),
        }
    }
}

/// Delivery settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// After this many failed attempts, the next recipient in the chain is notified (the
    /// original keeps being retried).
    pub fallback_after_failures: u32,
    /// First retry delay, ms (doubles, with jitter, up to `backoff_max_ms`).
    pub backoff_initial_ms: u64,
    /// Longest retry delay, ms.
    pub backoff_max_ms: u64,
    /// Stop retrying a message after this long, s.
    pub give_up_after_s: u64,
    /// Deadline of one whole attempt, ms: connect, TLS, request and response (or the whole
    /// SMTP dialogue). A receiver that accepts and never answers fails the attempt after it.
    pub timeout_ms: u64,
    /// Sends in flight at once.
    pub concurrency: usize,
    /// Sends in flight at once to one destination (a webhook endpoint, the SMS gateway, the
    /// SMTP relay), so that a hung one holds no more than this many slots.
    pub per_destination: usize,
    /// After this many failed attempts in a row to one destination, its rows fail at once
    /// (without being tried) for `breaker_open_ms`, so fallbacks go out without waiting for
    /// a timeout per row; then one row is tried again.
    pub breaker_failures: u32,
    /// How long a failing destination is not tried, ms.
    pub breaker_open_ms: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            fallback_after_failures: 3,
            backoff_initial_ms: 1000,
            backoff_max_ms: 60_000,
            give_up_after_s: 24 * 3600,
            timeout_ms: 5000,
            concurrency: 32,
            per_destination: 8,
            breaker_failures: 5,
            breaker_open_ms: 30_000,
        }
    }
}

/// What an endpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointKind {
    /// JSON webhook, signed.
    #[default]
    Webhook,
    /// An SMS gateway's webhook, with a body template.
    Sms,
}

/// A webhook or SMS-gateway endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Webhook or SMS gateway.
    #[serde(default)]
    pub kind: EndpointKind,
    /// The URL.
    pub url: String,
    /// HMAC-SHA256 key for the `X-Mamori-Signature` header.
    pub secret: Secret,
    /// SMS only: the JSON body, with `{to}` and `{text}` replaced (JSON-escaped).
    #[serde(default)]
    pub template: Option<String>,
}

/// LINE's Messaging API: pushes to users and groups of the centre's LINE Official Account.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineConfig {
    /// The channel access token (long-lived or v2.1), as a secret.
    pub channel_access_token: Secret,
    /// The API's base URL (no trailing slash); another only for a local test server.
    #[serde(default = "default_line_api")]
    pub api_base_url: String,
}

/// Voice calls through a Twilio-compatible REST API: `POST
/// {api_base_url}/2010-04-01/Accounts/{account_sid}/Calls.json` with the spoken message as
/// inline TwiML; the call's outcome comes back to `{public_url}/voice/status/…`, a pressed 1 to
/// `{public_url}/voice/ack/…`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VoiceConfig {
    /// The API's base URL (no trailing slash); another only for a local test server.
    #[serde(default = "default_voice_api")]
    pub api_base_url: String,
    /// The account id (HTTP Basic user).
    pub account_sid: String,
    /// The auth token (HTTP Basic password), as a secret.
    pub auth_token: Secret,
    /// The number calls come from (international form).
    pub from: String,
    /// How long a call rings before it counts as not answered, s.
    #[serde(default = "default_ring_s")]
    pub ring_timeout_s: u32,
    /// The deadline of one call from dialling to its outcome, s (it holds one of the voice
    /// destination's send slots meanwhile).
    #[serde(default = "default_call_deadline_s")]
    pub call_deadline_s: u32,
}

fn default_voice_api() -> String {
    "https://api.twilio.com".into()
}

fn default_ring_s() -> u32 {
    30
}

fn default_call_deadline_s() -> u32 {
    180
}

fn default_line_api() -> String {
    "https://api.line.me".into()
}

/// How to talk to the SMTP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmtpTls {
    /// STARTTLS on 587.
    Starttls,
    /// TLS from the start on 465.
    Tls,
    /// None: only to a loopback relay.
    None,
}

/// E-mail.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    /// Server.
    pub host: String,
    /// Port.
    pub port: u16,
    /// TLS mode.
    pub tls: SmtpTls,
    /// The sender address.
    pub from: String,
    /// Username.
    #[serde(default)]
    pub username: Option<String>,
    /// Password.
    #[serde(default)]
    pub password: Option<Secret>,
    /// A CA certificate (PEM) to trust besides the public roots: for a relay with a private
    /// CA, as in a municipality's closed network.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// A config that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Every problem, one per line.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

/// Why a secret is too weak to sign links with, if it is.
pub fn weak_secret(secret: &str) -> Option<&'static str> {
    if secret.len() < 16 {
        Some("it is shorter")
    } else if secret.chars().collect::<std::collections::BTreeSet<_>>().len() < 8 {
        Some("it has fewer than 8 different characters")
    } else {
        None
    }
}

/// Whether a host name is the loopback interface.
pub fn is_loopback(host: &str) -> bool {
    mamori_connect::is_loopback(host)
}

impl Config {
    /// Read and validate.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: path.to_path_buf(), source })?;
        Config::parse(&text, path)
    }

    /// Parse and validate; relative paths are taken from the file's folder.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let mut c: Config = toml::from_str(text)
            .map_err(|e| ConfigError::Invalid(vec![format!("{file}: {}", e.to_string().trim_end())]))?;
        let base = path.parent().unwrap_or(Path::new("."));
        c.data_dir = base.join(&c.data_dir);
        c.homes_file = c.homes_file.map(|h| base.join(h));
        c.pki.dir = c.pki.dir.take().map(|d| base.join(d));
        if let Some(smtp) = c.smtp.as_mut() {
            smtp.ca_file = smtp.ca_file.take().map(|f| base.join(f));
        }
        c.store.postgres_ca_file = c.store.postgres_ca_file.take().map(|f| base.join(f));
        c.http.tls_cert_file = c.http.tls_cert_file.take().map(|f| base.join(f));
        c.http.tls_key_file = c.http.tls_key_file.take().map(|f| base.join(f));
        let mut errors = Vec::new();
        let mut bad = |key: &str, expected: &str| errors.push(format!("{file}: key `{key}`: expected {expected}"));
        if c.offset().is_none() {
            bad("utc_offset", "an offset like +09:00");
        }
        if !(c.public_url.starts_with("http://") || c.public_url.starts_with("https://")) || c.public_url.ends_with('/')
        {
            bad("public_url", "an http(s) URL without a trailing slash");
        }
        // The rules both sides keep (the agent's `[broker]` refuses the same).
        for (key, expected) in c.broker.keys().problems() {
            bad(&key, &expected);
        }
        if let Some(cl) = &c.cluster {
            if cl.name.is_empty()
                || cl.name.len() > 64
                || !cl.name.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-')
            {
                bad("cluster.name", "this gateway's name: letters, digits and `-`, at most 64");
            }
            if !(3..=60).contains(&cl.lease_s) {
                bad("cluster.lease_s", "3 to 60 seconds");
            }
            if c.store.postgres.is_none() {
                bad("cluster", "a [store] postgres database that the gateways share (SQLite is one machine's)");
            }
            for (name, url) in &cl.peers {
                let key = format!("cluster.peers.{name}");
                match peer_url(url) {
                    None => {
                        bad(&key, "the gateway's own address, like \"https://10.0.0.1:8443\" (nothing after the port)")
                    }
                    Some(u) => {
                        let host = u.host_str().unwrap_or_default();
                        let ip = host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().ok();
                        // Logins and sessions pass between the gateways: never in clear
                        // across a network.
                        if u.scheme() == "http" && !is_loopback(host.trim_start_matches('[').trim_end_matches(']')) {
                            bad(&key, "an https:// address (people's passwords and sessions pass through it), or a loopback one");
                        }
                        // A peer named by its address must be believed when it passes a
                        // person's action on, or the audit log names the standby instead.
                        let listed = c.http.proxies().is_ok_and(|p| ip.is_none_or(|ip| p.is_proxy(ip)));
                        if name != &cl.name && !listed {
                            bad(
                                "http.trusted_proxies",
                                &format!("the address of the gateway `{name}` as well (it passes people's actions on as a standby)"),
                            );
                        }
                    }
                }
            }
            if let Some(f) = &cl.peer_ca_file {
                if !f.is_file() {
                    bad("cluster.peer_ca_file", "a PEM file of the CA that signed the gateways' certificates");
                }
            }
        }
        if !(1..=300).contains(&c.store.timeout_s) {
            bad("store.timeout_s", "1 to 300 seconds");
        }
        if let Some(conn) = &c.store.postgres {
            match crate::edge::store::pg::PgLocation::parse(conn, None, std::time::Duration::from_secs(10)) {
                Err(e) => bad("store.postgres", &format!("PostgreSQL connection settings without a password ({e})")),
                Ok(at) => match &c.store.postgres_ca_file {
                    Some(ca) => {
                        if let Err(e) = at.with_tls(ca) {
                            bad("store.postgres_ca_file", &format!("a readable PEM file of CA certificates ({e})"));
                        }
                    }
                    None if !c.store.postgres_plain && !at.is_local() => bad(
                        "store.postgres_ca_file",
                        "the CA of the database server's certificate, for TLS to a database off this machine \
                         (or `postgres_plain = true` to accept an unencrypted connection on a private network)",
                    ),
                    None => {}
                },
            }
        } else if c.store.postgres_ca_file.is_some() || c.store.postgres_plain {
            bad("store.postgres_ca_file", "a [store] postgres database to go with it");
        } else if c.store.postgres_password.is_some() {
            bad("store.postgres_password", "a [store] postgres database to go with it");
        }
        if c.http.tls_cert_file.is_some() != c.http.tls_key_file.is_some() {
            bad("http.tls_key_file", "both `tls_cert_file` and `tls_key_file`, or neither");
        }
        if let Err(e) = c.http.proxies() {
            bad("http.trusted_proxies", &format!("addresses or networks and a header name: {e}"));
        }
        for p in &c.http.trusted_proxies {
            if crate::edge::listen::parse_net(p).is_some_and(|(ip, len)| len < if ip.is_ipv4() { 8 } else { 16 }) {
                bad(
                    "http.trusted_proxies",
                    &format!("your reverse proxies' own addresses or networks, not `{p}` (anyone there could name any client)"),
                );
            }
        }
        if let Ok(secret) = c.link_secret.resolve() {
            if let Some(why) = weak_secret(&secret) {
                bad(
                    "link_secret",
                    &format!("a random secret of at least 16 characters ({why}); e.g. `openssl rand -hex 32`"),
                );
            }
        }
        if !c.http.tls() && c.http.trusted_proxies.is_empty() && !c.http.bind.ip().is_loopback() {
            bad(
                "http.bind",
                "a loopback address, unless the gateway serves HTTPS itself (`tls_cert_file`, `tls_key_file`) \
                 or sits behind a reverse proxy listed in `trusted_proxies`",
            );
        }
        if c.http.session_idle_min == 0 || c.http.session_idle_min > 24 * 60 {
            bad("http.session_idle_min", "1 to 1440 minutes");
        }
        if c.http.session_max_h == 0 || c.http.session_max_h > 7 * 24 {
            bad("http.session_max_h", "1 to 168 hours");
        }
        let h = &c.http;
        if !(16..=65_536).contains(&h.max_connections) {
            bad("http.max_connections", "16 to 65536");
        }
        if h.max_connections_per_address == 0 || h.max_connections_per_address > h.max_connections {
            bad("http.max_connections_per_address", "1 to `max_connections`");
        }
        if !(500..=120_000).contains(&h.header_read_timeout_ms) {
            bad("http.header_read_timeout_ms", "500 to 120000 ms");
        }
        if !(20..=3600).contains(&h.idle_timeout_s) {
            bad("http.idle_timeout_s", "20 to 3600 s (above the live stream's 15 s keep-alive)");
        }
        if !(1..=600).contains(&h.request_timeout_s) {
            bad("http.request_timeout_s", "1 to 600 s");
        }
        if c.http.secure_cookies == Some(false) && !c.http.bind.ip().is_loopback() {
            bad("http.secure_cookies", "true (or unset) unless the gateway listens on loopback only");
        }
        if c.broker.share_group.is_some() {
            bad(
                "broker.share_group",
                "no shared subscription: it would split one home's messages between gateways that each keep \
                 their own state. Remove it; several gateways run with [cluster] (one active, the others standing by)",
            );
        }
        if c.broker.client_id.is_empty() || c.broker.client_id.len() > 64 {
            bad("broker.client_id", "1 to 64 characters");
        }
        let d = &c.delivery;
        if d.fallback_after_failures == 0 {
            bad("delivery.fallback_after_failures", "at least 1");
        }
        if d.backoff_initial_ms == 0 || d.backoff_max_ms < d.backoff_initial_ms {
            bad("delivery.backoff_initial_ms", "> 0 and not above backoff_max_ms");
        }
        if d.backoff_max_ms > 3_600_000 {
            bad("delivery.backoff_max_ms", "at most 3600000 ms (an hour)");
        }
        if !(60..=30 * 24 * 3600).contains(&d.give_up_after_s) {
            bad("delivery.give_up_after_s", "60 s to 30 days");
        }
        if d.fallback_after_failures > 1000 {
            bad("delivery.fallback_after_failures", "at most 1000");
        }
        if !(100..=600_000).contains(&d.timeout_ms) {
            bad("delivery.timeout_ms", "100 to 600000 ms");
        }
        if !(1..=4096).contains(&d.concurrency) {
            bad("delivery.concurrency", "1 to 4096");
        }
        if d.per_destination == 0 || d.per_destination > d.concurrency {
            bad("delivery.per_destination", "1 to `concurrency`");
        }
        if !(1..=1000).contains(&d.breaker_failures) {
            bad("delivery.breaker_failures", "1 to 1000");
        }
        if !(1000..=3_600_000).contains(&d.breaker_open_ms) {
            bad("delivery.breaker_open_ms", "1000 to 3600000 ms");
        }
        for (name, e) in &c.endpoints {
            if !(e.url.starts_with("http://") || e.url.starts_with("https://")) {
                bad(&format!("endpoints.{name}.url"), "an http(s) URL");
            }
            if e.url.starts_with("http://") && !url_host(&e.url).is_some_and(is_loopback) {
                bad(&format!("endpoints.{name}.url"), "https (plain http only to loopback)");
            }
            if e.kind == EndpointKind::Sms && !e.template.as_deref().is_some_and(|t| t.contains("{text}")) {
                bad(&format!("endpoints.{name}.template"), "an SMS body template containing {text} (and {to})");
            }
        }
        if let Some(l) = &c.line {
            let url = l.api_base_url.trim_end_matches('/');
            if !(url.starts_with("https://") || url.starts_with("http://") && url_host(url).is_some_and(is_loopback)) {
                bad("line.api_base_url", "an https URL (plain http only to loopback)");
            }
        }
        if let Some(v) = &c.voice {
            let url = v.api_base_url.trim_end_matches('/');
            if !(url.starts_with("https://") || url.starts_with("http://") && url_host(url).is_some_and(is_loopback)) {
                bad("voice.api_base_url", "an https URL (plain http only to loopback)");
            }
            if !crate::domain::homes::valid_phone(&v.from) {
                bad("voice.from", "a phone number in international form (+8190...)");
            }
            if v.account_sid.is_empty() || !v.account_sid.chars().all(|c| c.is_ascii_alphanumeric()) {
                bad("voice.account_sid", "the account id (letters and digits)");
            }
            if !(10..=120).contains(&v.ring_timeout_s) {
                bad("voice.ring_timeout_s", "10 to 120 s");
            }
            if v.call_deadline_s < v.ring_timeout_s + 30 || v.call_deadline_s > 1800 {
                bad("voice.call_deadline_s", "at least ring_timeout_s + 30 s, at most 1800 s");
            }
        }
        if let Some(s) = &c.smtp {
            if s.tls == SmtpTls::None && !is_loopback(&s.host) {
                bad("smtp.tls", "starttls or tls (none only to a loopback relay)");
            }
            if !s.from.contains('@') {
                bad("smtp.from", "an e-mail address");
            }
        }
        let s = &c.escalation;
        if s.stale_after_intervals == 0 || s.default_interval_s == 0 || s.incident_min_homes < 2 {
            bad("escalation", "stale_after_intervals and default_interval_s > 0, incident_min_homes >= 2");
        }
        let day = 24 * 3600;
        for (key, v, lo, hi) in [
            ("escalation.stale_after_intervals", i64::from(s.stale_after_intervals), 1, 100),
            ("escalation.default_interval_s", i64::from(s.default_interval_s), 1, day),
            ("escalation.max_interval_s", i64::from(s.max_interval_s), 1, day),
            ("escalation.incident_window_s", s.incident_window_s, 1, day),
            ("escalation.incident_update_min_s", s.incident_update_min_s, 1, day),
            ("escalation.t2_margin_min", s.t2_margin_min, 0, 7 * 24 * 60),
            ("escalation.t3_time_left_min", s.t3_time_left_min, 0, 7 * 24 * 60),
            ("escalation.late_event_s", s.late_event_s, 0, day),
            ("escalation.replay_settle_s", s.replay_settle_s, 0, 3600),
            ("escalation.clock_skew_s", s.clock_skew_s, 5, day),
            ("escalation.silence_settle_s", s.silence_settle_s, 0, 3600),
            ("escalation.mass_silence_window_s", s.mass_silence_window_s, 1, 3600),
            ("escalation.mass_silence_grace_s", s.mass_silence_grace_s, 0, 6 * 3600),
            ("escalation.mass_silence_return_s", s.mass_silence_return_s, 0, 3600),
        ] {
            if !(lo..=hi).contains(&v) {
                bad(key, &format!("{lo} to {hi}"));
            }
        }
        if s.mass_silence_min_homes < 2 || s.incident_min_homes > 100_000 {
            bad("escalation.mass_silence_min_homes", "at least 2 (and incident_min_homes at most 100000)");
        }
        if c.telemetry_retention_h == 0 || c.telemetry_retention_h > 24 * 366 {
            bad("telemetry_retention_h", "1 to 8784 hours");
        }
        if !(1..=3600).contains(&c.telemetry_history_every_s) {
            bad("telemetry_history_every_s", "1 to 3600 s");
        }
        let known = c.known();
        for (i, o) in c.operators.iter().enumerate() {
            if o.name.trim().is_empty() || o.channels.is_empty() {
                bad(&format!("operators[{i}]"), "a name and at least one channel");
            }
            for (k, ch) in o.channels.iter().enumerate() {
                if let Some(expected) = known.check(ch) {
                    bad(&format!("operators[{i}].channels[{k}]"), &expected.en());
                }
            }
        }
        if let Some(h) = &c.heartbeat {
            for (key, url) in [("heartbeat.url", Some(&h.url)), ("heartbeat.fail_url", h.fail_url.as_ref())] {
                if let Some(u) = url {
                    if !(u.starts_with("https://")
                        || (u.starts_with("http://") && url_host(u).is_some_and(is_loopback)))
                    {
                        bad(key, "an https URL (plain http only to loopback)");
                    }
                }
            }
            if !(5..=3600).contains(&h.interval_s) {
                bad("heartbeat.interval_s", "5 to 3600 s");
            }
        }
        for (kind, p) in &c.policy {
            if kind != "default" && kind.parse::<crate::domain::engine::AlertKind>().is_err() {
                bad(&format!("policy.{kind}"), "an alert kind (an event kind such as mains_lost, or home_silent, state_unknown, delivery_failed, clock_skew, drill, battery_degraded, battery_test_failed) or default");
            }
            if let Err(e) = p.validate() {
                bad(&format!("policy.{kind}"), &e);
            }
        }
        if errors.is_empty() {
            Ok(c)
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    /// The display offset.
    pub fn offset(&self) -> Option<FixedOffset> {
        let s = self.utc_offset.as_str();
        let (sign, rest) = match s.as_bytes().first() {
            Some(b'+') => (1, &s[1..]),
            Some(b'-') => (-1, &s[1..]),
            _ => return None,
        };
        let (h, m) = rest.split_once(':')?;
        let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
        FixedOffset::east_opt(sign * (h * 3600 + m * 60))
    }

    /// What the homes-file validator needs to know.
    pub fn known(&self) -> Known {
        Known {
            endpoints: self
                .endpoints
                .iter()
                .filter(|(_, e)| e.kind == EndpointKind::Webhook)
                .map(|(n, _)| n.clone())
                .collect(),
            sms: self.endpoints.get("sms").is_some_and(|e| e.kind == EndpointKind::Sms),
            smtp: self.smtp.is_some(),
            line: self.line.is_some(),
            voice: self.voice.is_some(),
        }
    }
}

fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(v6) = host.strip_prefix('[') {
        return v6.split(']').next();
    }
    Some(host.split(':').next().unwrap_or(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
data_dir = "data"
public_url = "http://127.0.0.1:8080"
link_secret = { value = "a-test-secret-long-enough" }
[broker]
host = "127.0.0.1"
port = 1883
[endpoints.coord]
url = "http://127.0.0.1:9000/hook"
secret = { env = "X" }
[endpoints.sms]
kind = "sms"
url = "https://sms.example/send"
secret = { value = "k" }
template = '{"to":"{to}","text":"{text}"}'
"#;

    #[test]
    fn a_good_config_resolves_paths_and_knows_its_endpoints() {
        let c = Config::parse(GOOD, Path::new("/etc/mamori/gateway.toml")).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/etc/mamori/data"));
        assert_eq!(c.offset(), FixedOffset::east_opt(9 * 3600));
        let k = c.known();
        assert!(k.endpoints.contains("coord") && k.sms && !k.smtp);
        assert_eq!(c.escalation.incident_min_homes, 3);
    }

    #[test]
    fn every_error_names_file_key_and_expectation() {
        let bad = GOOD
            .replace("host = \"127.0.0.1\"", "host = \"broker.example\"")
            .replace("http://127.0.0.1:9000/hook", "http://hooks.example/x")
            .replace("public_url = \"http://127.0.0.1:8080\"", "public_url = \"ftp://x/\"");
        let e = Config::parse(&bad, Path::new("g.toml")).unwrap_err().to_string();
        assert!(e.contains("g.toml: key `broker.tls`"), "{e}");
        assert!(e.contains("key `endpoints.coord.url`: expected https"), "{e}");
        assert!(e.contains("key `public_url`"), "{e}");
        let typo = format!("{GOOD}[policy.mains_lsot]\nsteps = [{{ tier = \"T0\", roles = [\"family\"] }}]\n");
        let e = Config::parse(&typo, Path::new("g.toml")).unwrap_err().to_string();
        assert!(e.contains("key `policy.mains_lsot`: expected an alert kind"), "a typo matches nothing: {e}");
        let e = Config::parse(&GOOD.replace("port = 1883", "port = \"x\""), Path::new("g.toml")).unwrap_err();
        assert!(e.to_string().contains("g.toml") && e.to_string().contains("port"), "{e}");
    }

    #[test]
    fn the_store_is_sqlite_unless_a_postgresql_database_is_named_without_its_password() {
        let c = Config::parse(GOOD, Path::new("/etc/mamori/gateway.toml")).unwrap();
        assert!(
            matches!(c.store_location(), Ok(crate::edge::store::Location::Sqlite(d)) if d == Path::new("/etc/mamori/data"))
        );
        let with = |store: &str| Config::parse(&format!("{GOOD}[store]\n{store}"), Path::new("g.toml"));
        let c = with(
            "postgres = \"host=db.example user=mamori dbname=mamori\"\npostgres_password = { value = \"pw\" }\npostgres_plain = true\n",
        )
        .unwrap();
        let Ok(crate::edge::store::Location::Postgres(at)) = c.store_location() else { panic!("postgres") };
        assert_eq!(at.target, "postgres db.example:5432/mamori");
        for (store, key) in [
            ("postgres = \"host=db password=hunter2\"\n", "store.postgres"),
            ("postgres = \"host='unclosed\"\n", "store.postgres"),
            ("postgres_password = { value = \"pw\" }\n", "store.postgres_password"),
            ("postgres = \"host=db\"\ntimeout_s = 0\n", "store.timeout_s"),
        ] {
            let e = with(store).unwrap_err().to_string();
            assert!(e.contains(&format!("key `{key}`")) && !e.contains("hunter2"), "{store}: {e}");
        }
        // A database off this machine needs TLS, or the operator's word that the network is
        // private; on loopback plain is fine; a CA file that is not there is said.
        let e = with("postgres = \"host=db.example user=mamori\"\n").unwrap_err().to_string();
        assert!(e.contains("key `store.postgres_ca_file`") && e.contains("postgres_plain"), "{e}");
        assert!(with("postgres = \"host=127.0.0.1 user=mamori\"\n").is_ok());
        assert!(with("postgres = \"host=/run/postgresql user=mamori\"\n").is_ok(), "a Unix socket is this machine");
        let e = with("postgres = \"host=db.example\"\npostgres_ca_file = \"/nonexistent/ca.pem\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `store.postgres_ca_file`") && e.contains("/nonexistent/ca.pem"), "{e}");
        let e = with("postgres_ca_file = \"/etc/ca.pem\"\n").unwrap_err().to_string();
        assert!(e.contains("key `store.postgres_ca_file`") && e.contains("a [store] postgres database"), "{e}");
        let e =
            with("postgres = \"host=/run/postgresql\"\npostgres_ca_file = \"/etc/ca.pem\"\n").unwrap_err().to_string();
        assert!(e.contains("key `store.postgres_ca_file`"), "{e}");
        // The password's file is read when the store is opened, and a missing one is said.
        let c =
            with("postgres = \"host=db\"\npostgres_password = { file = \"/nonexistent/pw\" }\npostgres_plain = true\n")
                .unwrap();
        assert!(c.store_location().unwrap_err().contains("/nonexistent/pw"));
    }

    #[test]
    fn line_goes_to_https_or_a_loopback_test_server() {
        let with =
            |url: &str| format!("{GOOD}[line]\nchannel_access_token = {{ value = \"t\" }}\napi_base_url = \"{url}\"\n");
        let c =
            Config::parse(&format!("{GOOD}[line]\nchannel_access_token = {{ env = \"T\" }}\n"), Path::new("g.toml"))
                .unwrap();
        assert_eq!(c.line.as_ref().map(|l| l.api_base_url.as_str()), Some("https://api.line.me"));
        assert!(c.known().line);
        assert!(Config::parse(&with("http://127.0.0.1:9999"), Path::new("g.toml")).is_ok());
        let e = Config::parse(&with("http://line.example"), Path::new("g.toml")).unwrap_err().to_string();
        assert!(e.contains("key `line.api_base_url`"), "{e}");
    }

    #[test]
    fn voice_needs_an_account_a_calling_number_and_sane_times() {
        let voice = |extra: &str| {
            format!(
                "{GOOD}[voice]\naccount_sid = \"AC1\"\nauth_token = {{ value = \"t\" }}\nfrom = \"+81300000000\"\n{extra}"
            )
        };
        let c = Config::parse(&voice(""), Path::new("g.toml")).unwrap();
        assert!(c.known().voice);
        assert_eq!(c.voice.as_ref().map(|v| (v.ring_timeout_s, v.call_deadline_s)), Some((30, 180)));
        let e = Config::parse(
            &voice("api_base_url = \"http://voice.example\"\nring_timeout_s = 5\n")
                .replace("+81300000000", "0300000000"),
            Path::new("g.toml"),
        )
        .unwrap_err()
        .to_string();
        for key in ["voice.api_base_url", "voice.from", "voice.ring_timeout_s"] {
            assert!(e.contains(&format!("key `{key}`")), "{key}: {e}");
        }
    }

    #[test]
    fn http_serves_tls_itself_or_stays_on_loopback_unless_a_proxy_is_named() {
        let with = |http: &str| Config::parse(&format!("{GOOD}\n[http]\n{http}\n"), Path::new("/e/g.toml"));
        let c = with("bind = \"127.0.0.1:8443\"\ntls_cert_file = \"c.pem\"\ntls_key_file = \"k.pem\"").unwrap();
        assert_eq!(c.http.tls_key_file, Some(PathBuf::from("/e/k.pem")));
        assert!(c.http.tls() && c.http.client_ip_header == "X-Forwarded-For");
        let e = with("tls_cert_file = \"c.pem\"").unwrap_err().to_string();
        assert!(e.contains("key `http.tls_key_file`: expected both"), "{e}");
        let e = with("bind = \"0.0.0.0:8080\"").unwrap_err().to_string();
        assert!(e.contains("key `http.bind`") && e.contains("trusted_proxies"), "{e}");
        assert!(with("bind = \"0.0.0.0:8080\"\ntrusted_proxies = [\"10.0.0.0/8\"]").is_ok());
        assert!(with("bind = \"0.0.0.0:8443\"\ntls_cert_file = \"c\"\ntls_key_file = \"k\"").is_ok());
        let e = with("trusted_proxies = [\"proxy.lan\"]").unwrap_err().to_string();
        assert!(e.contains("key `http.trusted_proxies`") && e.contains("proxy.lan"), "{e}");
        let e = with("bind = \"127.0.0.1:1\"\nport = 3").unwrap_err().to_string();
        assert!(e.contains("unknown field `port`"), "{e}");
    }

    #[test]
    fn weak_link_secrets_and_world_wide_proxies_are_refused() {
        let e = Config::parse(&GOOD.replace("a-test-secret-long-enough", "a"), Path::new("g.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `link_secret`") && e.contains("16 characters"), "{e}");
        let e = Config::parse(&GOOD.replace("a-test-secret-long-enough", &"ab".repeat(20)), Path::new("g.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("different characters"), "{e}");
        for net in ["0.0.0.0/0", "::/0", "0.0.0.0/4"] {
            let e = Config::parse(&format!("{GOOD}\n[http]\ntrusted_proxies = [\"{net}\"]\n"), Path::new("g.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("http.trusted_proxies") && e.contains(net), "{e}");
        }
        assert!(Config::parse(&format!("{GOOD}\n[http]\ntrusted_proxies = [\"10.0.0.0/8\"]\n"), Path::new("g.toml"))
            .is_ok());
    }

    #[test]
    fn a_clusters_peers_are_bare_addresses_and_the_active_believes_what_they_pass_on() {
        let with = |http: &str, peers: &str| {
            let text = format!(
                "{GOOD}[http]\n{http}\n[store]\npostgres = \"host=127.0.0.1 user=m dbname=m\"\n[cluster]\nname = \"gw-a\"\npeers = {{ {peers} }}\n"
            );
            Config::parse(&text, Path::new("g.toml"))
        };
        let both = "gw-a = \"http://127.0.0.1:8080\", gw-b = \"http://127.0.0.2:8080\"";
        let c = with("trusted_proxies = [\"127.0.0.2\"]", both).unwrap();
        assert_eq!(c.cluster.unwrap().peers.len(), 2);
        // gw-b would pass people's actions on, but gw-a would not believe the address it names.
        let e = with("", both).unwrap_err().to_string();
        assert!(e.contains("key `http.trusted_proxies`") && e.contains("`gw-b`"), "{e}");
        let e = with("trusted_proxies = [\"127.0.0.2\"]", "gw-b = \"http://127.0.0.2:8080/dashboard\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `cluster.peers.gw-b`"), "{e}");
        let e = with("", "gw-b = \"127.0.0.2:8080\"").unwrap_err().to_string();
        assert!(e.contains("key `cluster.peers.gw-b`"), "{e}");
        let e = with("trusted_proxies = [\"10.0.0.2\"]", "gw-b = \"http://10.0.0.2:8080\"").unwrap_err().to_string();
        assert!(e.contains("key `cluster.peers.gw-b`") && e.contains("https://"), "{e}");
        assert!(with("trusted_proxies = [\"10.0.0.2\"]", "gw-b = \"https://10.0.0.2:8443\"").is_ok());
    }

    #[test]
    fn failover_brokers_are_host_and_port_and_a_shared_subscription_is_refused() {
        let with = |line: &str| {
            Config::parse(&GOOD.replace("port = 1883\n", &format!("port = 1883\n{line}\n")), Path::new("g.toml"))
        };
        let c = with("failover = [\"127.0.0.1:1884\", \"localhost:1885\"]").unwrap();
        assert_eq!(c.broker.failover.len(), 2);
        // Without TLS, only loopback: the password would cross the network in clear.
        let e = with("failover = [\"127.0.0.1:1884\", \"mq3.example.lg.jp:8883\"]").unwrap_err().to_string();
        assert!(e.contains("broker.failover[1]") && e.contains("tls"), "{e}");
        let e = with("failover = [\"127.0.0.1\"]").unwrap_err().to_string();
        assert!(e.contains("broker.failover[0]") && e.contains("host:port"), "{e}");
        let e = with("share_group = \"gws\"").unwrap_err().to_string();
        assert!(e.contains("broker.share_group") && e.contains("[cluster]"), "{e}");
    }

    /// The gateway's `[broker]` keeps the agent's rules (one place: `mamori_connect`); before,
    /// a password with no username, two CA certificates or a zero keep-alive passed here.
    #[test]
    fn the_broker_section_is_refused_where_the_agent_would_refuse_it() {
        let with = |line: &str| {
            Config::parse(&GOOD.replace("port = 1883\n", &format!("port = 1883\n{line}\n")), Path::new("g.toml"))
        };
        for (line, key) in [
            ("password = { value = \"p\" }", "broker.username"),
            ("keep_alive_s = 0", "broker.keep_alive_s"),
            ("keep_alive_s = 65535", "broker.keep_alive_s"),
            ("[broker.tls]\nca_file = \"a.pem\"\nca_pem = \"A\"", "broker.tls.ca_file"),
            ("[broker.tls]\nca_pem = \"A\"\nclient_cert_pem = \"C\"", "broker.tls.client_key_file"),
        ] {
            let e = with(line).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{line}: {e}");
        }
        assert!(with("username = \"gw\"\npassword = { value = \"p\" }\nkeep_alive_s = 30").is_ok());
    }

    #[test]
    fn url_hosts() {
        assert_eq!(url_host("http://127.0.0.1:9/x"), Some("127.0.0.1"));
        assert_eq!(url_host("http://u:p@localhost/x"), Some("localhost"));
        assert_eq!(url_host("http://[::1]:80/"), Some("::1"));
    }
}
