//! The monitor: turns readings into the home's state and into events. Pure: no I/O, no clock,
//! no tasks. Time comes in as [`Now`] (a monotonic millisecond count for every duration rule,
//! and the wall-clock time with its offset for the events' `ts`), so every rule here is tested
//! without sockets or sleeps.
//!
//! ## Rules
//! - **Staleness**: a source that has not produced a reading for its `lost_after_ms` (3 missed
//!   polls plus half a poll for polled devices, 5 s for streams, by default) is `device_lost`; its next reading
//!   is `device_restored`. A source that never answers after start-up is lost too. Garbage on
//!   a line is counted and does not keep a source alive.
//! - **Mains**: lost when any mains-capable source says so (a UPS on battery, the mains
//!   contact, the bridge's mains input); restored when none does. An agent that starts during
//!   an outage reports it. A Megatec reply whose *input fault voltage* is under the source's
//!   `glitch_below_v` while the UPS is on line, after a poll that was on line too, reveals an
//!   outage shorter than one poll: it becomes `mains_lost` + `mains_restored` with
//!   `"glitch": true`. (After a real outage the first reply still carries the outage's fault
//!   voltage, which is why the previous poll must have been on line.)
//! - **Battery self-tests**: a UPS that says it is testing its battery (Megatec's status bit
//!   b2: its own scheduled test, or one started at its panel) is on battery because of the
//!   test, not an outage, for at most [`TEST_BIT_MAX_MS`]; one the agent started
//!   ([`Monitor::self_test_started`]) likewise until it is seen back on line or its `max_ms`
//!   passes. A UPS still on battery after either is in an outage, reported then. The agent's
//!   own test ends in a `battery_test` event: `passed`, `failed` (the battery went low, or the
//!   UPS reported a fault or a battery to replace), `not_started` (the UPS never switched: it
//!   does not support the command) or `ended_on_battery` (mains failed during the test).
//! - **Battery low / UPS fault**: from the UPS's flags, the bridge's low-battery flag, or a
//!   power monitor's comparator (which has its own hysteresis); one event per change.
//! - **SpO2 and pulse**: `spo2_low` after SpO2 stays under the limit for the delay; `spo2_ok`
//!   only once it is back at the limit plus the hysteresis. Pulse likewise, outside
//!   `[low, high]`. A reading with no value neither starts nor continues the delay (the sensor
//!   being off is its own event), so noise around a limit cannot produce a storm.
//! - **Oximeter flags**: `oximeter_alarm` when its alarm starts, `oximeter_alarm_silenced`
//!   when it is silenced at the bedside (a reason to tell someone, not to stay quiet),
//!   `oximeter_alarm_cleared` when both end; `sensor_off` / `sensor_on` after the state holds
//!   for 3 s (a probe slipping for a moment is not an event).
//! - **Ventilator**: the contact pair's state changes become `ventilator_alarm`,
//!   `ventilator_alarm_cleared`, `alarm_cable_fault`, `alarm_cable_ok`. A latched alarm that
//!   already ended (a short pulse, or silenced at once) still becomes `ventilator_alarm` +
//!   `ventilator_alarm_cleared` with `"latched": true`.

use std::collections::BTreeMap;

use mamori_firmware::contact::Debouncer;
use mamori_protocol::bridge::{self, ContactState, Frame};
use mamori_protocol::event_data::{to_data, BatteryTest, TestResult};
use mamori_protocol::mqtt::{
    DeviceKind, DeviceState, DeviceStatus, EventKind, PowerMeterReading, SpoolStatus, Telemetry, Timestamp,
    VentilatorReading,
};
use mamori_protocol::reading::{OximeterReading, UpsReading};
use serde_json::{Map, Value};

use crate::config::Thresholds;

/// The time of an input: monotonic for durations, wall clock for timestamps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Now {
    /// Monotonic milliseconds (any origin).
    pub mono_ms: u64,
    /// Wall-clock time with its UTC offset.
    pub wall: Timestamp,
}

