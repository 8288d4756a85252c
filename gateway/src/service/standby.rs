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
//!   states with their alerts, open incidents: [`crate::service::run::load_engine`], as after a
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
//!   them), so the audit log names the person, not the standby. No action is taken by a
//!   standby itself, so there is one writer and one audit entry for each (reads write what
//!   they write on the active too: a session's last use, an audited view).
//! - **Never in a loop.** A gateway never passes actions to itself (restarted while its own
//!   lease runs out, it sees itself as the holder: no active yet), and a request already
//!   passed on ([`PASSED_ON`]) is refused rather than passed on again.
//! - **Nobody to pass it to.** While no other gateway holds a live lease (the active died and
//!   nobody has taken over yet: at most about the lease's length), or the connection to it
//!   cannot be made, the person is told in Japanese and English that the action was not taken
//!   and to try again in a few seconds (503, `Retry-After`). When it was sent but no whole
//!   answer came within [`FORWARD_TIMEOUT`], it may have been taken: the person is told that,
//!   and to look before trying again (504), never that nothing happened.
//! - **Health.** A standby's `/healthz` says ok while its mirror reads the store and the
//!   active answers at its address (checked every [`MIRROR_EVERY`]), so a load balancer keeps
//!   it in rotation exactly while it can serve; `mamori_gateway_active` is 0 in its
//!   `/metrics`. A standby started before its database waits for it (as for the lease) and
//!   listens only once it answers.
//! - **Takeover.** The standby binds the HTTP port once the store answers. When it takes the
//!   lease its server stops taking new requests (those in flight have 5 s to finish), the
//!   mirror stops, and the *same* listener goes to the service ([`crate::service::run::Listener`]):
//!   the port is never closed in between, so nothing else can take it and connections
//!   waiting in its queue are served by the service.

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
use crate::domain::engine::Engine;
use crate::service::health::{Health, Standby};

use crate::edge::listen::{Peer, TrustedProxies};
use crate::edge::store::pg::{PgLocation, PgStore};
use crate::service::lease::Held;
use crate::service::run::Listener;
use crate::web::{Snapshot, WebRequest};

/// How often a standby reads the store for its dashboard.
pub const MIRROR_EVERY: Duration = Duration::from_secs(2);

/// How long a standby waits for the active's answer to an action it passed on.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest request body a standby passes on (forms and API bodies are a few kB).
pub const FORWARD_BODY_MAX: usize = 256 << 10;

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
        let mut by_municipality: BTreeMap<String, Vec<&crate::domain::engine::Incident>> = BTreeMap::new();
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
/// lease is live, and never this gateway itself), and every gateway's address.
#[derive(Clone)]
pub struct Forward {
    client: reqwest::Client,
    peers: Arc<BTreeMap<String, reqwest::Url>>,
    me: String,
    active: Arc<Mutex<Option<String>>>,
    proxies: TrustedProxies,
    header: HeaderName,
}

/// Set on a request a standby passes on: a gateway that receives one as a standby refuses it
/// rather than pass it on again (two standbys that each think the other active, never a loop).
pub const PASSED_ON: &str = "x-mamori-passed-on";

impl Forward {
    /// From the config (its checks have passed), waiting `timeout` for the active's answer.
    pub fn new(config: &Config, cluster: &ClusterConfig, timeout: Duration) -> anyhow::Result<Forward> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        // Straight to the peer: an HTTP(S)_PROXY of the environment would put itself between,
        // and the active would audit the proxy's address.
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_secs(3).min(timeout))
            .timeout(timeout);
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
            me: cluster.name.clone(),
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

    /// The lease's holder as just read (`None`: no lease is live). This gateway itself counts
    /// as none: it held the lease before it restarted, and the lease has not ended yet.
    pub fn set_active(&self, name: Option<String>) {
        let name = name.filter(|n| *n != self.me);
        *self.active.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = name;
    }

    /// Why actions cannot be passed on now, checked by asking the active's `/healthz` (any
    /// answer will do: its own health is its own); `None` when they can, or when no lease is
    /// live (a takeover, not this standby's fault).
    pub async fn check(&self) -> Option<String> {
        match self.target() {
            Err(Unreachable::NoAddress(name)) => {
                Some(format!("no address for the active gateway `{name}` in [cluster] peers"))
            }
            Err(_) => None,
            Ok(mut url) => {
                url.set_path("/healthz");
                match self.client.get(url.clone()).timeout(Duration::from_secs(3)).send().await {
                    Ok(_) => None,
                    Err(e) => Some(format!("{url} does not answer: {e}")),
                }
            }
        }
    }
}

