//! The agent's configuration: one TOML file.
//!
//! Every key has a unit in its name where it has one (`poll_interval_ms`, `capacity_bytes`),
//! unknown keys are refused (`deny_unknown_fields`: a typo must not silently fall back to a
//! default on a life-support monitor), and every problem is reported with the file, the key
//! and what was expected. Secrets may be given inline, as a file path, or as an environment
//! variable name. `deploy/agent/*.toml` are the shipped examples; a test parses each.

use std::path::{Path, PathBuf};

use mamori_protocol::mqtt::HomeId;
use serde::Deserialize;

/// Shared with the gateway (`mamori-connect`): the same keys, the same checks.
pub use mamori_connect::{parse_host_port, Secret, TlsConfig};

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML, an unknown key, or a value of the wrong type.
    #[error("{file}: {message}")]
    Parse {
        /// The file.
        file: PathBuf,
        /// The parser's message (with line, column and key).
        message: String,
    },
    /// A value of the right type but out of bounds.
    #[error("{file}: key `{key}`: expected {expected}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// The key, as a dotted path (`ups[0].poll_interval_ms`).
        key: String,
        /// What was expected.
        expected: String,
    },
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This home's opaque id (`[a-z0-9-]{1,64}`): also the MQTT client id. Never a name.
    pub home_id: String,
    /// Where the spool and the persisted sequence number live.
    pub data_dir: PathBuf,
    /// The MQTT broker.
    pub broker: BrokerConfig,
    /// Telemetry snapshots.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// The durable event spool.
    #[serde(default)]
    pub spool: SpoolConfig,
    /// Thresholds for oximeter readings (set per child with the doctor).
    #[serde(default)]
    pub thresholds: Thresholds,
    /// Serial UPSes (Megatec, Voltronic, APC Smart).
    #[serde(default)]
    pub ups: Vec<SerialUpsConfig>,
    /// UPSes served by a Network UPS Tools `upsd`.
    #[serde(default)]
    pub nut: Vec<NutConfig>,
    /// INA219 power monitors on I2C (Pi UPS boards).
    #[serde(default)]
    pub power_monitor: Vec<PowerMonitorConfig>,
    /// Serial pulse oximeters.
    #[serde(default)]
    pub oximeter: Vec<OximeterConfig>,
    /// Sensor bridges on serial.
    #[serde(default)]
    pub bridge: Vec<BridgeConfig>,
    /// GPIO contacts: mains presence and the ventilator's alarm pair.
    #[serde(default)]
    pub contacts: Option<ContactsConfig>,
    /// The family's local alarm (buzzer, LEDs, silence button).
    #[serde(default)]
    pub local_alarm: Option<LocalAlarmConfig>,
    /// How the agent tells whether its wall clock is synchronised.
    #[serde(default)]
    pub clock: ClockConfig,
    /// Scheduled battery self-tests of the serial UPSes: off unless the home opts in.
    #[serde(default)]
    pub self_test: crate::self_test::SelfTestConfig,
}

/// How the agent tells whether its wall clock is synchronised (reported with every event and
/// telemetry snapshot, so that the gateway can tell a replay from a wrong clock).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockConfig {
    /// A file that exists once the clock is synchronised: systemd-timesyncd's
    /// `/run/systemd/timesync/synchronized` by default. When its folder does not exist either
    /// (another NTP client), the agent reports that it cannot tell; a wall clock before
    /// 2026-01-01 is reported as not synchronised in any case.
    #[serde(default = "default_synced_file")]
    pub synced_file: PathBuf,
}

fn default_synced_file() -> PathBuf {
    PathBuf::from("/run/systemd/timesync/synchronized")
}

impl Default for ClockConfig {
    fn default() -> Self {
        ClockConfig { synced_file: default_synced_file() }
    }
}