/// What the monitor knows about a source before it reads anything.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceSpec {
    /// The source id from the config.
    pub id: String,
    /// What it is.
    pub kind: DeviceKind,
    /// Silence after which it is lost, ms.
    pub lost_after_ms: u64,
    /// For Megatec UPSes: the input fault voltage under which a short outage is inferred.
    pub glitch_below_v: Option<f64>,
}

/// One thing a source produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// A UPS reading (serial or NUT).
    Ups(UpsReading),
    /// A power monitor reading, with its low-battery comparator's verdict.
    PowerMeter {
        /// The reading.
        reading: PowerMeterReading,
        /// Below the configured low-battery voltage (with hysteresis).
        low: Option<bool>,
    },
    /// An oximeter reading.
    Oximeter(OximeterReading),
    /// A sensor-bridge frame.
    Bridge(Frame),
    /// GPIO contacts.
    Contacts {
        /// Mains present, if wired.
        mains_present: Option<bool>,
        /// The ventilator pair, if wired.
        ventilator: Option<ContactState>,
        /// An alarm began since the last observation.
        alarm_latched: bool,
    },
    /// Bytes that did not decode (counted; does not keep the source alive).
    Garbage,
    /// The source's port failed (missing, unplugged, refused); the reason is kept for
    /// `device_lost`.
    Failed(String),
    /// The UPS (or its `upsd`) refused to start a battery self-test, with the reason.
    SelfTestRefused(String),
}

/// An event the monitor raised; the spool gives it its `id` and `seq`.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// What happened.
    pub kind: EventKind,
    /// The source, for device events.
    pub source: Option<String>,
    /// When it was observed.
    pub ts: Timestamp,
    /// When it was observed, on the monotonic clock ([`Now::mono_ms`]).
    pub mono_ms: u64,
    /// Readings at the time.
    pub data: Map<String, Value>,
}

#[derive(Debug, Clone)]
struct SourceState {
    spec: SourceSpec,
    last_seen_ms: Option<u64>,
    since_ms: u64,
    lost: bool,
    last_error: Option<String>,
    garbage: u64,
    /// Last UPS on-battery verdict from this source, for the glitch rule.
    last_on_battery: Option<bool>,
}

#[derive(Debug, Clone, Default)]
struct OxState {
    reading: Option<OximeterReading>,
    spo2_low_since: Option<u64>,
    spo2_alarm: bool,
    pulse_out_since: Option<u64>,
    pulse_alarm: bool,
    alarm_active: bool,
    alarm_silenced: bool,
    sensor_off: Option<Debouncer>,
    sensor_off_reported: Option<bool>,
}

/// How long the sensor-off flag must hold before it is an event, ms.
const SENSOR_OFF_HOLD_MS: u32 = 3000;

/// The longest a UPS's own "testing" status bit explains its being on battery, ms (a quick
/// test takes 10 s; a firmware that leaves the bit set must not hide an outage).
pub const TEST_BIT_MAX_MS: u64 = 60_000;

/// A battery self-test the agent started on one UPS.
#[derive(Debug, Clone, Default)]
struct TestRun {
    started_ms: u64,
    until_ms: u64,
    /// The UPS was seen on battery or testing.
    seen: bool,
    /// The UPS reported its "testing" bit.
    bit_seen: bool,
    /// The battery went low, or the UPS reported a fault or a battery to replace.
    failed: bool,
    charge_before_pct: Option<f64>,
    voltage_min_v: Option<f64>,
    /// The UPS or its `upsd` refused the command.
    refused: Option<String>,
}

