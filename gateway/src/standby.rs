//! A standby gateway serves the dashboard and the API as well, and passes every action on to
//! the active one (`[cluster] peers`).
//!
//! ## Why
//! Behind a load balancer every gateway of a cluster is in rotation, so a coordinator's
//! browser, a family's acknowledgement link or an API client may reach a standby. A standby
//! that served nothing would fail them; one that refused actions would turn away an
//! acknowledgement during an outage. So a standby answers as the active would.
//!
//! ## How
//! - **Reads from the store.** A mirror thread reads the whole engine from the store (plans,
//!   states with their alerts, open incidents: [`crate::run::load_engine`], as after a
//!   restart) every [`MIRROR_EVERY`] and publishes it as the web's [`Snapshot`]. Each home and
//!   municipality gets the read's version only when its content changed ([`Mirror`], pure), so
//!   the live stream pushes exactly what changed. What the active has not committed yet is not
//!   shown: a standby's pages are at most [`MIRROR_EVERY`] plus one commit behind. Sessions,
//!   accounts, history and the audit log are read from the shared store as on the active.
//! - **Actions go to the active.** Every request that is not `GET`/`HEAD`/`OPTIONS` (a login,
//!   an acknowledgement, an answer, a clear, a drill, a plan, an account change, a voice
//!   gateway's callback) is passed whole to the lease holder's address in `[cluster] peers`
//!   ([`forward`]), with the person's address in `[http] client_ip_header`, and its answer
//!   (a redirect, a cookie, an error page) is returned as it is. The active believes that
//!   header only from the gateways listed in its `trusted_proxies` (the config check asks for
//!   them), so the audit log names the person, not the standby. Nothing is changed by a
//!   standby itself, so there is one writer and one audit of each action.
//! - **Nobody to pass it to.** While the lease is ended (the active died and nobody has taken
//!   over yet: at most about the lease's length) or the active does not answer within
//!   [`FORWARD_TIMEOUT`], the person is told in their language that the action was not taken
//!   and to try again in a few seconds (503, `Retry-After`); nothing is half done.
//! - **Health.** A standby's `/healthz` says ok while its mirror reads the store, so a load
//!   balancer keeps it in rotation; `mamori_gateway_active` is 0 in its `/metrics`.
//! - **Takeover.** The standby binds the HTTP port at start. When it takes the lease its
//!   server stops accepting new requests (those in flight finish), the mirror stops, and the
//!   *same* listener goes to the service ([`crate::run::Listener`]): the port is never closed
//!   in between, so nothing else can take it and clients see no refusal.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use mamori_protocol::mqtt::HomeId;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{ClusterConfig, Config};
use crate::engine::Engine;
use crate::health::{Health, Standby};
use crate::lease::Held;
use crate::listen::{Peer, TrustedProxies};
use crate::run::Listener;
use crate::store::pg::{PgLocation, PgStore};
use crate::web::{Snapshot, WebRequest};

/// How often a standby reads the store for its dashboard.
pub const MIRROR_EVERY: Duration = Duration::from_secs(2);

/// How long a standby waits for the active's answer to an action it passed on.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest request body a standby passes on (forms and API bodies are a few kB).
pub const FORWARD_BODY_MAX: usize = 1 << 20;

/// Versions for a standby's snapshots, from fingerprints of what each home and municipality
/// holds: pure, the freshly read engine passed in.
#[derive(Debug, Default)]
pub struct Mirror {
    homes: HashMap<HomeId, u64>,
    incidents: HashMap<String, u64>,
    version: u64,
    home_versions: HashMap<HomeId, u64>,
    incident_versions: HashMap<String, u64>,
}

fn fingerprint(value: &impl serde::Serialize) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_vec(value).unwrap_or_default().hash(&mut h);
    h.finish()
}

