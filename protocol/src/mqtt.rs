//! The MQTT v1 contract between a home's agent and the gateway. `docs/mqtt.md` is the
//! human-readable form, with an example of every message; a test parses every example there
//! with these types, so the two cannot drift apart.
//!
//! ## Topics
//! | topic | direction | QoS | retained | payload |
//! |---|---|---|---|---|
//! | `mamori/v1/{home}/status` | agent → gateway | 1 | yes | [`Status`]; `{"state":"offline"}` is the Last Will |
//! | `mamori/v1/{home}/telemetry` | agent → gateway | 0 | no | [`Telemetry`] |
//! | `mamori/v1/{home}/event` | agent → gateway | 1 | no | [`Event`] |
//! | `mamori/v1/{home}/ack` | gateway → agent | 1 | no | [`Ack`] |
//!
//! ## Privacy
//! `{home}` is an opaque [`HomeId`] (`[a-z0-9-]{1,64}`). No type here has a field for a name,
//! an address or a phone number, and free text is limited to short machine identifiers: the
//! gateway alone maps a home id to people.
//!
//! ## Evolution
//! Readers ignore fields they do not know, and an event `kind` they do not know decodes as
//! [`EventKind::Unknown`], so an agent can be newer than its gateway. A change that would
//! break an old reader gets a new topic prefix (`mamori/v2/...`).

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};

pub use crate::bridge::ContactState;
use crate::reading::{OximeterReading, UpsReading};

/// The first two levels of every topic.
pub const PREFIX: &str = "mamori/v1";
/// Largest payload a reader accepts; larger ones are rejected unparsed.
pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024;

/// A time with its UTC offset, serialised as RFC 3339 (`2026-11-22T03:04:05.123+09:00`).
pub type Timestamp = chrono::DateTime<chrono::FixedOffset>;

/// An opaque home identifier: 1–64 characters of `a-z`, `0-9` and `-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HomeId(String);

/// A home id that does not follow `[a-z0-9-]{1,64}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("home id must be 1-64 characters of a-z, 0-9 and '-'")]
pub struct InvalidHomeId;

impl HomeId {
    /// Validate and wrap.
    pub fn new(id: &str) -> Result<HomeId, InvalidHomeId> {
        let ok = (1..=64).contains(&id.len())
            && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(HomeId(id.to_string()))
        } else {
            Err(InvalidHomeId)
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The topic of `channel` for this home.
    pub fn topic(&self, channel: Channel) -> String {
        Topic { home: self.clone(), channel }.to_string()
    }
}

impl TryFrom<String> for HomeId {
    type Error = InvalidHomeId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        HomeId::new(&s)
    }
}

impl From<HomeId> for String {
    fn from(h: HomeId) -> String {
        h.0
    }
}

impl fmt::Display for HomeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The last level of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// `status`.
    Status,
    /// `telemetry`.
    Telemetry,
    /// `event`.
    Event,
    /// `ack`.
    Ack,
}

impl Channel {
    /// The topic level.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Status => "status",
            Channel::Telemetry => "telemetry",
            Channel::Event => "event",
            Channel::Ack => "ack",
        }
    }

    /// The subscription filter for this channel of every home: `mamori/v1/+/event`.
    pub fn filter(self) -> String {
        [PREFIX, "/+/", self.as_str()].concat()
    }
}

/// A parsed topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic {
    /// The home.
    pub home: HomeId,
    /// The channel.
    pub channel: Channel,
}

/// A topic outside the v1 contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Not `mamori/v1/{home}/{channel}`.
    #[error("topic is not mamori/v1/<home>/<channel>")]
    Shape,
    /// The home id is not valid.
    #[error(transparent)]
    Home(#[from] InvalidHomeId),
    /// The channel is not one of status, telemetry, event, ack.
    #[error("unknown channel")]
    Channel,
}

