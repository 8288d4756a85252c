//! The everyday faults, over real parts: the real `mamori-gateway` binary, a Mosquitto the test
//! starts on a free port, receivers that hang, trickle or refuse, a full disk, a missing data
//! volume, wrong clocks, the centre's own downtime. Each test says who was paged, and that
//! nobody was paged falsely. Every wait is for a condition, with a deadline.
#![allow(clippy::disallowed_methods)] // the tests measure delays with their own clock

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mamori_testkit::process::Process;
use mamori_testkit::stall::{Mode, Stall};
use mamori_testkit::webhook::{Delivery, WebhookReceiver};
use mamori_testkit::{publish, Deadline, Mosquitto};

const BIN: &str = env!("CARGO_BIN_EXE_mamori-gateway");
const LIMIT: Duration = Duration::from_secs(30);

use mamori_testkit::site::{event, home_id, homes_paged, http_get, kind_of, now_ts, outages, site, step_of, Plan};

fn init(config: &Path) -> Result<()> {
    mamori_testkit::site::init(Path::new(BIN), config)
}

fn start(config: &Path) -> Result<Process> {
    mamori_testkit::site::start(Path::new(BIN), config)
}

#[test]
fn a_hung_relay_a_hung_webhook_and_a_trickling_gateway_stall_no_one_else() -> Result<()> {
    let broker = Mosquitto::start("")?;
    let coord = WebhookReceiver::start("hook-secret")?;
    let hung_webhook = Stall::start(Mode::Silent)?;
    let trickle = Stall::start(Mode::TrickleHttp)?;
    let hung_relay = Stall::start(Mode::SmtpHangAfterGreeting)?;
    let homes = 20;
    let extra = format!(
        r#"[delivery]
timeout_ms = 1500
backoff_initial_ms = 200
backoff_max_ms = 1000
fallback_after_failures = 2
concurrency = 8
per_destination = 2
[smtp]
host = "127.0.0.1"
port = {relay}
tls = "none"
from = "mamori@example.jp"
[endpoints.sms]
kind = "sms"
url = "{trickle}/sms"
secret = {{ value = "k" }}
template = '{{"to":"{{to}}","text":"{{text}}"}}'
"#,
        relay = hung_relay.port(),
        trickle = trickle.url()
    );
    let s = site(
        broker.port(),
        &hung_webhook.url(),
        &coord.url(),
        &Plan {
            homes,
            family_channels: r#", { email = "fam{i}@example.jp" }, { sms = "+8190000{i}" }"#,
            extra: &extra,
            steps: r#"{ tier = "T0", roles = ["family"], escalate_after_s = 2 }, { tier = "T1", roles = ["coordinator"] }"#,
            // Each home is paged on its own (no regional incident digest).
            escalation: "incident_min_homes = 1000",
            ..Plan::default()
        },
    )?;
    init(&s.config)?;
    let gw = start(&s.config)?;
    let published = Instant::now();
    publish(broker.port(), &outages(homes, 1))?;
    // Every family's three channels hang or trickle; the coordinator's page (policy: 2 s after
    // the family) still arrives for every home.
    let d = coord.wait("the coordinator paged for every home", LIMIT, |d| {
        homes_paged(d, "/coord", |x| step_of(x) == Some(1) && kind_of(x) == "mains_lost").len() == homes
    })?;
    let last = d.iter().filter(|x| step_of(x) == Some(1)).map(|x| x.at).max().unwrap_or(published);
    eprintln!("coordinator paged for {homes} homes {:?} after the outages", last.duration_since(published));
    // And because the families cannot be reached: the fallback and delivery_failed.
    coord.wait("fallbacks and delivery_failed for every home", LIMIT, |d| {
        homes_paged(d, "/coord", |x| x.key.contains(":fallback")).len() == homes
            && homes_paged(d, "/coord", |x| kind_of(x) == "delivery_failed").len() == homes
    })?;
    // Every hung attempt ended at its deadline and was said so.
    gw.wait_line("an SMTP attempt timed out", LIMIT, |l| l.contains("smtp: no complete answer within 1500 ms"))?;
    gw.wait_line("a webhook attempt timed out", LIMIT, |l| l.contains("webhook:family: no complete answer"))?;
    gw.wait_line("an SMS attempt timed out", LIMIT, |l| l.contains("sms: no complete answer within 1500 ms"))?;
    // Each failing destination got at most its share at once, and was tried again later.
    assert!(hung_relay.connections() > 2 && hung_webhook.connections() > 2, "retried after the deadlines");
    drop(s.dir);
    Ok(())
}