/// How to reach the broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Host name or address.
    pub host: String,
    /// TCP port (8883 for TLS, 1883 plain on loopback only).
    pub port: u16,
    /// More brokers, `host:port`, tried in turn after `host` when a connection fails or is
    /// lost (the other nodes of a clustered broker). Same TLS and credentials.
    #[serde(default)]
    pub failover: Vec<String>,
    /// TLS settings; absent means plain TCP, which is refused unless `host` is loopback.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Username (with `password`).
    #[serde(default)]
    pub username: Option<String>,
    /// The password.
    #[serde(default)]
    pub password: Option<Secret>,
    /// MQTT keep-alive, s.
    #[serde(default = "default_keep_alive_s")]
    pub keep_alive_s: u16,
    /// First reconnect delay, ms (doubles with jitter up to `reconnect_max_ms`).
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay, ms.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// An event the broker took but has not acknowledged after this long: the connection is
    /// dropped and the event sent again on the next, s.
    #[serde(default = "default_puback_timeout_s")]
    pub puback_timeout_s: u32,
}

impl BrokerConfig {
    /// The keys the gateway's `[broker]` has too, for the rules both keep.
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

fn default_keep_alive_s() -> u16 {
    15
}
fn default_puback_timeout_s() -> u32 {
    30
}
fn default_reconnect_min_ms() -> u64 {
    500
}
fn default_reconnect_max_ms() -> u64 {
    30_000
}

/// Telemetry snapshots.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Period when nothing changes, s.
    #[serde(default = "default_telemetry_interval_s")]
    pub interval_s: u32,
}

fn default_telemetry_interval_s() -> u32 {
    10
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig { interval_s: default_telemetry_interval_s() }
    }
}

/// The spool's bounds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Largest spool file, bytes. When full, telemetry kept during an outage is dropped first;
    /// events are never dropped (they are held in memory and the family is warned).
    #[serde(default = "default_spool_capacity_bytes")]
    pub capacity_bytes: u64,
    /// Events published and awaiting PUBACK at once.
    #[serde(default = "default_inflight")]
    pub inflight: u16,
}

fn default_spool_capacity_bytes() -> u64 {
    16 * 1024 * 1024
}
fn default_inflight() -> u16 {
    32
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig { capacity_bytes: default_spool_capacity_bytes(), inflight: default_inflight() }
    }
}

/// Oximeter thresholds with their alarm delays and hysteresis.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// SpO2 under this is low, %.
    #[serde(default = "d_spo2_low")]
    pub spo2_low_pct: u8,
    /// For this long, s.
    #[serde(default = "d_delay")]
    pub spo2_delay_s: u32,
    /// Clears at `spo2_low_pct` + this, %.
    #[serde(default = "d_spo2_hyst")]
    pub spo2_hysteresis_pct: u8,
    /// Pulse under this is out of range, /min.
    #[serde(default = "d_pulse_low")]
    pub pulse_low_bpm: u16,
    /// Pulse over this is out of range, /min.
    #[serde(default = "d_pulse_high")]
    pub pulse_high_bpm: u16,
    /// For this long, s.
    #[serde(default = "d_delay")]
    pub pulse_delay_s: u32,
    /// Clears this far inside the range, /min.
    #[serde(default = "d_pulse_hyst")]
    pub pulse_hysteresis_bpm: u16,
}

fn d_spo2_low() -> u8 {
    90
}
fn d_delay() -> u32 {
    10
}
fn d_spo2_hyst() -> u8 {
    2
}
fn d_pulse_low() -> u16 {
    50
}
fn d_pulse_high() -> u16 {
    180
}
fn d_pulse_hyst() -> u16 {
    5
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            spo2_low_pct: d_spo2_low(),
            spo2_delay_s: d_delay(),
            spo2_hysteresis_pct: d_spo2_hyst(),
            pulse_low_bpm: d_pulse_low(),
            pulse_high_bpm: d_pulse_high(),
            pulse_delay_s: d_delay(),
            pulse_hysteresis_bpm: d_pulse_hyst(),
        }
    }
}