/// The home's state as the agent sees it.
#[derive(Debug, Clone)]
pub struct Monitor {
    thresholds: Thresholds,
    sources: BTreeMap<String, SourceState>,
    mains_lost_by: BTreeMap<String, bool>,
    mains_lost: Option<bool>,
    battery_low_by: BTreeMap<String, bool>,
    battery_low: bool,
    ups_fault_by: BTreeMap<String, bool>,
    ups: Option<UpsReading>,
    power_meter: Option<PowerMeterReading>,
    oximeters: BTreeMap<String, OxState>,
    ventilator: Option<ContactState>,
    changed: bool,
    self_tests: BTreeMap<String, TestRun>,
    test_bit_since: BTreeMap<String, u64>,
}

impl Monitor {
    /// A monitor for `sources`, started at `now`.
    pub fn new(sources: Vec<SourceSpec>, thresholds: Thresholds, now: &Now) -> Self {
        let sources = sources
            .into_iter()
            .map(|spec| {
                let st = SourceState {
                    spec: spec.clone(),
                    last_seen_ms: None,
                    since_ms: now.mono_ms,
                    lost: false,
                    last_error: None,
                    garbage: 0,
                    last_on_battery: None,
                };
                (spec.id, st)
            })
            .collect();
        Monitor {
            thresholds,
            sources,
            mains_lost_by: BTreeMap::new(),
            mains_lost: None,
            battery_low_by: BTreeMap::new(),
            battery_low: false,
            ups_fault_by: BTreeMap::new(),
            ups: None,
            power_meter: None,
            oximeters: BTreeMap::new(),
            ventilator: None,
            changed: true,
            self_tests: BTreeMap::new(),
            test_bit_since: BTreeMap::new(),
        }
    }

    /// The agent asked `source` (a UPS) to test its battery at `now`: its switch to battery
    /// is the test's, not an outage, until it is back on line or `max_ms` passes.
    pub fn self_test_started(&mut self, source: &str, now: &Now, max_ms: u64) {
        let before = self.ups.as_ref();
        let run = TestRun {
            started_ms: now.mono_ms,
            until_ms: now.mono_ms + max_ms,
            charge_before_pct: before.and_then(|u| u.battery_charge_pct),
            voltage_min_v: before.and_then(|u| u.battery_voltage_v),
            ..Default::default()
        };
        self.self_tests.insert(source.to_string(), run);
    }

    /// Whether a self-test started by the agent is running.
    pub fn self_testing(&self) -> bool {
        !self.self_tests.is_empty()
    }

    /// The latest UPS reading (merged over the UPS sources).
    pub fn ups(&self) -> Option<&UpsReading> {
        self.ups.as_ref()
    }

    fn finish_self_test(&mut self, source: &str, now: &Now, on_battery: bool, out: &mut Vec<NewEvent>) {
        let Some(run) = self.self_tests.remove(source) else { return };
        let result = match (run.seen, on_battery) {
            (false, _) => TestResult::NotStarted,
            (true, true) => TestResult::EndedOnBattery,
            (true, false) if run.failed => TestResult::Failed,
            (true, false) => TestResult::Passed,
        };
        let test = BatteryTest {
            result: Some(result),
            reason: run.refused,
            seconds: Some(now.mono_ms.saturating_sub(run.started_ms) / 1000),
            charge_before_pct: run.charge_before_pct,
            voltage_min_v: run.voltage_min_v,
        };
        out.push(Self::event(EventKind::BatteryTest, Some(source), now, to_data(&test)));
        if on_battery {
            // Still on battery when the test should be over: an outage.
            self.set_mains_lost(source, true, now, Map::new, out);
        }
    }

    fn event(kind: EventKind, source: Option<&str>, now: &Now, data: Map<String, Value>) -> NewEvent {
        NewEvent { kind, source: source.map(str::to_string), ts: now.wall, mono_ms: now.mono_ms, data }
    }

