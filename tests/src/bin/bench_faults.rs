//! `bench-faults`: paging under everyday faults. Not a test: it prints figures for
//! `docs/benchmarks.md`.
//!
//! ```sh
//! cargo build --release -p mamori-gateway -p mamori-tests
//! target/release/bench-faults [--only disk,broker,hung,viewers] [--rows 100000] [--homes 1000] [--viewers 200] [--fleet 2000] [--pages 50]
//! ```
//!
//! Everything is real: a Mosquitto started here, the release `mamori-gateway` with its SQLite
//! store, webhook receivers over HTTP, and for part 1 a receiver that accepts connections and
//! never answers.
//!
//! 0. **Disk**: what one stored telemetry snapshot costs, and so the history of a 2,000-home
//!    fleet at the default retention.
//! 0. **The broker's persistence**: what a `kill -9` of Mosquitto loses of what it had
//!    acknowledged, with the generated config and with the one before, and what saving on
//!    every change costs.
//! 1. **A hung family endpoint**: `--homes` homes (no regional incident: each is paged on its
//!    own) lose mains at once; every family's webhook accepts and never answers. Policy: the
//!    family at once, the coordinator 5 s later. For each home: the time from its outage to
//!    the coordinator's page (target: within the policy's 5 s + 5 s), to the fallback for the
//!    family, and to the `delivery_failed` alert.
//! 2. **Dashboard viewers**: a fleet of `--fleet` homes sends telemetry every 10 s (so the
//!    dashboard's snapshot changes four times a second), `--viewers` live streams are open
//!    (one logged-in coordinator who sees every home), and `--pages` homes lose mains one by
//!    one: the time from each outage to the family's webhook, with no viewer and with them
//!    (target: p99 ≤ 100 ms), and the gateway's CPU.

#![allow(clippy::disallowed_methods)] // a benchmark reads the clock: that is its job
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mamori_tests::args::{self, arg, arg_text};
use mamori_tests::fleet::gateway_bin;
use mamori_tests::process::Process;
use mamori_tests::procfs::{cpu_ns, machine, percentile};
use mamori_tests::stall::{Mode, Stall};
use mamori_tests::webhook::WebhookReceiver;
use mamori_tests::{free_port, municipality_code, Deadline, Mosquitto};

const SECRET: &str = "bench-hook-secret";

fn home(i: usize) -> String {
    format!("f{i:05}")
}

/// A deployment: `homes` homes over `munis` municipalities, the family's and coordinator's
/// webhooks at the given bases.
fn deployment(
    dir: &Path,
    broker: u16,
    homes: usize,
    munis: usize,
    family: &str,
    coord: &str,
    extra: &str,
) -> Result<(PathBuf, u16)> {
    let mut h = String::with_capacity(homes * 500);
    for i in 0..homes {
        h += &format!(
            r#"[[home]]
id = "{id}"
municipality = "{m}"
label = "F-{i:05}"
devices = [{{ name = "ventilator", watts = 25 }}, {{ name = "humidifier", watts = 60 }}]
backup = [{{ kind = "power_station", nameplate_wh = 1000 }}]
contacts = [
  {{ role = "family", name = "家族", channels = [{{ webhook = "family" }}] }},
  {{ role = "coordinator", name = "コーディネーター", channels = [{{ webhook = "coord" }}] }},
]
"#,
            id = home(i),
            m = municipality_code(i % munis)
        );
    }
    std::fs::write(dir.join("homes.toml"), h)?;
    let http = free_port()?;
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "data"
homes_file = "homes.toml"
public_url = "http://127.0.0.1:{http}"
link_secret = {{ value = "bench-link-secret-bench" }}
[broker]
host = "127.0.0.1"
port = {broker}
client_id = "bench-faults"
[http]
bind = "127.0.0.1:{http}"
secure_cookies = false
[escalation]
default_interval_s = 3600
incident_min_homes = 100000
[policy.default]
steps = [
  {{ tier = "T0", roles = ["family"], escalate_after_s = 5 }},
  {{ tier = "T1", roles = ["coordinator"] }},
]
[endpoints.family]
url = "{family}/family"
secret = {{ value = "{SECRET}" }}
[endpoints.coord]
url = "{coord}/coord"
secret = {{ value = "{SECRET}" }}
{extra}"#
        ),
    )?;
    Ok((config, http))
}