/// Serial UPS protocols.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UpsProtocol {
    /// Megatec Q1.
    Megatec,
    /// Voltronic (QGS / QBV / QMOD).
    Voltronic,
    /// APC Smart.
    Apc,
}

/// A serial UPS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialUpsConfig {
    /// Source id (`ups`), used in events and telemetry.
    pub id: String,
    /// The protocol.
    pub protocol: UpsProtocol,
    /// Serial port path; prefer `/dev/serial/by-id/...` so a replug finds the same device.
    pub port: PathBuf,
    /// Baud rate.
    #[serde(default = "d_ups_baud")]
    pub baud: u32,
    /// Status poll period, ms (250 sees a power cut within a quarter second).
    #[serde(default = "d_ups_poll")]
    pub poll_interval_ms: u64,
    /// Declared lost after this many polls without an answer.
    #[serde(default = "d_missed")]
    pub lost_after_missed_polls: u32,
    /// Input-fault voltage under which a Megatec reply reveals an outage shorter than a poll, V.
    #[serde(default = "d_glitch_v")]
    pub glitch_below_v: f64,
}

fn d_ups_baud() -> u32 {
    2400
}
fn d_ups_poll() -> u64 {
    250
}
fn d_missed() -> u32 {
    3
}
fn d_glitch_v() -> f64 {
    80.0
}

/// A UPS behind a NUT server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NutConfig {
    /// Source id.
    pub id: String,
    /// `upsd` host.
    #[serde(default = "d_nut_host")]
    pub host: String,
    /// `upsd` port.
    #[serde(default = "d_nut_port")]
    pub port: u16,
    /// The UPS name in `ups.conf`.
    pub ups: String,
    /// Poll period, ms.
    #[serde(default = "d_nut_poll")]
    pub poll_interval_ms: u64,
    /// Declared lost after this many polls without a reading.
    #[serde(default = "d_missed")]
    pub lost_after_missed_polls: u32,
    /// A `upsd` user with `instcmds` rights, for scheduled battery self-tests (`[self_test]`);
    /// without one this UPS is not tested.
    #[serde(default)]
    pub username: Option<String>,
    /// Its password.
    #[serde(default)]
    pub password: Option<Secret>,
}

fn d_nut_host() -> String {
    "127.0.0.1".into()
}
fn d_nut_port() -> u16 {
    3493
}
fn d_nut_poll() -> u64 {
    1000
}

/// An INA219 on I2C.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerMonitorConfig {
    /// Source id.
    pub id: String,
    /// The I2C bus device.
    #[serde(default = "d_i2c")]
    pub i2c_bus: PathBuf,
    /// The chip's address (0x40–0x4F).
    #[serde(default = "d_i2c_addr")]
    pub address: u8,
    /// The shunt, mΩ.
    pub shunt_milliohm: u32,
    /// The largest current expected, mA.
    pub max_current_ma: u32,
    /// Poll period, ms.
    #[serde(default = "d_pm_poll")]
    pub poll_interval_ms: u64,
    /// Battery voltage under which the battery is low, mV.
    #[serde(default)]
    pub low_battery_mv: Option<u16>,
    /// Voltage at which it is no longer low, mV.
    #[serde(default)]
    pub battery_recover_mv: Option<u16>,
}

fn d_i2c() -> PathBuf {
    "/dev/i2c-1".into()
}
fn d_i2c_addr() -> u8 {
    0x40
}
fn d_pm_poll() -> u64 {
    1000
}

/// Oximeter protocols.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OximeterProtocol {
    /// Masimo ASCII 1.
    Masimo,
    /// Nonin ASCII.
    NoninAscii,
    /// Nonin #2.
    #[serde(rename = "nonin-2")]
    Nonin2,
    /// Nonin #7.
    #[serde(rename = "nonin-7")]
    Nonin7,
    /// Nonin #8.
    #[serde(rename = "nonin-8")]
    Nonin8,
    /// Nellcor ASCII.
    Nellcor,
}