#[test]
fn run_refuses_an_empty_data_dir_and_a_store_that_is_not_the_brokers_and_loses_nothing() -> Result<()> {
    let broker = Mosquitto::start("")?;
    let hook = WebhookReceiver::start("hook-secret")?;
    let s = site(broker.port(), &hook.url(), &hook.url(), &Plan { homes: 10, ..Plan::default() })?;
    // The data volume not mounted: an empty data_dir. `run` creates nothing and says why.
    let out = Command::new(BIN).args(["run", "--config"]).arg(&s.config).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no database") && err.contains("mount") && err.contains("mamori-gateway init"), "{err}");
    assert!(!s.dir.path().join("data/mamori.db").exists(), "nothing created");

    // The real store: initialised, run once (the broker now keeps its session), stopped.
    init(&s.config)?;
    let mut gw = start(&s.config)?;
    gw.terminate(LIMIT)?;
    // Ten outages while the gateway is away: queued at the broker for its session.
    publish(broker.port(), &outages(10, 1))?;

    // Another, empty store under the same client id (the volume not mounted, and an operator
    // ran `init` to "fix" it): refused before anything is acknowledged.
    let other = s.dir.path().join("other.toml");
    std::fs::write(&other, std::fs::read_to_string(&s.config)?.replace("data_dir = \"data\"", "data_dir = \"other\""))?;
    init(&other)?;
    let out = Command::new(BIN).args(["run", "--config"]).arg(&other).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("holds a session") && err.contains("adopt-broker-session"), "{err}");
    assert!(hook.deliveries().is_empty(), "nobody paged from the wrong store");

    // The real store again: all ten outages are paged.
    let _gw = start(&s.config)?;
    hook.wait("every family", LIMIT, |d| homes_paged(d, "/family", |_| true).len() == 10)?;
    drop(s.dir);
    Ok(())
}

#[test]
fn a_store_without_homes_acknowledges_nothing_and_its_heartbeat_says_so() -> Result<()> {
    let broker = Mosquitto::start("")?;
    let hook = WebhookReceiver::start("hook-secret")?;
    let extra = format!("[heartbeat]\nurl = \"{0}/beat\"\nfail_url = \"{0}/beat-fail\"\ninterval_s = 5\n", hook.url());
    let s = site(broker.port(), &hook.url(), &hook.url(), &Plan { homes: 3, extra: &extra, ..Plan::default() })?;
    // The homes file is not there (say, on the volume that is not mounted).
    let text = std::fs::read_to_string(&s.config)?;
    let no_homes = s.dir.path().join("no-homes.toml");
    std::fs::write(&no_homes, text.replace("homes_file = \"homes.toml\"\n", ""))?;
    init(&no_homes)?;
    let mut gw = start(&no_homes)?;
    publish(broker.port(), &outages(3, 1))?;
    gw.wait_line("the refusal", LIMIT, |l| l.contains("no homes in the store: messages not acknowledged"))?;
    let (status, body) = http_get(s.http, "/healthz")?;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no homes"), "{body}");
    // The dead-man monitor outside hears it too.
    hook.wait("the heartbeat's failure URL", LIMIT, |d| d.iter().any(|x| x.path == "/beat-fail"))?;
    assert!(hook.deliveries().iter().all(|x| x.path != "/beat"), "never healthy");
    gw.terminate(LIMIT)?;
    // With the homes: the three outages were kept by the broker, and are paged; the heartbeat
    // says it is alive.
    let _gw = start(&s.config)?;
    hook.wait("every family", LIMIT, |d| homes_paged(d, "/family", |_| true).len() == 3)?;
    hook.wait("the heartbeat", LIMIT, |d| d.iter().any(|x| x.path == "/beat"))?;
    drop(s.dir);
    Ok(())
}