fn start(bin: &Path, config: &Path) -> Result<Process> {
    mamori_tests::gateway_init(bin, config)?;
    let mut cmd = Command::new(bin);
    let log = std::env::var("MAMORI_BENCH_LOG").unwrap_or_else(|_| "warn,mamori_gateway::edge::mqtt=info".into());
    cmd.args(["run", "--config"]).arg(config).env("RUST_LOG", log);
    let p = Process::spawn("gateway", cmd)?;
    p.wait_line("subscribed", Duration::from_secs(60), |l| l.contains("\"subscribed\""))?;
    Ok(p)
}

fn outage(i: usize, seq: u64) -> (String, Vec<u8>) {
    let ts = chrono::Utc::now().to_rfc3339();
    let id = home(i);
    let body = format!(r#"{{"id":"{id}:{seq}","seq":{seq},"ts":"{ts}","kind":"mains_lost","severity":"critical"}}"#);
    (format!("mamori/v1/{id}/event"), body.into_bytes())
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn table(name: &str, mut v: Vec<f64>) {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        println!("| {name} | none |||| ");
        return;
    }
    println!(
        "| {name} | {} | {:.2} | {:.2} | {:.2} |",
        v.len(),
        percentile(&v, 50.0),
        percentile(&v, 99.0),
        v.last().copied().unwrap_or(0.0)
    );
}

fn hung_family_endpoint(bin: &Path, homes: usize) -> Result<()> {
    let broker = Mosquitto::start_quiet("max_queued_messages 1000000\nmax_inflight_messages 1000")?;
    let hung = Stall::start(Mode::Silent)?;
    let coord = WebhookReceiver::start(SECRET)?;
    let dir = tempfile::tempdir()?;
    let (config, _) = deployment(dir.path(), broker.port(), homes, 50, &hung.url(), &coord.url(), "")?;
    let _gw = start(bin, &config)?;
    let msgs: Vec<(String, Vec<u8>)> = (0..homes).map(|i| outage(i, 1)).collect();
    let published = Instant::now();
    mamori_tests::publish(broker.port(), &msgs)?;
    let took = published.elapsed();
    let d = coord.wait("every coordinator page, fallback and delivery_failed", Duration::from_secs(600), |d| {
        let n = |pred: &dyn Fn(&mamori_tests::webhook::Delivery) -> bool| d.iter().filter(|x| pred(x)).count();
        n(&|x| x.key.contains(":s1:") && x.body["content"]["kind"] == "mains_lost") >= homes
            && n(&|x| x.key.contains(":fallback")) >= homes
            && n(&|x| x.body["content"]["kind"] == "delivery_failed") >= homes
    })?;
    let after = |pred: &dyn Fn(&mamori_tests::webhook::Delivery) -> bool| -> Vec<f64> {
        d.iter().filter(|x| pred(x)).map(|x| secs(x.at.duration_since(published))).collect()
    };
    println!("\n### A hung family endpoint: {homes} homes lose mains at once (published in {:.2} s)\n", secs(took));
    println!("Every family's webhook accepts the connection and never answers (attempt deadline 5 s, 8 slots per destination, breaker after 5 failures in a row). Policy: family at once, coordinator 5 s later.\n");
    println!("| from the outages to | n | p50 s | p99 s | max s |\n|---|---|---|---|---|");
    table(
        "the coordinator's page (policy: 5 s)",
        after(&|x| x.key.contains(":s1:") && x.body["content"]["kind"] == "mains_lost"),
    );
    table("the fallback to the coordinator", after(&|x| x.key.contains(":fallback")));
    table("the `delivery_failed` alert", after(&|x| x.body["content"]["kind"] == "delivery_failed"));
    println!("\nConnections the hung endpoint received: {}", hung.connections());
    if let Ok(path) = std::env::var("MAMORI_BENCH_DUMP") {
        std::fs::write(path, _gw.lines().join("\n"))?;
    }
    Ok(())
}

/// Log in as `user` and return the session cookie.
fn login(http: u16, user: &str, password: &str) -> Result<String> {
    let get = request(http, "GET /login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let nonce = get
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: mamori_login=").or_else(|| l.strip_prefix("Set-Cookie: mamori_login="))
        })
        .and_then(|v| v.split(';').next())
        .context("login cookie")?
        .to_string();
    let body = format!("username={user}&password={password}&code=&csrf={nonce}&next=%2F");
    let post = request(
        http,
        &format!(
            "POST /login HTTP/1.1\r\nHost: x\r\nConnection: close\r\nCookie: mamori_login={nonce}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )?;
    post.lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: mamori_session=").or_else(|| l.strip_prefix("Set-Cookie: mamori_session="))
        })
        .and_then(|v| v.split(';').next())
        .map(str::to_string)
        .with_context(|| format!("no session: {}", post.lines().next().unwrap_or_default()))
}