    /// Feed what `source` produced at `now`; returns the events it raises.
    pub fn observe(&mut self, source: &str, obs: Observation, now: &Now) -> Vec<NewEvent> {
        let mut out = Vec::new();
        if let Observation::SelfTestRefused(reason) = obs {
            // Not a reading: it neither keeps the source alive nor restores it.
            if let Some(run) = self.self_tests.get_mut(source) {
                run.refused = Some(reason);
                self.finish_self_test(source, now, false, &mut out);
            }
            return out;
        }
        let Some(st) = self.sources.get_mut(source) else { return out };
        match obs {
            Observation::Garbage => {
                st.garbage += 1;
                return out;
            }
            Observation::Failed(reason) => {
                st.last_error = Some(reason);
                return out;
            }
            _ => {}
        }
        st.last_seen_ms = Some(now.mono_ms);
        st.last_error = None;
        if st.lost {
            st.lost = false;
            self.changed = true;
            out.push(Self::event(EventKind::DeviceRestored, Some(source), now, Map::new()));
        }
        match obs {
            Observation::Ups(r) => self.observe_ups(source, r, now, &mut out),
            Observation::PowerMeter { reading, low } => {
                if let Some(low) = low {
                    self.set_battery_low(source, low, now, || to_data(&reading), &mut out);
                }
                self.power_meter = Some(reading);
            }
            Observation::Oximeter(r) => self.observe_oximeter(source, r, now, &mut out),
            Observation::Bridge(f) => self.observe_bridge(source, &f, now, &mut out),
            Observation::Contacts { mains_present, ventilator, alarm_latched } => {
                if let Some(p) = mains_present {
                    self.set_mains_lost(source, !p, now, Map::new, &mut out);
                }
                if let Some(v) = ventilator {
                    self.set_ventilator(source, v, alarm_latched, now, &mut out);
                }
            }
            Observation::Garbage | Observation::Failed(_) | Observation::SelfTestRefused(_) => {}
        }
        out.extend(self.tick(now));
        out
    }

    fn observe_ups(&mut self, source: &str, r: UpsReading, now: &Now, out: &mut Vec<NewEvent>) {
        // Built only when an event needs it: most polls change nothing.
        let data = || to_data(&r);
        let (glitch_below, prev_on_battery) = match self.sources.get_mut(source) {
            Some(st) => {
                let prev = st.last_on_battery;
                if r.on_battery.is_some() {
                    st.last_on_battery = r.on_battery;
                }
                (st.spec.glitch_below_v, prev)
            }
            None => (None, None),
        };
        // A battery self-test explains the UPS's being on battery.
        if r.self_test == Some(true) {
            self.test_bit_since.entry(source.to_string()).or_insert(now.mono_ms);
        } else if r.self_test == Some(false) {
            self.test_bit_since.remove(source);
        }
        let bit_explains =
            self.test_bit_since.get(source).is_some_and(|s| now.mono_ms.saturating_sub(*s) < TEST_BIT_MAX_MS);
        let mut test_over = None;
        if let Some(run) = self.self_tests.get_mut(source) {
            if r.on_battery == Some(true) || r.self_test == Some(true) {
                run.seen = true;
            }
            run.bit_seen |= r.self_test == Some(true);
            if [r.battery_low, r.ups_fault, r.replace_battery].contains(&Some(true)) {
                run.failed = true;
            }
            if let Some(v) = r.battery_voltage_v {
                run.voltage_min_v = Some(run.voltage_min_v.map_or(v, |m| m.min(v)));
            }
            if run.seen && r.on_battery == Some(false) && r.self_test != Some(true) {
                test_over = Some(false);
            } else if run.bit_seen && r.self_test == Some(false) && r.on_battery == Some(true) {
                test_over = Some(true); // the UPS ended its test and stayed on battery: mains failed
            }
        }
        let test_explains = bit_explains || (self.self_tests.contains_key(source) && test_over.is_none());
        if let Some(on_battery) = r.on_battery.map(|b| b && !test_explains) {
            let glitch = !on_battery
                && prev_on_battery == Some(false)
                && self.mains_lost != Some(true)
                && matches!((glitch_below, r.input_fault_voltage_v), (Some(limit), Some(v)) if v < limit);
            if glitch {
                let mut d = data();
                d.insert("glitch".into(), true.into());
                out.push(Self::event(EventKind::MainsLost, Some(source), now, d.clone()));
                out.push(Self::event(EventKind::MainsRestored, Some(source), now, d));
                self.changed = true;
            }
            self.set_mains_lost(source, on_battery, now, data, out);
        }
        if let Some(on_battery) = test_over {
            self.finish_self_test(source, now, on_battery, out);
        }
        if let Some(low) = r.battery_low {
            self.set_battery_low(source, low, now, data, out);
        }
        if let Some(fault) = r.ups_fault {
            let was = self.ups_fault_by.insert(source.to_string(), fault).unwrap_or(false);
            if fault != was {
                let kind = if fault { EventKind::UpsFault } else { EventKind::UpsFaultCleared };
                out.push(Self::event(kind, Some(source), now, data()));
                self.changed = true;
            }
        }
        match &mut self.ups {
            Some(u) => u.merge(&r),
            None => self.ups = Some(r),
        }
    }