impl Topic {
    /// Parse a topic name.
    pub fn parse(topic: &str) -> Result<Topic, TopicError> {
        let rest = topic.strip_prefix(PREFIX).and_then(|r| r.strip_prefix('/')).ok_or(TopicError::Shape)?;
        let (home, channel) = rest.split_once('/').ok_or(TopicError::Shape)?;
        let channel = match channel {
            "status" => Channel::Status,
            "telemetry" => Channel::Telemetry,
            "event" => Channel::Event,
            "ack" => Channel::Ack,
            _ => return Err(TopicError::Channel),
        };
        Ok(Topic { home: HomeId::new(home)?, channel })
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}/{}/{}", self.home, self.channel.as_str())
    }
}

/// Whether the agent is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionState {
    /// Connected.
    Online,
    /// Gone: the Last Will, or a clean shutdown.
    Offline,
}

/// The agent's clocks when a message was written, so that the gateway can place it in time
/// even when the wall clock in `ts` is wrong: a Raspberry Pi has no real-time clock and boots
/// with a stale time until NTP answers, which in a regional outage may be never. `uptime_ms`
/// never steps, so within one `boot` the gateway orders and dates messages by it, and tells a
/// replay from the spool (old uptime) from a wrong clock (recent uptime, old `ts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockInfo {
    /// The operating system's boot (Linux's boot id) that `uptime_ms` counts from.
    pub boot: String,
    /// Milliseconds since that boot, on a clock that never steps.
    pub uptime_ms: u64,
    /// Whether the wall clock was synchronised (NTP) when the message was written; absent
    /// when the agent cannot tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced: Option<bool>,
}

/// `mamori/v1/{home}/status` (retained).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Online or offline.
    pub state: ConnectionState,
    /// When the state began (absent in the Last Will, which is composed at connect time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
    /// The agent's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// The telemetry period, s: the gateway calls a home stale after 3 missed periods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry_interval_s: Option<u32>,
    /// The sources the agent is configured with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceInfo>,
    /// Why the agent went offline, when it says so itself (`shutdown`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Status {
    /// The Last Will: exactly `{"state":"offline"}`.
    pub fn last_will() -> Status {
        Status {
            state: ConnectionState::Offline,
            since: None,
            agent_version: None,
            telemetry_interval_s: None,
            sources: Vec::new(),
            reason: None,
        }
    }
}

/// What kind of device a source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// A UPS (serial or NUT).
    Ups,
    /// A pulse oximeter.
    Oximeter,
    /// The sensor bridge.
    Bridge,
    /// A Pi UPS board's power monitor.
    PowerMonitor,
    /// GPIO contacts.
    Contacts,
}

/// A configured source, as announced in [`Status`] and reported in [`Telemetry`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// The source's id in the agent's config (`ups`, `oximeter`...): a short identifier.
    pub id: String,
    /// What kind of device it is.
    pub kind: DeviceKind,
}

/// Whether a device is answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Answering.
    Ok,
    /// Silent for longer than its staleness limit, or its port is gone.
    Lost,
}

/// One source's health in [`Telemetry`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// The source's id.
    pub id: String,
    /// What kind of device it is.
    pub kind: DeviceKind,
    /// Answering or lost.
    pub state: DeviceState,
}

/// A power-monitor reading (INA219 on a Pi UPS board or through the bridge).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PowerMeterReading {
    /// Battery (bus) voltage, V.
    pub battery_voltage_v: Option<f64>,
    /// Current, A (positive = discharging).
    pub current_a: Option<f64>,
    /// Power, W.
    pub power_w: Option<f64>,
}

/// The ventilator's remote-alarm contact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VentilatorReading {
    /// The contact pair's state.
    pub alarm: ContactState,
}

/// The agent's durable spool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpoolStatus {
    /// Events waiting for the broker's acknowledgement.
    pub pending_events: u32,
    /// The spool is full or the disk refused a write: events are held in memory.
    pub degraded: bool,
}

