//! `mamori-demo`: one command, no setup, no network beyond loopback.
//!
//! It starts the embedded broker ([`broker`], rumqttd) on a free loopback port, the real
//! gateway service (`mamori_gateway::service::run::Service`) with a store in a temporary folder, and
//! a dozen simulated homes in two municipalities (Kumamoto city 431001 and Nagano city
//! 202011). Each home is a child process of this binary (`home`) running the real agent
//! code (`mamori_agent::run`) against the agent's simulated devices on pseudo-terminals
//! (`mamori_agent::simulate`: a Megatec UPS, a Masimo oximeter, the sensor bridge with the
//! ventilator's alarm contact). The console channel prints every notification.
//!
//! Time is compressed: escalation steps of tens of seconds instead of tens of minutes, and
//! tier thresholds in minutes, so the story fits in two minutes:
//! a regional outage hits five homes in Kumamoto; one home's small battery drains fast and
//! crosses tiers; one home goes silent during the outage; an oximeter alarm is silenced at a
//! bedside in Nagano; a ventilator alarm; the coordinator acknowledges (through the signed
//! link in the message, over HTTP); power returns.
//!
//! The dashboard is served on the same loopback port, with demo accounts ([`DEMO_USERS`],
//! password [`DEMO_PASSWORD`]), an administrator ([`DEMO_ADMIN`], with a two-factor secret
//! made for the run and printed) and cookies without `Secure` (plain HTTP on loopback only).
//!
//! This crate is the only one that links rumqttd and both the agent and the gateway: the
//! production gateway runs against Mosquitto or a NATS cluster and knows nothing of the demo.
#![deny(unsafe_code, missing_docs)]

pub mod broker;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mamori_protocol::mqtt::Role;
use tokio_util::sync::CancellationToken;

use mamori_gateway::config::Config;
use mamori_gateway::service::run::Service;

const HOMES: &[(&str, &str, &str, u32, u32)] = &[
    // id, municipality, label, usable Wh, travel min
    ("k01", "431001", "K-01 東区", 900, 40),
    ("k02", "431001", "K-02 中央区", 600, 25),
    ("k03", "431001", "K-03 北区（小容量）", 1, 1),
    ("k04", "431001", "K-04 南区", 700, 30),
    ("k05", "431001", "K-05 西区", 1200, 20),
    ("k06", "431001", "K-06 東区", 800, 35),
    ("k07", "431001", "K-07 中央区", 500, 15),
    ("n01", "202011", "N-01 長野市若穂", 900, 30),
    ("n02", "202011", "N-02 長野市篠ノ井", 700, 20),
    ("n03", "202011", "N-03 長野市松代", 800, 45),
    ("n04", "202011", "N-04 長野市豊野", 600, 30),
    ("n05", "202011", "N-05 長野市戸隠", 1000, 60),
];

/// The home a newcomer's own agent can attach as (`--attach`): the id that
/// `deploy/agent/demo-simulated.toml` uses.
pub const ATTACH_HOME: (&str, &str, &str, u32, u32) =
    ("home-01", "431001", "D-01 お試しの家（あなたの模擬機器）", 800, 30);