#[test]
fn a_wrong_clock_neither_swallows_an_outage_nor_pages_zero_minutes_left() -> Result<()> {
    let broker = Mosquitto::start("")?;
    let hook = WebhookReceiver::start("hook-secret")?;
    let s = site(broker.port(), &hook.url(), &hook.url(), &Plan { homes: 2, ..Plan::default() })?;
    init(&s.config)?;
    let _gw = start(&s.config)?;
    let now = chrono::Utc::now();
    let (h0, h1) = (home_id(0), home_id(1));
    // h0's agent is an hour ahead: an outage and its end...
    let ahead = |s: i64| (now + chrono::Duration::seconds(3600 + s)).to_rfc3339();
    publish(broker.port(), &[event(&h0, 1, "mains_lost", &ahead(0))])?;
    hook.wait("the first outage", LIMIT, |d| d.iter().any(|x| x.path == "/family"))?;
    publish(broker.port(), &[event(&h0, 2, "mains_restored", &ahead(60))])?;
    hook.wait("its end", LIMIT, |d| d.iter().any(|x| x.key.contains(":clear:")))?;
    // ...then NTP corrects it: a real outage now is paged, not discarded as older.
    publish(broker.port(), &[event(&h0, 3, "mains_lost", &now_ts())])?;
    hook.wait("the real outage", LIMIT, |d| {
        d.iter().filter(|x| x.path == "/family" && x.body["home"] == h0.as_str() && kind_of(x) == "mains_lost").count()
            == 2
    })?;
    // h1's agent is a day behind: its outage is now, with about 30 hours left (5000 Wh at
    // 100 W, taken at 60 % for a battery nothing is known of), not "0 min" at the top tier.
    // (Its telemetry, sent as it is written, shows the gateway how far off its clock is: two
    // snapshots whose times advance as their arrivals do.)
    let behind = || (chrono::Utc::now() - chrono::Duration::days(1)).to_rfc3339();
    for _ in 0..2 {
        let telemetry = format!(r#"{{"ts":"{}","interval_s":10,"mains_present":true}}"#, behind());
        publish(broker.port(), &[(format!("mamori/v1/{h1}/telemetry"), telemetry.into_bytes())])?;
    }
    publish(broker.port(), &[event(&h1, 1, "mains_lost", &behind())])?;
    let h1_outage = |x: &&Delivery| x.body["home"] == h1.as_str() && kind_of(x) == "mains_lost";
    let d = hook.wait("h1's family", LIMIT, |d| d.iter().any(|x| h1_outage(&x)))?;
    let page = d.iter().find(h1_outage).context("h1")?;
    let left = page.body["content"]["time_left_s"].as_i64().unwrap_or(0);
    assert!(left > 25 * 3600, "time left {left} s: {}", page.body["text"]);
    assert_eq!(page.body["content"]["tier"], "T0");
    // Nobody but the coordinator hears about the clock itself (after its ten minutes).
    assert!(hook.deliveries().iter().all(|x| kind_of(x) != "clock_skew"));
    drop(s.dir);
    Ok(())
}

/// Telemetry for homes, twice a second, at QoS 0 as agents send it (so nothing is queued at
/// the broker for a gateway that is away), until dropped. It reconnects when the broker comes
/// back.
struct Telemetry {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Telemetry {
    fn start(port: u16, homes: Vec<String>, mains: bool) -> Telemetry {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            let mut o = rumqttc::MqttOptions::new(format!("feed-{}", homes.join("-")), "127.0.0.1", port);
            o.set_keep_alive(Duration::from_secs(5));
            let (client, mut conn) = rumqttc::Client::new(o, 1000);
            let s2 = s.clone();
            std::thread::spawn(move || {
                for ev in conn.iter() {
                    if s2.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    if ev.is_err() {
                        std::thread::sleep(Duration::from_millis(200)); // the broker is down: try again
                    }
                }
            });
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                let ts = now_ts();
                for h in &homes {
                    let body = format!(r#"{{"ts":"{ts}","interval_s":1,"mains_present":{mains}}}"#);
                    let _ =
                        client.try_publish(format!("mamori/v1/{h}/telemetry"), rumqttc::QoS::AtMostOnce, false, body);
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            let _ = client.disconnect();
        });
        Telemetry { stop }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The gateway's broker dies (one node of a cluster): it connects to the next of `[broker]
/// failover` and goes on hearing the homes there.
#[test]
fn a_dead_broker_is_left_for_the_next_of_the_failover_list() -> Result<()> {
    let mut a = Mosquitto::start("")?;
    let b = Mosquitto::start("")?;
    let hook = WebhookReceiver::start("hook-secret")?;
    let s = site(
        a.port(),
        &hook.url(),
        &hook.url(),
        &Plan { homes: 1, municipalities: &["431001"], interval_s: 60, ..Plan::default() },
    )?;
    let text = std::fs::read_to_string(&s.config)?;
    let with_failover = text.replace(
        &format!("port = {}\n", a.port()),
        &format!("port = {}\nfailover = [\"127.0.0.1:{}\"]\n", a.port(), b.port()),
    );
    anyhow::ensure!(with_failover != text, "the site's [broker] port line");
    std::fs::write(&s.config, with_failover)?;
    init(&s.config)?;
    let gw = start(&s.config)?;
    a.kill9()?;
    gw.wait_line("the gateway on the second broker", LIMIT, |l| {
        l.contains("connected to the broker") && l.contains(&format!("127.0.0.1:{}", b.port()))
    })?;
    // Subscribed there: every filter in one SUBSCRIBE at the first broker, again at the second.
    let deadline = Deadline::after(LIMIT);
    while gw.lines().iter().filter(|l| l.contains("\"subscribed\"")).count() < 2 {
        deadline.check("the gateway to subscribe at the second broker")?;
        std::thread::sleep(Duration::from_millis(20));
    }
    publish(b.port(), &[event(&home_id(0), 1, "mains_lost", &now_ts())])?;
    hook.wait("the outage, heard through the second broker", LIMIT, |d| d.iter().any(|x| kind_of(x) == "mains_lost"))?;
    Ok(())
}

#[test]
fn the_centres_own_downtime_is_not_the_homes_silence() -> Result<()> {
    let mut broker = Mosquitto::start("")?;
    let hook = WebhookReceiver::start("hook-secret")?;
    let homes = 4;
    let s = site(
        broker.port(),
        &hook.url(),
        &hook.url(),
        &Plan {
            homes,
            municipalities: &["431001", "202011"],
            interval_s: 1,
            steps: r#"{ tier = "T0", roles = ["family", "coordinator"] }"#,
            ..Plan::default()
        },
    )?;
    init(&s.config)?;
    let mut gw = start(&s.config)?;
    let ids: Vec<String> = (0..homes).map(home_id).collect();
    // Every home on battery, reporting every second.
    let ts = now_ts();
    publish(broker.port(), &ids.iter().map(|h| event(h, 1, "mains_lost", &ts)).collect::<Vec<_>>())?;
    let feed = Telemetry::start(broker.port(), ids.clone(), false);
    hook.wait("the outage pages", LIMIT, |d| homes_paged(d, "/family", |x| kind_of(x) == "mains_lost").len() == homes)?;

    // The gateway stops for 8 s (homes are stale after 3 s of silence) and comes back.
    gw.terminate(LIMIT)?;
    std::thread::sleep(Duration::from_secs(8)); // the downtime itself, not a synchronisation
    let gw = start(&s.config)?;
    // The broker stops for 8 s and comes back.
    broker.stop()?;
    std::thread::sleep(Duration::from_secs(8)); // the downtime itself
    broker.resume()?;
    let deadline = Deadline::after(LIMIT);
    while gw.lines().iter().filter(|l| l.contains("connected to the broker")).count() < 2 {
        deadline.check("the gateway to reconnect to the broker")?;
        std::thread::sleep(Duration::from_millis(50));
    }
    // Homes are judged from the gateway's return: after a few periods of fresh telemetry,
    // nobody has been told a home is silent.
    let deadline = Deadline::after(Duration::from_secs(6));
    while deadline.remaining() > Duration::ZERO {
        let silent = hook.deliveries().iter().filter(|x| kind_of(x) == "state_unknown").count();
        assert_eq!(silent, 0, "the centre's downtime was blamed on the homes");
        std::thread::sleep(Duration::from_millis(200));
    }
    // A home that really stops is still found: h0 falls silent, and is paged.
    drop(feed);
    let _feed = Telemetry::start(broker.port(), ids[1..].to_vec(), false);
    hook.wait("h0 silent on battery", LIMIT, |d| {
        d.iter().any(|x| kind_of(x) == "state_unknown" && x.body["home"] == ids[0].as_str())
    })?;
    let wrongly: Vec<_> = hook
        .deliveries()
        .into_iter()
        .filter(|x| kind_of(x) == "state_unknown" && x.body["home"] != ids[0].as_str())
        .collect();
    assert!(wrongly.is_empty(), "{wrongly:?}");
    drop(s.dir);
    Ok(())
}

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Tmpfs> {
        std::fs::create_dir_all(at)?;
        let st =
            Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at).status()?;
        anyhow::ensure!(st.success(), "mount -t tmpfs failed ({st}): this test needs root");
        Ok(Tmpfs(at.to_path_buf()))
    }

    /// Write until the disk is full; returns the filler's path.
    fn fill(&self) -> Result<PathBuf> {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path)?;
        let chunk = vec![0u8; 64 * 1024];
        loop {
            if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_all()) {
                anyhow::ensure!(e.raw_os_error() == Some(28), "expected ENOSPC, got {e}");
                break;
            }
        }
        // Every last byte: small writes until nothing more fits.
        while f.write_all(&[0u8; 512]).and_then(|()| f.sync_all()).is_ok() {}
        Ok(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
#[ignore = "needs root: mounts a small tmpfs and fills it (scripts/test runs it as root)"]
fn a_full_disk_degrades_the_gateway_it_keeps_paging_what_it_decided_and_recovers_by_itself() -> Result<()> {
    let broker = Mosquitto::start("")?;
    let hook = WebhookReceiver::start("hook-secret")?;
    let extra = format!(
        r#"[[operators]]
name = "支援センター"
channels = [{{ webhook = "ops" }}]
[heartbeat]
url = "{hook}/beat"
fail_url = "{hook}/beat-fail"
interval_s = 5
[delivery]
backoff_initial_ms = 200
backoff_max_ms = 500
[endpoints.ops]
url = "{hook}/ops"
secret = {{ value = "hook-secret" }}
"#,
        hook = hook.url()
    );
    let s = site(broker.port(), &hook.url(), &hook.url(), &Plan { homes: 3, extra: &extra, ..Plan::default() })?;
    let disk = Tmpfs::mount(&s.dir.path().join("data"), "16m")?;
    init(&s.config)?;
    let mut gw = start(&s.config)?;
    hook.wait("a heartbeat", LIMIT, |d| d.iter().any(|x| x.path == "/beat"))?;
    let ts = now_ts();
    let (h0, h1, h2) = (home_id(0), home_id(1), home_id(2));
    // The homes report every second throughout (QoS 0: dropped while the gateway cannot store).
    let _feed = Telemetry::start(broker.port(), vec![h0.clone(), h1.clone(), h2.clone()], false);
    publish(broker.port(), &[event(&h0, 1, "mains_lost", &ts)])?;
    hook.wait("h0's family", LIMIT, |d| homes_paged(d, "/family", |_| true).contains(&h0))?;
    // h1's page is decided while the family's phone gateway is down: it waits in the outbox.
    hook.set_path_up("/family", false);
    publish(broker.port(), &[event(&h1, 1, "mains_lost", &ts)])?;
    hook.wait("h1's first attempt", LIMIT, |d| d.iter().any(|x| x.path == "/family" && x.body["home"] == h1.as_str()))?;

    // The disk fills up. h2's outage cannot be stored.
    let filler = disk.fill()?;
    publish(broker.port(), &[event(&h2, 1, "mains_lost", &now_ts())])?;
    let d = hook.wait("the operators told", LIMIT, |d| d.iter().any(|x| x.path == "/ops"))?;
    let notice = d.iter().find(|x| x.path == "/ops").context("notice")?;
    assert_eq!(notice.body["content"]["type"], "store_degraded", "{}", notice.body);
    assert!(notice.body["text"].as_str().unwrap_or_default().contains("ディスクの空きがありません"), "{}", notice.body);
    let (status, body) = http_get(s.http, "/healthz")?;
    assert!(status == 503 && body.contains("disk is full"), "{status} {body}");
    let (_, metrics) = http_get(s.http, "/metrics")?;
    assert!(metrics.contains("mamori_gateway_degraded 1"), "{metrics}");
    hook.wait("the heartbeat's failure URL", LIMIT, |d| d.iter().any(|x| x.path == "/beat-fail"))?;
    assert!(gw.running(), "the gateway did not exit");

    // What it had decided still goes out: the phone gateway is back, h1's family hears.
    hook.set_path_up("/family", true);
    hook.wait("h1's family, from the outbox", LIMIT, |d| homes_paged(d, "/family", |_| true).contains(&h1))?;
    assert!(!homes_paged(&hook.deliveries(), "/family", |_| true).contains(&h2), "h2 is held, not decided");

    // Killed while degraded and started again on the full disk: it starts, and h2's outage,
    // never acknowledged to the broker, comes back to it.
    gw.kill9()?;
    let before = hook.deliveries().len();
    let gw = start(&s.config)?;
    assert!(gw.lines().iter().all(|l| !l.contains("\"gateway failed\"")));
    // It stays degraded for a while (two heartbeats to the failure URL, 5 s apart: longer than
    // the homes' 3 s of silence), with the homes reporting all along.
    hook.wait("two failure heartbeats from the restarted gateway", LIMIT, |d| {
        d[before..].iter().filter(|x| x.path == "/beat-fail").count() >= 2
    })?;

    // Space again: it recovers by itself, says so, and h2's family is paged.
    std::fs::remove_file(&filler)?;
    hook.wait("recovered", LIMIT, |d| {
        d.iter().any(|x| x.path == "/ops" && x.body["content"]["type"] == "store_recovered")
    })?;
    hook.wait("h2's family", LIMIT, |d| homes_paged(d, "/family", |_| true).contains(&h2))?;
    let (status, _) = http_get(s.http, "/healthz")?;
    assert_eq!(status, 200);
    // The time it could not store was the centre's downtime, not the homes' silence: they
    // report again within a second, and nobody hears they went silent.
    let fresh = hook.deliveries().len();
    hook.wait("three more heartbeats", LIMIT, |d| d[fresh..].iter().filter(|x| x.path == "/beat").count() >= 1)?;
    let silent: Vec<_> = hook
        .deliveries()
        .into_iter()
        .filter(|x| matches!(kind_of(x).as_str(), "home_silent" | "state_unknown"))
        .collect();
    assert!(silent.is_empty(), "{silent:?}");
    // One page per family: h1's, delivered while the result could not be recorded and the
    // gateway then killed, may be sent again after the restart, but with the same idempotency
    // key, which a receiver that honours it takes once.
    let family: std::collections::BTreeSet<(String, String)> = hook
        .deliveries()
        .iter()
        .filter(|x| x.path == "/family" && x.accepted)
        .map(|x| (x.body["home"].as_str().unwrap_or_default().to_string(), x.key.clone()))
        .collect();
    assert_eq!(family.len(), 3, "{family:?}");
    drop(gw);
    drop(disk);
    Ok(())
}

#[test]
fn what_the_broker_acknowledged_survives_its_crash_with_the_generated_config() -> Result<()> {
    // The generated service lines (`pki init`): persistence with autosave on every change.
    let service: String = mamori_gateway::admin::pki::mosquitto_service(Path::new("/unused"))
        .lines()
        .filter(|l| !l.starts_with("persistence"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(service.contains("autosave_on_changes true"), "{service}");
    let mut broker =
        Mosquitto::start_with(|port, _| format!("listener {port} 127.0.0.1\nallow_anonymous true\n{service}"))?;
    let hook = WebhookReceiver::start("hook-secret")?;
    let homes = 50;
    let s = site(broker.port(), &hook.url(), &hook.url(), &Plan { homes, ..Plan::default() })?;
    init(&s.config)?;
    // The gateway's session exists at the broker; the gateway is away.
    let mut gw = start(&s.config)?;
    gw.terminate(LIMIT)?;
    // Fifty outages, each acknowledged by the broker (an agent would drop it from its spool
    // now), and the broker killed at once.
    publish(broker.port(), &outages(homes, 1))?;
    broker.kill9()?;
    broker.resume()?;
    let _gw = start(&s.config)?;
    // Mosquitto saves after the loop turn in which it acknowledged a message, so a kill can
    // land between the last acknowledgement and its save: at most that one is lost (with the
    // old `autosave_interval 10`, all fifty were; docs/benchmarks.md).
    hook.wait("every family but at most the last", LIMIT, |d| homes_paged(d, "/family", |_| true).len() >= homes - 1)?;
    drop(s.dir);
    Ok(())
}

#[test]
fn systemd_hears_ready_then_a_watchdog_ping_every_second_and_the_unit_restarts_what_can_be_restarted() -> Result<()> {
    // The shipped unit: notify, watchdog, always restarted, except for what an operator must fix.
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/mamori-gateway.service"),
    )?;
    for line in [
        "Type=notify",
        "WatchdogSec=30",
        "Restart=always",
        "RestartPreventExitStatus=2",
        "RequiresMountsFor=/var/lib/mamori",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ExecStart=/usr/local/bin/mamori-gateway run --config /etc/mamori/gateway.toml",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks `{line}`");
    }
    // The gateway speaks the protocol: READY=1 once it serves, WATCHDOG=1 while its loop turns.
    let broker = Mosquitto::start("")?;
    let hook = WebhookReceiver::start("hook-secret")?;
    let s = site(broker.port(), &hook.url(), &hook.url(), &Plan::default())?;
    init(&s.config)?;
    let sock_path = s.dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path)?;
    sock.set_read_timeout(Some(LIMIT))?;
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--config"]).arg(&s.config).env("NOTIFY_SOCKET", &sock_path).env("WATCHDOG_USEC", "2000000");
    let _gw = Process::spawn("gateway", cmd)?;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.iter().filter(|m: &&String| m.contains("WATCHDOG=1")).count() < 3 {
        let n = sock.recv(&mut buf).context("no notification from the gateway")?;
        got.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    let ready = got.iter().position(|m| m.contains("READY=1")).context("READY=1")?;
    assert!(ready < got.len() - 3, "READY before the pings: {got:?}");
    drop(s.dir);
    Ok(())
}
