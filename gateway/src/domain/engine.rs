//! The gateway's pure core: per-home state, forecasts, alerts, escalation and regional
//! incidents. No I/O and no clock: every call takes `now`, and the caller sleeps until
//! [`Engine::next_deadline`].
//!
//! ## Inputs and outputs
//! [`Engine::handle`] takes one stored message (status, telemetry, event), an acknowledgement,
//! or a delivery failure; [`Engine::poll`] runs the timers (repeats, escalations, staleness,
//! incident updates). Both only change state and schedule; notifications are produced by
//! `poll`, so a batch of replayed messages in which an alert opens and clears pages nobody.
//! [`Engine::take_outputs`] returns what to send and what to persist, and
//! [`Engine::take_dirty`] the homes whose state changed, for the store; [`alerts_to_store`]
//! reads from both the alerts to write, each once. A restart rebuilds the engine from those
//! rows ([`Engine::restore_state`], [`Engine::restore_alert`], [`Engine::restore_incident`]);
//! the property test in `engine/tests/restart.rs` holds it to being the same engine.
//!
//! ## Order
//! Events are stored and deduplicated by `(home, seq)` before they get here. Late and replayed
//! events are ordered by their own `ts`: each opening/clearing pair (`mains_lost` /
//! `mains_restored`) remembers the time of its last transition, and an older event changes
//! nothing (it is still in the store's history). An alert opened by a replayed event (older
//! than `late_event_s` on arrival) waits `replay_settle_s` before its first notification, so a
//! replay that arrives in several batches, an outage and its end, still pages nobody.
//!
//! ## Time
//! Every message is placed on the gateway's own timeline before it is ordered or forecast
//! by ([`clock`]): a home's wrong clock can neither discard a real outage nor make a fresh one
//! look a day old. A home whose clock is off by more than `clock_skew_s` has a `clock_skew`
//! alert (for the coordinator, to have the installer look), which clears when it is right again.
//!
//! ## Silence
//! A home is `stale` when nothing arrived for `stale_after_intervals` telemetry periods and
//! `offline` on its Last Will. Silent while on battery or inside a regional incident raises
//! `state_unknown` (critical, with the last known forecast, which keeps running); otherwise
//! `home_silent`. Hearing from the home clears both (a retained status replayed by the broker
//! at subscription is not hearing from it).
//!
//! The centre's own downtime is not the homes' silence: silence is judged only while the
//! gateway's broker connection is up, and from the moment it came up ([`Engine::set_uplink`]).
//! A silence alert waits `silence_settle_s` before its first notification; when
//! `mass_silence_min_homes` homes in two or more municipalities fall silent within
//! `mass_silence_window_s`, that is a network or centre problem: the operators get one notice
//! ([`Output::Notice`]) and those homes' alerts wait `mass_silence_grace_s`. A home still
//! silent after that is escalated as usual. Homes falling silent during the grace wait with
//! the others, and enough of them are a second mass silence with a grace of its own. The wait survives a silence becoming a risk, for
//! as long as agents take to reconnect: when an incident opens around homes still silent
//! from a network cut (the first homes back report the outage they had during it, while the
//! others are still in their reconnect backoff), their `state_unknown` shows on the dashboard
//! at once (and in the incident's digest) but pages no family, nurse or facility before
//! `mass_silence_return_s` (or the grace's end, if sooner); one still silent then is paged.
//!
//! ## Conditions that end without their event
//! An alert whose condition is over clears by itself: telemetry that says so (the agent's
//! `conditions`, or for older agents the readings themselves: mains present, every device
//! answering, the spool writing, the ventilator contact normal) clears it, for instance after
//! an agent restarted on mains and so never sent `mains_restored`. An event older than such a
//! report opens nothing.
//!
//! ## Regional incidents
//! When `incident_min_homes` homes of one municipality lose mains within
//! `incident_window_s`, one incident opens; every home of the municipality on battery or
//! silent joins. Its coordinators and support centre get one digest (a triage list sorted by
//! time left, silent homes marked) at once, again whenever a member crosses a tier, and
//! otherwise at most every `incident_update_min_s` while something changed. Per-home power
//! alerts of member homes then skip those two roles (one event, one voice); the family, nurse
//! and facility still hear about their own home.
//!
//! Over 800 lines for a reason: the engine is one state machine over every home (its power,
//! alerts, escalation, silence and incidents), and its rules read and write each other's
//! fields under one `handle`/`poll`; the alert kinds (`engine/kind.rs`), the clock helpers
//! (`engine/clock.rs`) and the tests (`engine/tests.rs`) are apart. Cutting the rules by
//! concern is part of the service redesign issue 20 still asks for.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use chrono::Duration;
use mamori_protocol::event_data::{BatteryTest, Readings, TestResult};
use mamori_protocol::mqtt::{
    Ack, ConnectionState, DeviceKind, DeviceState, DeviceStatus, Event, EventKind, HomeId, Role, Severity, Status,
    Telemetry, VentilatorReading,
};
use mamori_protocol::reading::OximeterReading;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::domain::forecast::Time;
use crate::domain::forecast::{forecast, learn, Assumptions, Discharge, Forecast, Learned, PowerReadings, Sample};
use crate::domain::homes::{Chemistry, Contact, Home};
use crate::domain::notice::Notice;
use crate::domain::policy::{Policies, Policy, Tier};

pub mod clock;
pub mod facts;
pub mod kind;
mod stored;

use clock::HomeClock;
pub use kind::AlertKind;
pub use stored::StoredAlerts;

/// Engine settings (the `[escalation]` section of the gateway config).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// A home is stale after this many missed telemetry periods.
    pub stale_after_intervals: u32,
    /// Telemetry period assumed until a home says its own, s.
    pub default_interval_s: u32,
    /// Homes of one municipality losing mains within the window that make an incident.
    pub incident_min_homes: usize,
    /// The window, s.
    pub incident_window_s: i64,
    /// Least time between incident digests when no home crossed a tier, s.
    pub incident_update_min_s: i64,
    /// T2 when time left < travel time × 2 + this margin, min.
    pub t2_margin_min: i64,
    /// T3 when time left < this, min.
    pub t3_time_left_min: i64,
    /// An event whose own time is older than this on arrival is a replay (from a home's
    /// spool after its network came back), s.
    pub late_event_s: i64,
    /// An alert a replayed event opens waits this long before its first notification, so
    /// that the rest of the replay (the event that clears it) can arrive first, s.
    pub replay_settle_s: i64,
    /// A home's message time further than this from its arrival (outside a replay) is not
    /// believed, and the home gets a `clock_skew` alert, s.
    pub clock_skew_s: i64,
    /// A silence alert waits this long before its first notification, so that homes falling
    /// silent together are seen together, s.
    pub silence_settle_s: i64,
    /// This many homes falling silent within `mass_silence_window_s`, in two or more
    /// municipalities, is a network or centre problem, not one emergency per family.
    pub mass_silence_min_homes: usize,
    /// The window, s.
    pub mass_silence_window_s: i64,
    /// Their silence alerts then wait this long before anyone is paged, s.
    pub mass_silence_grace_s: i64,
    /// A home still silent from a mass silence when an incident opens around it is then at
    /// risk (`state_unknown`): it waits at most this long (within the grace) for the home to
    /// come back, the time agents take to reconnect after their network does, s.
    pub mass_silence_return_s: i64,
    /// The longest telemetry period a home may announce, s (a larger one is taken as this:
    /// a home must not be able to switch its own silence detection off).
    pub max_interval_s: u32,
    /// `battery_degraded` when a battery was measured to hold less than this share of its
    /// care plan's energy, % (found on a calm day, not in the typhoon).
    pub battery_degraded_below_pct: f64,
    /// Send a contact other than the family nothing without a current consent naming them
    /// (set from the config's `[privacy] require_consent`, not from `[escalation]`).
    #[serde(skip)]
    pub require_consent: bool,
    /// The local UTC offset, s, for the day a consent is in force (set from the config's
    /// `utc_offset`).
    #[serde(skip)]
    pub local_offset_s: i32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            stale_after_intervals: 3,
            default_interval_s: 60,
            incident_min_homes: 3,
            incident_window_s: 300,
            incident_update_min_s: 300,
            t2_margin_min: 360,
            t3_time_left_min: 120,
            late_event_s: 10,
            replay_settle_s: 3,
            clock_skew_s: 120,
            silence_settle_s: 30,
            mass_silence_min_homes: 10,
            mass_silence_window_s: 180,
            mass_silence_grace_s: 600,
            mass_silence_return_s: 180,
            max_interval_s: 3600,
            battery_degraded_below_pct: 70.0,
            require_consent: false,
            local_offset_s: 0,
        }
    }
}

/// Mains or battery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Power {
    /// Not known yet.
    #[default]
    Unknown,
    /// On mains.
    Mains,
    /// On backup power since the outage began.
    Battery {
        /// When the outage began (the home's time).
        since: Time,
    },
}

/// Whether the home is heard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Connectivity {
    /// Never heard from.
    #[default]
    Never,
    /// Talking.
    Online,
    /// The Last Will (or a clean stop) arrived.
    Offline {
        /// Since when.
        since: Time,
        /// A clean stop.
        shutdown: bool,
    },
    /// Telemetry stopped for too long.
    Stale {
        /// Since when (the last message).
        since: Time,
    },
}

impl Connectivity {
    /// Offline or stale.
    pub fn silent(self) -> bool {
        matches!(self, Connectivity::Offline { .. } | Connectivity::Stale { .. })
    }
}

/// Who acknowledged.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct AckInfo {
    /// Their role.
    pub role: Role,
    /// Who (an account, `cli:<user>`, `link`).
    pub by: String,
    /// When.
    pub at: Time,
    /// What they said they are doing.
    pub note: Option<String>,
    /// A family's or a facility's answer from its page (then this is no free text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<Answer>,
}

impl AckInfo {
    /// Whether this counts as an acknowledgement: everything but a facility saying it cannot
    /// take the child (which must not slow the escalation down).
    pub fn acknowledges(&self) -> bool {
        self.answer != Some(Answer::CannotAccept)
    }

    /// What they said, in the reader's language: the answer's words, or their note.
    pub fn said(&self, lang: crate::domain::homes::Lang) -> Option<String> {
        self.answer.map(|a| a.text(lang).to_string()).or_else(|| self.note.clone())
    }
}

/// The answers a family, a facility or a coordinator gives about a home from its page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// A family: 「避難します」.
    Evacuating,
    /// A family: 「電源を確保しました」.
    PowerSecured,
    /// A facility: 「受け入れられます」.
    CanAccept,
    /// A facility: 「受け入れられません」 (not an acknowledgement).
    CannotAccept,
    /// A coordinator: 「この世帯を担当します」 (who is handling the home; the latest holds).
    Handling,
}

impl Answer {
    /// From its wire name.
    pub fn parse(s: &str) -> Option<Answer> {
        match s {
            "evacuating" => Some(Answer::Evacuating),
            "power_secured" => Some(Answer::PowerSecured),
            "can_accept" => Some(Answer::CanAccept),
            "cannot_accept" => Some(Answer::CannotAccept),
            "handling" => Some(Answer::Handling),
            _ => None,
        }
    }

    /// Its wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Answer::Evacuating => "evacuating",
            Answer::PowerSecured => "power_secured",
            Answer::CanAccept => "can_accept",
            Answer::CannotAccept => "cannot_accept",
            Answer::Handling => "handling",
        }
    }

    /// Whose answer it is.
    pub fn role(self) -> Role {
        match self {
            Answer::Evacuating | Answer::PowerSecured => Role::Family,
            Answer::CanAccept | Answer::CannotAccept => Role::Facility,
            Answer::Handling => Role::Coordinator,
        }
    }

    /// In the reader's language.
    pub fn text(self, lang: crate::domain::homes::Lang) -> &'static str {
        use crate::domain::homes::Lang::{En, Ja};
        match (self, lang) {
            (Answer::Evacuating, Ja) => "避難します",
            (Answer::Evacuating, En) => "We are leaving for the destination",
            (Answer::PowerSecured, Ja) => "電源を確保しました",
            (Answer::PowerSecured, En) => "We have power again",
            (Answer::CanAccept, Ja) => "受け入れられます",
            (Answer::CanAccept, En) => "We can take the child",
            (Answer::CannotAccept, Ja) => "受け入れられません",
            (Answer::CannotAccept, En) => "We cannot take the child",
            (Answer::Handling, Ja) => "この世帯を担当します",
            (Answer::Handling, En) => "I am handling this home",
        }
    }
}