impl Mirror {
    /// The snapshot of `engine` as just read from the store, every home and municipality whose
    /// content changed since the last read marked with this read's version; `None` when
    /// nothing changed.
    pub fn next(&mut self, engine: Engine) -> Option<Snapshot> {
        let homes: HashMap<HomeId, u64> =
            engine.states_and_plans().map(|(plan, st)| (plan.id.clone(), fingerprint(&(plan, st)))).collect();
        let mut by_municipality: BTreeMap<String, Vec<&crate::engine::Incident>> = BTreeMap::new();
        for i in engine.incidents() {
            by_municipality.entry(i.municipality.clone()).or_default().push(i);
        }
        let incidents: HashMap<String, u64> =
            by_municipality.iter().map(|(m, list)| (m.clone(), fingerprint(list))).collect();
        let changed_homes: Vec<HomeId> = homes
            .iter()
            .filter(|(id, fp)| self.homes.get(*id) != Some(*fp))
            .map(|(id, _)| id.clone())
            .chain(self.homes.keys().filter(|id| !homes.contains_key(*id)).cloned())
            .collect();
        let changed_incidents: Vec<String> = incidents
            .iter()
            .filter(|(m, fp)| self.incidents.get(*m) != Some(*fp))
            .map(|(m, _)| m.clone())
            .chain(self.incidents.keys().filter(|m| !incidents.contains_key(*m)).cloned())
            .collect();
        if self.version > 0 && changed_homes.is_empty() && changed_incidents.is_empty() {
            return None;
        }
        self.version += 1;
        for h in changed_homes {
            match homes.contains_key(&h) {
                true => self.home_versions.insert(h, self.version),
                false => self.home_versions.remove(&h),
            };
        }
        for m in changed_incidents {
            self.incident_versions.insert(m, self.version);
        }
        self.homes = homes;
        self.incidents = incidents;
        Some(Snapshot {
            engine,
            version: self.version,
            home_versions: self.home_versions.clone(),
            incident_versions: self.incident_versions.clone(),
        })
    }
}

/// Where a standby passes actions: the active gateway's name as last read (only while its
/// lease is live), and every gateway's address.
#[derive(Clone)]
pub struct Forward {
    client: reqwest::Client,
    peers: Arc<BTreeMap<String, reqwest::Url>>,
    active: Arc<Mutex<Option<String>>>,
    proxies: TrustedProxies,
    header: HeaderName,
}

impl Forward {
    /// From the config (its checks have passed).
    pub fn new(config: &Config, cluster: &ClusterConfig) -> anyhow::Result<Forward> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(3))
            .timeout(FORWARD_TIMEOUT);
        if let Some(ca) = &cluster.peer_ca_file {
            let pem = std::fs::read(ca).with_context(|| format!("cluster.peer_ca_file {}", ca.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("cluster.peer_ca_file {}", ca.display()))?
            {
                b = b.add_root_certificate(cert);
            }
        }
        let peers = cluster
            .peers
            .iter()
            .filter_map(|(name, url)| crate::config::peer_url(url).map(|u| (name.clone(), u)))
            .collect();
        let proxies = config.http.proxies().map_err(|e| anyhow::anyhow!("http.trusted_proxies: {e}"))?;
        let header = HeaderName::try_from(config.http.client_ip_header.as_str())
            .map_err(|_| anyhow::anyhow!("http.client_ip_header: not a header name"))?;
        Ok(Forward {
            client: b.build().context("the HTTP client for the active gateway")?,
            peers: Arc::new(peers),
            active: Default::default(),
            proxies,
            header,
        })
    }

    /// The active gateway's base URL, if its lease is live and its address is known.
    pub fn target(&self) -> Result<reqwest::Url, Unreachable> {
        let active = self.active.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let name = active.ok_or(Unreachable::NoActive)?;
        self.peers.get(&name).cloned().ok_or(Unreachable::NoAddress(name))
    }

    fn set_active(&self, name: Option<String>) {
        *self.active.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = name;
    }
}

/// Why an action could not be passed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unreachable {
    /// No gateway holds a live lease (taking over), or the store could not be read.
    NoActive,
    /// The active one has no address in `[cluster] peers`.
    NoAddress(String),
    /// It did not answer in time or refused the connection.
    NoAnswer(String),
}