fn request(http: u16, req: &str) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", http))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(req.as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// A live stream held open, counting the events it gets.
fn viewer(http: u16, session: &str, events: Arc<AtomicU64>, stop: Arc<AtomicBool>) -> Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", http))?;
    write!(
        s,
        "GET /events HTTP/1.1\r\nHost: x\r\nCookie: mamori_session={session}\r\nAccept: text/event-stream\r\n\r\n"
    )?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) if line.starts_with("event: change") => {
                events.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
    Ok(())
}

fn viewers(bin: &Path, fleet: usize, n_viewers: usize, pages: usize) -> Result<()> {
    let broker = Mosquitto::start_quiet("max_queued_messages 1000000\nmax_inflight_messages 1000")?;
    let hook = WebhookReceiver::start(SECRET)?;
    let dir = tempfile::tempdir()?;
    let munis = 10;
    let (config, http) = deployment(dir.path(), broker.port(), fleet, munis, &hook.url(), &hook.url(), "")?;
    let gw = start(bin, &config)?;
    // One coordinator who sees every home.
    let mut add = Command::new(bin);
    add.args(["users", "add", "--config"]).arg(&config).args(["watcher", "--role", "coordinator"]);
    for m in 0..munis {
        add.args(["--municipality", &municipality_code(m)]);
    }
    let mut child = add.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::null()).spawn()?;
    writeln!(child.stdin.take().context("stdin")?, "bench-viewer-password")?;
    anyhow::ensure!(child.wait()?.success(), "users add");
    let session = login(http, "watcher", "bench-viewer-password")?;

    // The fleet's telemetry: every home every 10 s, spread evenly.
    let stop = Arc::new(AtomicBool::new(false));
    let (port, s2) = (broker.port(), stop.clone());
    let feeder = std::thread::spawn(move || -> Result<()> {
        let mut o = rumqttc::MqttOptions::new("bench-fleet", "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut conn) = rumqttc::Client::new(o, 10_000);
        std::thread::spawn(move || for _ in conn.iter() {});
        let every = Duration::from_secs(10).div_f64(fleet as f64);
        let mut i = 0usize;
        let start = Instant::now();
        while !s2.load(Ordering::Relaxed) {
            let ts = chrono::Utc::now().to_rfc3339();
            let spo2 = 95 + (i / fleet) % 4;
            let body = format!(
                r#"{{"ts":"{ts}","interval_s":10,"mains_present":true,"oximeter":{{"spo2_pct":{spo2},"pulse_bpm":90}}}}"#
            );
            let _ = client.publish(
                format!("mamori/v1/{}/telemetry", home(i % fleet)),
                rumqttc::QoS::AtMostOnce,
                false,
                body,
            );
            i += 1;
            if let Some(wait) = (every * i as u32).checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(())
    });
    std::thread::sleep(Duration::from_secs(12)); // one whole telemetry period before measuring

    let measure = |label: &str, first: usize| -> Result<(Vec<f64>, f64)> {
        let cpu0 = cpu_ns(gw.pid());
        let t0 = Instant::now();
        let mut lat = Vec::new();
        for k in 0..pages {
            let i = first + k;
            let before = hook.deliveries().len();
            let sent = Instant::now();
            mamori_tests::publish(broker.port(), &[outage(i, 1)])?;
            let id = home(i);
            let d = hook
                .wait(label, Duration::from_secs(30), |d| d[before..].iter().any(|x| x.body["home"] == id.as_str()))?;
            let got = d[before..].iter().find(|x| x.body["home"] == id.as_str()).map(|x| x.at).context("page")?;
            lat.push(got.duration_since(sent).as_secs_f64() * 1000.0);
            std::thread::sleep(Duration::from_millis(200));
        }
        let cpu = (cpu_ns(gw.pid()) - cpu0) as f64 / 1e9 / t0.elapsed().as_secs_f64();
        Ok((lat, cpu))
    };
    let (alone, cpu_alone) = measure("a family's page, no viewer", 0)?;
    let events = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for _ in 0..n_viewers {
        let (e, s, session) = (events.clone(), stop.clone(), session.clone());
        threads.push(std::thread::spawn(move || viewer(http, &session, e, s)));
    }
    let deadline = Deadline::after(Duration::from_secs(60));
    while events.load(Ordering::Relaxed) < n_viewers as u64 {
        deadline.check("every viewer's stream to deliver a change")?;
        std::thread::sleep(Duration::from_millis(100));
    }
    let (watched, cpu_watched) = measure("a family's page, with viewers", pages)?;
    let streamed = events.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let _ = feeder.join();
    for t in threads {
        let _ = t.join();
    }
    println!("\n### Dashboard viewers: a fleet of {fleet} homes (telemetry every 10 s), {pages} outages one by one\n");
    println!(
        "| live streams open | pages | p50 ms | p99 ms | max ms | gateway CPU (cores) |\n|---|---|---|---|---|---|"
    );
    for (n, lat, cpu) in [(0, alone, cpu_alone), (n_viewers, watched, cpu_watched)] {
        let mut v = lat;
        v.sort_by(f64::total_cmp);
        println!(
            "| {n} | {} | {:.1} | {:.1} | {:.1} | {cpu:.2} |",
            v.len(),
            percentile(&v, 50.0),
            percentile(&v, 99.0),
            v.last().copied().unwrap_or(0.0)
        );
    }
    println!("\nChange events the streams received: {streamed}");
    drop(gw);
    Ok(())
}

/// What a stored telemetry snapshot costs on disk: a realistic snapshot (UPS, oximeter,
/// devices, conditions, clocks) stored `rows` times through the store, its file measured.
fn disk_budget(rows: usize) -> Result<()> {
    use mamori_gateway::edge::store::{SqliteStore, Store};
    use mamori_protocol::mqtt::{self, HomeId, Telemetry};
    let sample = br#"{"ts":"2026-11-22T03:04:05.250+09:00","interval_s":10,"mains_present":true,
      "ups":{"on_battery":false,"battery_low":false,"input_voltage_v":101.2,"output_voltage_v":100.0,"load_pct":23.0,
      "battery_voltage_v":27.1,"battery_charge_pct":100.0,"runtime_s":5400,"temperature_c":31.0,"frequency_hz":50.0,"ups_fault":false},
      "oximeter":{"spo2_pct":97,"pulse_bpm":92,"perfusion_index":3.1,"sensor_off":false,"alarm_active":false,"alarm_silenced":false},
      "ventilator":{"alarm":"normal"},
      "devices":[{"id":"ups","kind":"ups","state":"ok"},{"id":"oximeter","kind":"oximeter","state":"ok"},{"id":"bridge","kind":"bridge","state":"ok"}],
      "spool":{"pending_events":0,"degraded":false},
      "conditions":{"mains_lost":false,"battery_low":false,"device_lost":false,"spo2_low":false,"pulse_out_of_range":false,"ventilator_alarm":false},
      "clock":{"boot":"5c8a0f2e-1b7d-4c1a-9e53-0d7f3a2b9c41","uptime_ms":86400250,"synced":true}}"#;
    let t: Telemetry = mqtt::decode(sample)?;
    let dir = tempfile::tempdir()?;
    let mut store = SqliteStore::open(dir.path())?;
    let size = |d: &Path| -> u64 {
        ["mamori.db", "mamori.db-wal"].iter().filter_map(|f| std::fs::metadata(d.join(f)).ok()).map(|m| m.len()).sum()
    };
    let before = size(dir.path());
    let homes: Vec<HomeId> = (0..2000).map(|i| HomeId::new(&home(i)).unwrap()).collect();
    let now = chrono::Utc::now();
    for chunk in 0..rows / 1000 {
        let tx = store.begin()?;
        for k in 0..1000 {
            let n = chunk * 1000 + k;
            store.insert_telemetry(&tx, &homes[n % homes.len()], &t, now + chrono::Duration::seconds(n as i64))?;
        }
        store.commit(tx)?;
    }
    store.conn().execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
    let per_row = (size(dir.path()) - before) as f64 / rows as f64;
    let fleet_rows = 2000.0 * 60.0 * 48.0;
    println!("\n### Disk: the telemetry history\n");
    println!("{rows} realistic snapshots stored through the store: {per_row:.0} bytes each on disk (row, payload and both indexes).\n");
    println!("| fleet | stored | retention | rows | disk |\n|---|---|---|---|---|");
    println!("| 2,000 homes | one snapshot per home per minute (`telemetry_history_every_s = 60`) | 48 h | {:.2} M | {:.2} GB |", fleet_rows / 1e6, fleet_rows * per_row / 1e9);
    Ok(())
}