/// `mamori/v1/{home}/telemetry`: a snapshot of every source, periodic and on change (QoS 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    /// When the snapshot was taken (the agent's clock, with its offset).
    pub ts: Timestamp,
    /// The period, s, at which snapshots are sent when nothing changes.
    pub interval_s: u32,
    /// Mains presence from the UPS or the mains-sense contact.
    #[serde(default)]
    pub mains_present: Option<bool>,
    /// The UPS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ups: Option<UpsReading>,
    /// The power monitor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_meter: Option<PowerMeterReading>,
    /// The oximeter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oximeter: Option<OximeterReading>,
    /// The ventilator's alarm contact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ventilator: Option<VentilatorReading>,
    /// Every configured source's health.
    #[serde(default)]
    pub devices: Vec<DeviceStatus>,
    /// The spool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spool: Option<SpoolStatus>,
    /// The conditions the agent knows, by opening event kind (`"mains_lost": false`): `false`
    /// says the condition is over now, even when its clearing event never came (the agent
    /// restarted in between). Kinds the agent cannot tell yet are left out.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub conditions: BTreeMap<EventKind, bool>,
    /// The agent's clocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<ClockInfo>,
    /// Taken while the broker was unreachable and published later from the spool: history,
    /// not the present.
    #[serde(default, skip_serializing_if = "is_false")]
    pub kept: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// How urgent an event is on its own (the gateway's escalation decides who hears of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Worth recording.
    Info,
    /// Someone should look.
    Warning,
    /// Someone must act.
    Critical,
}

macro_rules! event_kinds {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal, $sev:ident, $clears:expr; )*) => {
        /// What happened. Unknown kinds from a newer agent decode as [`EventKind::Unknown`].
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum EventKind {
            $( $(#[$doc])* $variant, )*
            /// A kind this version does not know.
            #[serde(other)]
            Unknown,
        }

        impl EventKind {
            /// Every known kind.
            pub const ALL: &'static [EventKind] = &[$(EventKind::$variant),*];

            /// The name on the wire.
            pub fn as_str(self) -> &'static str {
                match self { $(EventKind::$variant => $name,)* EventKind::Unknown => "unknown" }
            }

            /// The severity the agent gives this kind.
            pub fn default_severity(self) -> Severity {
                match self { $(EventKind::$variant => Severity::$sev,)* EventKind::Unknown => Severity::Warning }
            }

            /// The kind this one clears, for the "back to normal" kinds.
            pub fn clears(self) -> Option<EventKind> {
                match self { $(EventKind::$variant => $clears,)* EventKind::Unknown => None }
            }
        }
    };
}