/// Hop-by-hop headers, which are the connection's, not the request's.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "te" | "trailer" | "upgrade"
    ) || name == header::HOST
        || name == header::CONTENT_LENGTH
}

fn copy_headers(from: &HeaderMap) -> HeaderMap {
    let mut to = HeaderMap::new();
    for (k, v) in from {
        if !hop_by_hop(k) {
            to.append(k.clone(), v.clone());
        }
    }
    to
}

/// The person is told that their action was not taken, in their language (the page's
/// `Accept-Language`) or as JSON for the API.
fn not_taken(api: bool, why: &Unreachable) -> Response {
    tracing::warn!(reason = ?why, "standby: an action could not be passed to the active gateway");
    let retry = [(header::RETRY_AFTER, HeaderValue::from_static("5"))];
    if api {
        let body = serde_json::json!({
            "error": "the gateway that sends the notifications could not be reached (it may be switching over); nothing was changed: try again in a few seconds"
        });
        return (StatusCode::SERVICE_UNAVAILABLE, retry, axum::Json(body)).into_response();
    }
    let body = "<!doctype html><html lang=\"ja\"><meta charset=\"utf-8\"><title>mamori</title>\
        <p>通知を送っているゲートウェイにつながらなかったため、この操作はまだ行われていません（切り替えの途中かもしれません）。\
        数秒後にもう一度お試しください。急ぐときは電話で伝えてください。</p>\
        <p lang=\"en\">The gateway that sends the notifications could not be reached (it may be switching over), \
        so this action was not taken. Try again in a few seconds; if it is urgent, call.</p></html>";
    (StatusCode::SERVICE_UNAVAILABLE, retry, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
}

/// Middleware of a standby's router: reads are served here, every other request is passed to
/// the active gateway and its answer returned.
pub async fn forward(State(f): State<Forward>, req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    let api = req.uri().path().starts_with("/api/");
    let base = match f.target() {
        Ok(b) => b,
        Err(why) => return not_taken(api, &why),
    };
    let peer = req.extensions().get::<ConnectInfo<Peer>>().map(|c| c.0 .0.ip());
    let client = peer.map(|p| f.proxies.client(p, req.headers()));
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, FORWARD_BODY_MAX).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "request too large\n").into_response();
    };
    let mut url = base;
    url.set_path(parts.uri.path());
    url.set_query(parts.uri.query());
    let mut headers = copy_headers(&parts.headers);
    // The person's address as this gateway determined it (through its own trusted proxies),
    // replacing whatever the request said.
    headers.remove(&f.header);
    if let Some(ip) = client.and_then(|c| HeaderValue::from_str(&c.to_string()).ok()) {
        headers.insert(f.header.clone(), ip);
    }
    let sent = f.client.request(parts.method.clone(), url).headers(headers).body(body).send().await;
    let answer = match sent {
        Ok(r) => r,
        Err(e) => return not_taken(api, &Unreachable::NoAnswer(e.to_string())),
    };
    let status = answer.status();
    let headers = copy_headers(answer.headers());
    let Ok(bytes) = answer.bytes().await else {
        return not_taken(api, &Unreachable::NoAnswer("the answer was cut off".into()));
    };
    tracing::debug!(method = %parts.method, path = parts.uri.path(), %status, "standby: passed to the active gateway");
    let mut r = Response::new(axum::body::Body::from(bytes));
    *r.status_mut() = status;
    *r.headers_mut() = headers;
    r
}