/// Why an action could not be passed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unreachable {
    /// No gateway holds a live lease (taking over), or the store could not be read.
    NoActive,
    /// The active one has no address in `[cluster] peers`.
    NoAddress(String),
    /// The connection to it could not be made: the request was certainly not taken.
    NoConnection(String),
    /// It was already passed on by another gateway (which took this one for the active).
    PassedOnTwice,
    /// It was sent, but no whole answer came in time: it may or may not have been taken.
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

/// The person is told that their action was not taken (or, when the active got it and did
/// not answer in time, that it may have been), in both languages, or as JSON for the API.
fn not_taken(api: bool, why: &Unreachable) -> Response {
    tracing::warn!(reason = ?why, "standby: an action could not be passed to the active gateway");
    let retry = [(header::RETRY_AFTER, HeaderValue::from_static("5"))];
    let uncertain = matches!(why, Unreachable::NoAnswer(_));
    if api {
        let error = if uncertain {
            "the gateway that sends the notifications did not answer in time: the action may or may not have been taken; read its state before trying again"
        } else {
            "the gateway that sends the notifications could not be reached (it may be switching over); nothing was changed: try again in a few seconds"
        };
        let status = if uncertain { StatusCode::GATEWAY_TIMEOUT } else { StatusCode::SERVICE_UNAVAILABLE };
        return (status, retry, axum::Json(serde_json::json!({ "error": error }))).into_response();
    }
    let (status, body) = if uncertain {
        (
            StatusCode::GATEWAY_TIMEOUT,
            "<p>通知を送っているゲートウェイから時間内に返事がありませんでした。この操作が行われたかどうかは分かりません。\
             画面を開き直して確かめてから、必要ならもう一度行ってください。急ぐときは電話で伝えてください。</p>\
             <p lang=\"en\">The gateway that sends the notifications did not answer in time, so it is not known whether \
             this action was taken. Open the page again to check before trying again; if it is urgent, call.</p>",
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "<p>通知を送っているゲートウェイにつながらなかったため、この操作はまだ行われていません（切り替えの途中かもしれません）。\
             数秒後にもう一度お試しください。急ぐときは電話で伝えてください。</p>\
             <p lang=\"en\">The gateway that sends the notifications could not be reached (it may be switching over), \
             so this action was not taken. Try again in a few seconds; if it is urgent, call.</p>",
        )
    };
    let page = format!("<!doctype html><html lang=\"ja\"><meta charset=\"utf-8\"><title>mamori</title>{body}</html>");
    (status, retry, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response()
}

/// Middleware of a standby's router: reads are served here, every other request is passed to
/// the active gateway and its answer returned.
pub async fn forward(State(f): State<Forward>, req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    let api = req.uri().path().starts_with("/api/");
    if req.headers().contains_key(PASSED_ON) {
        return not_taken(api, &Unreachable::PassedOnTwice);
    }
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
    headers.insert(HeaderName::from_static(PASSED_ON), HeaderValue::from_static("1"));
    let sent = f.client.request(parts.method.clone(), url).headers(headers).body(body).send().await;
    let answer = match sent {
        Ok(r) => r,
        Err(e) if e.is_connect() => return not_taken(api, &Unreachable::NoConnection(e.to_string())),
        Err(e) => return not_taken(api, &Unreachable::NoAnswer(e.to_string())),
    };
    let status = answer.status();
    let headers = copy_headers(answer.headers());
    let bytes = match answer.bytes().await {
        Ok(b) => b,
        Err(e) => return not_taken(api, &Unreachable::NoAnswer(format!("the answer was cut off: {e}"))),
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
            let now = crate::edge::clock::now();
            // A connection that failed is made again at the next read.
            let read = store.take().map_or_else(|| PgStore::open(&at, false), Ok).and_then(|s| {
                let engine = crate::service::run::load_engine(&config, &s)?;
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
                    health.update_standby(|s| {
                        s.read_at = Some(now);
                        s.error = None;
                    });
                    said = None;
                }
                Err(e) => {
                    forward.set_active(None);
                    let text = e.to_string();
                    if said.as_deref() != Some(&text) {
                        tracing::warn!(error = %text, "standby: cannot read the store for the dashboard");
                        said = Some(text.clone());
                    }
                    health.update_standby(|s| s.error = Some(text));
                }
            }
            if stop.recv_timeout(MIRROR_EVERY) != Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                return;
            }
        }
    })?;
    Ok(())
}

