//! A deployment for the gateway's process tests: a homes file and a config in a temporary
//! folder, `init`, `run`, and the shapes of what the webhook receivers get. Shared by
//! `gateway/tests/faults.rs` and `gateway/tests/attack.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use crate::free_port;
use crate::process::Process;
use crate::webhook::Delivery;

/// A deployment in a temporary folder: `n` homes in `municipalities` (round robin), each with a
/// family and the municipality's coordinator, and the config's extra sections.
pub struct Site {
    /// The folder (the config, the homes file, `data/`).
    pub dir: tempfile::TempDir,
    /// The config file.
    pub config: PathBuf,
    /// The HTTP port.
    pub http: u16,
}

/// What a [`site`] has.
pub struct Plan<'a> {
    /// Homes.
    pub homes: usize,
    /// Their municipalities, round robin.
    pub municipalities: &'a [&'a str],
    /// Extra channels of each family (TOML inline tables), besides `{ webhook = "family" }`.
    pub family_channels: &'a str,
    /// Extra top-level config.
    pub extra: &'a str,
    /// `[policy.default]` steps.
    pub steps: &'a str,
    /// The telemetry period assumed until a home announces its own (`default_interval_s`).
    pub interval_s: u32,
    /// Extra `[escalation]` keys.
    pub escalation: &'a str,
    /// Extra `[http]` keys.
    pub http: &'a str,
}

impl Default for Plan<'_> {
    fn default() -> Self {
        Plan {
            homes: 1,
            municipalities: &["431001"],
            family_channels: "",
            extra: "",
            steps: r#"{ tier = "T0", roles = ["family"], escalate_after_s = 3600 }, { tier = "T1", roles = ["coordinator"] }"#,
            interval_s: 3600,
            escalation: "",
            http: "",
        }
    }
}

/// The id of home `i`.
pub fn home_id(i: usize) -> String {
    format!("h{i:04}")
}

/// A deployment in a temporary folder for a gateway on `broker`: the families' webhook endpoint
/// at `family_url`/family, the coordinators' at `coord_url`/coord.
pub fn site(broker: u16, family_url: &str, coord_url: &str, p: &Plan) -> Result<Site> {
    let dir = tempfile::tempdir()?;
    let http = free_port()?;
    let mut homes = String::new();
    for i in 0..p.homes {
        let m = p.municipalities[i % p.municipalities.len()];
        homes += &format!(
            r#"
[[home]]
id = "{id}"
municipality = "{m}"
label = "K-{i:04}"
devices = [{{ name = "ventilator", watts = 25 }}, {{ name = "humidifier", watts = 75 }}]
backup = [{{ kind = "power_station", usable_wh = 5000 }}]
contacts = [
  {{ role = "family", name = "家族{i}", channels = [{{ webhook = "family" }}{extra}] }},
  {{ role = "coordinator", name = "coord-{m}", channels = [{{ webhook = "coord" }}] }},
]
"#,
            id = home_id(i),
            extra = p.family_channels.replace("{i}", &i.to_string()),
        );
    }
    std::fs::write(dir.path().join("homes.toml"), homes)?;
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "data"
homes_file = "homes.toml"
public_url = "http://127.0.0.1:{http}"
link_secret = {{ value = "a-long-link-secret-for-the-tests" }}
{extra}
[broker]
host = "127.0.0.1"
port = {broker}
client_id = "gw-faults"
[http]
bind = "127.0.0.1:{http}"
{http_extra}
[escalation]
default_interval_s = {interval}
silence_settle_s = 0
{escalation}
[policy.default]
steps = [{steps}]
[endpoints.family]
url = "{family_url}/family"
secret = {{ value = "hook-secret" }}
[endpoints.coord]
url = "{coord_url}/coord"
secret = {{ value = "hook-secret" }}
"#,
            extra = p.extra,
            http_extra = p.http,
            escalation = p.escalation,
            interval = p.interval_s,
            steps = p.steps,
        ),
    )?;
    Ok(Site { dir, config, http })
}

/// `mamori-gateway init` (unless the database exists).
pub fn init(bin: &Path, config: &Path) -> Result<()> {
    crate::gateway_init(bin, config)
}

/// `mamori-gateway run`, waiting until it is subscribed.
pub fn start(bin: &Path, config: &Path) -> Result<Process> {
    let mut cmd = Command::new(bin);
    cmd.args(["run", "--config"]).arg(config);
    let p = Process::spawn("gateway", cmd)?;
    p.wait_line("subscribed", Duration::from_secs(30), |l| l.contains("\"subscribed\""))?;
    Ok(p)
}

/// Now, as a home writes it.
pub fn now_ts() -> String {
    #[allow(clippy::disallowed_methods)] // the harness plays a home, which reads its clock
    let now = chrono::Utc::now();
    now.to_rfc3339()
}

/// An event as a home publishes it: topic and payload.
pub fn event(home: &str, seq: u64, kind: &str, ts: &str) -> (String, Vec<u8>) {
    let body = format!(r#"{{"id":"boot:{seq}","seq":{seq},"ts":"{ts}","kind":"{kind}","severity":"critical"}}"#);
    (format!("mamori/v1/{home}/event"), body.into_bytes())
}

/// `mains_lost` now for homes 0..n.
pub fn outages(n: usize, seq: u64) -> Vec<(String, Vec<u8>)> {
    let ts = now_ts();
    (0..n).map(|i| event(&home_id(i), seq, "mains_lost", &ts)).collect()
}

/// The step of a delivery (`{alert}:s{step}:r{repeat}:...`).
pub fn step_of(d: &Delivery) -> Option<u32> {
    d.key.split(':').nth(1)?.strip_prefix('s')?.parse().ok()
}

/// The alert kind a delivery is about.
pub fn kind_of(d: &Delivery) -> String {
    d.body["content"]["kind"].as_str().unwrap_or_default().to_string()
}

/// The homes whose pages to `path` were accepted and match `pred`.
pub fn homes_paged(d: &[Delivery], path: &str, pred: impl Fn(&Delivery) -> bool) -> std::collections::BTreeSet<String> {
    d.iter()
        .filter(|x| x.path == path && x.accepted && pred(x))
        .map(|x| x.body["home"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// `GET path` on loopback: the status and the body.
pub fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}