event_kinds! {
    /// Mains power lost: the home is on backup power.
    MainsLost = "mains_lost", Critical, None;
    /// Mains power back.
    MainsRestored = "mains_restored", Info, Some(EventKind::MainsLost);
    /// The backup battery is low.
    BatteryLow = "battery_low", Critical, None;
    /// The backup battery is no longer low.
    BatteryOk = "battery_ok", Info, Some(EventKind::BatteryLow);
    /// The UPS reports a fault.
    UpsFault = "ups_fault", Critical, None;
    /// The UPS fault has cleared.
    UpsFaultCleared = "ups_fault_cleared", Info, Some(EventKind::UpsFault);
    /// A device stopped answering (data: `source`).
    DeviceLost = "device_lost", Warning, None;
    /// A device answers again.
    DeviceRestored = "device_restored", Info, Some(EventKind::DeviceLost);
    /// SpO2 under the home's limit for longer than its delay.
    Spo2Low = "spo2_low", Critical, None;
    /// SpO2 back above the limit (with hysteresis).
    Spo2Ok = "spo2_ok", Info, Some(EventKind::Spo2Low);
    /// Pulse outside the home's range for longer than its delay.
    PulseOutOfRange = "pulse_out_of_range", Critical, None;
    /// Pulse back in range.
    PulseOk = "pulse_ok", Info, Some(EventKind::PulseOutOfRange);
    /// The oximeter sensor is off the patient or disconnected.
    SensorOff = "sensor_off", Warning, None;
    /// The sensor reads again.
    SensorOn = "sensor_on", Info, Some(EventKind::SensorOff);
    /// The oximeter's own alarm is sounding.
    OximeterAlarm = "oximeter_alarm", Critical, None;
    /// The oximeter's alarm was silenced at the bedside: still a reason to tell someone.
    OximeterAlarmSilenced = "oximeter_alarm_silenced", Critical, None;
    /// The oximeter's alarm stopped.
    OximeterAlarmCleared = "oximeter_alarm_cleared", Info, Some(EventKind::OximeterAlarm);
    /// The ventilator's remote-alarm contact signals an alarm (latched: a short pulse counts).
    VentilatorAlarm = "ventilator_alarm", Critical, None;
    /// The ventilator's contact is back to normal.
    VentilatorAlarmCleared = "ventilator_alarm_cleared", Info, Some(EventKind::VentilatorAlarm);
    /// The ventilator alarm cable is cut or miswired: alarms cannot be seen.
    AlarmCableFault = "alarm_cable_fault", Critical, None;
    /// The alarm cable reads correctly again.
    AlarmCableOk = "alarm_cable_ok", Info, Some(EventKind::AlarmCableFault);
    /// The agent started (data: `version`).
    AgentStarted = "agent_started", Info, None;
    /// The agent is stopping cleanly.
    AgentStopping = "agent_stopping", Warning, None;
    /// The spool is full or the disk failed: events are held in memory only.
    SpoolDegraded = "spool_degraded", Warning, None;
    /// The spool writes to disk again.
    SpoolOk = "spool_ok", Info, Some(EventKind::SpoolDegraded);
    /// A scheduled battery self-test ran or was skipped (data: `result` = `passed`, `failed`,
    /// `not_started`, `ended_on_battery` or `skipped`; `reason`; `charge_before_pct`,
    /// `voltage_min_v`, `seconds`).
    BatteryTest = "battery_test", Info, None;
}

/// `mamori/v1/{home}/event` (QoS 1, through the agent's durable spool).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique id (the agent's boot id and seq, or a UUID): 1–64 of `A-Za-z0-9-_:.`.
    pub id: String,
    /// Per home, strictly increasing, survives restarts. Starts at 1.
    pub seq: u64,
    /// When the agent observed it (RFC 3339 with offset). Replays keep the original time.
    pub ts: Timestamp,
    /// What happened.
    pub kind: EventKind,
    /// How urgent.
    pub severity: Severity,
    /// The source id in the agent's config, for device events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Kind-specific data: readings at the time (`spo2_pct`, `runtime_s`...).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub data: serde_json::Map<String, serde_json::Value>,
    /// The agent's clocks when it observed the event (replays keep them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<ClockInfo>,
}

fn valid_ident(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b':' | b'.'))
}

/// Roles that can acknowledge an alert (never a name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The family at home.
    Family,
    /// The municipal coordinator.
    Coordinator,
    /// The visiting nurse.
    VisitingNurse,
    /// The care facility / powered destination.
    Facility,
    /// The prefectural support centre.
    SupportCentre,
    /// A system administrator.
    Admin,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 6] =
        [Role::Family, Role::Coordinator, Role::VisitingNurse, Role::Facility, Role::SupportCentre, Role::Admin];

    /// Its wire name, the one spelling used everywhere (JSON, links, outbox keys, the store).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Family => "family",
            Role::Coordinator => "coordinator",
            Role::VisitingNurse => "visiting_nurse",
            Role::Facility => "facility",
            Role::SupportCentre => "support_centre",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that names no role.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a role (expected family, coordinator, visiting_nurse, facility, support_centre or admin)")]
pub struct UnknownRole(pub String);

impl std::str::FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| UnknownRole(s.to_string()))
    }
}

/// `mamori/v1/{home}/ack`: an alert about this home was acknowledged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    /// The gateway's alert id.
    pub alert_id: String,
    /// The alert's kind (an [`EventKind`] name, or a gateway kind such as `silent`).
    pub alert_kind: String,
    /// Who acknowledged, by role.
    pub role: Role,
    /// When.
    pub at: Timestamp,
}