/// Whether actions can be passed on, every [`MIRROR_EVERY`], for the standby's health, until
/// `stop`.
fn spawn_pass_on_check(forward: Forward, health: Arc<Health>, stop: CancellationToken) {
    tokio::spawn(async move {
        loop {
            let why = forward.check().await;
            health.update_standby(|s| s.pass_on = why);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(MIRROR_EVERY) => {}
            }
        }
    });
}

/// The web's connection to the store, once the database answers (a standby started before its
/// database waits for it, as for the lease, rather than exit).
async fn web_store(at: &PgLocation, cancel: &CancellationToken) -> Option<Box<dyn crate::edge::store::Store>> {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status("standby")]);
    let watchdog = sd_notify::watchdog_enabled().is_some();
    let mut said = String::new();
    loop {
        if watchdog {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        }
        let at2 = Box::new(at.clone());
        let opened = tokio::task::spawn_blocking(move || {
            crate::edge::store::open_existing(&crate::edge::store::Location::Postgres(at2))
        })
        .await;
        match opened {
            Ok(Ok(db)) => return Some(db),
            Ok(Err(e)) => {
                let text = e.to_string();
                if text != said {
                    tracing::warn!(error = %text, "standby: cannot reach the store; waiting for it");
                    said = text;
                }
            }
            Err(e) => tracing::warn!(error = %e, "standby: the store's task"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
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
    let style = crate::service::run::style(config)?;
    let forward = Forward::new(config, cluster, FORWARD_TIMEOUT)?;
    // Nothing is served before the store answers: every page needs it.
    let Some(db) = web_store(at, cancel).await else { return Ok(None) };
    let listener = Listener::bind(config, cancel.clone()).await?;
    let now = crate::edge::clock::now();
    let health = Arc::new(Health::new(now));
    health.set_standby(Some(Standby::new(now)));
    let (snapshot, snapshot_rx) = watch::channel(Arc::new(Snapshot::of(crate::service::run::empty_engine(config))));
    let (tx, rx) = mpsc::channel(16);
    let Listener { rt, incoming } = listener;
    let serving_cancel = CancellationToken::new();
    let app = {
        let _on_web = rt.handle().enter();
        refuse_requests(rx);
        spawn_pass_on_check(forward.clone(), health.clone(), serving_cancel.clone());
        crate::service::run::web_app(
            config,
            &style,
            tx,
            snapshot_rx,
            db,
            Default::default(),
            health.clone(),
            Default::default(),
        )?
    };
    let router = crate::web::router(app).layer(axum::middleware::from_fn_with_state(forward.clone(), self::forward));
    let serving = rt.handle().spawn(crate::edge::listen::serve(incoming, router, serving_cancel.clone()));
    tracing::info!(gateway = %cluster.name, http = %config.http.bind, "standby: serving the dashboard, actions passed to the active gateway");
    let (stop, stopped) = std::sync::mpsc::channel();
    spawn_mirror(config.clone(), at.clone(), snapshot, forward, health, stopped)?;
    let held = crate::service::lease::wait_for_lease(at, cluster, cancel).await;
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
        let file: crate::domain::homes::HomesFile = toml::from_str(&(home("h1") + &home("h2"))).unwrap();
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
        e.handle(crate::domain::engine::Input::Event(HomeId::new("h2").unwrap(), lost), t).unwrap();
        let second = m.next(e).expect("a change is published");
        assert_eq!(second.version, 2);
        assert_eq!(second.home_versions[&HomeId::new("h1").unwrap()], 1, "h1 did not change");
        assert_eq!(second.home_versions[&HomeId::new("h2").unwrap()], 2, "h2 did");
        assert!(m.next(second.engine.clone()).is_none(), "read again unchanged: nothing");
    }

    fn config() -> (Config, ClusterConfig) {
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
        (config, cluster)
    }

    #[test]
    fn an_action_has_somewhere_to_go_only_while_another_gateway_holds_a_live_lease_and_has_an_address() {
        let (config, cluster) = config();
        let f = Forward::new(&config, &cluster, FORWARD_TIMEOUT).unwrap();
        assert_eq!(f.target(), Err(Unreachable::NoActive));
        f.set_active(Some("gw-b".into()));
        assert_eq!(f.target().unwrap().as_str(), "https://10.0.0.2:8443/");
        f.set_active(Some("gw-c".into()));
        assert_eq!(f.target(), Err(Unreachable::NoAddress("gw-c".into())));
        // Itself, restarted while its own lease runs out: never to itself.
        f.set_active(Some("gw-a".into()));
        assert_eq!(f.target(), Err(Unreachable::NoActive));
    }

    /// A standby's router in front of a handler that says where it was served.
    fn standby_router(active_url: &str, timeout: Duration) -> (axum::Router, Forward) {
        let (mut config, mut cluster) = config();
        cluster.peers.insert("gw-b".into(), active_url.into());
        config.cluster = Some(cluster.clone());
        let f = Forward::new(&config, &cluster, timeout).unwrap();
        f.set_active(Some("gw-b".into()));
        let r = axum::Router::new()
            .route("/x", axum::routing::any(|| async { "served here" }))
            .layer(axum::middleware::from_fn_with_state(f.clone(), forward));
        (r, f)
    }

    async fn call(r: &axum::Router, method: Method, extra: Option<(&str, &str)>) -> (StatusCode, String) {
        use tower::ServiceExt as _;
        let mut req = axum::http::Request::builder().method(method).uri("/x");
        if let Some((k, v)) = extra {
            req = req.header(k, v);
        }
        let resp = r.clone().oneshot(req.body(axum::body::Body::empty()).unwrap()).await.unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn an_action_is_refused_as_not_taken_or_as_unknown_according_to_what_is_known() {
        // Nobody listens: the connection is refused, so nothing was taken.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let (r, _) = standby_router(&closed_url, Duration::from_secs(2));
        let (status, body) = call(&r, Method::GET, None).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "served here"), "reads are served by the standby");
        let (status, body) = call(&r, Method::POST, None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("まだ行われていません") && body.contains("was not taken"), "{body}");
        // Passed on already by another gateway: refused, never passed on again.
        let (status, body) = call(&r, Method::POST, Some((PASSED_ON, "1"))).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");

        // It accepts and never answers: the action may have been taken, and the page says so.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_url = format!("http://{}", silent.local_addr().unwrap());
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                open.push(s);
            }
        });
        let (r, f) = standby_router(&silent_url, Duration::from_millis(300));
        let (status, body) = call(&r, Method::POST, None).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert!(body.contains("行われたかどうかは分かりません") && body.contains("not known whether"), "{body}");
        // A peer that answers nothing is not one to pass actions to: the standby says so.
        assert!(f.check().await.is_some_and(|why| why.contains("does not answer")));
        held.abort();
    }
}