fn homes_toml(attach: bool) -> String {
    let mut s = String::new();
    let extra = attach.then_some(&ATTACH_HOME);
    for (i, (id, muni, label, wh, travel)) in HOMES.iter().chain(extra).enumerate() {
        // A made-up number, for the dashboard's tap-to-call link (nothing is ever sent to it).
        let phone = format!("+8190000000{:02}", i + 1);
        // Every family agreed to share with each recipient (the demo requires consent).
        let consent =
            format!(r#"{{ given_by = "{id}の家族", on = "2026-04-01", purpose = "停電時の通知と避難の調整" }}"#);
        let coord = if *muni == "431001" { "熊本市コーディネーター" } else { "Nagano coordinator" };
        let coord_lang = if *muni == "431001" { "ja" } else { "en" };
        let muni_name = if *muni == "431001" { "熊本市" } else { "長野市" };
        s += &format!(
            r#"
[[home]]
id = "demo-{id}"
municipality = "{muni}"
municipality_name = "{muni_name}"
label = "{label}"
devices = [{{ name = "人工呼吸器", watts = 30 }}, {{ name = "加温加湿器", watts = 70 }}]
backup = [{{ kind = "ups", usable_wh = {wh} }}, {{ kind = "ventilator_internal", runtime_min = 1 }}]
evacuation = {{ destination = "市民病院", travel_min = {travel} }}
contacts = [
  {{ role = "family", name = "{id}の家族", phone = "{phone}", channels = [{{ console = "family" }}] }},
  {{ role = "coordinator", name = "{coord}", language = "{coord_lang}", channels = [{{ console = "coordinator" }}], consent = {consent} }},
  {{ role = "visiting_nurse", name = "{id}の訪問看護", channels = [{{ console = "nurse" }}], consent = {consent} }},
  {{ role = "facility", name = "市民病院", channels = [{{ console = "facility" }}], consent = {consent} }},
  {{ role = "support_centre", name = "支援センター", channels = [{{ console = "centre" }}], consent = {consent} }},
]
"#
        );
    }
    s
}

/// Steps of seconds instead of minutes, so the story fits in two minutes.
const DEMO_POLICY: &str = r#"
[escalation]
stale_after_intervals = 3
incident_min_homes = 3
incident_window_s = 60
incident_update_min_s = 30
t2_margin_min = 2
t3_time_left_min = 1

[policy.default]
notify_after_s = 0
reescalate_after_ack_s = 60
steps = [
  { tier = "T0", roles = ["family"], repeat_every_s = 20, repeats = 1, escalate_after_s = 30 },
  { tier = "T1", roles = ["coordinator", "visiting_nurse"], repeat_every_s = 30, repeats = 1, escalate_after_s = 60 },
  { tier = "T2", roles = ["facility"], repeat_every_s = 30, repeats = 1, escalate_after_s = 60 },
  { tier = "T3", roles = ["family", "coordinator", "visiting_nurse", "facility", "support_centre"], repeat_every_s = 60, repeats = 2 },
]

[policy.mains_lost]
notify_after_s = 0
follows_forecast = true
reescalate_after_ack_s = 60
steps = [
  { tier = "T0", roles = ["family"], repeat_every_s = 20, repeats = 1, escalate_after_s = 30, escalate_even_if_acknowledged_after_s = 30 },
  { tier = "T1", roles = ["coordinator", "visiting_nurse"], repeat_every_s = 30, repeats = 1, escalate_after_s = 60 },
  { tier = "T2", roles = ["facility"], repeat_every_s = 30, repeats = 1, escalate_after_s = 60 },
  { tier = "T3", roles = ["family", "coordinator", "visiting_nurse", "facility", "support_centre"], repeat_every_s = 60, repeats = 2 },
]

[policy.state_unknown]
follows_forecast = true
steps = [
  { tier = "T1", roles = ["family", "coordinator", "visiting_nurse"], repeat_every_s = 30, repeats = 1, escalate_after_s = 60 },
  { tier = "T3", roles = ["family", "coordinator", "visiting_nurse", "facility", "support_centre"], repeat_every_s = 60, repeats = 2 },
]
"#;

struct HomeProc {
    id: &'static str,
    child: Child,
    stdin: ChildStdin,
}

impl HomeProc {
    fn cmd(&mut self, c: &str) {
        let _ = writeln!(self.stdin, "{c}");
        let _ = self.stdin.flush();
    }
}

fn spawn_home(exe: &Path, base: &Path, id: &'static str, broker_port: u16) -> anyhow::Result<HomeProc> {
    let dir = base.join(format!("home-{id}"));
    let devices = dir.join("dev");
    std::fs::create_dir_all(&devices)?;
    let config = dir.join("agent.toml");
    std::fs::write(&config, agent_toml(id, &dir.join("spool"), &devices, broker_port))?;
    let mut child = Command::new(exe)
        .args(["home", "--config"])
        .arg(&config)
        .arg("--dir")
        .arg(&devices)
        .args(["--devices", "ups,oximeter,bridge"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let stdin = child.stdin.take().context("child stdin")?;
    Ok(HomeProc { id, child, stdin })
}

/// The `home` child: simulated devices plus the real agent.
pub fn home(config: &Path, dir: &Path, devices: &[String]) -> anyhow::Result<()> {
    let agent_config = mamori_agent::config::Config::load(config)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (d, devs, s) = (dir.to_path_buf(), devices.to_vec(), stop.clone());
    std::thread::spawn(move || {
        if let Err(e) = mamori_agent::simulate::run(&d, &devs, Vec::new(), s) {
            eprintln!("simulate: {e:#}");
        }
    });
    // Wait for the devices (the agent would reopen them every second, reporting them lost).
    #[allow(clippy::disallowed_methods)] // an I/O edge
    let start = std::time::Instant::now();
    while devices.iter().any(|d| !dir.join(d).exists()) && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(mamori_agent::run::run(agent_config, CancellationToken::new()))
}

fn say(start: std::time::Instant, text: &str) {
    let s = start.elapsed().as_secs();
    println!("\n▶ {:02}:{:02}  {text}\n", s / 60, s % 60);
}

/// Run the demo.
/// Run the demo for `linger_s` seconds after its story (0: until Ctrl-C). `attach`: register
/// one more home ([`ATTACH_HOME`]) whose agent the demo does not run, and write its agent
/// config with the demo's broker and devices in that folder (`mamori-agent simulate --dir`).
pub async fn run(linger_s: u64, attach: Option<&Path>) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new().prefix("mamori-demo-").tempdir()?;
    let base = tmp.path().to_path_buf();
    let exe = std::env::current_exe().context("cannot find this executable")?;
    std::fs::write(base.join("homes.toml"), homes_toml(attach.is_some()))?;
    // The HTTP port must be known for the links: take a free one.
    let http_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let broker = broker::start(([127, 0, 0, 1], 0).into())?;
    let broker_port = broker.port();
    let text = format!(
        r#"data_dir = "store"
homes_file = "homes.toml"
public_url = "http://127.0.0.1:{http_port}"
link_secret = {{ value = "demo-only-secret" }}
[broker]
host = "127.0.0.1"
port = {broker_port}
client_id = "mamori-demo-gateway"
[http]
bind = "127.0.0.1:{http_port}"
secure_cookies = false
[privacy]
require_consent = true
{DEMO_POLICY}"#
    );
    let config_path = base.join("gateway.toml");
    std::fs::write(&config_path, &text)?;
    let config = Config::load(&config_path)?;
    let style = mamori_gateway::service::run::style(&config)?;
    let admin_secret = demo_accounts(&config)?;

    println!("mamori demo — a secondary, remote notification system: it never silences or replaces");
    println!("a device's own alarm. 12 simulated homes, 2 municipalities, time compressed (seconds for minutes).");
    println!("store: {}", base.display());

    let (console_tx, mut console_rx) =
        tokio::sync::mpsc::channel::<String>(mamori_gateway::edge::delivery::CONSOLE_QUEUE);
    let printer = tokio::spawn(async move {
        while let Some(text) = console_rx.recv().await {
            println!("{text}\n");
        }
    });
    let service = Service::new(config, console_tx)?;
    let cancel = CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let svc_cancel = cancel.clone();
    let gateway = tokio::spawn(async move { service.run(svc_cancel, Some(ready_tx)).await });
    let ready = ready_rx.await.context("the gateway did not start")?;
    println!("broker: {} (embedded, loopback only)   acknowledgement links: http://{}", ready.broker, ready.http);
    println!("dashboard: http://{}/", ready.http);
    println!(
        "  log in as {} with the password {DEMO_PASSWORD} (demo only)",
        DEMO_USERS.iter().map(|(u, r, _, _)| format!("{u} ({r})")).collect::<Vec<_>>().join(", ")
    );
    println!(
        "  or as {DEMO_ADMIN} (administrator: the admin pages and the audit log), with a code from an authenticator app \
         given the two-factor secret {admin_secret}\n  ({})",
        mamori_gateway::admin::accounts::totp_uri(DEMO_ADMIN, &admin_secret)
    );
    println!("admin-secret: {admin_secret}");
    if let Some(devices) = attach {
        let path = write_attach_config(&base, devices, ready.broker.port())?;
        println!(
            "attach: {}\n  one more home, {} (Kumamoto), waits for your agent: in another terminal,\n    \
             mamori-agent simulate --dir {} --scenario outage\n  and in a third,\n    \
             mamori-agent run --config {}\n  (from ./target/release after `cargo build --release -p mamori-agent`)",
            path.display(),
            ATTACH_HOME.2,
            devices.display(),
            path.display()
        );
    }

    let mut homes = Vec::new();
    for (id, ..) in HOMES {
        homes.push(spawn_home(&exe, &base, id, ready.broker.port())?);
    }
    #[allow(clippy::disallowed_methods)] // the demo's script clock is an I/O edge
    let start = std::time::Instant::now();
    let find = |homes: &mut Vec<HomeProc>, id: &str| homes.iter().position(|h| h.id == id);

    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let story: Vec<(u64, &str)> = vec![
        (8, "all 12 homes report in on mains"),
        (10, "typhoon: a regional outage in Kumamoto (431001) — five homes lose mains within seconds"),
        (30, "K-04 goes silent during the outage (its network dies)"),
        (40, "Nagano N-02: the oximeter alarms and is silenced at the bedside — still escalated remotely"),
        (50, "Nagano N-03: the ventilator's remote alarm contact closes"),
        (70, "the Kumamoto coordinator acknowledges the regional incident (through the link in the message)"),
        (100, "power returns in Kumamoto; K-04's network is back"),
        (120, "the story is over"),
    ];
    let mut done = 0;
    let mut story_over = false;
    loop {
        let elapsed = start.elapsed().as_secs();
        while done < story.len() && story[done].0 <= elapsed {
            let (at, line) = story[done];
            say(start, line);
            match at {
                10 => {
                    for id in ["k01", "k02", "k03", "k04", "k05"] {
                        if let Some(i) = find(&mut homes, id) {
                            homes[i].cmd("mains off");
                        }
                    }
                }
                30 => {
                    if let Some(i) = find(&mut homes, "k04") {
                        let _ = homes[i].child.kill(); // no clean shutdown: the broker sends its Last Will
                        let _ = homes[i].child.wait();
                    }
                }
                40 => {
                    if let Some(i) = find(&mut homes, "n02") {
                        homes[i].cmd("spo2 85");
                        homes[i].cmd("oxalarm on");
                    }
                }
                50 => {
                    if let Some(i) = find(&mut homes, "n03") {
                        homes[i].cmd("vent alarm");
                    }
                    if let Some(i) = find(&mut homes, "n02") {
                        homes[i].cmd("oxalarm silenced");
                    }
                }
                70 => {
                    if let Some(id) = open_incident(&base.join("store"))? {
                        let link = style.ack_link(&id, Role::Coordinator);
                        let url = link.replace(&style.public_url, &format!("http://{}", ready.http));
                        let resp = reqwest::Client::new().post(&url).form(&[("note", "避難先と調整中")]).send().await;
                        println!(
                            "  POST {url} → {}",
                            resp.map(|r| r.status().to_string()).unwrap_or_else(|e| e.to_string())
                        );
                    }
                }
                100 => {
                    for id in ["k01", "k02", "k03", "k05"] {
                        if let Some(i) = find(&mut homes, id) {
                            homes[i].cmd("mains on");
                        }
                    }
                    if let Some(i) = find(&mut homes, "k04") {
                        homes.remove(i);
                        homes.push(spawn_home(&exe, &base, "k04", ready.broker.port())?);
                    }
                    if let Some(i) = find(&mut homes, "n02") {
                        homes[i].cmd("spo2 97");
                        homes[i].cmd("oxalarm off");
                    }
                    if let Some(i) = find(&mut homes, "n03") {
                        homes[i].cmd("vent normal");
                    }
                }
                120 => {
                    story_over = true;
                    // The gateway's own command line reads the store: beside this binary
                    // when it was built, through cargo otherwise.
                    let gateway = exe.with_file_name("mamori-gateway");
                    let gateway = if gateway.exists() {
                        gateway.display().to_string()
                    } else {
                        "cargo run --release -p mamori-gateway --".to_string()
                    };
                    println!(
                        "While the demo runs, its alerts are in its store (deleted when it stops):\n  {gateway} alerts list --all --config {}",
                        config_path.display()
                    );
                    if linger_s == 0 {
                        println!("Ctrl-C to stop.");
                    }
                }
                _ => {}
            }
            done += 1;
        }
        if story_over && linger_s > 0 && elapsed >= 120 + linger_s {
            break;
        }
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        if gateway.is_finished() {
            break;
        }
    }
    println!("stopping…");
    // The gateway first, so the homes going away pages nobody.
    cancel.cancel();
    let result = gateway.await;
    for mut h in homes {
        let _ = h.child.kill();
        let _ = h.child.wait();
    }
    match result {
        Ok(r) => r?,
        Err(e) => anyhow::bail!("gateway task: {e}"),
    }
    printer.abort();
    drop(tmp);
    Ok(())
}

/// The demo's password for every demo account (never use outside the demo).
pub const DEMO_PASSWORD: &str = "mamori-demo-password";

/// Demo accounts: username, role, municipalities, homes.
pub const DEMO_USERS: &[(&str, &str, &[&str], &[&str])] = &[
    ("kumamoto", "coordinator", &["431001"], &[]),
    ("nagano", "coordinator", &["202011"], &[]),
    ("hospital", "facility", &[], &["demo-k02", "demo-n01"]),
    ("family-k03", "family", &[], &["demo-k03"]),
];

fn demo_accounts(config: &Config) -> anyhow::Result<String> {
    // The homes first: a facility or family account names homes that must exist.
    let mut store = mamori_gateway::service::run::open_store(config)?;
    let mut acc = mamori_gateway::admin::accounts::Accounts::new(store.as_mut());
    let key =
        mamori_gateway::admin::accounts::TotpKey::derive(&mamori_gateway::service::run::style(config)?.link_secret);
    for (name, role, munis, homes) in DEMO_USERS {
        let new = mamori_gateway::admin::accounts::NewUser {
            username: name.to_string(),
            display_name: name.to_string(),
            role: mamori_gateway::admin::accounts::AccountRole::parse(role).context("demo role")?,
            municipalities: munis.iter().map(|s| s.to_string()).collect(),
            homes: homes.iter().map(|s| s.to_string()).collect(),
        };
        acc.add(&new, DEMO_PASSWORD, None, &key, mamori_gateway::edge::clock::now())?;
    }
    // An administrator, to try the admin pages and the audit log: as every admin, with a
    // two-factor secret (made for this run and printed; the demo's data is thrown away).
    let secret = mamori_gateway::admin::accounts::new_totp_secret();
    let admin = mamori_gateway::admin::accounts::NewUser {
        username: DEMO_ADMIN.into(),
        display_name: DEMO_ADMIN.into(),
        role: mamori_gateway::admin::accounts::AccountRole::Admin,
        municipalities: Vec::new(),
        homes: Vec::new(),
    };
    acc.add(&admin, DEMO_PASSWORD, Some(&secret), &key, mamori_gateway::edge::clock::now())?;
    Ok(secret)
}

/// The demo's administrator (with a two-factor secret printed at the start).
pub const DEMO_ADMIN: &str = "admin";

fn open_incident(store_dir: &Path) -> anyhow::Result<Option<String>> {
    let store =
        mamori_gateway::edge::store::open(&mamori_gateway::edge::store::Location::Sqlite(store_dir.to_path_buf()))?;
    Ok(store.open_incidents()?.into_iter().next().map(|i| i.id))
}

/// A demo home's agent config: the demo's broker, its three simulated devices in `devices`.
fn agent_toml(id: &str, data_dir: &Path, devices: &Path, broker_port: u16) -> String {
    format!(
        r#"home_id = "demo-{id}"
data_dir = "{data}"
[broker]
host = "127.0.0.1"
port = {broker_port}
keep_alive_s = 5
[telemetry]
interval_s = 2
[[ups]]
id = "ups"
protocol = "megatec"
port = "{dev}/ups"
[[oximeter]]
id = "oximeter"
protocol = "masimo"
port = "{dev}/oximeter"
[[bridge]]
id = "bridge"
port = "{dev}/bridge"
"#,
        data = data_dir.display(),
        dev = devices.display()
    )
}

/// The agent config for [`ATTACH_HOME`] (deleted with the demo's folder).
fn write_attach_config(base: &Path, devices: &Path, broker_port: u16) -> anyhow::Result<PathBuf> {
    let path = base.join(format!("demo-{}.toml", ATTACH_HOME.0));
    let spool = base.join(format!("home-{}", ATTACH_HOME.0)).join("spool");
    std::fs::write(&path, agent_toml(ATTACH_HOME.0, &spool, devices, broker_port))?;
    Ok(path)
}

/// Where the demo's homes file would be written (for tests that check it validates).
pub fn demo_homes() -> (String, PathBuf) {
    (homes_toml(false), PathBuf::from("homes.toml"))
}