/// An alert: one active per (home, kind).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Alert {
    /// Stable id (hex).
    pub id: String,
    /// The home.
    pub home: HomeId,
    /// Its kind (an event kind, or one the gateway concluded: [`AlertKind`]).
    pub kind: AlertKind,
    /// How urgent.
    pub severity: Severity,
    /// When it began at the home.
    pub since: Time,
    /// When the gateway raised it.
    pub raised_at: Time,
    /// The current acknowledgement (cleared when the alert escalates to a new step).
    pub acknowledged: Option<AckInfo>,
    /// Every acknowledgement.
    pub acks: Vec<AckInfo>,
    /// When it cleared.
    pub cleared_at: Option<Time>,
    /// Who cleared it by hand (an account), when it was not the home's own event.
    #[serde(default)]
    pub cleared_by: Option<String>,
    /// `home/kind`: one active alert per key.
    pub dedup_key: String,
    /// The policy in force when it opened.
    pub policy: Policy,
    /// The current step.
    pub step: usize,
    /// Notifications sent on this step.
    pub sent_in_step: u32,
    /// When this step began.
    pub step_entered_at: Time,
    /// The last notification.
    pub last_sent_at: Option<Time>,
    /// Roles notified so far (they hear when it clears).
    pub notified: BTreeSet<Role>,
    /// No notification before this (an alert a replayed event opened; see
    /// [`Settings::replay_settle_s`]).
    #[serde(default)]
    pub hold_until: Option<Time>,
    /// The device, for device alerts.
    pub source: Option<String>,
    /// The event's data (readings at the time), or the gateway's own detail.
    pub data: serde_json::Map<String, serde_json::Value>,
}

impl Alert {
    /// The current tier.
    pub fn tier(&self) -> Tier {
        self.policy.steps.get(self.step).map_or(Tier::T3, |s| s.tier)
    }
}

/// Every home's state, each shared copy-on-write with the engine's copies: the web's snapshot
/// (several a second) copies a map of pointers, and a home's state is copied only when it
/// changes while a snapshot still holds it. Without it a fleet of 20,000 homes was copied whole
/// four times a second (the fleet benchmark: most of the service's CPU, and its memory).
#[derive(Debug, Clone, Default)]
struct States(BTreeMap<HomeId, Arc<HomeState>>);

impl States {
    fn get(&self, home: &HomeId) -> Option<&HomeState> {
        self.0.get(home).map(|s| &**s)
    }

    fn get_mut(&mut self, home: &HomeId) -> Option<&mut HomeState> {
        self.0.get_mut(home).map(Arc::make_mut)
    }

    fn entry_or_default(&mut self, home: HomeId) -> &mut HomeState {
        Arc::make_mut(self.0.entry(home).or_default())
    }

    fn insert(&mut self, home: HomeId, state: HomeState) {
        self.0.insert(home, Arc::new(state));
    }

    fn iter(&self) -> impl Iterator<Item = (&HomeId, &HomeState)> {
        self.0.iter().map(|(h, s)| (h, &**s))
    }

    fn values(&self) -> impl Iterator<Item = &HomeState> {
        self.0.values().map(|s| &**s)
    }
}

/// What the gateway knows of one home (persisted after every change).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct HomeState {
    /// Mains or battery.
    pub power: Power,
    /// Time of the last power transition (the home's clock).
    pub power_ts: Option<Time>,
    /// The home unit's boot that said the mains were back (from the agent's clocks): another
    /// boot than the outage's last reading means the unit lost its power on battery.
    #[serde(default)]
    pub mains_boot: Option<String>,
    /// Heard or silent.
    pub conn: Connectivity,
    /// When the gateway last received anything from the home.
    pub last_heard: Option<Time>,
    /// The telemetry period, s.
    pub interval_s: Option<u32>,
    /// The latest telemetry's time.
    pub telemetry_ts: Option<Time>,
    /// Power readings for the forecast.
    pub readings: PowerReadings,
    /// The oximeter.
    pub oximeter: Option<OximeterReading>,
    /// The ventilator contact.
    pub ventilator: Option<VentilatorReading>,
    /// Sources that are lost.
    pub devices_lost: BTreeSet<String>,
    /// Sources the home reports.
    pub devices: BTreeSet<String>,
    /// What kind each source is (for people: 「パルスオキシメータ」, not `oximeter-1`).
    #[serde(default)]
    pub device_kinds: BTreeMap<String, mamori_protocol::mqtt::DeviceKind>,
    /// The latest forecast while on battery (kept while silent).
    #[serde(default, deserialize_with = "lenient")]
    pub forecast: Option<Forecast>,
    /// The current outage's discharge, as observed (what the forecast is made from).
    #[serde(default)]
    pub discharge: Option<Discharge>,
    /// What earlier outages taught about the home's battery.
    #[serde(default)]
    pub battery: Option<Learned>,
    /// The external backup was taken as run out at this time (the home fell silent when its
    /// own forecast said it would run out).
    #[serde(default)]
    pub ran_out_at: Option<Time>,
    /// Readings refused, by reason, in all.
    #[serde(default)]
    pub rejected_readings: BTreeMap<String, u64>,
    /// Active alerts by kind. Not part of the stored state: the store keeps each alert once,
    /// in its own row ([`alerts_to_store`]), and [`Engine::restore_alert`] puts the active ones
    /// back. (A state stored by an older version still carries them, and they are read.)
    #[serde(default, skip_serializing)]
    pub alerts: BTreeMap<AlertKind, Alert>,
    /// Time of the last transition of each opening/clearing pair, by opening kind.
    pub pair_ts: BTreeMap<String, Time>,
    /// The spool is degraded.
    pub spool_degraded: bool,
    /// The home's clocks.
    #[serde(default)]
    pub clock: HomeClock,
    /// When telemetry last said a condition is over, by opening kind: an event older than
    /// that opens nothing.
    #[serde(default)]
    pub normal_at: BTreeMap<String, Time>,
    /// Opening kinds a person cleared while the home may still say they hold, and when: not
    /// raised again from a snapshot until the home says the condition is over (a snapshot or a
    /// clearing event), or sends an opening event written after the clear. (Without it a cleared
    /// alert would come back with the next snapshot; an event written before the clear is the
    /// occurrence the person cleared, arriving late.)
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cleared_by_hand: BTreeMap<String, Time>,
}

/// A stored forecast from an older version is recomputed at the next reading, not a reason to
/// refuse the whole state.
fn lenient<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Forecast>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(v).ok())
}

impl HomeState {
    /// The forecast as it stands at `now`: a silent home's band widens with the time since
    /// it was last heard.
    pub fn forecast_at(&self, now: Time) -> Option<Forecast> {
        let f = self.forecast?;
        match (self.conn.silent(), self.last_heard, self.ran_out_at) {
            (true, Some(heard), None) => Some(f.widened(now - heard)),
            _ => Some(f),
        }
    }
}

/// A row of an incident's triage list.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct TriageRow {
    /// The home.
    pub home: HomeId,
    /// Its label.
    pub label: String,
    /// On battery (false: mains back, or unknown).
    pub on_battery: bool,
    /// Silent.
    pub silent: bool,
    /// Time left, s (the forecast's middle).
    pub time_left_s: Option<i64>,
    /// Time left on the pessimistic and the optimistic bound, s.
    #[serde(default)]
    pub time_left_range_s: Option<(i64, i64)>,
    /// The forecast's basis.
    pub basis: Option<String>,
    /// Its tier now.
    pub tier: Tier,
    /// Who acknowledged its power alert.
    pub acknowledged_by: Option<Role>,
    /// Evacuation destination.
    pub destination: Option<String>,
    /// Travel time, min.
    pub travel_min: Option<u32>,
    /// How long until the child must leave, s (negative: overdue): the pessimistic time
    /// everything runs out, less the travel time; without a destination, until it runs out.
    #[serde(default)]
    pub leave_in_s: Option<i64>,
}

/// A regional incident: one per municipality at a time.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Incident {
    /// Stable id (`inc-...`).
    pub id: String,
    /// The municipality.
    pub municipality: String,
    /// When it opened.
    pub opened_at: Time,
    /// When it closed.
    pub closed_at: Option<Time>,
    /// Member homes.
    pub members: BTreeSet<HomeId>,
    /// Acknowledgements.
    pub acks: Vec<AckInfo>,
    /// Digests sent.
    pub revision: u32,
    /// The last digest.
    pub last_sent_at: Option<Time>,
    /// Something changed since the last digest.
    pub changed: bool,
    /// Each member's tier at the last digest.
    pub tiers: BTreeMap<HomeId, Tier>,
}

/// What a message says (rendered per language by [`crate::domain::message`]).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
// Built once per notification and moved into its outbox row: boxing the alert would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Content {
    /// An alert, first or repeated.
    Alert {
        /// Home label.
        label: String,
        /// Alert kind.
        kind: AlertKind,
        /// When it began.
        since: Time,
        /// Its tier.
        tier: Tier,
        /// Repeat number on this step (0 = first).
        repeat: u32,
        /// The forecast, while on battery.
        #[serde(default, deserialize_with = "lenient")]
        forecast: Option<Forecast>,
        /// Time left at the time of writing, s (the middle).
        time_left_s: Option<i64>,
        /// Time left on the pessimistic and the optimistic bound, s.
        #[serde(default)]
        time_left_range_s: Option<(i64, i64)>,
        /// The home is silent.
        silent: bool,
        /// The evacuation destination and travel time.
        evacuation: Option<(String, u32)>,
        /// Readings and detail.
        data: serde_json::Map<String, serde_json::Value>,
        /// The devices on backup and their watts (for the facility).
        #[serde(default)]
        devices: Vec<(String, f64)>,
        /// Every role told of this alert so far, this message's included (for the family:
        /// who else knows).
        #[serde(default)]
        told: Vec<Role>,
        /// The roles that have acknowledged it.
        #[serde(default)]
        acknowledged_by: Vec<Role>,
    },
    /// An alert cleared.
    Cleared {
        /// Home label.
        label: String,
        /// Alert kind.
        kind: AlertKind,
        /// When it began.
        since: Time,
        /// When it cleared.
        at: Time,
    },
    /// A family's or a facility's answer about a home's alert, for the others who act on it
    /// (the coordinator; a family leaving, also the facility).
    Answer {
        /// Home label.
        label: String,
        /// What they answered.
        answer: Answer,
        /// When.
        at: Time,
        /// The evacuation destination and travel time.
        evacuation: Option<(String, u32)>,
    },
    /// A regional incident digest.
    Incident {
        /// Municipality code.
        municipality: String,
        /// When it opened.
        opened_at: Time,
        /// Digest number.
        revision: u32,
        /// Sorted by time left, silent homes included.
        rows: Vec<TriageRow>,
        /// The incident is over.
        closed: bool,
    },
}

/// Who a message goes to, each with the role they are told as.
type Recipients = Vec<(Role, Contact)>;

/// One message to send: to every channel of every recipient.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Notification {
    /// Idempotency key base: the outbox adds the recipient and channel.
    pub key: String,
    /// The alert or incident id (the acknowledgement link points at it).
    pub alert_id: String,
    /// The home, for per-home messages.
    pub home: Option<HomeId>,
    /// Recipients.
    pub recipients: Vec<(Role, Contact)>,
    /// What it says.
    pub content: Content,
    /// When it was decided.
    pub at: Time,
    /// Never held back by a contact's quiet hours (a critical alert, its all-clear, an
    /// incident).
    pub critical: bool,
}

/// How long a drill stays open for acknowledgements, min.
pub const DRILL_OPEN_MIN: i64 = 60;

