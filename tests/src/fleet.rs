//! What the fleet benchmarks share: a prefecture of generated homes, the telemetry a healthy
//! home sends, the gateway's own count of what it took in, and how figures are summarised.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mamori_protocol::mqtt::{EventKind, Telemetry};
use mamori_protocol::reading::{OximeterReading, UpsReading};

use crate::procfs::percentile;
use crate::webhook::Delivery;

/// Generated homes spread evenly over municipalities.
pub struct Fleet {
    /// The home ids, `b<municipality>-<n>`.
    pub homes: Vec<String>,
    /// Municipality index of each home.
    pub muni_of: Vec<usize>,
    /// The municipality codes.
    pub munis: Vec<String>,
}

impl Fleet {
    /// `homes` homes in `munis` municipalities.
    pub fn new(homes: usize, munis: usize) -> Fleet {
        let codes: Vec<String> = (0..munis).map(crate::municipality_code).collect();
        let per = homes.div_ceil(munis.max(1));
        let muni_of: Vec<usize> = (0..homes).map(|i| i / per).collect();
        let homes = (0..homes).map(|i| format!("b{:02}-{:05}", i / per, i % per)).collect();
        Fleet { homes, muni_of, munis: codes }
    }

    /// The homes file: every home with a ventilator and a humidifier on a power station, a
    /// 40-minute evacuation, and the family, coordinator, facility and support centre on the
    /// webhook endpoints `family`, `coord`, `facility` and `centre`.
    pub fn homes_toml(&self) -> String {
        let mut s = String::with_capacity(self.homes.len() * 700);
        for (i, id) in self.homes.iter().enumerate() {
            s.push_str(&format!(
                r#"[[home]]
id = "{id}"
municipality = "{m}"
label = "B-{i:05}"
devices = [{{ name = "ventilator", watts = 25 }}, {{ name = "humidifier", watts = 60 }}]
backup = [{{ kind = "power_station", nameplate_wh = 1000 }}, {{ kind = "ventilator_internal", runtime_min = 480 }}]
evacuation = {{ destination = "病院", travel_min = 40 }}
contacts = [
  {{ role = "family", name = "家族", channels = [{{ webhook = "family" }}] }},
  {{ role = "coordinator", name = "コーディネーター", channels = [{{ webhook = "coord" }}] }},
  {{ role = "facility", name = "病院", channels = [{{ webhook = "facility" }}] }},
  {{ role = "support_centre", name = "支援センター", channels = [{{ webhook = "centre" }}] }},
]
"#,
                m = self.munis[self.muni_of[i]]
            ));
        }
        s
    }
}

/// A home's telemetry: a UPS on mains (or on battery with `runtime_s` left) and an oximeter.
#[allow(clippy::disallowed_methods)] // the harness plays a home, which reads its clock
pub fn telemetry(on_battery: bool, runtime_s: u32, interval_s: u32) -> Telemetry {
    Telemetry {
        ts: chrono::Utc::now().fixed_offset(),
        interval_s,
        mains_present: Some(!on_battery),
        ups: Some(UpsReading {
            on_battery: Some(on_battery),
            battery_low: Some(false),
            input_voltage_v: Some(if on_battery { 0.0 } else { 101.2 }),
            output_voltage_v: Some(100.0),
            load_pct: Some(9.0),
            battery_charge_pct: Some(100.0),
            runtime_s: Some(runtime_s),
            ..UpsReading::default()
        }),
        power_meter: None,
        oximeter: Some(OximeterReading {
            spo2_pct: Some(97),
            pulse_bpm: Some(92),
            perfusion_index: Some(3.1),
            ..OximeterReading::default()
        }),
        ventilator: None,
        devices: Vec::new(),
        spool: None,
        clock: None,
        // As the agent sends them: whether the mains are lost, as its monitor sees it.
        conditions: [(EventKind::MainsLost, on_battery)].into_iter().collect(),
        kept: Default::default(),
    }
}

/// Messages the gateway took in (`mamori_messages_total{result="ingested"}` in its
/// `/metrics`): what it decoded, applied and committed, whether or not it kept a telemetry
/// row (history is thinned to one row per home per `telemetry_history_every_s`).
pub async fn ingested(http: u16) -> Result<u64> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(("127.0.0.1", http)))
        .await
        .context("connecting to /metrics")??;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut text)).await??;
    text.lines()
        .find_map(|l| l.strip_prefix("mamori_messages_total{result=\"ingested\"} "))
        .and_then(|n| n.trim().parse().ok())
        .context("mamori_messages_total{result=\"ingested\"} in /metrics")
}

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Print and return `p50 · p99 · max` of latencies in ms.
pub fn summary(name: &str, mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    let short = format!(
        "p50 {:.1} · p99 {:.1} · max {:.1} ms",
        percentile(&v, 50.0),
        percentile(&v, 99.0),
        v.last().copied().unwrap_or(f64::NAN)
    );
    println!("{name}: n {} · {short}", v.len());
    short
}

/// A webhook delivery's content type and kind (`("alert", "mains_lost")`).
pub fn kind_of(d: &Delivery) -> (&str, &str) {
    let c = &d.body["content"];
    (c["type"].as_str().unwrap_or(""), c["kind"].as_str().unwrap_or(""))
}

/// The release `mamori-gateway` beside the running benchmark.
pub fn gateway_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("exe dir")?.join("mamori-gateway");
    if !bin.exists() {
        bail!("{} not found: run `cargo build --release -p mamori-gateway` first", bin.display());
    }
    Ok(bin)
}
