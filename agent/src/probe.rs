//! `mamori-agent probe`: read each configured source once, connect to the broker once as this
//! home, and say what was seen. This is the installer's tool at the family's home: it names
//! the problem in words (port missing, permission, no answer, wrong protocol; the broker not
//! listening, refusing the password, a TLS failure) and exits non-zero if anything failed.

use std::time::Duration;

use mamori_protocol::codec::Stream;
use mamori_protocol::mqtt::DeviceKind;
use mamori_protocol::reading::{OximeterReading, UpsReading};
use mamori_protocol::{bridge, nut};
use serde::Serialize;

use crate::config::Config;
use crate::sources::{open_serial, serial_first_item, serial_transact, transact};

/// What probing one source found.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Probe {
    /// The source id.
    pub id: String,
    /// What it is.
    pub kind: DeviceKind,
    /// It answered with a reading.
    pub ok: bool,
    /// The reading, or why not.
    pub detail: String,
}

fn ups_detail(r: &UpsReading) -> String {
    let mut parts = vec![match r.on_battery {
        Some(true) => "ON BATTERY".to_string(),
        Some(false) => "on mains".to_string(),
        None => "mains unknown".to_string(),
    }];
    if r.battery_low == Some(true) {
        parts.push("BATTERY LOW".into());
    }
    if let Some(v) = r.battery_voltage_v {
        parts.push(format!("battery {v:.1} V"));
    }
    if let Some(c) = r.battery_charge_pct {
        parts.push(format!("charge {c:.0} %"));
    }
    if let Some(s) = r.runtime_s {
        parts.push(format!("runtime {} min", s / 60));
    }
    if let Some(l) = r.load_pct {
        parts.push(format!("load {l:.0} %"));
    }
    if let Some(v) = r.input_voltage_v {
        parts.push(format!("input {v:.0} V"));
    }
    parts.join(", ")
}

fn oximeter_detail(r: &OximeterReading) -> String {
    let f = |v: Option<u16>| v.map_or("--".to_string(), |v| v.to_string());
    let mut s = format!("SpO2 {} %, pulse {} /min", f(r.spo2_pct.map(u16::from)), f(r.pulse_bpm));
    if r.sensor_off == Some(true) {
        s.push_str(", SENSOR OFF");
    }
    if r.alarm_active == Some(true) {
        s.push_str(", ALARM");
    }
    s
}

fn no_answer(garbage: u64, what: &str) -> String {
    if garbage > 0 {
        format!("bytes arrived but none decoded as {what}: wrong protocol or baud rate?")
    } else {
        "no answer (is it switched on, and is this the right port?)".to_string()
    }
}

/// Run blocking device I/O on a thread of its own, its panic (none is expected) as an error.
async fn blocking(f: impl FnOnce() -> Result<String, String> + Send + 'static) -> Result<String, String> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| Err(e.to_string()))
}