/// Answer whatever reaches a standby's service channel (nothing should: every action is
/// passed on before it reaches a handler) with a refusal, never leaving a handler waiting.
fn refuse_requests(mut rx: mpsc::Receiver<WebRequest>) {
    tokio::spawn(async move {
        const WHY: &str = "this gateway is a standby: try again in a few seconds";
        while let Some(r) = rx.recv().await {
            match r {
                WebRequest::Ack { reply, .. } | WebRequest::Clear { reply, .. } => {
                    let _ = reply.send(Err(WHY.into()));
                }
                WebRequest::Answer { reply, .. } => {
                    let _ = reply.send(Err(WHY.into()));
                }
                WebRequest::Drill { reply, .. } => {
                    let _ = reply.send(Err(WHY.into()));
                }
                WebRequest::SavePlan { reply, .. } => {
                    let _ = reply.send(Err(crate::web::SaveRefusal::Failed(WHY.into())));
                }
            }
        }
    });
}

/// Read the store for the dashboard every [`MIRROR_EVERY`] until `stop` says so or is dropped.
fn spawn_mirror(
    config: Config,
    at: PgLocation,
    snapshot: watch::Sender<Arc<Snapshot>>,
    forward: Forward,
    health: Arc<Health>,
    stop: std::sync::mpsc::Receiver<()>,
) -> anyhow::Result<()> {
    std::thread::Builder::new().name("mamori-mirror".into()).spawn(move || {
        let mut mirror = Mirror::default();
        let mut store: Option<PgStore> = None;
        let mut said = None::<String>;
        loop {
            let now = crate::clock::now();
            // A connection that failed is made again at the next read.
            let read = store.take().map_or_else(|| PgStore::open(&at, false), Ok).and_then(|s| {
                let engine = crate::run::load_engine(&config, &s)?;
                let lease = s.lease_holder()?;
                store = Some(s);
                Ok((engine, lease))
            });
            match read {
                Ok((engine, lease)) => {
                    let live = lease.left_s > 0.0 && !lease.holder.is_empty();
                    forward.set_active(live.then_some(lease.holder));
                    if let Some(snap) = mirror.next(engine) {
                        snapshot.send_replace(Arc::new(snap));
                    }
                    health.set_standby(Some(Standby {
                        since: health_since(&health, now),
                        read_at: Some(now),
                        error: None,
                    }));
                    said = None;
                }
                Err(e) => {
                    forward.set_active(None);
                    let text = e.to_string();
                    if said.as_deref() != Some(&text) {
                        tracing::warn!(error = %text, "standby: cannot read the store for the dashboard");
                        said = Some(text.clone());
                    }
                    let last = health.standby();
                    health.set_standby(Some(Standby {
                        since: health_since(&health, now),
                        read_at: last.and_then(|s| s.read_at),
                        error: Some(text),
                    }));
                }
            }
            if stop.recv_timeout(MIRROR_EVERY) != Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                return;
            }
        }
    })?;
    Ok(())
}

fn health_since(health: &Health, now: crate::engine::Time) -> crate::engine::Time {
    health.standby().map_or(now, |s| s.since)
}