/// An input.
#[derive(Debug, Clone)]
pub enum Input {
    /// A status message (retained; the Last Will is one).
    Status(HomeId, Status),
    /// A retained status the broker replayed at subscription: old news, not hearing from the
    /// home (an `offline` one still says the home is gone).
    RetainedStatus(HomeId, Status),
    /// A telemetry snapshot.
    Telemetry(HomeId, Telemetry),
    /// A stored, deduplicated event.
    Event(HomeId, Event),
    /// A drill at a home: a labelled test message to every contact ([`DRILL_OPEN_MIN`]).
    Drill {
        /// The home.
        home: HomeId,
        /// Who started it (an account).
        by: String,
    },
    /// Someone acknowledged an alert or an incident.
    Ack {
        /// Alert or incident id.
        alert_id: String,
        /// Their role.
        role: Role,
        /// Who.
        by: String,
        /// Their note.
        note: Option<String>,
    },
    /// A family or a facility answered from its page about a home's alert (recorded with its
    /// acknowledgements; a facility's refusal does not acknowledge).
    Answer {
        /// Alert id.
        alert_id: String,
        /// Who (an account).
        by: String,
        /// The answer (its role is the answer's).
        answer: Answer,
    },
    /// Someone cleared an alert by hand (from the dashboard), for a condition that is over
    /// but whose clearing event will never come (a device taken away, say). Refused while
    /// the condition still holds: a power alert while on battery, a silence alert while silent.
    Clear {
        /// Alert id.
        alert_id: String,
        /// Who (an account).
        by: String,
    },
    /// A notification could not be delivered to a recipient after the configured attempts.
    DeliveryFailed {
        /// The notification's key.
        key: String,
        /// Its alert.
        alert_id: String,
        /// Its home.
        home: Option<HomeId>,
        /// The recipient's role.
        role: Role,
        /// The recipient's name.
        name: String,
        /// The message that did not arrive.
        content: Content,
    },
}

/// An output.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send this.
    Notify(Notification),
    /// Tell the home's agent (`mamori/v1/{home}/ack`).
    AgentAck(HomeId, Ack),
    /// An alert opened, changed or cleared (persist it).
    Alert(Alert),
    /// An incident opened, changed or closed (persist it).
    Incident(Incident),
    /// Tell the operators something about the gateway or the fleet (not stored: sent
    /// straight away).
    Notice(Notice),
}

/// The alerts to write, each once and as it is now: those the outputs carry (a cleared alert
/// is only there, since it has left its home's state) and every active alert of a home whose
/// state changed (so an alert changed in place, without an output of its own, is written with
/// its home). An alert's row is the only place it is stored; a restart reads the active ones
/// back ([`Engine::restore_alert`]).
pub fn alerts_to_store(outputs: &[Output], dirty: &[(HomeId, HomeState)]) -> Vec<Alert> {
    let mut at: HashMap<&str, usize> = HashMap::new();
    let mut alerts: Vec<Alert> = Vec::new();
    let emitted = outputs.iter().filter_map(|o| match o {
        Output::Alert(a) => Some(a),
        _ => None,
    });
    for a in emitted.chain(dirty.iter().flat_map(|(_, s)| s.alerts.values())) {
        match at.get(a.id.as_str()) {
            Some(&i) => alerts[i] = a.clone(),
            None => {
                at.insert(&a.id, alerts.len());
                alerts.push(a.clone());
            }
        }
    }
    alerts
}

/// Why an input was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The home is not registered.
    #[error("home {0} is not registered")]
    UnknownHome(String),
    /// No such active alert or incident.
    #[error("no active alert or incident {0}")]
    UnknownAlert(String),
    /// A hand clear of an alert whose condition still holds.
    #[error("alert {0} cannot be cleared by hand: its condition still holds (on battery or silent)")]
    StillActive(String),
    /// A drill while one is open at the home.
    #[error("a drill is already open at this home ({0})")]
    DrillOpen(String),
}

/// The engine.
#[derive(Debug, Clone)]
pub struct Engine {
    settings: Settings,
    policies: Policies,
    /// Shared with every copy (the web's snapshots): a plan change copies the map, which is
    /// rare; a snapshot copies nothing.
    plans: Arc<BTreeMap<HomeId, Home>>,
    state: States,
    incidents: BTreeMap<String, Incident>,
    alert_index: HashMap<String, (HomeId, AlertKind)>,
    outputs: Vec<Output>,
    dirty_homes: BTreeSet<HomeId>,
    /// Since when the gateway's broker connection is down (None: up). Silence is judged only
    /// while it is up.
    down_since: Option<Time>,
    /// Past periods the connection was down, oldest first: a home's silence does not count
    /// them (the centre's downtime is not the homes' silence), and only them, so a link that
    /// keeps dropping for a moment cannot put silence detection off for ever.
    downtime: std::collections::VecDeque<(Time, Time)>,
    /// Homes that fell silent recently, for the mass-silence rule.
    recent_silences: std::collections::VecDeque<(Time, HomeId)>,
    /// A mass silence is being waited out until then.
    mass_until: Option<Time>,
}

fn alert_id(home: &HomeId, kind: AlertKind, at: Time) -> String {
    let h = Sha256::digest(format!("{}/{kind}/{}", home.as_str(), at.timestamp_micros()).as_bytes());
    hex::encode(&h[..8])
}

fn to_utc(t: &mamori_protocol::mqtt::Timestamp) -> Time {
    t.with_timezone(&chrono::Utc)
}

/// Kinds that clear other kinds here (beyond the protocol's own pairs).
fn clears(kind: EventKind) -> Vec<AlertKind> {
    match kind {
        EventKind::OximeterAlarmCleared => {
            vec![EventKind::OximeterAlarm.into(), EventKind::OximeterAlarmSilenced.into()]
        }
        k => k.clears().map(|c| vec![c.into()]).unwrap_or_default(),
    }
}

/// The opening kinds a telemetry snapshot says are over: the agent's own `conditions`, or,
/// from an agent too old to send them, what the readings show by themselves.
fn over(t: &Telemetry) -> Vec<AlertKind> {
    let mut v: Vec<EventKind> = Vec::new();
    if t.conditions.is_empty() {
        if t.mains_present == Some(true) {
            v.push(EventKind::MainsLost);
        }
        if !t.devices.is_empty() && t.devices.iter().all(|d| d.state == DeviceState::Ok) {
            v.push(EventKind::DeviceLost);
        }
        match t.ventilator.as_ref().map(|r| r.alarm) {
            Some(mamori_protocol::mqtt::ContactState::Normal) => {
                v.extend([EventKind::VentilatorAlarm, EventKind::AlarmCableFault])
            }
            Some(mamori_protocol::mqtt::ContactState::Alarm) => v.push(EventKind::AlarmCableFault),
            _ => {}
        }
    } else {
        v.extend(t.conditions.iter().filter(|(k, holds)| !**holds && **k != EventKind::Unknown).map(|(k, _)| *k));
    }
    if t.spool.as_ref().is_some_and(|s| !s.degraded) {
        v.push(EventKind::SpoolDegraded);
    }
    v.into_iter().map(AlertKind::Event).collect()
}

/// Whether an opening kind that a snapshot's `conditions` say holds is raised from the snapshot
/// when its event has not come: every kind that raises an alert from its event.
fn raised_from_snapshot(kind: EventKind) -> bool {
    kind.default_severity() != Severity::Info
        && kind.clears().is_none()
        && !matches!(kind, EventKind::AgentStarted | EventKind::AgentStopping | EventKind::Unknown)
}

fn power_kind(kind: AlertKind) -> bool {
    kind.is_power()
}

impl Engine {
    /// A new engine.
    pub fn new(settings: Settings, policies: Policies) -> Engine {
        Engine {
            settings,
            policies,
            plans: Default::default(),
            state: States::default(),
            incidents: BTreeMap::new(),
            alert_index: HashMap::new(),
            outputs: Vec::new(),
            dirty_homes: BTreeSet::new(),
            // Up from the beginning of time unless told otherwise: the service says when its
            // connection comes and goes.
            down_since: None,
            downtime: std::collections::VecDeque::new(),
            recent_silences: std::collections::VecDeque::new(),
            mass_until: None,
        }
    }

    /// The gateway's broker connection came up (`true`) or went down at `now`. While it is
    /// down no home is judged silent, and the time it was down is not counted in any home's
    /// silence. (The service marks it down from the beginning of time when it starts, so a
    /// gateway that was stopped judges silence from its first connection.)
    pub fn set_uplink(&mut self, up: bool, now: Time) {
        match (up, self.down_since) {
            (true, Some(from)) => {
                self.down_since = None;
                self.downtime.push_back((from, now.max(from)));
                // Keep what can still matter: the longest silence a home can be judged on.
                let keep = Duration::seconds(
                    i64::from(self.settings.max_interval_s) * i64::from(self.settings.stale_after_intervals) + 3600,
                );
                while self.downtime.len() > 1 && self.downtime.front().is_some_and(|(_, to)| now - *to > keep) {
                    self.downtime.pop_front();
                }
            }
            (false, None) => self.down_since = Some(now),
            _ => {}
        }
    }

    /// Take over another engine's record of the connection (after a reload from the store).
    pub fn carry_uplink(&mut self, from: &Engine) {
        self.down_since = from.down_since;
        self.downtime = from.downtime.clone();
    }

    /// Whether the broker connection is up.
    pub fn uplink(&self) -> bool {
        self.down_since.is_none()
    }

    /// How long the connection was down between `from` and now (it is up now).
    fn downtime_since(&self, from: Time) -> Duration {
        self.downtime
            .iter()
            .filter(|(_, to)| *to > from)
            .map(|(f, to)| *to - (*f).max(from))
            .fold(Duration::zero(), |a, b| a + b)
    }

    /// Registered homes.
    pub fn home_count(&self) -> usize {
        self.plans.len()
    }

    /// The engine settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Add or replace a home's care plan (its state is kept).
    pub fn upsert_home(&mut self, home: Home) {
        self.state.entry_or_default(home.id.clone());
        Arc::make_mut(&mut self.plans).insert(home.id.clone(), home);
    }

    /// Restore a home's state (after a restart).
    pub fn restore_state(&mut self, id: HomeId, state: HomeState) {
        for (kind, a) in &state.alerts {
            self.alert_index.insert(a.id.clone(), (id.clone(), *kind));
        }
        self.state.insert(id, state);
    }

    /// Restore an active alert (after a restart) from its stored row, unless the home's state
    /// already holds one of its kind (a state stored by an older version, which carried its
    /// alerts), the home is not registered, or the alert was cleared.
    pub fn restore_alert(&mut self, alert: Alert) {
        if alert.cleared_at.is_some() || !self.knows(&alert.home) {
            return;
        }
        let st = self.state.entry_or_default(alert.home.clone());
        if st.alerts.contains_key(&alert.kind) {
            return;
        }
        self.alert_index.insert(alert.id.clone(), (alert.home.clone(), alert.kind));
        st.alerts.insert(alert.kind, alert);
    }

    /// Restore an open incident (after a restart).
    pub fn restore_incident(&mut self, incident: Incident) {
        if incident.closed_at.is_none() {
            self.incidents.insert(incident.municipality.clone(), incident);
        }
    }

    /// Whether a home is registered.
    pub fn knows(&self, home: &HomeId) -> bool {
        self.plans.contains_key(home)
    }

    /// Whether a contact needs a current consent to be sent anything (`[privacy]`).
    pub fn require_consent(&self) -> bool {
        self.settings.require_consent
    }

    /// The local date at `now`: the day a consent's dates are read against.
    pub fn today(&self, now: Time) -> chrono::NaiveDate {
        (now + Duration::seconds(i64::from(self.settings.local_offset_s))).date_naive()
    }

    /// Whether a message for `recipient` in `role` about `home` may still be sent at `now`:
    /// always unless consent is required; then the family always, and anyone else only while
    /// the home's plan still names them with a consent in force (checked again when a queued
    /// message comes due, so a withdrawal stops what was already queued).
    pub fn may_send(
        &self,
        home: Option<&HomeId>,
        role: Role,
        recipient: &str,
        channel: &crate::domain::homes::ChannelRef,
        now: Time,
    ) -> bool {
        if !self.settings.require_consent || role == Role::Family {
            return true;
        }
        let Some(home) = home else { return true };
        let today = self.today(now);
        // The contact by its name, or by the channel (a name corrected in the plan meanwhile).
        self.plans.get(home).is_some_and(|p| {
            p.contacts.iter().any(|c| {
                c.role == role
                    && (c.name == recipient
                        || c.channels.iter().chain(c.then.iter().flat_map(|s| s.channels.iter())).any(|x| x == channel))
                    && c.may_receive(true, today)
            })
        })
    }

