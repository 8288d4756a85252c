//! `bench-gateway`: the gateway's fleet benchmark. Not a test: it prints figures for
//! `docs/benchmarks.md`.
//!
//! ```sh
//! cargo build --release -p mamori-gateway -p mamori-tests
//! target/release/bench-gateway [--homes 20000] [--municipalities 40] [--steady-s 60] [--storm 2000] [--burst 100000]
//!     [--shapes sqlite+mosquitto,postgres+mosquitto,postgres+nats]
//! ```
//!
//! Each shape runs the whole sequence below in turn, and a table sets them side by side:
//! `sqlite+mosquitto` (one prefecture's default), `postgres+mosquitto` (the store alone
//! changed) and `postgres+nats` (beyond one machine: PostgreSQL and a three-node NATS cluster,
//! MQTT on JetStream with three replicas, the gateway on one node and the publishers spread
//! over all three). PostgreSQL is the server `MAMORI_TEST_POSTGRES` names, in a database of
//! the benchmark's own; NATS is `nats-server` without TLS or users (the publishers speak for
//! many homes each): `MAMORI_NATS_SERVER` when set (`scripts/nats-server` prints a pinned
//! current release), otherwise the one on `PATH`. The storm counts the outage events the
//! gateway stored as well as the pages, since a lost event's outage is paged from telemetry.
//!
//! Everything is real: a Mosquitto started here on a free loopback port, the release
//! `mamori-gateway` binary with its SQLite store in a temporary folder, a webhook receiver
//! over HTTP, and `mosquitto_sub` on the same topics as the reference subscriber. The homes
//! are published by this program over a few MQTT connections (the broker has no ACLs here,
//! so one connection may publish for many homes; what the gateway receives is the same).
//!
//! 1. **Steady fleet**: `--homes` homes (spread over `--municipalities`) each send a status
//!    and then telemetry every 10 s, spread evenly over the period, for `--steady-s`. The
//!    messages the gateway took in (its `/metrics`) are counted against `mosquitto_sub`'s; its CPU time is read
//!    from `/proc`; nothing may be notified (a false "silent" would show up at the webhook).
//! 2. **Storm**: `--storm` homes lose mains within 10 s (the same number in every
//!    municipality) while the rest keep sending telemetry. For each: the time from publishing
//!    its `mains_lost` to the family's webhook receiving the notification; for each
//!    municipality: the time from the outage that makes it a regional incident (the third) to
//!    the coordinator's first digest.
//! 3. **Burst**: `--burst` telemetry messages published as fast as one connection can, with
//!    the rate each subscriber (gateway, `mosquitto_sub`) took them in.
//! 4. **Memory**: the gateway's VmRSS and VmHWM.
//! 5. **Restart**: the gateway is killed with SIGKILL; one more home loses mains while it is
//!    down; the time from the new process's start to `subscribed` and to that home's family
//!    being notified. Every notification key received twice is counted.
//!
//! Over 800 lines for a reason: the five phases share one fleet, one gateway process and one
//! set of counters per shape, and a family the storm does not page is traced here (its
//! deliveries, its store rows, the gateway's and the brokers' counters) in the same run, while
//! the evidence is still there; the fleet, the brokers and the receivers are in `tests/src/`.

#![allow(clippy::disallowed_methods)] // a benchmark reads the clock: that is its job
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mamori_protocol::mqtt::{self, Channel, ConnectionState, HomeId, Status};
use mamori_tests::args::{self, arg, arg_text};
use mamori_tests::fleet::{self, gateway_bin, ingested, kind_of, ms, summary, Fleet};
use mamori_tests::nats::NatsCluster;
use mamori_tests::postgres::TestDb;
use mamori_tests::process::Process;
use mamori_tests::procfs::{cpu_ns, machine, status_kb};
use mamori_tests::webhook::{Delivery, WebhookReceiver};
use mamori_tests::{free_port, Deadline, Mosquitto};
use rumqttc::{AsyncClient, MqttOptions, QoS};

const SECRET: &str = "bench-hook-secret";
const PERIOD: Duration = Duration::from_secs(10);

/// Where the gateway keeps its state and which broker everyone uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoreKind {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BrokerKind {
    Mosquitto,
    Nats,
}

fn shape_name(store: StoreKind, broker: BrokerKind) -> &'static str {
    match (store, broker) {
        (StoreKind::Sqlite, BrokerKind::Mosquitto) => "SQLite + Mosquitto",
        (StoreKind::Postgres, BrokerKind::Mosquitto) => "PostgreSQL + Mosquitto",
        (StoreKind::Sqlite, BrokerKind::Nats) => "SQLite + NATS ×3",
        (StoreKind::Postgres, BrokerKind::Nats) => "PostgreSQL + NATS ×3",
    }
}