/// Probe every configured source.
pub async fn probe(config: &Config, limit: Duration) -> Vec<Probe> {
    let mut out = Vec::new();
    let p = |id: &str, kind, r: Result<String, String>| Probe {
        id: id.to_string(),
        kind,
        ok: r.is_ok(),
        detail: r.unwrap_or_else(|e| e),
    };
    for u in &config.ups {
        let u = u.clone();
        let id = u.id.clone();
        // The service's own serial stack, on a thread of its own (`crate::sources`).
        let r = blocking(move || {
            let mut port = open_serial(&u.port, u.baud, limit)?;
            let mut garbage = 0;
            let mut reading = None;
            let mut echo = None;
            // As the service polls it (`crate::devices`): what opens the session, then the status.
            let driver = u.protocol.driver();
            let mut s = Stream::new(u.protocol.decoder());
            for cmd in driver.init {
                let _ = serial_transact(&mut port, &mut s, cmd, limit, &mut garbage, |r| r.solicited());
            }
            let status = driver.each.first().copied().unwrap_or_default();
            let ok = serial_transact(&mut port, &mut s, status, limit, &mut garbage, |r| {
                if let Some(c) = r.echoed() {
                    echo = Some(c.to_string());
                    return true;
                }
                reading = r.reading();
                reading.is_some()
            });
            ok.map_err(|e| format!("{}: {e}", u.port.display()))?;
            if let Some(c) = echo {
                return Err(format!("the device echoed `{c}` back: not a Megatec UPS, or another protocol"));
            }
            reading.map(|r| ups_detail(&r)).ok_or_else(|| no_answer(garbage, "a UPS reply"))
        })
        .await;
        out.push(p(&id, DeviceKind::Ups, r));
    }
    for n in &config.nut {
        let r = async {
            let addr = format!("{}:{}", n.host, n.port);
            let mut sock = tokio::time::timeout(limit, tokio::net::TcpStream::connect(&addr))
                .await
                .map_err(|_| format!("upsd at {addr}: no answer"))?
                .map_err(|e| format!("upsd at {addr}: {e}"))?;
            let mut s = Stream::new(nut::ReadingDecoder::default());
            let mut got = None;
            let mut garbage = 0;
            transact(
                &mut sock,
                &mut s,
                nut::Command::ListVar { ups: n.ups.clone() }.encode().as_bytes(),
                limit,
                &mut garbage,
                |o| {
                    got = Some(o);
                    true
                },
            )
            .await
            .map_err(|e| format!("upsd at {addr}: {e}"))?;
            match got {
                Some(nut::Output::Reading { reading, .. }) => Ok(ups_detail(&reading)),
                Some(nut::Output::Error(code)) => Err(format!("upsd says ERR {} for UPS `{}`", code.as_str(), n.ups)),
                None => Err(format!("upsd at {addr}: no reply to LIST VAR")),
            }
        }
        .await;
        out.push(p(&n.id, DeviceKind::Ups, r));
    }
    for o in &config.oximeter {
        let wait = limit.max(Duration::from_millis(o.lost_after_ms));
        let (path, baud, protocol) = (o.port.clone(), o.baud, o.protocol);
        let r = blocking(move || {
            let mut port = open_serial(&path, baud, wait)?;
            let reading = serial_first_item(&mut port, protocol.decoder(), wait, |_| true).map(|r| r.reading());
            reading
                .map(|r| oximeter_detail(&r))
                .map_err(|(g, e)| if e.is_empty() { no_answer(g, "oximeter data") } else { e })
        })
        .await;
        out.push(p(&o.id, DeviceKind::Oximeter, r));
    }
    for b in &config.bridge {
        let wait = limit.max(Duration::from_millis(b.lost_after_ms));
        let (path, baud) = (b.port.clone(), b.baud);
        let r = blocking(move || {
            let mut port = open_serial(&path, baud, wait)?;
            // The first frames come before every input has settled; a heartbeat (a second in)
            // has them all. Fall back to whatever came last.
            let f = serial_first_item(&mut port, bridge::Decoder, wait, |f| f.kind == bridge::FrameKind::Heartbeat)
                .map_err(|(g, e)| if e.is_empty() { no_answer(g, "a bridge frame") } else { e })?;
            let mut d = vec![format!("frame {}", f.seq)];
            if let Some(m) = f.mains_present {
                d.push(if m { "mains present".into() } else { "MAINS LOST".into() });
            }
            if let Some(v) = f.ventilator {
                d.push(format!("ventilator contact {v:?}").to_lowercase());
            }
            if let Some(pw) = f.power {
                d.push(format!("battery {:.2} V", f64::from(pw.bus_mv) / 1000.0));
            }
            Ok(d.join(", "))
        })
        .await;
        out.push(p(&b.id, DeviceKind::Bridge, r));
    }
    for pm in &config.power_monitor {
        let cfg = pm.clone();
        let r = tokio::task::spawn_blocking(move || {
            use mamori_firmware::ina219::{Calibration, Ina219};
            let bus =
                linux_embedded_hal::I2cdev::new(&cfg.i2c_bus).map_err(|e| format!("{}: {e}", cfg.i2c_bus.display()))?;
            let mut ina = Ina219::new(bus, cfg.address);
            let cal = Calibration::new(cfg.shunt_milliohm, cfg.max_current_ma).map_err(|e| format!("{e:?}"))?;
            ina.calibrate(cal).map_err(|e| format!("no INA219 answering at {:#x}: {e:?}", cfg.address))?;
            let s = ina.sample().map_err(|e| format!("{e:?}"))?;
            Ok(format!("battery {:.2} V, current {} mA", f64::from(s.bus_mv) / 1000.0, s.current_ma.unwrap_or(0)))
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        out.push(p(&pm.id, DeviceKind::PowerMonitor, r));
    }
    if let Some(c) = &config.contacts {
        let cfg = c.clone();
        let r = tokio::task::spawn_blocking(move || {
            use embedded_hal::digital::InputPin;
            use linux_embedded_hal::gpio_cdev::{Chip, LineRequestFlags};
            let mut chip = Chip::new(&cfg.chip).map_err(|e| format!("{}: {e}", cfg.chip.display()))?;
            let mut level = |line: u32| -> Result<bool, String> {
                let h = chip
                    .get_line(line)
                    .and_then(|l| l.request(LineRequestFlags::INPUT, 0, "mamori-probe"))
                    .map_err(|e| format!("line {line}: {e}"))?;
                linux_embedded_hal::CdevPin::new(h).map_err(|e| e.to_string())?.is_low().map_err(|e| e.to_string())
            };
            let mut d = Vec::new();
            if let Some(l) = cfg.mains_line {
                d.push(if level(l)? == cfg.mains_present_when_low {
                    "mains present".to_string()
                } else {
                    "MAINS LOST".into()
                });
            }
            if let (Some(no), Some(nc)) = (cfg.ventilator_no_line, cfg.ventilator_nc_line) {
                let closed = |low: bool| low == cfg.closed_when_low;
                d.push(match (closed(level(no)?), closed(level(nc)?)) {
                    (false, true) => "ventilator contact normal".into(),
                    (true, false) => "VENTILATOR ALARM".into(),
                    _ => "ventilator contact CABLE FAULT (both open or both closed)".into(),
                });
            }
            Ok(d.join(", "))
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        out.push(p(&c.id, DeviceKind::Contacts, r));
    }
    out
}

/// Whether the broker accepts this home: connect once with its TLS and credentials
/// ([`crate::uplink::Connection::check`]), within `limit`.
pub async fn broker(config: &Config, limit: Duration) -> Result<String, String> {
    let conn = crate::uplink::Connection::from_config(config.home(), &config.broker).map_err(|e| e.to_string())?;
    conn.check(limit).await
}

/// The broker's line under the table.
pub fn broker_line(r: &Result<String, String>) -> String {
    match r {
        Ok(d) => format!("broker: yes, {d}\n"),
        Err(e) => format!("broker: NO, {e}\n"),
    }
}

/// The table an installer reads.
pub fn table(probes: &[Probe]) -> String {
    let w = probes.iter().map(|p| p.id.len()).max().unwrap_or(6).max(6);
    let mut s = format!("{:<w$}  {:<13}  {:<4}  DETAIL\n", "SOURCE", "KIND", "OK");
    for p in probes {
        let kind = serde_json::to_value(p.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        s.push_str(&format!("{:<w$}  {:<13}  {:<4}  {}\n", p.id, kind, if p.ok { "yes" } else { "NO" }, p.detail));
    }
    s
}