    fn set_mains_lost(
        &mut self,
        source: &str,
        lost: bool,
        now: &Now,
        data: impl FnOnce() -> Map<String, Value>,
        out: &mut Vec<NewEvent>,
    ) {
        self.mains_lost_by.insert(source.to_string(), lost);
        let any = self.mains_lost_by.values().any(|&l| l);
        if self.mains_lost != Some(any) {
            let first = self.mains_lost.is_none();
            self.mains_lost = Some(any);
            self.changed = true;
            // Starting up on mains is not news; starting up on battery is.
            if any || !first {
                let kind = if any { EventKind::MainsLost } else { EventKind::MainsRestored };
                out.push(Self::event(kind, Some(source), now, data()));
            }
        }
    }

    fn set_battery_low(
        &mut self,
        source: &str,
        low: bool,
        now: &Now,
        data: impl FnOnce() -> Map<String, Value>,
        out: &mut Vec<NewEvent>,
    ) {
        self.battery_low_by.insert(source.to_string(), low);
        let any = self.battery_low_by.values().any(|&l| l);
        if any != self.battery_low {
            self.battery_low = any;
            self.changed = true;
            let kind = if any { EventKind::BatteryLow } else { EventKind::BatteryOk };
            out.push(Self::event(kind, Some(source), now, data()));
        }
    }

    fn set_ventilator(&mut self, source: &str, state: ContactState, latched: bool, now: &Now, out: &mut Vec<NewEvent>) {
        let prev = self.ventilator.replace(state);
        if prev != Some(state) {
            self.changed = true;
        }
        let ev = |kind, latched: bool| {
            let mut d = Map::new();
            if latched {
                d.insert("latched".into(), true.into());
            }
            Self::event(kind, Some(source), now, d)
        };
        match (prev, state) {
            (Some(ContactState::CableFault), s) if s != ContactState::CableFault => {
                out.push(ev(EventKind::AlarmCableOk, false))
            }
            _ => {}
        }
        match (prev, state) {
            (p, ContactState::Alarm) if p != Some(ContactState::Alarm) => {
                out.push(ev(EventKind::VentilatorAlarm, false))
            }
            (Some(ContactState::Alarm), s) if s != ContactState::Alarm => {
                out.push(ev(EventKind::VentilatorAlarmCleared, false))
            }
            // An alarm that began and ended between two observations.
            (_, s) if latched && s != ContactState::Alarm => {
                out.push(ev(EventKind::VentilatorAlarm, true));
                out.push(ev(EventKind::VentilatorAlarmCleared, true));
                self.changed = true;
            }
            _ => {}
        }
        if state == ContactState::CableFault && prev != Some(ContactState::CableFault) {
            out.push(ev(EventKind::AlarmCableFault, false));
        }
    }