/// Stand by: serve the dashboard and the API (actions passed to the active gateway) and wait
/// for the lease. The lease and the listener, to run the service on; `None` when cancelled
/// first.
pub async fn stand_by(
    config: &Config,
    at: &PgLocation,
    cluster: &ClusterConfig,
    cancel: &CancellationToken,
) -> anyhow::Result<Option<(Held, Listener)>> {
    let listener = Listener::bind(config, cancel.clone()).await?;
    let now = crate::clock::now();
    let style = crate::run::style(config)?;
    let health = Arc::new(Health::new(now));
    health.set_standby(Some(Standby { since: now, read_at: None, error: None }));
    let (snapshot, snapshot_rx) = watch::channel(Arc::new(Snapshot::of(crate::run::empty_engine(config))));
    let (tx, rx) = mpsc::channel(16);
    let Listener { rt, incoming } = listener;
    let forward = Forward::new(config, cluster)?;
    let app = {
        let _on_web = rt.handle().enter();
        refuse_requests(rx);
        crate::run::web_app(
            config,
            &style,
            tx,
            snapshot_rx,
            &crate::store::Location::Postgres(Box::new(at.clone())),
            Default::default(),
            health.clone(),
            Default::default(),
        )?
    };
    let router = crate::web::router(app).layer(axum::middleware::from_fn_with_state(forward.clone(), self::forward));
    let serving_cancel = CancellationToken::new();
    let serving = rt.handle().spawn(crate::listen::serve(incoming, router, serving_cancel.clone()));
    tracing::info!(gateway = %cluster.name, http = %config.http.bind, "standby: serving the dashboard, actions passed to the active gateway");
    let (stop, stopped) = std::sync::mpsc::channel();
    spawn_mirror(config.clone(), at.clone(), snapshot, forward, health, stopped)?;
    let held = crate::lease::wait_for_lease(at, cluster, cancel).await;
    let _ = stop.send(());
    serving_cancel.cancel();
    let incoming = serving.await.context("the standby's web server")?;
    match held? {
        Some(h) => Ok(Some((h, Listener { rt, incoming }))),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> Engine {
        let home = |id: &str| {
            format!(
                "[[home]]\nid = \"{id}\"\nmunicipality = \"431001\"\nlabel = \"K-{id}\"\n\
                 devices = [{{ name = \"ventilator\", watts = 25 }}]\n\
                 backup = [{{ kind = \"ventilator_internal\", runtime_min = 480 }}]\n\
                 contacts = [{{ role = \"family\", name = \"家族\", channels = [{{ webhook = \"family\" }}] }}]\n"
            )
        };
        let file: crate::homes::HomesFile = toml::from_str(&(home("h1") + &home("h2"))).unwrap();
        let mut e = Engine::new(Default::default(), Default::default());
        for h in file.homes {
            e.upsert_home(h);
        }
        e
    }

    #[test]
    fn a_read_marks_only_the_homes_whose_content_changed() {
        let mut m = Mirror::default();
        let first = m.next(engine()).expect("the first read is published");
        assert_eq!(first.version, 1);
        assert_eq!(first.home_versions.len(), 2, "every home is new");
        assert!(m.next(engine()).is_none(), "the same content publishes nothing");
        let mut e = engine();
        let t = chrono::DateTime::from_timestamp(1_790_000_000, 0).unwrap();
        let lost = mamori_protocol::mqtt::Event {
            id: "b-1".into(),
            seq: 1,
            ts: t.fixed_offset(),
            kind: mamori_protocol::mqtt::EventKind::MainsLost,
            severity: mamori_protocol::mqtt::Severity::Critical,
            source: None,
            data: Default::default(),
            clock: None,
        };
        e.handle(crate::engine::Input::Event(HomeId::new("h2").unwrap(), lost), t).unwrap();
        let second = m.next(e).expect("a change is published");
        assert_eq!(second.version, 2);
        assert_eq!(second.home_versions[&HomeId::new("h1").unwrap()], 1, "h1 did not change");
        assert_eq!(second.home_versions[&HomeId::new("h2").unwrap()], 2, "h2 did");
        assert!(m.next(second.engine.clone()).is_none(), "read again unchanged: nothing");
    }

    #[test]
    fn an_action_has_somewhere_to_go_only_while_a_lease_is_live_and_its_holder_has_an_address() {
        let config: Config = toml::from_str(
            r#"data_dir = "data"
public_url = "http://127.0.0.1:8080"
link_secret = { value = "0123456789abcdef0123" }
[broker]
host = "127.0.0.1"
port = 1883
client_id = "gw"
[http]
trusted_proxies = ["10.0.0.2"]
[cluster]
name = "gw-a"
peers = { gw-a = "https://10.0.0.1:8443", gw-b = "https://10.0.0.2:8443" }
"#,
        )
        .unwrap();
        let cluster = config.cluster.clone().unwrap();
        let f = Forward::new(&config, &cluster).unwrap();
        assert_eq!(f.target(), Err(Unreachable::NoActive));
        f.set_active(Some("gw-b".into()));
        assert_eq!(f.target().unwrap().as_str(), "https://10.0.0.2:8443/");
        f.set_active(Some("gw-c".into()));
        assert_eq!(f.target(), Err(Unreachable::NoAddress("gw-c".into())));
    }
}