/// A serial oximeter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OximeterConfig {
    /// Source id.
    pub id: String,
    /// The protocol.
    pub protocol: OximeterProtocol,
    /// Serial port path.
    pub port: PathBuf,
    /// Baud rate.
    #[serde(default = "d_oxi_baud")]
    pub baud: u32,
    /// Declared lost after this long without a reading, ms.
    #[serde(default = "d_stream_lost")]
    pub lost_after_ms: u64,
}

fn d_oxi_baud() -> u32 {
    9600
}
fn d_stream_lost() -> u64 {
    5000
}

/// A sensor bridge on serial.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// Source id.
    pub id: String,
    /// Serial port path.
    pub port: PathBuf,
    /// Baud rate.
    #[serde(default = "d_bridge_baud")]
    pub baud: u32,
    /// Declared lost after this long without a frame, ms (the bridge sends a heartbeat a second).
    #[serde(default = "d_bridge_lost")]
    pub lost_after_ms: u64,
}

fn d_bridge_baud() -> u32 {
    115_200
}
fn d_bridge_lost() -> u64 {
    3000
}

/// GPIO contacts on the Pi.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContactsConfig {
    /// Source id.
    #[serde(default = "d_contacts_id")]
    pub id: String,
    /// The GPIO character device.
    #[serde(default = "d_chip")]
    pub chip: PathBuf,
    /// Line of the mains-sense input.
    #[serde(default)]
    pub mains_line: Option<u32>,
    /// Mains is present when the line is low (an optocoupler pulling down).
    #[serde(default = "d_true")]
    pub mains_present_when_low: bool,
    /// Line of the ventilator's normally-open contact.
    #[serde(default)]
    pub ventilator_no_line: Option<u32>,
    /// Line of the ventilator's normally-closed contact.
    #[serde(default)]
    pub ventilator_nc_line: Option<u32>,
    /// A contact is closed when its line is low.
    #[serde(default = "d_true")]
    pub closed_when_low: bool,
    /// Debounce, ms.
    #[serde(default = "d_debounce")]
    pub debounce_ms: u32,
    /// A both-open / both-closed pair is a cable fault after this long, ms.
    #[serde(default = "d_cable_fault")]
    pub cable_fault_ms: u32,
    /// Sampling period, ms.
    #[serde(default = "d_contact_poll")]
    pub poll_interval_ms: u64,
}

fn d_contacts_id() -> String {
    "contacts".into()
}
fn d_chip() -> PathBuf {
    "/dev/gpiochip0".into()
}
fn d_true() -> bool {
    true
}
fn d_debounce() -> u32 {
    30
}
fn d_cable_fault() -> u32 {
    500
}
fn d_contact_poll() -> u64 {
    10
}

/// The local alarm.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalAlarmConfig {
    /// The GPIO character device.
    #[serde(default = "d_chip")]
    pub chip: PathBuf,
    /// Buzzer line.
    #[serde(default)]
    pub buzzer_line: Option<u32>,
    /// Red LED line.
    #[serde(default)]
    pub red_led_line: Option<u32>,
    /// Green LED line ("someone outside knows" after an acknowledgement).
    #[serde(default)]
    pub green_led_line: Option<u32>,
    /// Silence button line (pressed = low).
    #[serde(default)]
    pub silence_button_line: Option<u32>,
    /// How long the button silences the local sounder, min (never the remote escalation).
    #[serde(default = "d_silence")]
    pub silence_min: u32,
    /// "Nobody outside can see us" after the broker is unreachable this long, s.
    #[serde(default = "d_unreachable")]
    pub unreachable_after_s: u32,
}

fn d_silence() -> u32 {
    30
}
fn d_unreachable() -> u32 {
    120
}