    /// The roles of a home with at least one contact who may be sent something at `now`.
    fn reachable(&self, home: &HomeId, roles: &[Role], now: Time) -> Vec<Role> {
        let today = self.today(now);
        let Some(p) = self.plans.get(home) else { return Vec::new() };
        roles
            .iter()
            .copied()
            .filter(|r| p.contacts_for(*r).any(|c| c.may_receive(self.settings.require_consent, today)))
            .collect()
    }

    /// An active alert by its id.
    pub fn alert_by_id(&self, id: &str) -> Option<&Alert> {
        let (home, kind) = self.alert_index.get(id)?;
        self.state.get(home)?.alerts.get(kind)
    }

    /// A home's care plan.
    pub fn plan(&self, home: &HomeId) -> Option<&Home> {
        self.plans.get(home)
    }

    /// Every registered home's care plan, and its state once heard from.
    pub fn states_and_plans(&self) -> impl Iterator<Item = (&Home, Option<&HomeState>)> {
        self.plans.values().map(|p| (p, self.state.get(&p.id)))
    }

    /// A home's state.
    pub fn home_state(&self, home: &HomeId) -> Option<&HomeState> {
        self.state.get(home)
    }

    /// Every home's state.
    pub fn states(&self) -> impl Iterator<Item = (&HomeId, &HomeState)> {
        self.state.iter()
    }

    /// Open incidents.
    pub fn incidents(&self) -> impl Iterator<Item = &Incident> {
        self.incidents.values()
    }