fn parse_shapes(text: &str) -> Result<Vec<(StoreKind, BrokerKind)>> {
    text.split(',')
        .map(|s| match s.trim() {
            "sqlite+mosquitto" => Ok((StoreKind::Sqlite, BrokerKind::Mosquitto)),
            "postgres+mosquitto" => Ok((StoreKind::Postgres, BrokerKind::Mosquitto)),
            "sqlite+nats" => Ok((StoreKind::Sqlite, BrokerKind::Nats)),
            "postgres+nats" => Ok((StoreKind::Postgres, BrokerKind::Nats)),
            other => {
                bail!("--shapes: `{other}` is not sqlite+mosquitto, postgres+mosquitto, sqlite+nats or postgres+nats")
            }
        })
        .collect()
}

enum Broker {
    Mosquitto(Mosquitto),
    Nats(NatsCluster),
}

impl Broker {
    fn start(kind: BrokerKind) -> Result<Broker> {
        Ok(match kind {
            // Queues deep enough for a storm at one subscriber.
            BrokerKind::Mosquitto => {
                Broker::Mosquitto(Mosquitto::start_quiet("max_queued_messages 1000000\nmax_inflight_messages 1000")?)
            }
            BrokerKind::Nats => Broker::Nats(NatsCluster::start_plain()?),
        })
    }

    /// The port of the node the `n`th client connects to (the gateway is client 0).
    fn port(&self, n: usize) -> u16 {
        match self {
            Broker::Mosquitto(m) => m.port(),
            Broker::Nats(c) => c.nodes[n % c.nodes.len()].mqtt_port,
        }
    }
}

/// Where to count what the gateway stored.
enum Counter {
    Sqlite(PathBuf),
    Postgres(String),
}

/// The config, and its HTTP port.
fn write_config(
    dir: &Path,
    broker_port: u16,
    hook: &str,
    with_homes_file: bool,
    store: &str,
) -> Result<(PathBuf, u16)> {
    let http = free_port()?;
    let mut c = format!(
        r#"data_dir = "data"
public_url = "http://127.0.0.1:{http}"
link_secret = {{ value = "bench-link-secret" }}
[broker]
host = "127.0.0.1"
port = {broker_port}
client_id = "bench-gateway"
[http]
bind = "127.0.0.1:{http}"
"#
    );
    if with_homes_file {
        c = format!("homes_file = \"homes.toml\"\n{c}");
    }
    for name in ["family", "coord", "facility", "centre"] {
        c.push_str(&format!("[endpoints.{name}]\nurl = \"{hook}/{name}\"\nsecret = {{ value = \"{SECRET}\" }}\n"));
    }
    c.push_str(store);
    let path = dir.join(if with_homes_file { "gateway-with-homes.toml" } else { "gateway.toml" });
    std::fs::write(&path, c)?;
    Ok((path, http))
}

fn telemetry(on_battery: bool, runtime_s: u32) -> Vec<u8> {
    mqtt::encode(&fleet::telemetry(on_battery, runtime_s, PERIOD.as_secs() as u32))
}

fn status() -> Vec<u8> {
    mqtt::encode(&Status {
        state: ConnectionState::Online,
        since: Some(chrono::Utc::now().fixed_offset()),
        agent_version: Some("bench".into()),
        telemetry_interval_s: Some(PERIOD.as_secs() as u32),
        sources: Vec::new(),
        reason: None,
    })
}