    fn observe_bridge(&mut self, source: &str, f: &Frame, now: &Now, out: &mut Vec<NewEvent>) {
        if let Some(p) = f.power {
            self.power_meter = Some(PowerMeterReading {
                battery_voltage_v: Some(f64::from(p.bus_mv) / 1000.0),
                current_a: p.current_ma.map(|ma| f64::from(ma) / 1000.0),
                power_w: p.power_mw.map(|mw| f64::from(mw) / 1000.0),
            });
        }
        if let Some(p) = f.mains_present {
            self.set_mains_lost(source, !p, now, Map::new, out);
        }
        if f.power.is_some() || f.flags & bridge::flags::LOW_BATTERY != 0 {
            let data = self.power_meter.as_ref().map(to_data).unwrap_or_default();
            self.set_battery_low(source, f.flags & bridge::flags::LOW_BATTERY != 0, now, || data, out);
        }
        if let Some(v) = f.ventilator {
            self.set_ventilator(source, v, f.flags & bridge::flags::ALARM_LATCHED != 0, now, out);
        }
    }

    fn observe_oximeter(&mut self, source: &str, r: OximeterReading, now: &Now, out: &mut Vec<NewEvent>) {
        let ox = self.oximeters.entry(source.to_string()).or_default();
        let mut push = |kind| out.push(Self::event(kind, Some(source), now, to_data(&r)));
        // The bedside alarm.
        let active = r.alarm_active.unwrap_or(false);
        let silenced = r.alarm_silenced.unwrap_or(false);
        if active && !ox.alarm_active {
            push(EventKind::OximeterAlarm);
        }
        if silenced && !ox.alarm_silenced {
            push(EventKind::OximeterAlarmSilenced);
        }
        if !active && !silenced && (ox.alarm_active || ox.alarm_silenced) {
            push(EventKind::OximeterAlarmCleared);
        }
        if active != ox.alarm_active || silenced != ox.alarm_silenced {
            self.changed = true;
        }
        ox.alarm_active = active;
        ox.alarm_silenced = silenced;
        // The sensor, held for a few seconds before it counts.
        if let Some(off) = r.sensor_off {
            let deb = ox.sensor_off.get_or_insert_with(|| Debouncer::new(SENSOR_OFF_HOLD_MS));
            if let Some(off) = deb.update(off, now.mono_ms) {
                let was = ox.sensor_off_reported.replace(off);
                if was != Some(off) && (off || was == Some(true)) {
                    push(if off { EventKind::SensorOff } else { EventKind::SensorOn });
                    self.changed = true;
                }
            }
        }
        // Delayed thresholds: a missing value stops the clock.
        let t = self.thresholds;
        match r.spo2_pct {
            Some(v) if v < t.spo2_low_pct => {
                ox.spo2_low_since.get_or_insert(now.mono_ms);
            }
            Some(v) => {
                ox.spo2_low_since = None;
                if ox.spo2_alarm && v >= t.spo2_low_pct.saturating_add(t.spo2_hysteresis_pct) {
                    ox.spo2_alarm = false;
                    push(EventKind::Spo2Ok);
                    self.changed = true;
                }
            }
            None => ox.spo2_low_since = None,
        }
        match r.pulse_bpm {
            Some(v) if v < t.pulse_low_bpm || v > t.pulse_high_bpm => {
                ox.pulse_out_since.get_or_insert(now.mono_ms);
            }
            Some(v) => {
                ox.pulse_out_since = None;
                let inside = v >= t.pulse_low_bpm + t.pulse_hysteresis_bpm
                    && v <= t.pulse_high_bpm.saturating_sub(t.pulse_hysteresis_bpm);
                if ox.pulse_alarm && inside {
                    ox.pulse_alarm = false;
                    push(EventKind::PulseOk);
                    self.changed = true;
                }
            }
            None => ox.pulse_out_since = None,
        }
        ox.reading = Some(r);
    }