/// What a `kill -9` of the broker loses, and what saving on every change costs: `n` QoS 1
/// messages published (each acknowledged by the broker) to a session that is away, the broker
/// killed at once and restarted, the session's messages counted.
fn broker_persistence(n: usize) -> Result<()> {
    let generated: String = mamori_gateway::admin::pki::mosquitto_service(Path::new("/unused"))
        .lines()
        .filter(|l| !l.starts_with("persistence"))
        .map(|l| format!("{l}\n"))
        .collect();
    let before = "autosave_interval 10\nmax_queued_messages 1000000\n".to_string();
    println!("\n### The broker's persistence: {n} outages acknowledged to agents, then `kill -9`\n");
    println!("The gateway's session is away (its messages queue at the broker); each message is a QoS 1 PUBLISH the broker acknowledged.\n");
    println!("| Mosquitto config | published and acknowledged in | survived `kill -9` |\n|---|---|---|");
    for (label, service) in [
        ("generated: `autosave_on_changes true`, `autosave_interval 1`", generated),
        ("before: `autosave_interval 10`", before),
    ] {
        let mut broker = Mosquitto::start_quiet_with(|port, _| {
            format!("listener {port} 127.0.0.1\nallow_anonymous true\n{service}")
        })?;
        let session = |port: u16| -> Result<(rumqttc::Client, rumqttc::Connection)> {
            let mut o = rumqttc::MqttOptions::new("bench-session", "127.0.0.1", port);
            o.set_clean_session(false);
            o.set_keep_alive(Duration::from_secs(30));
            let (c, conn) = rumqttc::Client::new(o, 10_000);
            c.subscribe("mamori/v1/+/event", rumqttc::QoS::AtLeastOnce)?;
            Ok((c, conn))
        };
        let (c, mut conn) = session(broker.port())?;
        for ev in conn.iter() {
            if matches!(ev?, rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) {
                break;
            }
        }
        c.disconnect()?;
        for ev in conn.iter() {
            if ev.is_err() {
                break;
            }
        }
        let msgs: Vec<(String, Vec<u8>)> = (0..n).map(|i| outage(i, 1)).collect();
        let t0 = Instant::now();
        mamori_tests::publish(broker.port(), &msgs)?;
        let took = t0.elapsed();
        broker.kill9()?;
        broker.resume()?;
        let (c, conn) = session(broker.port())?;
        let got = Arc::new(AtomicU64::new(0));
        let g = got.clone();
        let reader = std::thread::spawn(move || {
            let mut conn = conn;
            for ev in conn.iter() {
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(_))) => {
                        g.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => return,
                    _ => {}
                }
            }
        });
        let mut last = (u64::MAX, Instant::now());
        while last.1.elapsed() < Duration::from_secs(3) {
            let now = got.load(Ordering::Relaxed);
            if now != last.0 {
                last = (now, Instant::now());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = c.disconnect();
        let _ = reader.join();
        println!("| {label} | {:.2} s | {} of {n} |", secs(took), got.load(Ordering::Relaxed));
    }
    Ok(())
}

fn main() -> Result<()> {
    args::check(&["--only", "--rows", "--homes", "--viewers", "--fleet", "--pages"], &[])?;
    let bin = gateway_bin()?;
    println!("## bench-faults\n\n{}", machine());
    let only = arg_text("--only");
    let run = |part: &str| only.as_deref().is_none_or(|o| o.split(',').any(|p| p == part));
    if run("disk") {
        disk_budget(arg("--rows", 100_000)? as usize)?;
    }
    if run("broker") {
        for n in [50, 2000] {
            broker_persistence(n)?;
        }
    }
    if run("hung") {
        hung_family_endpoint(&bin, arg("--homes", 1000)? as usize)?;
    }
    if run("viewers") {
        viewers(&bin, arg("--fleet", 2000)? as usize, arg("--viewers", 200)? as usize, arg("--pages", 50)? as usize)?;
    }
    Ok(())
}