fn mains_lost(home: &str, seq: u64) -> Vec<u8> {
    let ts = chrono::Utc::now().to_rfc3339();
    format!(r#"{{"id":"{home}:{seq}","seq":{seq},"ts":"{ts}","kind":"mains_lost","severity":"critical"}}"#).into_bytes()
}

fn topic(home: &str, channel: Channel) -> String {
    HomeId::new(home).expect("home id").topic(channel)
}

/// Connection errors of the benchmark's own publishers (a message they lost would show as a
/// family not paged, and is not the gateway's).
static PUBLISHER_ERRORS: AtomicU64 = AtomicU64::new(0);
/// QoS 1 PUBLISHes the benchmark's publishers sent, and the PUBACKs they were given.
static PUBLISHED_QOS1: AtomicU64 = AtomicU64::new(0);
static PUBACKS: AtomicU64 = AtomicU64::new(0);

/// An MQTT connection for publishing, its event loop driven on the runtime.
async fn publisher(port: u16, name: &str) -> Result<AsyncClient> {
    let mut o = MqttOptions::new(format!("bench-pub-{name}"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(o, 10_000);
    tokio::spawn(async move {
        loop {
            // Errors show up as missing messages in the counts; the broker going away at the
            // end is not worth a line.
            let ev = eventloop.poll().await;
            match &ev {
                Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) if *pkid != 0 => {
                    PUBLISHED_QOS1.fetch_add(1, Ordering::Relaxed);
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                    PUBACKS.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            if let Err(e) = ev {
                if PUBLISHER_ERRORS.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("publisher: {e}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    Ok(client)
}

/// `mosquitto_sub` on the gateway's topics, counting what it receives.
struct Reference {
    child: std::process::Child,
    telemetry: Arc<AtomicU64>,
    other: Arc<AtomicU64>,
}

impl Reference {
    fn start(port: u16) -> Result<Reference> {
        let mut child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-F", "%t", "-i", "bench-reference"])
            .args(["-t", "mamori/v1/+/status", "-t", "mamori/v1/+/telemetry", "-t", "mamori/v1/+/event"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("mosquitto_sub (apt-get install mosquitto-clients)")?;
        let out = child.stdout.take().context("stdout")?;
        let (telemetry, other) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (t, o) = (telemetry.clone(), other.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.ends_with("/telemetry") { &t } else { &o }.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(Reference { child, telemetry, other })
    }
}

impl Drop for Reference {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Rows the gateway stored: telemetry, and status and events (SQLite read-only beside the
/// running gateway, which WAL allows; PostgreSQL on a connection of its own, on a thread of
/// its own since its synchronous client runs its own runtime).
fn stored(at: &Counter) -> Result<(u64, u64)> {
    match at {
        Counter::Sqlite(db) => {
            let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
            let count = |table: &str| -> Result<u64> {
                Ok(c.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get::<_, i64>(0))? as u64)
            };
            Ok((count("telemetry")?, count("status")? + count("events")?))
        }
        Counter::Postgres(settings) => {
            let settings = settings.clone();
            std::thread::spawn(move || -> Result<(u64, u64)> {
                let mut c = postgres::Client::connect(&settings, postgres::NoTls)?;
                let mut count = |table: &str| -> Result<u64> {
                    Ok(c.query_one(&format!("SELECT count(*) FROM {table}"), &[])?.get::<_, i64>(0) as u64)
                };
                Ok((count("telemetry")?, count("status")? + count("events")?))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the PostgreSQL count panicked"))?
        }
    }
}

/// An HTTP GET on loopback (NATS's monitoring port), the body.
fn http_get(port: u16, path: &str) -> Result<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// What the gateway's store holds of one home (its events, alerts and their outbox rows), for
/// a family that was not paged: was the event lost before the store, or after it?
fn trace(at: &Counter, home: &str) -> Result<String> {
    let rows = query(
        at,
        vec![
            format!("SELECT kind || ' seq ' || seq FROM events WHERE home = '{home}'"),
            format!("SELECT kind || coalesce(' cleared ' || cleared_at, ' active') FROM alerts WHERE home = '{home}'"),
            format!(
                "SELECT o.status || ' ' || o.dest FROM outbox o JOIN alerts a ON a.id = o.alert_id WHERE a.home = '{home}'"
            ),
        ],
    )?;
    Ok(format!("events {:?}; alerts {:?}; outbox {:?}", rows[0], rows[1], rows[2]))
}

/// How many of the storm's `mains_lost` events the gateway stored: whether the broker delivered
/// every event, which the pages alone cannot say (an outage whose event is lost is paged from
/// the home's telemetry).
fn stored_outage_events(at: &Counter) -> Result<usize> {
    let rows = query(at, vec!["SELECT home FROM events WHERE kind = 'mains_lost'".to_string()])?;
    Ok(rows[0].iter().collect::<std::collections::BTreeSet<_>>().len())
}

/// Each query's rows, each row its first column as text, read from the gateway's store beside it.
fn query(at: &Counter, queries: Vec<String>) -> Result<Vec<Vec<String>>> {
    match at {
        Counter::Sqlite(db) => {
            let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
            let mut out = Vec::new();
            for q in &queries {
                let mut st = c.prepare(q)?;
                out.push(st.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?);
            }
            Ok(out)
        }
        Counter::Postgres(settings) => {
            let settings = settings.clone();
            std::thread::spawn(move || -> Result<Vec<Vec<String>>> {
                let mut c = postgres::Client::connect(&settings, postgres::NoTls)?;
                let mut out = Vec::new();
                for q in &queries {
                    out.push(c.query(q.as_str(), &[])?.iter().map(|r| r.get::<_, String>(0)).collect());
                }
                Ok(out)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the PostgreSQL query panicked"))?
        }
    }
}

fn spawn_gateway(bin: &Path, config: &Path) -> Result<(Process, Instant)> {
    mamori_tests::gateway_init(bin, config)?;
    let mut cmd = Command::new(bin);
    cmd.arg("run").arg("--config").arg(config).env("RUST_LOG", "info");
    let started = Instant::now();
    let p = Process::spawn("gateway", cmd)?;
    Ok((p, started))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    args::check(&["--homes", "--municipalities", "--shapes", "--storm", "--steady-s", "--burst"], &[])?;
    let n_homes = arg("--homes", 20_000)? as usize;
    let n_munis = arg("--municipalities", 40)? as usize;
    let shapes = parse_shapes(
        &arg_text("--shapes").unwrap_or_else(|| "sqlite+mosquitto,postgres+mosquitto,postgres+nats".into()),
    )?;
    println!("# mamori gateway fleet benchmark\n");
    println!("machine: {}", machine());
    println!(
        "homes {n_homes} in {n_munis} municipalities; telemetry every {} s; storm {}",
        PERIOD.as_secs(),
        arg("--storm", 2_000)?
    );
    let mut table: Vec<(&str, Vec<(&'static str, String)>)> = Vec::new();
    for (store, broker) in shapes {
        let name = shape_name(store, broker);
        println!("\n# {name}");
        let figures = match shape(store, broker).await {
            Ok(f) => f,
            Err(e) => {
                println!("{name}: failed: {e:#}");
                vec![("failed", format!("{e:#}"))]
            }
        };
        table.push((name, figures));
    }
    println!("\n# Side by side\n");
    println!("| measure | {} |", table.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(" | "));
    println!("|---|{}", "---|".repeat(table.len()));
    let mut rows: Vec<&'static str> = Vec::new();
    for (_, f) in &table {
        for (k, _) in f {
            if !rows.contains(k) {
                rows.push(k);
            }
        }
    }
    for row in rows {
        let cells: Vec<String> = table
            .iter()
            .map(|(_, f)| f.iter().find(|(k, _)| *k == row).map_or("–".to_string(), |(_, v)| v.clone()))
            .collect();
        println!("| {row} | {} |", cells.join(" | "));
    }
    Ok(())
}

/// The whole sequence on one shape: its figures for the table.
async fn shape(store_kind: StoreKind, broker_kind: BrokerKind) -> Result<Vec<(&'static str, String)>> {
    let n_homes = arg("--homes", 20_000)? as usize;
    let n_munis = arg("--municipalities", 40)? as usize;
    let steady_s = arg("--steady-s", 60)?;
    let n_storm = arg("--storm", 2_000)? as usize;
    let n_burst = arg("--burst", 100_000)?;
    let bin = gateway_bin()?;
    let work = tempfile::tempdir()?;
    let mut figures: Vec<(&'static str, String)> = Vec::new();

    let broker = Broker::start(broker_kind)?;
    let port = broker.port(0);
    let pg = OffRuntime(match store_kind {
        // The synchronous client runs a runtime of its own: not on this one's threads.
        StoreKind::Postgres => Some(
            std::thread::spawn(TestDb::new).join().map_err(|_| anyhow::anyhow!("creating the database panicked"))??,
        ),
        StoreKind::Sqlite => None,
    });
    let store_toml = pg.0.as_ref().map(TestDb::store_toml).unwrap_or_default();
    let hook = WebhookReceiver::start(SECRET)?;
    let fleet = Fleet::new(n_homes, n_munis);

    // Homes: imported once (the way an operator loads a prefecture), then a config without a
    // homes file, so that a restart only reads the store.
    std::fs::write(work.path().join("homes.toml"), fleet.homes_toml())?;
    let (config, http) = write_config(work.path(), port, &hook.url(), false, &store_toml)?;
    let (with_homes, _) = write_config(work.path(), port, &hook.url(), true, &store_toml)?;
    let t = Instant::now();
    let out = Command::new(&bin)
        .args(["homes", "import", "--config"])
        .arg(&config)
        .arg(work.path().join("homes.toml"))
        .output()?;
    if !out.status.success() {
        bail!("homes import: {}", String::from_utf8_lossy(&out.stderr));
    }
    println!("\n## Load\nhomes import of {n_homes} homes: {:.2} s", t.elapsed().as_secs_f64());
    figures.push(("homes import", format!("{:.2} s", t.elapsed().as_secs_f64())));
    let db = match &pg.0 {
        None => Counter::Sqlite(work.path().join("data").join("mamori.db")),
        Some(pg) => Counter::Postgres(format!(
            "{}{}",
            pg.settings(),
            pg.password().map(|p| format!(" password={p}")).unwrap_or_default()
        )),
    };

    let reference = Reference::start(broker.port(1))?;
    let (mut gw, started) = spawn_gateway(&bin, &config)?;
    gw.wait_line("subscribed", Duration::from_secs(60), |l| l.contains("\"subscribed\""))?;
    println!("gateway start with {n_homes} homes in the store, to subscribed: {:.0} ms", ms(started.elapsed()));

    // 1. Steady fleet.
    let shards = 4;
    let mut clients = Vec::new();
    for s in 0..shards {
        clients.push(publisher(broker.port(s + 1), &s.to_string()).await?);
    }
    for (i, h) in fleet.homes.iter().enumerate() {
        clients[i % shards].publish(topic(h, Channel::Status), QoS::AtLeastOnce, true, status()).await?;
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let on_battery: Arc<Vec<std::sync::atomic::AtomicBool>> =
        Arc::new((0..n_homes).map(|_| std::sync::atomic::AtomicBool::new(false)).collect());
    let published = Arc::new(AtomicU64::new(0));
    let stream = {
        let (clients, homes, stop, paused, on_battery, published) =
            (clients.clone(), fleet.homes.clone(), stop.clone(), paused.clone(), on_battery.clone(), published.clone());
        tokio::spawn(async move {
            // Every home once per period, in slices every 10 ms.
            let slices = (PERIOD.as_millis() / 10) as usize;
            let per_slice = homes.len().div_ceil(slices);
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut slice = 0;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                if paused.load(Ordering::Relaxed) {
                    continue;
                }
                let from = (slice % slices) * per_slice;
                for i in from..(from + per_slice).min(homes.len()) {
                    let b = on_battery[i].load(Ordering::Relaxed);
                    let payload = telemetry(b, 7200 + (i % 50) as u32 * 360);
                    let _ = clients[i % clients.len()]
                        .publish(topic(&homes[i], Channel::Telemetry), QoS::AtMostOnce, false, payload)
                        .await;
                    published.fetch_add(1, Ordering::Relaxed);
                }
                slice += 1;
            }
        })
    };
    // A first period to settle (every home heard once), then the measured window.
    tokio::time::sleep(PERIOD).await;
    let (cpu0, t0) = (cpu_ns(gw.pid()), Instant::now());
    let ref_t0 = reference.telemetry.load(Ordering::Relaxed);
    let (stored_t0, in_t0) = (stored(&db)?.0, ingested(http).await?);
    let pub0 = published.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(steady_s)).await;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = (cpu_ns(gw.pid()) - cpu0) as f64 / 1e9;
    let pub1 = published.load(Ordering::Relaxed);
    let ref_t = reference.telemetry.load(Ordering::Relaxed) - ref_t0;
    let (stored_t, in_t) = (stored(&db)?.0, ingested(http).await?);
    println!("\n## 1. Steady fleet ({steady_s} s)");
    println!(
        "telemetry published {} ({:.0}/s) · mosquitto_sub received {ref_t} · gateway took in {} ({:.1} % of mosquitto_sub, same window) and kept {} history rows",
        pub1 - pub0,
        (pub1 - pub0) as f64 / wall,
        in_t - in_t0,
        100.0 * (in_t - in_t0) as f64 / ref_t.max(1) as f64,
        stored_t - stored_t0,
    );
    println!("gateway CPU {cpu:.1} s in {wall:.1} s ({:.0} % of one core)", 100.0 * cpu / wall);
    println!("notifications during the steady fleet (should be 0): {}", hook.deliveries().len());
    figures.push((
        "steady: gateway took in / `mosquitto_sub` received",
        format!("{} / {} ({:.1} %)", in_t - in_t0, ref_t, 100.0 * (in_t - in_t0) as f64 / ref_t.max(1) as f64),
    ));
    figures.push(("steady: gateway CPU", format!("{:.0} % of one core", 100.0 * cpu / wall)));
    figures.push(("steady: false notifications", hook.deliveries().len().to_string()));

    // 2. Storm.
    let per_muni = n_storm / n_munis;
    let per_home_muni = n_homes.div_ceil(n_munis);
    let mut order = Vec::new();
    for k in 0..per_muni {
        for m in 0..n_munis {
            order.push(m * per_home_muni + k);
        }
    }
    let gap = Duration::from_secs(10) / order.len().max(1) as u32;
    let mut sent_at: HashMap<String, Instant> = HashMap::new();
    let mut third: BTreeMap<String, Instant> = BTreeMap::new();
    let storm_start = Instant::now();
    let storm_client = publisher(broker.port(2), "storm").await?;
    let mut next = Instant::now();
    for (n, &i) in order.iter().enumerate() {
        tokio::time::sleep_until(next.into()).await;
        next += gap;
        let h = &fleet.homes[i];
        on_battery[i].store(true, Ordering::Relaxed);
        storm_client.publish(topic(h, Channel::Event), QoS::AtLeastOnce, false, mains_lost(h, 1)).await?;
        storm_client
            .publish(
                topic(h, Channel::Telemetry),
                QoS::AtMostOnce,
                false,
                telemetry(true, 7200 + (i % 50) as u32 * 360),
            )
            .await?;
        let now = Instant::now();
        sent_at.insert(h.clone(), now);
        if n / n_munis == 2 {
            third.insert(fleet.munis[fleet.muni_of[i]].clone(), now);
        }
    }
    let storm_end = Instant::now();
    let family_for = |ds: &[Delivery], h: &str| {
        ds.iter().any(|d| d.path == "/family" && d.body["home"] == h && kind_of(d) == ("alert", "mains_lost"))
    };
    let all = hook
        .wait("every storm home's family", Duration::from_secs(120), |ds| sent_at.keys().all(|h| family_for(ds, h)));
    let ds = match all {
        Ok(ds) => ds,
        Err(_) => {
            println!("storm: not every family was paged within 120 s");
            hook.deliveries()
        }
    };
    let mut family = Vec::new();
    for (h, at) in &sent_at {
        let first = ds
            .iter()
            .filter(|d| d.path == "/family" && d.body["home"] == h.as_str() && kind_of(d) == ("alert", "mains_lost"))
            .map(|d| d.at)
            .min();
        if let Some(t) = first {
            family.push(ms(t.saturating_duration_since(*at)));
        }
    }
    // A family not paged: what its home's deliveries were instead, to tell a lost event from a
    // page of another kind.
    let mut unpaged: Vec<&String> = sent_at.keys().filter(|h| !family_for(&ds, h)).collect();
    unpaged.sort();
    if !unpaged.is_empty() {
        println!(
            "families not paged for mains_lost: {} (publisher connection errors so far: {}; QoS 1 sent {}, PUBACKs {})",
            unpaged.len(),
            PUBLISHER_ERRORS.load(Ordering::Relaxed),
            PUBLISHED_QOS1.load(Ordering::Relaxed),
            PUBACKS.load(Ordering::Relaxed),
        );
        match http_get(http, "/metrics") {
            Ok(m) => {
                for l in m.lines().filter(|l| l.starts_with("mamori_messages_total") || l.starts_with("mamori_broker"))
                {
                    println!("  gateway {l}");
                }
            }
            Err(e) => println!("  /metrics: {e:#}"),
        }
        let warnings: Vec<String> =
            gw.lines().into_iter().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
        println!("  gateway: {} warnings or errors", warnings.len());
        for l in warnings.iter().take(10) {
            println!("    {}", l.chars().take(300).collect::<String>());
        }
        if let Broker::Nats(c) = &broker {
            for i in 0..c.nodes.len() {
                let warn: Vec<String> =
                    c.log(i).into_iter().filter(|l| l.contains("[WRN]") || l.contains("[ERR]")).collect();
                println!("  NATS n{}: {} warnings or errors", i + 1, warn.len());
                for l in warn.iter().take(8) {
                    println!("    {l}");
                }
            }
            match http_get(c.nodes[0].monitor_port, "/jsz?accounts=true&streams=true&consumers=true") {
                Ok(j) => {
                    let v: serde_json::Value = serde_json::from_str(&j).unwrap_or_default();
                    for a in v["account_details"].as_array().into_iter().flatten() {
                        for st in a["stream_detail"].as_array().into_iter().flatten() {
                            println!("  stream {} state {}", st["name"], st["state"]);
                            for co in st["consumer_detail"].as_array().into_iter().flatten() {
                                println!(
                                    "    consumer {} delivered {} ack_floor {} ack_pending {} redelivered {} pending {}",
                                    co["name"],
                                    co["delivered"],
                                    co["ack_floor"],
                                    co["num_ack_pending"],
                                    co["num_redelivered"],
                                    co["num_pending"]
                                );
                            }
                        }
                    }
                }
                Err(e) => println!("  jsz: {e:#}"),
            }
        }
        for h in unpaged.iter().take(20) {
            let got: Vec<String> = ds
                .iter()
                .filter(|d| d.body["home"] == h.as_str())
                .map(|d| format!("{} {:?}", d.path, kind_of(d)))
                .collect();
            println!("  {h}: {}", if got.is_empty() { "nothing".to_string() } else { got.join(", ") });
            println!("    store: {}", trace(&db, h).unwrap_or_else(|e| format!("{e:#}")));
            for l in gw.lines().iter().filter(|l| l.contains(h.as_str())).take(5) {
                println!("    log: {l}");
            }
        }
    }
    let hook_ok = hook.wait("every coordinator's digest", Duration::from_secs(60), |ds| {
        third.keys().all(|m| ds.iter().any(|d| d.path == "/coord" && d.body["content"]["municipality"] == m.as_str()))
    });
    let ds = hook_ok.unwrap_or_else(|_| hook.deliveries());
    let mut coord = Vec::new();
    let mut last_coord = storm_start;
    for (m, at) in &third {
        let first = ds
            .iter()
            .filter(|d| {
                d.path == "/coord" && kind_of(d).0 == "incident" && d.body["content"]["municipality"] == m.as_str()
            })
            .map(|d| d.at)
            .min();
        if let Some(t) = first {
            coord.push(ms(t.saturating_duration_since(*at)));
            last_coord = last_coord.max(t);
        }
    }
    println!("\n## 2. Storm: {} outages in {:.1} s", order.len(), (storm_end - storm_start).as_secs_f64());
    let n_family = family.len();
    figures.push(("storm: outage → family (ms)", summary("mains_lost published → family webhook", family)));
    figures.push(("storm: families paged", format!("{n_family} of {}", order.len())));
    figures.push((
        "storm: third outage → coordinator's digest (ms)",
        summary("third outage of a municipality → its coordinator's first incident digest", coord.clone()),
    ));
    println!(
        "coordinators with a digest: {} of {}; the last one {:+.0} ms from the storm's last outage",
        coord.len(),
        third.len(),
        if last_coord >= storm_end { ms(last_coord - storm_end) } else { -ms(storm_end - last_coord) }
    );
    let coord_direct = ds.iter().filter(|d| d.path == "/coord" && kind_of(d).0 == "alert").count();
    println!("per-home alerts sent to coordinators during the storm (incidents replace them): {coord_direct}");
    let from_telemetry = gw
        .lines()
        .iter()
        .filter(|l| l.contains("alert raised from the home's telemetry") && l.contains("mains_lost"))
        .count();
    println!("outages raised from a home's telemetry (before their event, or without one): {from_telemetry}");
    figures.push(("storm: outages raised from telemetry", from_telemetry.to_string()));
    // Whether the broker delivered every outage's event (a lost one is paged from telemetry,
    // so the pages do not tell): up to 30 s more for the last to come.
    let deadline = Instant::now() + Duration::from_secs(30);
    let events = loop {
        let n = stored_outage_events(&db);
        match n {
            Ok(n) if n < order.len() && Instant::now() < deadline => std::thread::sleep(Duration::from_millis(500)),
            _ => break n,
        }
    };
    let events = match events {
        Ok(n) => format!("{n} of {}", order.len()),
        Err(e) => format!("not counted: {e:#}"),
    };
    println!("storm events the gateway received (stored), within 30 s of the last page: {events}");
    figures.push(("storm: outage events received", events));
    println!("deliveries so far {} · signatures bad {}", ds.len(), ds.iter().filter(|d| !d.signature_ok).count());

    // 3. Burst.
    // The fleet pauses (for less than the staleness limit, 3 periods) so that only the
    // burst is counted.
    paused.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let burst_client = publisher(broker.port(3), "burst").await?;
    let payloads: Vec<(String, Vec<u8>)> = (0..n_burst as usize)
        .map(|k| {
            let i = k % n_homes;
            let b = on_battery[i].load(Ordering::Relaxed);
            (topic(&fleet.homes[i], Channel::Telemetry), telemetry(b, 7200 + (i % 50) as u32 * 360))
        })
        .collect();
    let (ref0, st0) = (reference.telemetry.load(Ordering::Relaxed), ingested(http).await?);
    let t = Instant::now();
    for (topic, payload) in payloads {
        burst_client.publish(topic, QoS::AtMostOnce, false, payload).await?;
    }
    let publish_s = t.elapsed().as_secs_f64();
    // Wait until both have stopped growing.
    let (mut last, mut quiet_since) = ((0, 0), Instant::now());
    let (mut ref_done, mut gw_done) = (t, t);
    let deadline = Deadline::after(Duration::from_secs(300));
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = (reference.telemetry.load(Ordering::Relaxed), ingested(http).await?);
        if now.0 != last.0 {
            ref_done = Instant::now();
        }
        if now.1 != last.1 {
            gw_done = Instant::now();
        }
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
        if quiet_since.elapsed() > Duration::from_secs(3) || deadline.check("burst").is_err() {
            break;
        }
    }
    paused.store(false, Ordering::Relaxed);
    let (ref_n, gw_n) = (last.0 - ref0, last.1 - st0);
    println!(
        "\n## 3. Burst: {n_burst} telemetry messages queued by one connection in {publish_s:.1} s (the fleet paused)"
    );
    println!(
        "mosquitto_sub: {ref_n} in {:.1} s ({:.0}/s) · gateway took in: {gw_n} in {:.1} s ({:.0}/s), {:.1} % of mosquitto_sub",
        (ref_done - t).as_secs_f64(),
        ref_n as f64 / (ref_done - t).as_secs_f64(),
        (gw_done - t).as_secs_f64(),
        gw_n as f64 / (gw_done - t).as_secs_f64(),
        100.0 * gw_n as f64 / ref_n.max(1) as f64
    );
    figures.push((
        "burst: `mosquitto_sub` / gateway intake",
        format!(
            "{:.0} / {:.0} msg/s ({:.1} % of the messages)",
            ref_n as f64 / (ref_done - t).as_secs_f64(),
            gw_n as f64 / (gw_done - t).as_secs_f64(),
            100.0 * gw_n as f64 / ref_n.max(1) as f64
        ),
    ));

    // 4. Memory.
    println!("\n## 4. Memory");
    println!(
        "gateway VmRSS {} kB, VmHWM (peak) {} kB (target: <= 307200 kB)",
        status_kb(gw.pid(), "VmRSS:"),
        status_kb(gw.pid(), "VmHWM:")
    );
    figures.push((
        "gateway memory (VmRSS / VmHWM)",
        format!("{} / {} kB", status_kb(gw.pid(), "VmRSS:"), status_kb(gw.pid(), "VmHWM:")),
    ));

    // 5. Restart.
    gw.kill9()?;
    let i = per_muni + 10; // a home that was not in the storm
    let h = fleet.homes[i].clone();
    on_battery[i].store(true, Ordering::Relaxed);
    storm_client.publish(topic(&h, Channel::Event), QoS::AtLeastOnce, false, mains_lost(&h, 1)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await; // at the broker, queued for the gateway's session
    let (gw2, started) = spawn_gateway(&bin, &config)?;
    gw2.wait_line("ready", Duration::from_secs(60), |l| l.starts_with("ready "))?;
    let ready = started.elapsed();
    gw2.wait_line("subscribed", Duration::from_secs(60), |l| l.contains("\"subscribed\""))?;
    let subscribed = started.elapsed();
    let d = hook.wait(
        "the family of the home that lost mains while the gateway was down",
        Duration::from_secs(60),
        |ds| family_for(ds, &h),
    )?;
    let notified = d
        .iter()
        .filter(|x| x.path == "/family" && x.body["home"] == h.as_str() && kind_of(x) == ("alert", "mains_lost"))
        .map(|x| x.at)
        .min()
        .map(|t| t.saturating_duration_since(started))
        .unwrap_or_default();
    println!("\n## 5. Restart after SIGKILL with {n_homes} homes and {} open alerts", n_storm + 1);
    println!(
        "process start → ready {:.0} ms · → subscribed {:.0} ms · → the queued outage's family notified {:.0} ms",
        ms(ready),
        ms(subscribed),
        ms(notified)
    );
    let mut seen: HashMap<&str, u32> = HashMap::new();
    for x in d.iter().filter(|x| x.accepted) {
        *seen.entry(x.key.as_str()).or_default() += 1;
    }
    println!("notification keys received more than once: {}", seen.values().filter(|&&n| n > 1).count());
    figures.push((
        "restart after SIGKILL → subscribed / queued outage paged",
        format!("{:.0} / {:.0} ms", ms(subscribed), ms(notified)),
    ));
    figures.push(("notification keys received twice", seen.values().filter(|&&n| n > 1).count().to_string()));
    drop(gw2);

    // For information: a start that also parses the homes file.
    let (gw3, started) = spawn_gateway(&bin, &with_homes)?;
    gw3.wait_line("subscribed", Duration::from_secs(120), |l| l.contains("\"subscribed\""))?;
    println!("a start that also imports the {n_homes}-home file, to subscribed: {:.0} ms", ms(started.elapsed()));
    drop(gw3);
    stop.store(true, Ordering::Relaxed);
    let _ = stream.await;
    let refs = reference.other.load(Ordering::Relaxed);
    println!("\n(reference subscriber also saw {refs} status and event messages)");
    drop(reference);
    drop(broker);
    Ok(figures)
}

/// A test database dropped on a thread of its own, however the benchmark ends (its synchronous
/// client cannot run on the runtime's threads).
struct OffRuntime(Option<TestDb>);

impl Drop for OffRuntime {
    fn drop(&mut self) {
        if let Some(db) = self.0.take() {
            let _ = std::thread::spawn(move || drop(db)).join();
        }
    }
}