/// A payload that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Larger than [`MAX_PAYLOAD_BYTES`].
    #[error("payload of {size} bytes exceeds {max}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Not JSON of the expected shape.
    #[error("invalid JSON: {0}")]
    Json(String),
    /// JSON of the right shape with a value out of bounds.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// A message type of the contract.
pub trait Message: Serialize + serde::de::DeserializeOwned {
    /// Check the values serde cannot (lengths, ranges).
    fn validate(&self) -> Result<(), PayloadError> {
        Ok(())
    }
}

/// The longest uptime believed, ms (a hundred years).
pub const MAX_UPTIME_MS: u64 = 100 * 366 * 24 * 3600 * 1000;

fn valid_clock(c: &Option<ClockInfo>) -> bool {
    c.as_ref().is_none_or(|c| valid_ident(&c.boot) && c.uptime_ms <= MAX_UPTIME_MS)
}

impl Message for Status {
    fn validate(&self) -> Result<(), PayloadError> {
        if self.sources.len() > 64 || self.sources.iter().any(|s| !valid_ident(&s.id)) {
            return Err(PayloadError::Invalid("status sources"));
        }
        if self.agent_version.as_deref().is_some_and(|v| !valid_ident(v))
            || self.reason.as_deref().is_some_and(|r| !valid_ident(r))
        {
            return Err(PayloadError::Invalid("status version or reason"));
        }
        Ok(())
    }
}
impl Message for Ack {
    fn validate(&self) -> Result<(), PayloadError> {
        if valid_ident(&self.alert_id) && valid_ident(&self.alert_kind) {
            Ok(())
        } else {
            Err(PayloadError::Invalid("ack alert id or kind"))
        }
    }
}
impl Message for Telemetry {
    fn validate(&self) -> Result<(), PayloadError> {
        if self.devices.len() > 64 || !self.devices.iter().all(|d| valid_ident(&d.id)) || self.interval_s == 0 {
            return Err(PayloadError::Invalid("telemetry device id or interval"));
        }
        if !valid_clock(&self.clock) || self.conditions.len() > 64 {
            return Err(PayloadError::Invalid("telemetry clock or conditions"));
        }
        Ok(())
    }
}
impl Message for Event {
    fn validate(&self) -> Result<(), PayloadError> {
        if !valid_ident(&self.id) {
            return Err(PayloadError::Invalid("event id"));
        }
        if self.seq == 0 {
            return Err(PayloadError::Invalid("event seq (starts at 1)"));
        }
        if self.source.as_deref().is_some_and(|s| !valid_ident(s)) {
            return Err(PayloadError::Invalid("event source"));
        }
        if !valid_clock(&self.clock) {
            return Err(PayloadError::Invalid("event clock boot id"));
        }
        Ok(())
    }
}

/// Decode and validate a payload, refusing oversize ones before parsing.
pub fn decode<M: Message>(payload: &[u8]) -> Result<M, PayloadError> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(PayloadError::TooLarge { size: payload.len(), max: MAX_PAYLOAD_BYTES });
    }
    let m: M = serde_json::from_slice(payload).map_err(|e| PayloadError::Json(e.to_string()))?;
    m.validate()?;
    Ok(m)
}