/// Short identifiers: the source ids travel over MQTT, so they must not carry a name.
fn valid_source_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl Config {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: path.to_path_buf(), source })?;
        let config = Config::parse(&text, path)?;
        if config.broker.tls.as_ref().is_some_and(|t| t.client_key_pem.is_some()) {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).map(|m| m.permissions().mode()).unwrap_or(0o644);
            if mode & 0o077 != 0 {
                return Err(ConfigError::Invalid {
                    file: path.to_path_buf(),
                    key: "broker.tls.client_key_pem".into(),
                    expected: "a file readable by its owner only when it holds a private key (chmod 600)".into(),
                });
            }
        }
        Ok(config)
    }

    /// Parse and validate config text (`file` is used in messages).
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.validate(file)?;
        Ok(config)
    }

    /// The home id, validated.
    pub fn home(&self) -> HomeId {
        // `validate` checked it; a Config is only built through `parse`.
        HomeId::new(&self.home_id).unwrap_or_else(|_| unreachable!("validated at load"))
    }

    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let bad = |key: String, expected: &str| {
            Err(ConfigError::Invalid { file: file.to_path_buf(), key, expected: expected.to_string() })
        };
        if HomeId::new(&self.home_id).is_err() {
            return bad("home_id".into(), "1-64 characters of a-z, 0-9 and '-' (an opaque id, never a name)");
        }
        // The rules both sides keep (the gateway's `[broker]` refuses the same).
        if let Some((key, expected)) = self.broker.keys().problems().into_iter().next() {
            return bad(key, &expected);
        }
        for (i, n) in self.nut.iter().enumerate() {
            if n.username.is_some() != n.password.is_some() {
                return bad(format!("nut[{i}].password"), "a upsd username and its password together, or neither");
            }
        }
        if let Err((key, expected)) = self.self_test.check() {
            return bad(format!("self_test.{key}"), expected);
        }
        if self.broker.reconnect_min_ms == 0 || self.broker.reconnect_max_ms < self.broker.reconnect_min_ms {
            return bad(
                "broker.reconnect_max_ms".into(),
                "reconnect_min_ms > 0 and reconnect_max_ms >= reconnect_min_ms",
            );
        }
        if !(1..=3600).contains(&self.telemetry.interval_s) {
            return bad("telemetry.interval_s".into(), "between 1 and 3600");
        }
        // Every number has bounds: a typo must be refused here, not overflow or stall later.
        let within = |v: u64, lo: u64, hi: u64| (lo..=hi).contains(&v);
        let b = &self.broker;
        if b.reconnect_max_ms > 3_600_000 {
            return bad("broker.reconnect_max_ms".into(), "at most 3600000 (an hour)");
        }
        if !within(u64::from(b.puback_timeout_s), 5, 600) {
            return bad("broker.puback_timeout_s".into(), "between 5 and 600");
        }
        if !within(self.spool.capacity_bytes, 64 * 1024, 1 << 30) {
            return bad("spool.capacity_bytes".into(), "between 65536 and 1073741824");
        }
        if !within(u64::from(self.spool.inflight), 1, 1000) {
            return bad("spool.inflight".into(), "between 1 and 1000");
        }
        let t = &self.thresholds;
        if !(50..=100).contains(&t.spo2_low_pct) || t.pulse_low_bpm >= t.pulse_high_bpm || t.pulse_high_bpm > 300 {
            return bad("thresholds".into(), "spo2_low_pct between 50 and 100, pulse_low_bpm < pulse_high_bpm <= 300");
        }
        if t.spo2_delay_s > 3600 || t.pulse_delay_s > 3600 || t.spo2_hysteresis_pct > 20 || t.pulse_hysteresis_bpm > 50
        {
            return bad(
                "thresholds".into(),
                "spo2_delay_s and pulse_delay_s at most 3600, spo2_hysteresis_pct at most 20, pulse_hysteresis_bpm at most 50",
            );
        }
        if let Some(a) = &self.local_alarm {
            if !within(u64::from(a.silence_min), 1, 240) || !within(u64::from(a.unreachable_after_s), 10, 86_400) {
                return bad(
                    "local_alarm".into(),
                    "silence_min between 1 and 240, unreachable_after_s between 10 and 86400",
                );
            }
        }
        let mut ids: Vec<(String, String)> = Vec::new();
        let mut check_id = |id: &str, key: String| ids.push((id.to_string(), key));
        for (i, u) in self.ups.iter().enumerate() {
            check_id(&u.id, format!("ups[{i}].id"));
            if !(50..=60_000).contains(&u.poll_interval_ms) {
                return bad(format!("ups[{i}].poll_interval_ms"), "between 50 and 60000");
            }
            if !within(u64::from(u.lost_after_missed_polls), 1, 100) {
                return bad(format!("ups[{i}].lost_after_missed_polls"), "between 1 and 100");
            }
            if !u.glitch_below_v.is_finite() || !(0.0..=300.0).contains(&u.glitch_below_v) {
                return bad(format!("ups[{i}].glitch_below_v"), "between 0 and 300 V");
            }
        }
        for (i, n) in self.nut.iter().enumerate() {
            check_id(&n.id, format!("nut[{i}].id"));
            if !(100..=60_000).contains(&n.poll_interval_ms) {
                return bad(format!("nut[{i}].poll_interval_ms"), "between 100 and 60000");
            }
            if !within(u64::from(n.lost_after_missed_polls), 1, 100) || n.port == 0 {
                return bad(format!("nut[{i}].lost_after_missed_polls"), "between 1 and 100 (and a port)");
            }
        }
        for (i, p) in self.power_monitor.iter().enumerate() {
            check_id(&p.id, format!("power_monitor[{i}].id"));
            if !within(p.poll_interval_ms, 50, 60_000) {
                return bad(format!("power_monitor[{i}].poll_interval_ms"), "between 50 and 60000");
            }
            if !(0x40..=0x4F).contains(&p.address) {
                return bad(format!("power_monitor[{i}].address"), "an INA219 address between 0x40 and 0x4f");
            }
            if mamori_firmware::ina219::Calibration::new(p.shunt_milliohm, p.max_current_ma).is_err() {
                return bad(
                    format!("power_monitor[{i}].max_current_ma"),
                    "a shunt and maximum current the INA219 can calibrate for (e.g. 100 mΩ with 3200 mA)",
                );
            }
        }
        for (i, o) in self.oximeter.iter().enumerate() {
            check_id(&o.id, format!("oximeter[{i}].id"));
            if !within(o.lost_after_ms, 1000, 600_000) {
                return bad(format!("oximeter[{i}].lost_after_ms"), "between 1000 and 600000");
            }
        }
        for (i, b) in self.bridge.iter().enumerate() {
            check_id(&b.id, format!("bridge[{i}].id"));
            if !within(b.lost_after_ms, 1000, 600_000) {
                return bad(format!("bridge[{i}].lost_after_ms"), "between 1000 and 600000");
            }
        }
        if let Some(c) = &self.contacts {
            check_id(&c.id, "contacts.id".into());
            if !within(c.poll_interval_ms, 1, 1000)
                || u64::from(c.debounce_ms) > 10_000
                || u64::from(c.cable_fault_ms) > 60_000
            {
                return bad(
                    "contacts.poll_interval_ms".into(),
                    "poll_interval_ms between 1 and 1000, debounce_ms at most 10000, cable_fault_ms at most 60000",
                );
            }
            if c.ventilator_no_line.is_some() != c.ventilator_nc_line.is_some() {
                return bad(
                    "contacts.ventilator_nc_line".into(),
                    "both ventilator_no_line and ventilator_nc_line: one contact cannot tell an alarm from a cut cable",
                );
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for (id, key) in &ids {
            if !valid_source_id(id) {
                return bad(
                    key.clone(),
                    "1-32 characters of a-z, 0-9, '-' and '_' (it travels over MQTT: never a name)",
                );
            }
            if !seen.insert(id.as_str()) {
                return bad(key.clone(), "a source id used only once");
            }
        }
        if ids.is_empty() {
            return bad(
                "ups".into(),
                "at least one source ([[ups]], [[nut]], [[power_monitor]], [[oximeter]], [[bridge]] or [contacts])",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