    /// Drain the outputs.
    pub fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.outputs)
    }

    /// Drain the homes whose state changed, with their state (its alerts go to the store
    /// through [`alerts_to_store`]).
    pub fn take_dirty(&mut self) -> Vec<(HomeId, HomeState)> {
        let dirty = std::mem::take(&mut self.dirty_homes);
        dirty.into_iter().filter_map(|h| self.state.get(&h).map(|s| (h, s.clone()))).collect()
    }

    /// Apply one input.
    pub fn handle(&mut self, input: Input, now: Time) -> Result<(), EngineError> {
        match input {
            Input::Status(home, s) => self.on_status(home, s, false, now),
            Input::RetainedStatus(home, s) => self.on_status(home, s, true, now),
            Input::Telemetry(home, t) => self.on_telemetry(home, t, now),
            Input::Event(home, e) => self.on_event(home, e, now),
            Input::Ack { alert_id, role, by, note } => {
                self.on_ack(alert_id, AckInfo { role, by, at: now, note, answer: None })
            }
            Input::Answer { alert_id, by, answer } => {
                if !self.alert_index.contains_key(&alert_id) {
                    return Err(EngineError::UnknownAlert(alert_id));
                }
                self.on_ack(alert_id, AckInfo { role: answer.role(), by, at: now, note: None, answer: Some(answer) })
            }
            Input::Drill { home, by } => {
                if !self.plans.contains_key(&home) {
                    return Err(EngineError::UnknownHome(home.as_str().to_string()));
                }
                if let Some(open) = self.state.get(&home).and_then(|s| s.alerts.get(&AlertKind::Drill)) {
                    return Err(EngineError::DrillOpen(open.id.clone()));
                }
                let mut data = serde_json::Map::new();
                data.insert("by".into(), by.into());
                self.raise(&home, AlertKind::Drill, Severity::Info, now, None, data, now);
                Ok(())
            }
            Input::Clear { alert_id, by } => self.on_clear(&alert_id, by, now),
            Input::DeliveryFailed { key, alert_id, home, role, name, content } => {
                self.on_delivery_failed(key, alert_id, home, role, name, content, now)
            }
        }
    }

    fn known(&self, home: &HomeId) -> Result<(), EngineError> {
        if self.knows(home) {
            Ok(())
        } else {
            Err(EngineError::UnknownHome(home.as_str().to_string()))
        }
    }

    fn heard(&mut self, home: &HomeId, now: Time) {
        let st = self.state.entry_or_default(home.clone());
        st.last_heard = Some(now);
        if st.conn != Connectivity::Online {
            st.conn = Connectivity::Online;
            // Heard again: whatever was assumed while it was silent, it has power (the next
            // reading recomputes the forecast).
            st.ran_out_at = None;
            for kind in [AlertKind::HomeSilent, AlertKind::StateUnknown] {
                self.clear_alert(home, kind, now);
            }
            self.touch_incident(home);
        }
        self.dirty_homes.insert(home.clone());
    }

    fn on_status(&mut self, home: HomeId, s: Status, retained: bool, now: Time) -> Result<(), EngineError> {
        self.known(&home)?;
        match s.state {
            ConnectionState::Online => {
                if let Some(i) = s.telemetry_interval_s {
                    self.state.entry_or_default(home.clone()).interval_s = Some(self.interval(i));
                }
                if !retained {
                    self.heard(&home, now);
                }
            }
            ConnectionState::Offline => {
                let st = self.state.entry_or_default(home.clone());
                if !st.conn.silent() {
                    st.conn = Connectivity::Offline { since: now, shutdown: s.reason.as_deref() == Some("shutdown") };
                    self.dirty_homes.insert(home.clone());
                    self.went_silent(&home, true, now);
                    self.check_mass_silence(now);
                }
            }
        }
        Ok(())
    }

    fn on_telemetry(&mut self, home: HomeId, t: Telemetry, now: Time) -> Result<(), EngineError> {
        self.known(&home)?;
        self.heard(&home, now);
        let limit = Duration::seconds(self.settings.clock_skew_s);
        let interval = self.interval(t.interval_s);
        let st = self.state.entry_or_default(home.clone());
        // When it was written on the home's event timeline (placed like an event, before it
        // becomes the clock's reference): a fresh snapshot itself is placed at its arrival.
        let written = st.clock.place_event(to_utc(&t.ts), t.clock.as_ref(), now, limit);
        let ts = st.clock.place_telemetry(to_utc(&t.ts), t.clock.as_ref(), t.kept, now, limit);
        st.interval_s = Some(interval);
        let skew = st.clock.skewed(limit).then_some(st.clock.skew_s);
        self.clock_skew(&home, skew, now);
        let st = self.state.entry_or_default(home.clone());
        if st.telemetry_ts.is_some_and(|prev| prev > ts) {
            return Ok(()); // a late snapshot: newer readings are already here
        }
        st.telemetry_ts = Some(ts);
        st.readings.update(&t, ts);
        if t.oximeter.is_some() {
            st.oximeter = t.oximeter.clone();
        }
        if t.ventilator.is_some() {
            st.ventilator = t.ventilator.clone();
        }
        st.devices = t.devices.iter().map(|d| d.id.clone()).collect();
        st.device_kinds = t.devices.iter().map(|d| (d.id.clone(), d.kind)).collect();
        st.devices_lost = t.devices.iter().filter(|d| d.state == DeviceState::Lost).map(|d| d.id.clone()).collect();
        st.spool_degraded = t.spool.as_ref().is_some_and(|s| s.degraded);
        if let Some(present) = t.mains_present {
            if st.power_ts.is_none_or(|p| ts > p) {
                let was = st.power;
                match (present, was) {
                    (true, Power::Mains) | (false, Power::Battery { .. }) => {}
                    (true, _) => {
                        st.power = Power::Mains;
                        st.power_ts = Some(ts);
                        st.mains_boot = t.clock.as_ref().map(|c| c.boot.clone());
                    }
                    (false, _) => {
                        st.power = Power::Battery { since: ts };
                        st.power_ts = Some(ts);
                    }
                }
                if st.power != was {
                    self.power_changed(&home, now);
                }
            }
        }
        self.observe(&home, Sample::of(ts, t.ups.as_ref(), t.power_meter.as_ref()), now);
        if let (Some(c), Some(d)) = (&t.clock, self.state.get_mut(&home).and_then(|s| s.discharge.as_mut())) {
            d.heard_in(ts, &c.boot);
        }
        self.refresh_forecast(&home, now);
        // Conditions the home says are over end their alerts, whether or not the clearing
        // event ever comes.
        for kind in over(&t) {
            let Some(st) = self.state.get_mut(&home) else { break };
            st.normal_at.insert(kind.to_string(), ts);
            st.cleared_by_hand.remove(&kind.to_string());
            if st.alerts.get(&kind).is_some_and(|a| a.since <= ts) {
                self.clear_alert(&home, kind, now);
                self.touch_incident(&home);
            }
        }
        if !t.kept {
            let holding: Vec<EventKind> = t
                .conditions
                .iter()
                .filter(|(k, holds)| **holds && raised_from_snapshot(**k))
                .map(|(k, _)| *k)
                .collect();
            for kind in holding {
                self.condition_without_its_event(&home, kind, written.min(ts), &t, now);
            }
        }
        Ok(())
    }

    /// The home's own snapshot, written at `ts` (on the home's event timeline, so that a
    /// snapshot written just before a `mains_restored` and arriving just after it is seen to be
    /// older), says a condition holds (its mains lost, its battery low, the ventilator's alarm,
    /// a device lost, an oximeter's alarm…), and no alert is open for it: the event was lost
    /// on its way (a clustered broker has been seen to acknowledge an event to the agent and
    /// never deliver it, `docs/operations.md`). The alert is raised from the snapshot, so its
    /// readers are paged all the same; the event, if it comes later, finds the alert open and
    /// pages nobody again (a `mains_lost` still sets the outage's start and the forecast from
    /// its own time). Not when the home has said anything about that condition since the
    /// snapshot was taken (its event, its end, or a snapshot saying it is over), nor when a
    /// person cleared it and the home has not said it was over since, nor from a snapshot
    /// kept during a broker outage (history, not the present), nor from an agent too old to
    /// send its conditions (its raw readings are not its judgement: its mains flag, for one,
    /// is down during a battery self-test).
    fn condition_without_its_event(&mut self, home: &HomeId, event: EventKind, ts: Time, t: &Telemetry, now: Time) {
        let kind = AlertKind::Event(event);
        let Some(st) = self.state.get(home) else { return };
        let told_since = |at: Option<&Time>| at.is_some_and(|at| *at > ts);
        if st.alerts.contains_key(&kind)
            || told_since(st.pair_ts.get(event.as_str()))
            || told_since(st.normal_at.get(event.as_str()))
            || st.cleared_by_hand.contains_key(event.as_str())
        {
            return;
        }
        let since = match (event, st.power) {
            (EventKind::MainsLost, Power::Battery { since }) => since.min(ts),
            _ => ts,
        };
        // The device, where the snapshot names it: the lost one, or the oximeter.
        let device = |want: &dyn Fn(&DeviceStatus) -> bool| t.devices.iter().find(|d| want(d)).map(|d| d.id.clone());
        let source = match event {
            EventKind::DeviceLost => device(&|d| d.state == DeviceState::Lost),
            EventKind::Spo2Low
            | EventKind::PulseOutOfRange
            | EventKind::SensorOff
            | EventKind::OximeterAlarm
            | EventKind::OximeterAlarmSilenced => {
                device(&|d| d.kind == DeviceKind::Oximeter && d.state == DeviceState::Ok)
            }
            _ => None,
        };
        let mut data = match event {
            EventKind::MainsLost | EventKind::BatteryLow | EventKind::UpsFault => {
                t.ups.as_ref().map(mamori_protocol::event_data::to_data).unwrap_or_default()
            }
            // The snapshot's oximeter reading is one oximeter's: with two, it may be the other's.
            _ if source.is_some()
                && event != EventKind::DeviceLost
                && t.devices.iter().filter(|d| d.kind == DeviceKind::Oximeter).count() == 1 =>
            {
                t.oximeter.as_ref().map(mamori_protocol::event_data::to_data).unwrap_or_default()
            }
            _ => serde_json::Map::new(),
        };
        data.insert("raised_from".into(), "telemetry".into());
        // Info, not a warning: the QoS 0 telemetry often overtakes the QoS 1 event (on a NATS
        // cluster most of all), which then arrives and pages nobody again.
        tracing::info!(
            home = home.as_str(),
            kind = event.as_str(),
            "alert raised from the home's telemetry: its event has not come (yet)"
        );
        self.raise(home, kind, event.default_severity(), since, source, data, now);
        self.hold_if_late(home, kind, ts, now);
    }

    /// A home's announced telemetry period, bounded.
    fn interval(&self, announced: u32) -> u32 {
        announced.clamp(1, self.settings.max_interval_s.max(1))
    }

    /// Open or clear the home's `clock_skew` alert (`skew`: seconds off, when beyond the limit).
    fn clock_skew(&mut self, home: &HomeId, skew: Option<i64>, now: Time) {
        let open = self.state.get(home).is_some_and(|s| s.alerts.contains_key(&AlertKind::ClockSkew));
        match skew {
            Some(s) if !open => {
                let data = mamori_protocol::event_data::to_data(&facts::ClockSkew { skew_s: Some(s) });
                self.raise(home, AlertKind::ClockSkew, Severity::Warning, now, None, data, now);
            }
            None if open => self.clear_alert(home, AlertKind::ClockSkew, now),
            _ => {}
        }
    }

    fn on_event(&mut self, home: HomeId, e: Event, now: Time) -> Result<(), EngineError> {
        self.known(&home)?;
        self.heard(&home, now);
        let limit = Duration::seconds(self.settings.clock_skew_s);
        let cleared = clears(e.kind);
        let pair = if cleared.is_empty() { e.kind.as_str() } else { cleared[0].as_str() };
        let st = self.state.entry_or_default(home.clone());
        let ts = st.clock.place_event(to_utc(&e.ts), e.clock.as_ref(), now, limit);
        if st.pair_ts.get(pair).is_some_and(|last| *last > ts) {
            return Ok(()); // older than what we know: history only
        }
        if cleared.is_empty() && st.normal_at.get(e.kind.as_str()).is_some_and(|n| *n > ts) {
            return Ok(()); // the home has since said this condition is over: history only
        }
        if cleared.is_empty() && st.cleared_by_hand.get(e.kind.as_str()).is_some_and(|at| ts <= *at) {
            return Ok(()); // the occurrence a person cleared, arriving late: history only
        }
        if cleared.is_empty() {
            st.pair_ts.insert(pair.to_string(), ts);
        }
        // A clearing event ends every kind it clears (`oximeter_alarm_cleared`: the alarm and
        // its silencing), and any hold a person's clear put on them: what the home says next
        // is a new occurrence.
        for kind in &cleared {
            st.pair_ts.insert(kind.as_str().to_string(), ts);
            st.cleared_by_hand.remove(kind.as_str());
        }
        // Power state from the mains events, ordered by ts.
        match e.kind {
            EventKind::MainsLost => {
                match st.power {
                    Power::Battery { since } if since <= ts => {}
                    Power::Battery { .. } => st.power = Power::Battery { since: ts },
                    _ if st.power_ts.is_none_or(|p| ts >= p) => {
                        st.power = Power::Battery { since: ts };
                        st.power_ts = Some(ts);
                    }
                    _ => {}
                }
                let runtime = Readings::of(&e.data).runtime_s;
                self.power_changed(&home, now);
                if let Some(r) = runtime {
                    self.observe(&home, Sample { at: Some(ts), runtime_s: Some(r), ..Default::default() }, now);
                }
                self.refresh_forecast(&home, now);
            }
            EventKind::MainsRestored => {
                if st.power_ts.is_none_or(|p| ts >= p) {
                    st.power = Power::Mains;
                    st.power_ts = Some(ts);
                    st.mains_boot = e.clock.as_ref().map(|c| c.boot.clone());
                }
                self.power_changed(&home, now);
                self.refresh_forecast(&home, now);
            }
            _ => {}
        }
        if !cleared.is_empty() {
            for kind in cleared {
                self.clear_alert(&home, kind, now);
            }
            return Ok(());
        }
        if e.kind == EventKind::BatteryTest {
            // A scheduled self-test: a failed one tells the family and the coordinator on a
            // calm day (like a degraded battery); a passed one clears that. Skipped, not
            // started or ended by an outage says nothing of the battery.
            match BatteryTest::of(&e.data).result {
                Some(TestResult::Failed) => self.raise(
                    &home,
                    AlertKind::BatteryTestFailed,
                    Severity::Warning,
                    ts,
                    e.source.clone(),
                    e.data.clone(),
                    now,
                ),
                Some(TestResult::Passed) => self.clear_alert(&home, AlertKind::BatteryTestFailed, now),
                _ => {}
            }
            return Ok(());
        }
        let silent_kind = matches!(e.kind, EventKind::AgentStarted | EventKind::AgentStopping | EventKind::Unknown);
        if e.severity == Severity::Info || silent_kind {
            return Ok(());
        }
        if let Some(st) = self.state.get_mut(&home) {
            st.cleared_by_hand.remove(e.kind.as_str());
        }
        self.raise(&home, AlertKind::Event(e.kind), e.severity, ts, e.source.clone(), e.data.clone(), now);
        self.hold_if_late(&home, AlertKind::Event(e.kind), ts, now);
        Ok(())
    }

    /// An alert just raised from something written more than `late_event_s` before it
    /// arrived (a replay) waits `replay_settle_s` before its first notification, so that the
    /// rest of the replay (its end, often) can arrive first.
    fn hold_if_late(&mut self, home: &HomeId, kind: AlertKind, ts: Time, now: Time) {
        if now - ts > Duration::seconds(self.settings.late_event_s) {
            let settle = Duration::seconds(self.settings.replay_settle_s);
            let alert = self.state.get_mut(home).and_then(|s| s.alerts.get_mut(&kind));
            if let Some(a) = alert.filter(|a| a.raised_at == now && a.notified.is_empty()) {
                a.hold_until = Some(now + settle);
            }
        }
    }

    /// Open an alert unless one of its kind is active.
    #[allow(clippy::too_many_arguments)]
    fn raise(
        &mut self,
        home: &HomeId,
        kind: AlertKind,
        severity: Severity,
        since: Time,
        source: Option<String>,
        data: serde_json::Map<String, serde_json::Value>,
        now: Time,
    ) {
        let Some(plan) = self.plans.get(home) else { return };
        let policy = self.policies.for_alert(kind.as_str(), &plan.escalation);
        let st = self.state.entry_or_default(home.clone());
        if st.alerts.contains_key(&kind) {
            return;
        }
        let id = alert_id(home, kind, since.max(now));
        let alert = Alert {
            id: id.clone(),
            home: home.clone(),
            kind,
            severity,
            since,
            raised_at: now,
            acknowledged: None,
            acks: Vec::new(),
            cleared_at: None,
            cleared_by: None,
            dedup_key: format!("{}/{kind}", home.as_str()),
            policy,
            step: 0,
            sent_in_step: 0,
            step_entered_at: now,
            last_sent_at: None,
            notified: BTreeSet::new(),
            hold_until: None,
            source,
            data,
        };
        self.outputs.push(Output::Alert(alert.clone()));
        st.alerts.insert(kind, alert);
        self.alert_index.insert(id, (home.clone(), kind));
        self.dirty_homes.insert(home.clone());
    }

    fn clear_alert(&mut self, home: &HomeId, kind: AlertKind, now: Time) {
        let Some(st) = self.state.get_mut(home) else { return };
        let Some(mut alert) = st.alerts.remove(&kind) else { return };
        alert.cleared_at = Some(now);
        self.alert_index.remove(&alert.id);
        self.dirty_homes.insert(home.clone());
        if !alert.notified.is_empty() {
            let roles: Vec<Role> = alert.notified.iter().copied().collect();
            let content = Content::Cleared { label: self.label(home), kind: alert.kind, since: alert.since, at: now };
            let n = self.notification(format!("{}:clear", alert.id), &alert.id, home, &roles, content, now);
            self.outputs.push(Output::Notify(n));
        }
        self.outputs.push(Output::Alert(alert));
    }

    fn label(&self, home: &HomeId) -> String {
        self.plans.get(home).map_or_else(|| home.as_str().to_string(), |p| p.label.clone())
    }

    fn notification(
        &self,
        key: String,
        alert_id: &str,
        home: &HomeId,
        roles: &[Role],
        content: Content,
        now: Time,
    ) -> Notification {
        // Only those the guardian consented to share the child's data with, when the config
        // asks for consent (the family always).
        let (require, today) = (self.settings.require_consent, self.today(now));
        let recipients = self.plans.get(home).map_or_else(Vec::new, |p| {
            roles
                .iter()
                .flat_map(|r| {
                    p.contacts_for(*r).filter(|c| c.may_receive(require, today)).map(move |c| (*r, c.clone()))
                })
                .collect()
        });
        let critical = match &content {
            Content::Alert { kind, .. } => {
                self.state.get(home).and_then(|s| s.alerts.get(kind)).is_none_or(|a| a.severity == Severity::Critical)
            }
            Content::Cleared { .. } | Content::Incident { .. } => true,
            // Someone is leaving, or the destination cannot take the child: now, not after
            // quiet hours.
            Content::Answer { answer, .. } => matches!(answer, Answer::Evacuating | Answer::CannotAccept),
        };
        Notification {
            key,
            alert_id: alert_id.to_string(),
            home: Some(home.clone()),
            recipients,
            content,
            at: now,
            critical,
        }
    }

    /// Whether a message decided at `since` for `role` about `alert_id` still has something
    /// to say: the alert (or incident) is open, and nobody in that role has acknowledged it
    /// since. A contact's later channels and quiet-held messages ask this when they come due.
    pub fn still_needed(&self, home: Option<&HomeId>, alert_id: &str, role: Role, since: Time) -> bool {
        let acks = match home {
            Some(h) => self.state.get(h).and_then(|s| s.alerts.values().find(|a| a.id == alert_id)).map(|a| &a.acks),
            None => self.incidents.values().find(|i| i.id == alert_id && i.closed_at.is_none()).map(|i| &i.acks),
        };
        // A facility's refusal is no acknowledgement: the home's other facility is still told.
        acks.is_some_and(|acks| !acks.iter().any(|a| a.role == role && a.acknowledges() && a.at >= since))
    }

    /// One acknowledgement per person (or link) per step: a replayed link changes nothing, and
    /// re-escalation is timed from the first acknowledgement of the step, so nobody can put it
    /// off by acknowledging again.
    fn on_ack(&mut self, alert_id: String, ack: AckInfo) -> Result<(), EngineError> {
        let (answer, at) = (ack.answer, ack.at);
        let Some(home) = self.record_ack(&alert_id, ack)? else { return Ok(()) };
        if let Some(answer) = answer {
            self.tell_answer(&home, &alert_id, answer, at);
        }
        Ok(())
    }

    /// A family's or a facility's answer goes to those who act on it: the home's coordinators
    /// (a family leaving: its facility too). A coordinator taking a home on is on the board,
    /// not paged.
    fn tell_answer(&mut self, home: &HomeId, alert_id: &str, answer: Answer, at: Time) {
        let roles = self.answer_roles(home, answer, at);
        if roles.is_empty() {
            return;
        }
        let evacuation =
            self.plans.get(home).and_then(|p| p.evacuation.as_ref()).map(|e| (e.destination.clone(), e.travel_min));
        let content = Content::Answer { label: self.label(home), answer, at, evacuation };
        let key = format!("{alert_id}:answer:{}:{}", answer.as_str(), at.timestamp_millis());
        let n = self.notification(key, alert_id, home, &roles, content, at);
        if !n.recipients.is_empty() {
            self.outputs.push(Output::Notify(n));
        }
    }

    /// Who a home's answer goes to: the roles that act on it and that someone will hear as
    /// (a family leaving: the coordinator and the facility; the rest: the coordinator; a
    /// coordinator taking a home on: nobody).
    pub fn answer_roles(&self, home: &HomeId, answer: Answer, now: Time) -> Vec<Role> {
        let roles: &[Role] = match answer {
            Answer::Evacuating => &[Role::Coordinator, Role::Facility],
            Answer::PowerSecured | Answer::CanAccept | Answer::CannotAccept => &[Role::Coordinator],
            Answer::Handling => &[],
        };
        self.reachable(home, roles, now)
    }

    /// Record an acknowledgement or an answer; the home, when it was recorded for a home's
    /// alert (None: an incident's, or nothing new).
    fn record_ack(&mut self, alert_id: &str, ack: AckInfo) -> Result<Option<HomeId>, EngineError> {
        let alert_id = alert_id.to_string();
        if let Some(inc) = self.incidents.values_mut().find(|i| i.id == alert_id) {
            if !inc.acks.iter().any(|a| a.by == ack.by && a.role == ack.role) {
                inc.acks.push(ack);
                self.outputs.push(Output::Incident(inc.clone()));
            }
            return Ok(None);
        }
        let (home, kind) =
            self.alert_index.get(&alert_id).cloned().ok_or_else(|| EngineError::UnknownAlert(alert_id.clone()))?;
        let alert = self
            .state
            .get_mut(&home)
            .and_then(|s| s.alerts.get_mut(&kind))
            .ok_or_else(|| EngineError::UnknownAlert(alert_id.clone()))?;
        // Nothing new: an acknowledgement this person already gave in this step (a replayed
        // link), or an answer that is already the last word of its role in this step. Anything
        // else is recorded: a family's answer after its acknowledgement, a facility changing
        // its mind, a coordinator taking a home back after handing it over.
        let same = |a: &AckInfo| a.note == ack.note && a.answer == ack.answer && a.at >= alert.step_entered_at;
        let again = if ack.answer.is_some() {
            alert.acks.iter().rev().find(|a| a.role == ack.role).is_some_and(|a| a.by == ack.by && same(a))
        } else {
            alert.acks.iter().any(|a| a.by == ack.by && a.role == ack.role && same(a))
        };
        if again {
            return Ok(None);
        }
        if !ack.acknowledges() {
            // Recorded for the coordinator to see; the escalation goes on as if unanswered. A
            // facility that first said yes and now says no takes its acknowledgement back,
            // unless someone else has acknowledged this step.
            let own = |k: &AckInfo| k.by == ack.by && k.role == ack.role;
            let others = alert.acks.iter().any(|k| !own(k) && k.acknowledges() && k.at >= alert.step_entered_at);
            if alert.acknowledged.as_ref().is_some_and(own) && !others {
                alert.acknowledged = None;
            }
            alert.acks.push(ack);
            self.outputs.push(Output::Alert(alert.clone()));
            self.dirty_homes.insert(home.clone());
            self.touch_incident(&home);
            return Ok(Some(home));
        }
        if alert.acknowledged.is_none() {
            alert.acknowledged = Some(ack.clone());
        }
        alert.acks.push(ack.clone());
        let out = Ack {
            alert_id: alert.id.clone(),
            alert_kind: alert.kind.to_string(),
            role: ack.role,
            at: ack.at.fixed_offset(),
        };
        self.outputs.push(Output::Alert(alert.clone()));
        self.outputs.push(Output::AgentAck(home.clone(), out));
        self.dirty_homes.insert(home.clone());
        self.touch_incident(&home);
        Ok(Some(home))
    }

    fn on_clear(&mut self, alert_id: &str, by: String, now: Time) -> Result<(), EngineError> {
        let unknown = || EngineError::UnknownAlert(alert_id.to_string());
        let (home, kind) = self.alert_index.get(alert_id).cloned().ok_or_else(unknown)?;
        let st = self.state.get_mut(&home).ok_or_else(unknown)?;
        let on_battery = matches!(st.power, Power::Battery { .. });
        let holds = (power_kind(kind) && on_battery) || (kind.is_silence() && st.conn.silent());
        if holds {
            return Err(EngineError::StillActive(alert_id.to_string()));
        }
        if let Some(a) = st.alerts.get_mut(&kind) {
            a.cleared_by = Some(by);
        }
        if let AlertKind::Event(e) = kind {
            st.cleared_by_hand.insert(e.as_str().to_string(), now);
        }
        self.clear_alert(&home, kind, now);
        self.touch_incident(&home);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn on_delivery_failed(
        &mut self,
        key: String,
        alert_id: String,
        home: Option<HomeId>,
        role: Role,
        name: String,
        content: Content,
        now: Time,
    ) -> Result<(), EngineError> {
        let Some(home) = home.filter(|h| self.knows(h)) else {
            return Ok(()); // incident digests go to many homes' contacts: the outbox keeps retrying them
        };
        let next = match role {
            Role::Family | Role::VisitingNurse | Role::Facility => Some(Role::Coordinator),
            Role::Coordinator => Some(Role::SupportCentre),
            Role::SupportCentre | Role::Admin => None,
        };
        if let Some(next) = next {
            let n = self.notification(format!("{key}:fallback"), &alert_id, &home, &[next], content, now);
            if !n.recipients.is_empty() {
                self.outputs.push(Output::Notify(n));
            }
        }
        let mut data = serde_json::Map::new();
        data.insert("role".into(), role.as_str().into());
        data.insert("recipient".into(), name.into());
        data.insert("alert_id".into(), alert_id.into());
        self.raise(&home, AlertKind::DeliveryFailed, Severity::Warning, now, None, data, now);
        Ok(())
    }

    /// A home on battery that fell silent when its own forecast said its external backup was
    /// running out (within three telemetry periods, or 5 minutes, of its P10) is taken as run
    /// out: its UPS most likely died and took the home unit with it.
    fn ran_out_if_due(&mut self, home: &HomeId) {
        let Some(plan) = self.plans.get(home) else { return };
        let interval =
            i64::from(self.state.get(home).and_then(|s| s.interval_s).unwrap_or(self.settings.default_interval_s));
        let Some(st) = self.state.get_mut(home) else { return };
        let (Power::Battery { .. }, Some(f), Some(heard), None) = (st.power, st.forecast, st.last_heard, st.ran_out_at)
        else {
            return;
        };
        let margin = Duration::seconds((interval * 3).max(300));
        if heard >= f.external.p10 - margin && f.basis != crate::domain::forecast::Basis::InternalOnly {
            tracing::warn!(home = %home, "silent when its backup was due to run out: taken as run out");
            st.ran_out_at = Some(heard);
            st.forecast = Some(f.ran_out(heard, Duration::seconds((plan.internal_min() * 60.0) as i64)));
        }
    }

    /// A home fell silent (`fresh`) or, already silent, became a home at risk (an incident
    /// opened around it).
    fn went_silent(&mut self, home: &HomeId, fresh: bool, now: Time) {
        let st = self.state.get(home).cloned().unwrap_or_default();
        let in_incident = self.incident_of(home).is_some() || self.would_be_in_incident(home);
        let on_battery = matches!(st.power, Power::Battery { .. });
        if on_battery || in_incident {
            self.ran_out_if_due(home);
            let st = self.state.get(home).cloned().unwrap_or_default();
            // A silence nobody has been told of yet keeps its wait when it becomes a risk,
            // for as long as an agent takes to come back after its network: a home silent in
            // a mass silence (a network cut) is not paged because an incident opened around
            // it while its agent was still reconnecting, nor held the whole grace when the
            // incident is a power cut it may be in.
            let back_by = now + Duration::seconds(self.settings.mass_silence_return_s);
            let held = st
                .alerts
                .get(&AlertKind::HomeSilent)
                .filter(|a| a.notified.is_empty())
                .and_then(|a| a.hold_until)
                .map(|until| until.min(back_by))
                .filter(|until| *until > now);
            self.clear_alert(home, AlertKind::HomeSilent, now);
            let mut data = serde_json::Map::new();
            if let Some(f) = &st.forecast {
                data.insert("runs_out_at".into(), f.runs_out_at.to_rfc3339().into());
                data.insert("basis".into(), f.basis.as_str().into());
            }
            data.insert("on_battery".into(), on_battery.into());
            self.raise(
                home,
                AlertKind::StateUnknown,
                Severity::Critical,
                st.last_heard.unwrap_or(now),
                None,
                data,
                now,
            );
            if let Some(until) = held {
                self.hold_silence(home, until);
            }
        } else {
            self.raise(
                home,
                AlertKind::HomeSilent,
                Severity::Warning,
                st.last_heard.unwrap_or(now),
                None,
                Default::default(),
                now,
            );
        }
        if fresh {
            // Wait a moment before paging anyone: homes falling silent together (a network
            // or centre problem) are seen together first.
            let settle = now + Duration::seconds(self.settings.silence_settle_s);
            self.hold_silence(home, settle);
            self.note_silence(home, now);
        }
        self.join_incident(home);
        self.touch_incident(home);
    }

    /// Delay the first notification of a home's silence alerts (those nobody has heard of yet).
    fn hold_silence(&mut self, home: &HomeId, until: Time) {
        let Some(st) = self.state.get_mut(home) else { return };
        for kind in [AlertKind::HomeSilent, AlertKind::StateUnknown] {
            if let Some(a) = st.alerts.get_mut(&kind).filter(|a| a.notified.is_empty()) {
                a.hold_until = Some(a.hold_until.map_or(until, |h| h.max(until)));
                self.dirty_homes.insert(home.clone());
            }
        }
    }

    /// A home just fell silent: remember it for the mass-silence rule, and if a mass silence
    /// is being waited out, it waits with the others.
    fn note_silence(&mut self, home: &HomeId, now: Time) {
        self.recent_silences.push_back((now, home.clone()));
        if let Some(until) = self.mass_until.filter(|u| now < *u) {
            self.hold_silence(home, until);
        }
    }

    /// The mass-silence rule: many homes in several municipalities falling silent together
    /// is one notice to the operators, and their alerts wait the grace period. Called after
    /// the homes that fell silent at `now` have been noted.
    fn check_mass_silence(&mut self, now: Time) {
        let window = Duration::seconds(self.settings.mass_silence_window_s);
        while self.recent_silences.front().is_some_and(|(t, _)| now - *t > window) {
            self.recent_silences.pop_front();
        }
        // During a grace, `recent_silences` holds only the homes that fell silent since it
        // began (each already waits with the others): enough of them make a mass silence of
        // their own (a second cut), with its own notice and a grace counted from now.
        let silent: BTreeSet<HomeId> = self
            .recent_silences
            .iter()
            .map(|(_, h)| h.clone())
            .filter(|h| self.state.get(h).is_some_and(|s| s.conn.silent()))
            .collect();
        let municipalities = silent.iter().filter_map(|h| self.municipality(h)).collect::<BTreeSet<_>>().len();
        if silent.len() < self.settings.mass_silence_min_homes.max(2) || municipalities < 2 {
            return;
        }
        let until = now + Duration::seconds(self.settings.mass_silence_grace_s);
        self.outputs.push(Output::Notice(Notice::MassSilence {
            homes: silent.len(),
            municipalities,
            grace_min: self.settings.mass_silence_grace_s / 60,
        }));
        for h in &silent {
            self.hold_silence(h, until);
        }
        self.mass_until = Some(self.mass_until.map_or(until, |u| u.max(until)));
        // Counted once: after the grace, these homes do not make the same mass silence again.
        self.recent_silences.clear();
    }

    /// A reading during an outage: into the discharge (refused readings counted, and logged
    /// the first time in an outage).
    fn observe(&mut self, home: &HomeId, sample: Sample, now: Time) {
        let Some(plan) = self.plans.get(home) else { return };
        // A charge unchanged this long is stuck: three times what one point takes at the care
        // plan's load for a battery 25 % better than planned, and at least 30 minutes.
        let point_min = plan.external_wh().map_or(0.0, |wh| wh * 1.25 / 100.0 / plan.load_w().max(1.0) * 60.0);
        let stuck_after = Duration::minutes((point_min * 3.0).clamp(30.0, 7.0 * 24.0 * 60.0) as i64);
        self.start_discharge(home, now);
        let Some(st) = self.state.get_mut(home) else { return };
        let Power::Battery { since } = st.power else { return };
        let Some(d) = st.discharge.as_mut() else { return };
        if sample.at.is_some_and(|t| t < since) {
            return;
        }
        for reason in d.push(sample, stuck_after) {
            *st.rejected_readings.entry(reason.to_string()).or_default() += 1;
            if d.rejected.get(reason) == Some(&1) {
                tracing::warn!(home = %home, reason, "a reading that cannot be true was set aside; the forecast uses the next basis");
            }
        }
    }

    /// Begin the outage's discharge when the home is on battery without one (or with one from
    /// another outage); end it, learning from it, when the home is back on mains.
    fn start_discharge(&mut self, home: &HomeId, now: Time) {
        let Some(plan) = self.plans.get(home) else { return };
        let Some(st) = self.state.get_mut(home) else { return };
        match st.power {
            Power::Battery { since } => match &mut st.discharge {
                Some(d) if d.since == Some(since) => {}
                Some(d) if d.since.is_some_and(|s| s < since + Duration::minutes(5)) && d.since > Some(since) => {
                    // An earlier event moved the outage's start back: the same outage.
                    d.since = Some(since);
                }
                _ => {
                    st.discharge = Some(Discharge::start(since));
                    st.ran_out_at = None;
                }
            },
            Power::Mains => {
                let interval = i64::from(st.interval_s.unwrap_or(self.settings.default_interval_s));
                if let Some(d) = st.discharge.take() {
                    let restored = st.power_ts.unwrap_or(now);
                    // Seen to run out, or (a home that reports no level) silent on battery
                    // until the mains came back.
                    let boot_now = st.mains_boot.as_deref();
                    let lead_acid = plan.external().is_some_and(|b| b.chemistry() == Chemistry::LeadAcid);
                    let margin = Duration::seconds((interval * 3).max(300));
                    let ran_out = st.ran_out_at.take().or_else(|| d.fell_silent(restored, margin, boot_now, lead_acid));
                    let ended = ran_out.unwrap_or(restored);
                    if let Some(l) = learn(plan, &d, st.battery.as_ref(), ended, ran_out.is_some()) {
                        tracing::info!(
                            home = %home,
                            health_pct = (l.health * 100.0).round(),
                            optimism = l.optimism.map(|o| (o * 100.0).round() / 100.0),
                            discharges = l.discharges,
                            "learned the battery from this outage"
                        );
                        st.battery = Some(l);
                    }
                    self.battery_health(home, now);
                }
            }
            Power::Unknown => {}
        }
    }

    /// Open or clear `battery_degraded` from what was learned of the battery (cleared too when
    /// the care plan names another battery).
    fn battery_health(&mut self, home: &HomeId, now: Time) {
        let Some(plan) = self.plans.get(home) else { return };
        let plan_wh = plan.external_wh();
        let Some(st) = self.state.get(home) else { return };
        let learned =
            st.battery.as_ref().filter(|l| l.usable() && plan_wh.is_some_and(|w| (w - l.plan_wh).abs() < 0.5));
        let degraded = learned.filter(|l| !l.by_silence && l.health * 100.0 < self.settings.battery_degraded_below_pct);
        let open = st.alerts.contains_key(&AlertKind::BatteryDegraded);
        match degraded {
            Some(l) if !open => {
                let data = mamori_protocol::event_data::to_data(&facts::BatteryDegraded {
                    health_pct: Some((l.health * 100.0).round()),
                    plan_wh: Some(l.plan_wh.round()),
                    delivered_wh: Some((l.health * l.plan_wh).round()),
                    source: Some(l.source),
                    discharges: Some(l.discharges),
                });
                self.raise(home, AlertKind::BatteryDegraded, Severity::Warning, now, None, data, now);
            }
            None if open => self.clear_alert(home, AlertKind::BatteryDegraded, now),
            _ => {}
        }
    }

    fn refresh_forecast(&mut self, home: &HomeId, now: Time) {
        self.start_discharge(home, now);
        let Some(plan) = self.plans.get(home) else { return };
        let Some(st) = self.state.get_mut(home) else { return };
        st.forecast = match (st.power, &st.discharge) {
            (Power::Battery { since }, Some(d)) => {
                let f = forecast(plan, since, d, st.battery.as_ref(), &Assumptions::default());
                Some(match st.ran_out_at {
                    Some(at) => f.ran_out(at, Duration::seconds((plan.internal_min() * 60.0) as i64)),
                    None => f,
                })
            }
            _ => None,
        };
    }

    /// A home's tier from its forecast, on the pessimistic bound (None: on mains / no forecast).
    fn forecast_tier(&self, home: &HomeId, now: Time) -> Option<Tier> {
        let st = self.state.get(home)?;
        let f = st.forecast_at(now)?;
        let plan = self.plans.get(home)?;
        let left = f.time_left_p10(now);
        let travel = plan.evacuation.as_ref().map_or(0, |e| i64::from(e.travel_min));
        if f.may_be_on_last_battery(now) || left < Duration::minutes(self.settings.t3_time_left_min) {
            Some(Tier::T3)
        } else if left < Duration::minutes(travel * 2 + self.settings.t2_margin_min) {
            Some(Tier::T2)
        } else {
            Some(Tier::T0)
        }
    }

    fn municipality(&self, home: &HomeId) -> Option<&str> {
        self.plans.get(home).map(|p| p.municipality.as_str())
    }

    fn incident_of(&self, home: &HomeId) -> Option<&Incident> {
        let m = self.municipality(home)?;
        self.incidents.get(m).filter(|i| i.members.contains(home))
    }

    fn would_be_in_incident(&self, home: &HomeId) -> bool {
        self.municipality(home).is_some_and(|m| self.incidents.contains_key(m))
    }

    fn touch_incident(&mut self, home: &HomeId) {
        let Some(m) = self.municipality(home).map(str::to_string) else { return };
        if let Some(i) = self.incidents.get_mut(&m) {
            if i.members.contains(home) && !i.changed {
                // Stored, so that a restart before the next digest still sends it.
                i.changed = true;
                self.outputs.push(Output::Incident(i.clone()));
            }
        }
    }

    fn join_incident(&mut self, home: &HomeId) {
        let Some(m) = self.municipality(home).map(str::to_string) else { return };
        let Some(st) = self.state.get(home) else { return };
        let at_risk = matches!(st.power, Power::Battery { .. }) || st.conn.silent();
        if let Some(i) = self.incidents.get_mut(&m) {
            if at_risk && i.members.insert(home.clone()) {
                i.changed = true;
                self.outputs.push(Output::Incident(i.clone()));
            }
        }
    }

    fn power_changed(&mut self, home: &HomeId, now: Time) {
        self.dirty_homes.insert(home.clone());
        self.join_incident(home);
        self.touch_incident(home);
        let Some(m) = self.municipality(home).map(str::to_string) else { return };
        if self.incidents.contains_key(&m) {
            return;
        }
        // Homes of this municipality whose outage began within the window of this one.
        let Some(Power::Battery { since }) = self.state.get(home).map(|s| s.power) else { return };
        let window = Duration::seconds(self.settings.incident_window_s);
        let members: BTreeSet<HomeId> = self
            .plans
            .values()
            .filter(|p| p.municipality == m)
            .filter(|p| {
                matches!(self.state.get(&p.id).map(|s| s.power),
                    Some(Power::Battery { since: s }) if (s - since).abs() <= window)
            })
            .map(|p| p.id.clone())
            .collect();
        if members.len() < self.settings.incident_min_homes {
            return;
        }
        // Every home of the municipality on battery or silent is in it.
        let mut all = members;
        for p in self.plans.values().filter(|p| p.municipality == m) {
            if let Some(s) = self.state.get(&p.id) {
                if matches!(s.power, Power::Battery { .. }) || s.conn.silent() {
                    all.insert(p.id.clone());
                }
            }
        }
        let id = format!("inc-{m}-{}", now.timestamp());
        let incident = Incident {
            id,
            municipality: m.clone(),
            opened_at: now,
            closed_at: None,
            members: all.clone(),
            acks: Vec::new(),
            revision: 0,
            last_sent_at: None,
            changed: true,
            tiers: BTreeMap::new(),
        };
        self.outputs.push(Output::Incident(incident.clone()));
        self.incidents.insert(m, incident);
        // Silent members are now homes at risk.
        for h in all {
            if self.state.get(&h).is_some_and(|s| s.conn.silent())
                && self.state.get(&h).is_some_and(|s| s.alerts.contains_key(&AlertKind::HomeSilent))
            {
                self.went_silent(&h, false, now);
            }
        }
    }

    /// Drills open longer than [`DRILL_OPEN_MIN`] end, without a message: their record
    /// (who was told, who acknowledged) stays.
    fn end_drills(&mut self, now: Time) {
        let over: Vec<HomeId> = self
            .state
            .iter()
            .filter(|(_, s)| {
                s.alerts.get(&AlertKind::Drill).is_some_and(|a| now >= a.raised_at + Duration::minutes(DRILL_OPEN_MIN))
            })
            .map(|(h, _)| h.clone())
            .collect();
        for h in over {
            let Some(st) = self.state.get_mut(&h) else { continue };
            let Some(mut alert) = st.alerts.remove(&AlertKind::Drill) else { continue };
            alert.cleared_at = Some(now);
            self.alert_index.remove(&alert.id);
            self.dirty_homes.insert(h.clone());
            self.outputs.push(Output::Alert(alert));
        }
    }

    /// Run the timers: staleness, escalation steps and repeats, incident digests.
    pub fn poll(&mut self, now: Time) {
        self.end_drills(now);
        // Staleness: only while the gateway itself is connected, and counted from when it
        // connected (the centre's downtime is not the homes' silence).
        let stale: Vec<HomeId> = if !self.uplink() {
            Vec::new()
        } else {
            self.state
                .iter()
                .filter(|(_, s)| s.conn == Connectivity::Online)
                .filter(|(_, s)| s.last_heard.is_some_and(|h| now > self.stale_at(s, h)))
                .map(|(h, _)| h.clone())
                .collect()
        };
        for h in stale {
            if let Some(st) = self.state.get_mut(&h) {
                st.conn = Connectivity::Stale { since: st.last_heard.unwrap_or(now) };
            }
            self.dirty_homes.insert(h.clone());
            self.went_silent(&h, true, now);
        }
        self.check_mass_silence(now);
        // A degraded battery whose care plan now names another battery (replaced): cleared.
        let replaced: Vec<HomeId> = self
            .state
            .iter()
            .filter(|(_, s)| s.alerts.contains_key(&AlertKind::BatteryDegraded))
            .filter(|(h, s)| {
                let plan_wh = self.plans.get(*h).and_then(Home::external_wh);
                !s.battery.as_ref().is_some_and(|l| plan_wh.is_some_and(|w| (l.plan_wh - w).abs() < 0.5))
            })
            .map(|(h, _)| h.clone())
            .collect();
        for h in replaced {
            self.battery_health(&h, now);
        }
        // Escalation.
        let homes: Vec<HomeId> =
            self.state.iter().filter(|(_, s)| !s.alerts.is_empty()).map(|(h, _)| h.clone()).collect();
        for h in homes {
            let kinds: Vec<AlertKind> =
                self.state.get(&h).map(|s| s.alerts.keys().copied().collect()).unwrap_or_default();
            for kind in kinds {
                self.escalate(&h, kind, now);
            }
        }
        self.poll_incidents(now);
    }

    fn escalate(&mut self, home: &HomeId, kind: AlertKind, now: Time) {
        let forecast_tier = self.forecast_tier(home, now);
        let in_incident = self.incident_of(home).is_some();
        for _ in 0..16 {
            let Some(alert) = self.state.get_mut(home).and_then(|s| s.alerts.get_mut(&kind)) else { return };
            // A forecast crossing a tier (or a regional incident: T1) jumps at once.
            if alert.policy.follows_forecast {
                let mut floor = forecast_tier.unwrap_or(Tier::T0);
                if in_incident {
                    floor = floor.max(Tier::T1);
                }
                if let Some(target) = alert.policy.first_step_at(floor) {
                    if target > alert.step {
                        alert.step = target;
                        alert.sent_in_step = 0;
                        alert.step_entered_at = now;
                        alert.acknowledged = None;
                        // Stored even when its first send is not due yet (a quiet policy):
                        // a restart goes on from this step, not from crossing it again.
                        let a = alert.clone();
                        self.outputs.push(Output::Alert(a));
                        self.dirty_homes.insert(home.clone());
                    }
                }
            }
            let Some((due, action)) = next_action(alert) else { return };
            if due > now {
                return;
            }
            match action {
                Action::Send => self.send_step(home, kind, now),
                Action::Escalate => {
                    let Some(alert) = self.state.get_mut(home).and_then(|s| s.alerts.get_mut(&kind)) else { return };
                    if alert.step + 1 < alert.policy.steps.len() {
                        alert.step += 1;
                    }
                    alert.sent_in_step = 0;
                    alert.step_entered_at = now;
                    alert.acknowledged = None;
                    let a = alert.clone();
                    self.outputs.push(Output::Alert(a));
                    self.touch_incident(home);
                }
            }
            self.dirty_homes.insert(home.clone());
        }
    }

    /// A municipality's name, from the first care plan that gives one.
    pub fn municipality_name(&self, code: &str) -> Option<String> {
        self.plans.values().filter(|p| p.municipality == code).find_map(|p| p.municipality_name.clone())
    }

    /// A municipality as people say it: its name, else its code.
    fn municipality_text(&self, code: &str) -> String {
        self.municipality_name(code).unwrap_or_else(|| code.to_string())
    }

    fn send_step(&mut self, home: &HomeId, kind: AlertKind, now: Time) {
        let in_incident = self.incident_of(home).is_some();
        let Some(st) = self.state.get(home) else { return };
        let Some(alert) = st.alerts.get(&kind) else { return };
        let at = alert.step.min(alert.policy.steps.len() - 1);
        let step = &alert.policy.steps[at];
        let mut roles: Vec<Role> = step.roles.clone();
        if alert.sent_in_step == 0 {
            // The tiers are cumulative: a jump past earlier steps (a forecast crossing, a
            // regional incident) skips nobody. Whoever an earlier step would have told and
            // who has not been told yet hears now, with the new step.
            for r in alert.policy.steps[..at].iter().flat_map(|s| s.roles.iter()) {
                if !alert.notified.contains(r) && !roles.contains(r) {
                    roles.push(*r);
                }
            }
        }
        roles.retain(|r| !(in_incident && power_kind(kind) && matches!(r, Role::Coordinator | Role::SupportCentre)));
        // Only the roles someone will actually hear as (a contact, with consent when it is
        // required): what the message says was told, and who hears the all-clear.
        let roles = self.reachable(home, &roles, now);
        let plan = self.plans.get(home);
        let content = Content::Alert {
            label: self.label(home),
            kind,
            since: alert.since,
            tier: step.tier,
            repeat: alert.sent_in_step,
            forecast: st.forecast_at(now),
            time_left_s: st.forecast_at(now).map(|f| f.time_left(now).num_seconds()),
            time_left_range_s: st
                .forecast_at(now)
                .map(|f| (f.time_left_p10(now).num_seconds(), f.time_left_p90(now).num_seconds())),
            silent: st.conn.silent(),
            evacuation: plan.and_then(|p| p.evacuation.as_ref()).map(|e| (e.destination.clone(), e.travel_min)),
            data: alert.data.clone(),
            devices: plan.map(|p| p.devices.iter().map(|d| (d.name.clone(), d.watts)).collect()).unwrap_or_default(),
            told: alert.notified.iter().chain(roles.iter()).copied().collect::<BTreeSet<Role>>().into_iter().collect(),
            // A facility's refusal is no acknowledgement: nobody is told it acknowledged.
            acknowledged_by: alert
                .acks
                .iter()
                .filter(|a| a.acknowledges())
                .map(|a| a.role)
                .collect::<BTreeSet<Role>>()
                .into_iter()
                .collect(),
        };
        let key = format!("{}:s{}:r{}", alert.id, alert.step, alert.sent_in_step);
        let n = self.notification(key, &alert.id, home, &roles, content, now);
        let Some(alert) = self.state.get_mut(home).and_then(|s| s.alerts.get_mut(&kind)) else { return };
        alert.sent_in_step += 1;
        alert.last_sent_at = Some(now);
        alert.notified.extend(roles.iter().copied());
        let a = alert.clone();
        if !n.recipients.is_empty() {
            self.outputs.push(Output::Notify(n));
        }
        self.outputs.push(Output::Alert(a));
    }

    fn triage(&self, inc: &Incident, now: Time) -> Vec<TriageRow> {
        let mut rows: Vec<TriageRow> = inc
            .members
            .iter()
            .filter_map(|h| {
                let st = self.state.get(h)?;
                let plan = self.plans.get(h)?;
                let ack = [AlertKind::Event(EventKind::MainsLost), AlertKind::StateUnknown]
                    .iter()
                    .find_map(|k| st.alerts.get(k).and_then(|a| a.acknowledged.as_ref()).map(|a| a.role));
                let f = st.forecast_at(now);
                Some(TriageRow {
                    home: h.clone(),
                    label: plan.label.clone(),
                    on_battery: matches!(st.power, Power::Battery { .. }),
                    silent: st.conn.silent(),
                    time_left_s: f.map(|f| f.time_left(now).num_seconds()),
                    time_left_range_s: f
                        .map(|f| (f.time_left_p10(now).num_seconds(), f.time_left_p90(now).num_seconds())),
                    basis: f.map(|f| f.basis.as_str().to_string()),
                    tier: self.forecast_tier(h, now).unwrap_or(Tier::T0).max(Tier::T1),
                    acknowledged_by: ack,
                    destination: plan.evacuation.as_ref().map(|e| e.destination.clone()),
                    travel_min: plan.evacuation.as_ref().map(|e| e.travel_min),
                    // Not clamped at zero: an overdue home sorts by how long overdue it is.
                    leave_in_s: f.map(|f| {
                        (f.runs_out.p10 - now).num_seconds()
                            - plan.evacuation.as_ref().map_or(0, |e| i64::from(e.travel_min) * 60)
                    }),
                })
            })
            .collect();
        // Whoever must leave soonest first: the pessimistic time left less the travel (the
        // time left alone without a destination); homes back on mains last; silent homes
        // without a forecast before those.
        rows.sort_by_key(|r| (!r.on_battery && !r.silent, r.leave_in_s.unwrap_or(i64::MAX), r.label.clone()));
        rows
    }

    /// The triage list of an open incident.
    pub fn incident_triage(&self, id: &str, now: Time) -> Option<Vec<TriageRow>> {
        self.incidents.values().find(|i| i.id == id).map(|i| self.triage(i, now))
    }

    fn poll_incidents(&mut self, now: Time) {
        let ms: Vec<String> = self.incidents.keys().cloned().collect();
        for m in ms {
            let Some(inc) = self.incidents.get(&m).cloned() else { continue };
            let rows = self.triage(&inc, now);
            let tiers: BTreeMap<HomeId, Tier> = rows.iter().map(|r| (r.home.clone(), r.tier)).collect();
            let crossed = tiers.iter().any(|(h, t)| inc.tiers.get(h).is_some_and(|old| t > old));
            let over = rows.iter().all(|r| !r.on_battery && !r.silent);
            let due =
                inc.last_sent_at.is_none_or(|l| now - l >= Duration::seconds(self.settings.incident_update_min_s));
            if !(over || crossed || (inc.changed && due)) {
                continue;
            }
            let mut inc = inc;
            inc.revision += 1;
            inc.last_sent_at = Some(now);
            inc.changed = false;
            inc.tiers = tiers;
            if over {
                inc.closed_at = Some(now);
            }
            // Recipients: every member's coordinators and support centre, once per channel set,
            // each with the homes whose data it may receive (all of them unless consent is
            // required); recipients with the same homes share one digest of those homes' rows.
            let (require, today) = (self.settings.require_consent, self.today(now));
            // In the order the plans name them (a Vec: a few desks per municipality).
            let mut desks: Vec<((Role, Contact), BTreeSet<HomeId>)> = Vec::new();
            for h in &inc.members {
                let Some(p) = self.plans.get(h) else { continue };
                for c in p.contacts.iter().filter(|c| matches!(c.role, Role::Coordinator | Role::SupportCentre)) {
                    let i = match desks.iter().position(|((_, d), _)| d.channels == c.channels) {
                        Some(i) => i,
                        None => {
                            desks.push(((c.role, c.clone()), BTreeSet::new()));
                            desks.len() - 1
                        }
                    };
                    if !require {
                        desks[i].1.extend(inc.members.iter().cloned());
                    } else if c.may_receive(true, today) {
                        desks[i].1.insert(h.clone());
                    }
                }
            }
            let mut groups: Vec<(BTreeSet<HomeId>, Recipients)> = Vec::new();
            for (recipient, homes) in desks.into_iter().filter(|(_, homes)| !homes.is_empty()) {
                match groups.iter_mut().find(|(h, _)| *h == homes) {
                    Some((_, r)) => r.push(recipient),
                    None => groups.push((homes, vec![recipient])),
                }
            }
            for (i, (homes, recipients)) in groups.into_iter().enumerate() {
                // One key per group: desks of two groups may share a name and a channel.
                let key = if i == 0 {
                    format!("{}:rev{}", inc.id, inc.revision)
                } else {
                    format!("{}:rev{}:g{i}", inc.id, inc.revision)
                };
                let n = Notification {
                    key,
                    alert_id: inc.id.clone(),
                    home: None,
                    recipients,
                    content: Content::Incident {
                        municipality: self.municipality_text(&m),
                        opened_at: inc.opened_at,
                        revision: inc.revision,
                        rows: rows.iter().filter(|r| homes.contains(&r.home)).cloned().collect(),
                        closed: over,
                    },
                    at: now,
                    critical: true,
                };
                self.outputs.push(Output::Notify(n));
            }
            self.outputs.push(Output::Incident(inc.clone()));
            if over {
                self.incidents.remove(&m);
            } else {
                self.incidents.insert(m, inc);
            }
        }
    }

    /// When a home last heard at `heard` becomes stale.
    /// When a home last heard at `heard` becomes stale: its periods of silence, not counting
    /// the time the gateway's own connection was down.
    fn stale_at(&self, s: &HomeState, heard: Time) -> Time {
        let interval = i64::from(self.interval(s.interval_s.unwrap_or(self.settings.default_interval_s)));
        heard
            + Duration::seconds(interval * i64::from(self.settings.stale_after_intervals))
            + self.downtime_since(heard)
    }

    /// The earliest time [`Engine::poll`] has something to do.
    pub fn next_deadline(&self, now: Time) -> Option<Time> {
        let mut best: Option<Time> = None;
        let mut consider = |t: Time| best = Some(best.map_or(t, |b| b.min(t)));
        for s in self.state.values() {
            if let (Connectivity::Online, Some(h), true) = (s.conn, s.last_heard, self.uplink()) {
                consider(self.stale_at(s, h) + Duration::seconds(1));
            }
            for a in s.alerts.values() {
                if let Some((t, _)) = next_action(a) {
                    consider(t);
                }
                if a.kind == AlertKind::Drill {
                    consider(a.raised_at + Duration::minutes(DRILL_OPEN_MIN));
                }
                if a.policy.follows_forecast {
                    // Tiers are crossed as time passes: look again every minute.
                    consider(now + Duration::seconds(60));
                }
            }
        }
        for i in self.incidents.values() {
            consider(i.last_sent_at.map_or(now, |l| l + Duration::seconds(self.settings.incident_update_min_s)));
        }
        best
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Send,
    Escalate,
}

/// The next thing an alert's escalation does, and when.
fn next_action(a: &Alert) -> Option<(Time, Action)> {
    let steps = &a.policy.steps;
    let st = steps.get(a.step)?;
    let has_next = a.step + 1 < steps.len();
    if a.sent_in_step == 0 {
        let first = if a.notified.is_empty() {
            a.raised_at + crate::domain::policy::delay(a.policy.notify_after_s)
        } else {
            a.step_entered_at
        };
        let first = a.hold_until.map_or(first, |h| first.max(h));
        return Some((first.max(a.step_entered_at), Action::Send));
    }
    let mut best: Option<(Time, Action)> = None;
    let mut consider = |t: Time, act: Action| {
        if best.is_none_or(|(b, _)| t < b) {
            best = Some((t, act));
        }
    };
    match &a.acknowledged {
        None => {
            if st.repeat_every_s > 0 && a.sent_in_step <= st.repeats {
                if let Some(last) = a.last_sent_at {
                    consider(last + crate::domain::policy::delay(st.repeat_every_s), Action::Send);
                }
            }
            if let (Some(e), true) = (st.escalate_after_s, has_next) {
                consider(a.step_entered_at + crate::domain::policy::delay(e), Action::Escalate);
            }
        }
        Some(ack) => {
            consider(ack.at + crate::domain::policy::delay(a.policy.reescalate_after_ack_s), Action::Escalate);
        }
    }
    if let (Some(e), true) = (st.escalate_even_if_acknowledged_after_s, has_next) {
        consider(a.step_entered_at + crate::domain::policy::delay(e), Action::Escalate);
    }
    best
}

#[cfg(test)]
mod tests;