    /// Apply the rules that fire on time alone (staleness, threshold delays); call at
    /// [`Monitor::next_deadline_ms`] or any time.
    pub fn tick(&mut self, now: &Now) -> Vec<NewEvent> {
        let mut out = Vec::new();
        let over: Vec<String> =
            self.self_tests.iter().filter(|(_, r)| now.mono_ms >= r.until_ms).map(|(s, _)| s.clone()).collect();
        for source in over {
            let on_battery = self.sources.get(&source).and_then(|s| s.last_on_battery) == Some(true);
            self.finish_self_test(&source, now, on_battery, &mut out);
        }
        for (id, st) in &mut self.sources {
            let last = st.last_seen_ms.unwrap_or(st.since_ms);
            if !st.lost && now.mono_ms.saturating_sub(last) >= st.spec.lost_after_ms {
                st.lost = true;
                self.changed = true;
                let mut d = Map::new();
                d.insert("silent_ms".into(), now.mono_ms.saturating_sub(last).into());
                if let Some(e) = &st.last_error {
                    d.insert("reason".into(), e.clone().into());
                }
                if st.last_seen_ms.is_none() {
                    d.insert("never_answered".into(), true.into());
                }
                out.push(Self::event(EventKind::DeviceLost, Some(id), now, d));
            }
        }
        let t = self.thresholds;
        for (id, ox) in &mut self.oximeters {
            let data = ox.reading.as_ref().map(to_data).unwrap_or_default();
            if let Some(since) = ox.spo2_low_since {
                if !ox.spo2_alarm && now.mono_ms.saturating_sub(since) >= u64::from(t.spo2_delay_s) * 1000 {
                    ox.spo2_alarm = true;
                    self.changed = true;
                    out.push(Self::event(EventKind::Spo2Low, Some(id), now, data.clone()));
                }
            }
            if let Some(since) = ox.pulse_out_since {
                if !ox.pulse_alarm && now.mono_ms.saturating_sub(since) >= u64::from(t.pulse_delay_s) * 1000 {
                    ox.pulse_alarm = true;
                    self.changed = true;
                    out.push(Self::event(EventKind::PulseOutOfRange, Some(id), now, data));
                }
            }
        }
        out
    }