/// Encode a message as JSON.
pub fn encode<M: Message>(msg: &M) -> Vec<u8> {
    // Serialising these types cannot fail: every map key is a string and there are no
    // non-finite floats in the derive output that serde_json rejects (it writes `null`).
    serde_json::to_vec(msg).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_role_has_one_wire_name_in_json_in_text_and_back() {
        for r in Role::ALL {
            assert_eq!(serde_json::to_value(r).unwrap(), serde_json::Value::String(r.as_str().into()));
            assert_eq!(r.to_string().parse::<Role>(), Ok(r));
        }
        assert_eq!("mayor".parse::<Role>(), Err(UnknownRole("mayor".into())));
        assert!("Family".parse::<Role>().is_err(), "no second spelling");
    }

    fn ts(s: &str) -> Timestamp {
        chrono::DateTime::parse_from_rfc3339(s).unwrap()
    }

    #[test]
    fn home_ids() {
        assert!(HomeId::new("kumamoto-0042").is_ok());
        for bad in ["", "Kumamoto", "a/b", "a+b", "#", "名前", &"a".repeat(65)] {
            assert!(HomeId::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn topics() {
        let t = Topic::parse("mamori/v1/h-1/event").unwrap();
        assert_eq!(t.channel, Channel::Event);
        assert_eq!(t.to_string(), "mamori/v1/h-1/event");
        assert_eq!(Topic::parse("mamori/v1/H/event"), Err(TopicError::Home(InvalidHomeId)));
        assert_eq!(Topic::parse("mamori/v1/h/x"), Err(TopicError::Channel));
        assert_eq!(Topic::parse("mamori/v2/h/event"), Err(TopicError::Shape));
        assert_eq!(Topic::parse("mamori/v1/h/event/extra"), Err(TopicError::Channel));
        assert_eq!(Channel::Event.filter(), "mamori/v1/+/event");
    }

    #[test]
    fn last_will_is_exact() {
        assert_eq!(encode(&Status::last_will()), br#"{"state":"offline"}"#);
    }

    #[test]
    fn event_round_trip_keeps_offset() {
        let mut data = serde_json::Map::new();
        data.insert("runtime_s".into(), 5400.into());
        let e = Event {
            id: "b7-000042".into(),
            seq: 42,
            ts: ts("2026-11-22T03:04:05.250+09:00"),
            kind: EventKind::MainsLost,
            severity: Severity::Critical,
            source: Some("ups".into()),
            data,
            clock: Some(ClockInfo {
                boot: "5c8a0f2e-1b7d-4c1a-9e53-0d7f3a2b9c41".into(),
                uptime_ms: 86_400_123,
                synced: Some(true),
            }),
        };
        let wire = encode(&e);
        let text = core::str::from_utf8(&wire).unwrap();
        assert!(text.contains("\"ts\":\"2026-11-22T03:04:05.250+09:00\""), "{text}");
        assert_eq!(decode::<Event>(&wire), Ok(e));
    }

    #[test]
    fn invalid_payloads() {
        assert!(matches!(decode::<Event>(&[b' '; MAX_PAYLOAD_BYTES + 1]), Err(PayloadError::TooLarge { .. })));
        assert!(matches!(decode::<Event>(b"{"), Err(PayloadError::Json(_))));
        let no_offset = br#"{"id":"a","seq":1,"ts":"2026-11-22T03:04:05","kind":"mains_lost","severity":"critical"}"#;
        assert!(matches!(decode::<Event>(no_offset), Err(PayloadError::Json(_))));
        let seq0 = br#"{"id":"a","seq":0,"ts":"2026-11-22T03:04:05Z","kind":"mains_lost","severity":"critical"}"#;
        assert_eq!(decode::<Event>(seq0), Err(PayloadError::Invalid("event seq (starts at 1)")));
        let bad_id = br#"{"id":"a b","seq":1,"ts":"2026-11-22T03:04:05Z","kind":"mains_lost","severity":"critical"}"#;
        assert_eq!(decode::<Event>(bad_id), Err(PayloadError::Invalid("event id")));
    }

    #[test]
    fn unknown_kind_from_a_newer_agent() {
        let e = decode::<Event>(
            br#"{"id":"a","seq":1,"ts":"2026-11-22T03:04:05Z","kind":"something_new","severity":"info","extra":1}"#,
        )
        .unwrap();
        assert_eq!(e.kind, EventKind::Unknown);
    }

    #[test]
    fn kinds_are_named_as_on_the_wire() {
        for &k in EventKind::ALL {
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, alloc::format!("\"{}\"", k.as_str()));
            if let Some(c) = k.clears() {
                assert_ne!(c.default_severity(), Severity::Info, "{k:?} clears a non-alarm");
            }
        }
    }
}