    /// The next monotonic time at which [`Monitor::tick`] may raise something.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let lost = self
            .sources
            .values()
            .filter(|s| !s.lost)
            .map(|s| s.last_seen_ms.unwrap_or(s.since_ms) + s.spec.lost_after_ms);
        let t = self.thresholds;
        let ox = self.oximeters.values().flat_map(|o| {
            [
                o.spo2_low_since.filter(|_| !o.spo2_alarm).map(|s| s + u64::from(t.spo2_delay_s) * 1000),
                o.pulse_out_since.filter(|_| !o.pulse_alarm).map(|s| s + u64::from(t.pulse_delay_s) * 1000),
            ]
        });
        let tests = self.self_tests.values().map(|r| r.until_ms);
        lost.chain(ox.flatten()).chain(tests).min()
    }

    /// Whether anything discrete changed since the last [`Monitor::snapshot`].
    pub fn changed(&self) -> bool {
        self.changed
    }

    /// Undecodable stretches counted for `source`.
    pub fn garbage(&self, source: &str) -> u64 {
        self.sources.get(source).map_or(0, |s| s.garbage)
    }

    /// Mains lost (any source), battery low (any source), any device lost: what the family's
    /// local alarm shows.
    pub fn local_state(&self) -> (bool, bool, bool) {
        (self.mains_lost == Some(true), self.battery_low, self.sources.values().any(|s| s.lost))
    }

    /// The conditions the monitor can tell now, by opening kind: `true` while it holds, `false`
    /// once it is over. A condition the monitor cannot tell yet (nothing read since start, a
    /// threshold's delay still running, a value inside the hysteresis band, the device lost)
    /// is left out, so that the gateway never takes "not known yet" for "over".
    pub fn conditions(&self) -> BTreeMap<EventKind, bool> {
        let mut c = BTreeMap::new();
        if let Some(m) = self.mains_lost {
            c.insert(EventKind::MainsLost, m);
        }
        if !self.battery_low_by.is_empty() {
            c.insert(EventKind::BatteryLow, self.battery_low);
        }
        if !self.ups_fault_by.is_empty() {
            c.insert(EventKind::UpsFault, self.ups_fault_by.values().any(|f| *f));
        }
        if self.sources.values().all(|s| s.lost || s.last_seen_ms.is_some()) {
            c.insert(EventKind::DeviceLost, self.sources.values().any(|s| s.lost));
        }
        if let Some(v) = self.ventilator {
            c.insert(EventKind::VentilatorAlarm, v == ContactState::Alarm);
            c.insert(EventKind::AlarmCableFault, v == ContactState::CableFault);
        }
        // Oximeters: a condition holds when any says so; it is over when every one that can
        // tell says so. A lost oximeter tells nothing.
        let t = self.thresholds;
        let mut ox: BTreeMap<EventKind, (bool, bool)> = BTreeMap::new(); // (any true, any known)
        let mut note = |k: EventKind, v: Option<bool>| {
            let e = ox.entry(k).or_default();
            if let Some(v) = v {
                e.0 |= v;
                e.1 = true;
            }
        };
        for (id, o) in &self.oximeters {
            let lost = self.sources.get(id).is_none_or(|s| s.lost);
            let Some(r) = o.reading.as_ref().filter(|_| !lost) else { continue };
            let spo2 = if o.spo2_alarm {
                Some(true)
            } else {
                r.spo2_pct
                    .filter(|v| {
                        o.spo2_low_since.is_none() && *v >= t.spo2_low_pct.saturating_add(t.spo2_hysteresis_pct)
                    })
                    .map(|_| false)
            };
            note(EventKind::Spo2Low, spo2);
            let pulse = if o.pulse_alarm {
                Some(true)
            } else {
                r.pulse_bpm
                    .filter(|v| {
                        o.pulse_out_since.is_none()
                            && *v >= t.pulse_low_bpm + t.pulse_hysteresis_bpm
                            && *v <= t.pulse_high_bpm.saturating_sub(t.pulse_hysteresis_bpm)
                    })
                    .map(|_| false)
            };
            note(EventKind::PulseOutOfRange, pulse);
            note(EventKind::SensorOff, o.sensor_off_reported);
            note(EventKind::OximeterAlarm, r.alarm_active.map(|_| o.alarm_active));
            note(EventKind::OximeterAlarmSilenced, r.alarm_silenced.map(|_| o.alarm_silenced));
        }
        for (k, (any, known)) in ox {
            if any || known {
                c.insert(k, any);
            }
        }
        c
    }

    /// The telemetry snapshot (clears the "changed" mark).
    pub fn snapshot(&mut self, now: &Now, interval_s: u32, spool: Option<SpoolStatus>) -> Telemetry {
        self.changed = false;
        let lost = |kind: DeviceKind| self.sources.values().filter(|s| s.spec.kind == kind).all(|s| s.lost);
        let oximeter =
            if lost(DeviceKind::Oximeter) { None } else { self.oximeters.values().find_map(|o| o.reading.clone()) };
        Telemetry {
            ts: now.wall,
            interval_s,
            mains_present: self.mains_lost.map(|l| !l),
            ups: self.ups.clone(),
            power_meter: self.power_meter.clone(),
            oximeter,
            ventilator: self.ventilator.map(|alarm| VentilatorReading { alarm }),
            devices: self
                .sources
                .values()
                .map(|s| DeviceStatus {
                    id: s.spec.id.clone(),
                    kind: s.spec.kind,
                    state: if s.lost { DeviceState::Lost } else { DeviceState::Ok },
                })
                .collect(),
            spool,
            conditions: self.conditions(),
            clock: None,
            kept: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests;
