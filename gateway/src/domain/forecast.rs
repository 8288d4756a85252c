//! When does the backup power run out? A band, not a point, from what is observed more than
//! from what is claimed. Pure: every function takes the readings and the times it needs.
//!
//! ## Why
//!
//! The ordinary home's battery is older and its load heavier than its care plan says: a
//! 3-year-old lead-acid UPS battery holds 50–70 % of its nameplate, UPS firmware estimates its
//! runtime as if the battery were new, a humidifier or a suction pump changes the load, and a
//! lithium power station's charge reading is good to about ±15 %. A forecast that believes the
//! claims is always wrong on the optimistic side, which is the side that costs a child.
//!
//! ## The model
//!
//! During an outage every reading goes into a [`Discharge`]: charge %, battery voltage, the
//! UPS's runtime, its load %, the power meter's watts. Readings that cannot be true are
//! refused there and counted by reason ([`Discharge::push`]): a charge outside 0–100 % or that
//! jumps by half in one step, a runtime of 0 with charge left or of 65,535 s and more (the
//! usual sentinels), a runtime that rises on battery while the load did not fall (the UPS's
//! runtime is then not used again in this outage), a voltage or a load outside any real range.
//!
//! Two kinds of estimate, each a band (P10 / P50 / P90 of the time the external backup runs
//! out):
//!
//! - **Claims** ([`Basis::UpsRuntime`], [`Basis::ChargeAndLoad`], [`Basis::EnergyBalance`],
//!   [`Basis::DeadReckoning`]): the UPS's runtime, the charge × the care plan's energy ÷ the
//!   load, the care plan's energy less what the power meter has measured leaving the battery,
//!   or the care plan's energy ÷ its load from the outage's start. Each is scaled by the
//!   battery's *health*: what this battery was seen to deliver in earlier outages ([`Learned`])
//!   or, for a battery never measured, a stated assumption for an unverified battery
//!   ([`Assumptions`]: a lead-acid battery, whose level shows an aged one within minutes, P10
//!   70 %, P50 85 %, P90 100 % of the care plan, and the UPS's runtime the same; a lithium
//!   pack, whose level reads full or 15 % off at first, 50 / 70 / 100 %). A lead-acid battery delivers less at a load above its care plan's (Peukert,
//!   exponent 1.2). The pessimistic claim wins: the band is the minimum of the available
//!   claims, quantile by quantile.
//! - **The observed discharge** ([`Basis::ObservedDischarge`]): a line through the level
//!   (charge %, or for a lead-acid battery without a charge reading its voltage on a 0–100
//!   scale between 1.75 and 2.28 V a cell) against the energy delivered (the meter's watts or
//!   the UPS's load % integrated over time; time itself when neither is reported), fitted with
//!   the Theil–Sen estimator (the median of the slopes between readings far enough apart), so
//!   1 % steps, noise and short load spikes move it little. The time left is the level over the
//!   slope at the current load (its average over the last 30 minutes). Its band comes from the
//!   slope's standard error (the readings' robust scatter, at least half a point, over the
//!   spread of the energy axis; a wider z while there are few readings) and from the
//!   quantisation of what was seen (a point of the drop observed so far), at least ±10 %. A
//!   level that reads full for a while (a lithium BMS) counts from its last full reading.
//!
//! The two are blended on a log scale, quantile by quantile, by the smaller of two trusts: how
//! much discharge has been seen (a drop of 2 points or less beyond three times the readings'
//! scatter is all claim, 8 and more all observation) and how narrow the observation's own band
//! is (P10 at half its middle: all claim; within a fifth: all observation). So the first noisy
//! minutes of a healthy battery's trend do not drag it down, and an aged battery's fast fall
//! takes over within minutes. One exception does not wait: an observation whose whole band
//! (its P90 too) is shorter than the claim's P10, after ten readings and three points beyond
//! the scatter, moves P10 and P50 at once (an aged battery under a heavier load than planned
//! is then paged when its fall is certain, not when it is precise). The claims then only bound the
//! observation: a UPS runtime longer than observed is never believed, a shorter one bounds the
//! pessimistic end and below the observed P10 becomes the middle (the UPS may know of its own
//! cut-off); and the P90 never exceeds what the care plan's energy at 125 % health could give
//! at the current level.
//!
//! The tiers cross on the pessimistic bound, P10 ([`Forecast::time_left_p10`]); messages, the
//! dashboard and the API say the middle and the range with the basis.
//!
//! A home that falls silent keeps its last forecast, with a band that widens by a quarter of
//! the time since it was last heard ([`Forecast::widened`]). One that fell silent when its own
//! P10 said its external backup was running out is treated as run out ([`Forecast::ran_out`]).
//!
//! ## Learning
//!
//! When the outage ends (or the battery was seen to run out), [`learn`] measures the usable
//! energy the battery actually delivered for the level it lost, the implied health (delivered
//! ÷ the care plan's energy) and the UPS firmware's optimism (the runtime it claimed at the
//! start ÷ what the battery could really give). A discharge of at least 10 points counts;
//! earlier measurements are averaged in, weighted by the points each observed. A battery
//! changed in the care plan (another energy) starts over. A home that reports no level is
//! measured by when it fell silent on battery and came back with the mains as another boot of
//! its unit ([`Discharge::fell_silent`]; the unit runs on the same backup), marked
//! [`Learned::by_silence`]: used by the forecast, never a `battery_degraded`, never mixed into
//! a battery measured by its level.
//!
//! A discharge keeps at most [`MAX_SAMPLES`]; when full, neighbours are merged two by two
//! (never across a full pack's leaving full), so a two-day outage keeps its shape.
//!
//! The ventilator's internal battery is added on top (its P10 at 80 % of its stated runtime:
//! those age too).
//!
//! Over 800 lines for a reason: one estimator (samples, the robust trend, the claim's
//! cross-check, the band, the lessons learned per battery) whose parts share their units and
//! assumptions; its tests are in `forecast/tests.rs`.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use mamori_protocol::mqtt::PowerMeterReading;
use mamori_protocol::reading::UpsReading;
use serde::{Deserialize, Serialize};

use crate::domain::homes::{BackupKind, Chemistry, Home};

/// A UTC instant.
pub type Time = DateTime<Utc>;

/// What a forecast rests on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// The discharge observed since the outage began.
    ObservedDischarge,
    /// The UPS's reported runtime (corrected by what is known of its optimism).
    UpsRuntime,
    /// Reported charge × care-plan capacity ÷ load.
    ChargeAndLoad,
    /// Care-plan capacity less the energy the power meter measured.
    EnergyBalance,
    /// Care-plan energy ÷ load from the outage's start.
    DeadReckoning,
    /// Only the ventilator's internal battery is known.
    InternalOnly,
}

impl Basis {
    /// Wire / display name.
    pub fn as_str(self) -> &'static str {
        match self {
            Basis::ObservedDischarge => "observed_discharge",
            Basis::UpsRuntime => "ups_runtime",
            Basis::ChargeAndLoad => "charge_and_load",
            Basis::EnergyBalance => "energy_balance",
            Basis::DeadReckoning => "dead_reckoning",
            Basis::InternalOnly => "internal_only",
        }
    }
}

/// Three instants: pessimistic, middle, optimistic.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
pub struct Band {
    /// 10 % of outcomes are earlier.
    pub p10: Time,
    /// The middle.
    pub p50: Time,
    /// 10 % of outcomes are later.
    pub p90: Time,
}

impl Band {
    fn at(t: Time) -> Band {
        Band { p10: t, p50: t, p90: t }
    }
}

/// A forecast.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
pub struct Forecast {
    /// When the external backup runs out (its P50).
    pub external_until: Time,
    /// When everything runs out, the ventilator's internal battery included (its P50).
    pub runs_out_at: Time,
    /// The external backup's band.
    pub external: Band,
    /// Everything's band.
    pub runs_out: Band,
    /// What it rests on.
    pub basis: Basis,
    /// The time of the reading it was computed from.
    pub as_of: Time,
    /// Whether the battery's health was measured (false: the assumption for an unverified
    /// battery is in it).
    pub verified: bool,
}

impl Forecast {
    /// Time left at `now`, the middle (zero when past).
    pub fn time_left(&self, now: Time) -> Duration {
        (self.runs_out.p50 - now).max(Duration::zero())
    }

    /// Time left at `now` on the pessimistic bound: what the tiers cross on.
    pub fn time_left_p10(&self, now: Time) -> Duration {
        (self.runs_out.p10 - now).max(Duration::zero())
    }

    /// Time left at `now` on the optimistic bound.
    pub fn time_left_p90(&self, now: Time) -> Duration {
        (self.runs_out.p90 - now).max(Duration::zero())
    }

    /// Whether the home runs on its last battery (the external backup's middle is past).
    pub fn on_last_battery(&self, now: Time) -> bool {
        now >= self.external.p50
    }

    /// Whether the home may be on its last battery (the external backup's P10 is past).
    pub fn may_be_on_last_battery(&self, now: Time) -> bool {
        now >= self.external.p10
    }

    /// The forecast of a home silent for `silent_for`: the band widens by a quarter of that
    /// time on each side (never before `as_of`).
    pub fn widened(&self, silent_for: Duration) -> Forecast {
        let w = silent_for.max(Duration::zero()) / 4;
        let early = |t: Time| (t - w).max(self.as_of);
        let mut f = *self;
        f.external = Band { p10: early(self.external.p10), p50: self.external.p50, p90: self.external.p90 + w };
        f.runs_out = Band { p10: early(self.runs_out.p10), p50: self.runs_out.p50, p90: self.runs_out.p90 + w };
        f
    }

    /// The forecast of a home whose external backup ran out at `at`: only the ventilator's
    /// internal battery is left.
    pub fn ran_out(&self, at: Time, internal: Duration) -> Forecast {
        Forecast {
            external_until: at,
            runs_out_at: at + internal,
            external: Band::at(at),
            runs_out: internal_band(Band::at(at), internal),
            basis: self.basis,
            as_of: at,
            verified: self.verified,
        }
    }
}

fn internal_band(external: Band, internal: Duration) -> Band {
    Band { p10: external.p10 + internal * 4 / 5, p50: external.p50 + internal, p90: external.p90 + internal }
}

/// The latest readings of a home (for display; the forecast uses the [`Discharge`]).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct PowerReadings {
    /// The UPS reading and its time.
    pub ups: Option<(Time, UpsReading)>,
    /// The power meter reading and its time.
    pub meter: Option<(Time, PowerMeterReading)>,
}

impl PowerReadings {
    /// Take the power readings of a telemetry snapshot placed at `at`.
    pub fn update(&mut self, t: &mamori_protocol::mqtt::Telemetry, at: Time) {
        if let Some(u) = &t.ups {
            self.ups = Some((at, u.clone()));
        }
        if let Some(m) = &t.power_meter {
            self.meter = Some((at, m.clone()));
        }
    }
}

/// What the discharge is measured from at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
pub struct Sample {
    /// When (the gateway's timeline).
    pub at: Option<Time>,
    /// Charge, %.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charge_pct: Option<f64>,
    /// Battery voltage, V.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voltage_v: Option<f64>,
    /// The UPS's runtime, s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_s: Option<u32>,
    /// The UPS's load, %.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_pct: Option<f64>,
    /// The power meter's watts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_w: Option<f64>,
}

impl Sample {
    /// From a telemetry snapshot's readings at `at`.
    pub fn of(at: Time, ups: Option<&UpsReading>, meter: Option<&PowerMeterReading>) -> Sample {
        Sample {
            at: Some(at),
            charge_pct: ups.and_then(|u| u.battery_charge_pct),
            voltage_v: ups.and_then(|u| u.battery_voltage_v).or_else(|| meter.and_then(|m| m.battery_voltage_v)),
            runtime_s: ups.and_then(|u| u.runtime_s),
            load_pct: ups.and_then(|u| u.load_pct),
            power_w: meter.and_then(|m| m.power_w),
        }
    }

    fn is_empty(&self) -> bool {
        self.charge_pct.is_none()
            && self.voltage_v.is_none()
            && self.runtime_s.is_none()
            && self.load_pct.is_none()
            && self.power_w.is_none()
    }
}

/// The most samples a discharge keeps: when full, neighbours are merged two by two (the first
/// and the last kept as they are), so memory is bounded and the whole outage stays covered.
pub const MAX_SAMPLES: usize = 128;

/// Half as many samples over the same time: the first and the last as they are, each pair
/// between them merged into one at its middle with the mean of each reading. Merging, not
/// dropping every other one: the readings' noise averages out instead of staying in the few
/// old samples left, which after a day or two of halvings pulled the line (a 40-hour discharge
/// was forecast 8 % short at 87 % of it; 15 % long in the benchmark).
fn halved(samples: &[Sample]) -> Vec<Sample> {
    let Some((first, rest)) = samples.split_first() else { return Vec::new() };
    let Some((last, middle)) = rest.split_last() else { return vec![*first] };
    let mean = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => Some((a + b) / 2.0),
        (a, b) => a.or(b),
    };
    // A pack that reads full at first (a lithium BMS at 100 %) is not on its line until it
    // leaves full (the trend keeps only the last full reading): a pair across that moment is
    // kept as it is, never averaged into a point that is on neither.
    let top = samples.iter().filter_map(|x| x.charge_pct).fold(f64::NEG_INFINITY, f64::max);
    let is_full = |x: &Sample| x.charge_pct.is_none_or(|c| c >= top - 1.0);
    let full_run = samples.iter().take_while(|x| is_full(x)).count();
    let mut out = vec![*first];
    for (k, pair) in middle.chunks(2).enumerate() {
        // `middle` starts at the second sample: this pair is samples 1 + 2k and 2 + 2k. The
        // last full reading (its time is where the line starts) and the first after it are
        // never merged.
        if let [a, b] = pair {
            let (i, j) = (1 + 2 * k, 2 + 2 * k);
            if (i..=j).contains(&(full_run.wrapping_sub(1))) || (i..=j).contains(&full_run) {
                out.extend([*a, *b]);
                continue;
            }
        }
        out.push(match pair {
            [a, b] => Sample {
                at: match (a.at, b.at) {
                    (Some(x), Some(y)) => Some(x + (y - x) / 2),
                    (x, y) => x.or(y),
                },
                charge_pct: mean(a.charge_pct, b.charge_pct),
                voltage_v: mean(a.voltage_v, b.voltage_v),
                runtime_s: mean(a.runtime_s.map(f64::from), b.runtime_s.map(f64::from)).map(|r| r.round() as u32),
                load_pct: mean(a.load_pct, b.load_pct),
                power_w: mean(a.power_w, b.power_w),
            },
            _ => pair[0],
        });
    }
    out.push(*last);
    out
}

/// One outage's discharge, as observed.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct Discharge {
    /// The outage's start.
    pub since: Option<Time>,
    /// The readings that passed the checks, oldest first.
    pub samples: Vec<Sample>,
    /// Readings refused, by reason.
    pub rejected: BTreeMap<String, u64>,
    /// The UPS's runtime rose on battery: not used again in this outage.
    pub runtime_unreliable: bool,
    /// The charge did not move while the battery must have drained: not used again in this
    /// outage.
    #[serde(default)]
    pub charge_stuck: bool,
    /// The latest reading of the outage, whatever it carried (a home that reports nothing of
    /// its battery is still heard).
    #[serde(default)]
    pub last_heard: Option<Time>,
    /// The home unit's boot at `last_heard` (from the agent's clocks, when it sends them).
    #[serde(default)]
    pub heard_boot: Option<String>,
}

/// Why a reading was refused (the counter's name).
pub mod reject {
    /// A charge outside 0–100 %.
    pub const CHARGE_RANGE: &str = "charge_out_of_range";
    /// A charge that fell by half in one step.
    pub const CHARGE_JUMP: &str = "charge_jump";
    /// A voltage outside 1–100 V.
    pub const VOLTAGE_RANGE: &str = "voltage_out_of_range";
    /// A runtime of 0 with charge left.
    pub const RUNTIME_ZERO: &str = "runtime_zero";
    /// A runtime of 65,535 s or more.
    pub const RUNTIME_SENTINEL: &str = "runtime_sentinel";
    /// A runtime that rose on battery while the load did not fall.
    pub const RUNTIME_RISING: &str = "runtime_rising";
    /// A load outside 0–150 %.
    pub const LOAD_RANGE: &str = "load_out_of_range";
    /// A power outside 0–5,000 W.
    pub const POWER_RANGE: &str = "power_out_of_range";
    /// A charge that did not move for 30 minutes while the battery must have drained.
    pub const CHARGE_STUCK: &str = "charge_stuck";
    /// Every reason.
    pub const ALL: &[&str] = &[
        CHARGE_RANGE,
        CHARGE_JUMP,
        CHARGE_STUCK,
        VOLTAGE_RANGE,
        RUNTIME_ZERO,
        RUNTIME_SENTINEL,
        RUNTIME_RISING,
        LOAD_RANGE,
        POWER_RANGE,
    ];
}

impl Discharge {
    /// A discharge beginning at `since`.
    pub fn start(since: Time) -> Discharge {
        Discharge { since: Some(since), ..Default::default() }
    }

    /// Take a sample: what cannot be true is refused and counted; the reasons are returned.
    /// `stuck_after`: a charge unchanged for this long is stuck (the care plan's battery at
    /// its load would have lost points by then).
    pub fn push(&mut self, mut s: Sample, stuck_after: Duration) -> Vec<&'static str> {
        let mut refused = Vec::new();
        let Some(at) = s.at else { return refused };
        self.last_heard = self.last_heard.max(Some(at));
        if self.samples.last().and_then(|p| p.at).is_some_and(|p| at < p) {
            return refused; // late: the discharge is in time order
        }
        let last = |f: fn(&Sample) -> Option<f64>| self.samples.iter().rev().find_map(|x| f(x).zip(x.at));
        if let Some(c) = s.charge_pct {
            if !(0.0..=100.0).contains(&c) || !c.is_finite() {
                refused.push(reject::CHARGE_RANGE);
                s.charge_pct = None;
            } else if let Some((p, pat)) = last(|x| x.charge_pct) {
                if p - c >= 50.0 && at - pat < Duration::minutes(2) {
                    refused.push(reject::CHARGE_JUMP);
                    s.charge_pct = None;
                }
            }
        }
        if let (Some(c), false) = (s.charge_pct, self.charge_stuck) {
            // Since when has the charge read exactly this?
            let unchanged_since = self
                .samples
                .iter()
                .rev()
                .filter(|x| x.charge_pct.is_some())
                .take_while(|x| x.charge_pct == Some(c))
                .last()
                .and_then(|x| x.at);
            if unchanged_since.is_some_and(|t| at - t >= stuck_after) {
                refused.push(reject::CHARGE_STUCK);
                self.charge_stuck = true;
            }
        }
        if self.charge_stuck {
            s.charge_pct = None;
        }
        if s.voltage_v.is_some_and(|v| !(1.0..=100.0).contains(&v) || !v.is_finite()) {
            refused.push(reject::VOLTAGE_RANGE);
            s.voltage_v = None;
        }
        if s.load_pct.is_some_and(|l| !(0.0..=150.0).contains(&l) || !l.is_finite()) {
            refused.push(reject::LOAD_RANGE);
            s.load_pct = None;
        }
        if s.power_w.is_some_and(|w| !(0.0..=5000.0).contains(&w) || !w.is_finite()) {
            refused.push(reject::POWER_RANGE);
            s.power_w = None;
        }
        if let Some(r) = s.runtime_s {
            let charge_left = s.charge_pct.is_none_or(|c| c > 10.0);
            if r >= 65_535 {
                refused.push(reject::RUNTIME_SENTINEL);
                s.runtime_s = None;
            } else if r == 0 && charge_left {
                refused.push(reject::RUNTIME_ZERO);
                s.runtime_s = None;
            } else if let Some(p) = self.samples.iter().rev().find(|x| x.runtime_s.is_some()) {
                let prev = f64::from(p.runtime_s.unwrap_or(0));
                let load_fell = matches!((p.load_pct, s.load_pct), (Some(a), Some(b)) if b < a * 0.85)
                    || matches!((p.power_w, s.power_w), (Some(a), Some(b)) if b < a * 0.85);
                if f64::from(r) > prev * 1.25 + 60.0 && !load_fell {
                    refused.push(reject::RUNTIME_RISING);
                    self.runtime_unreliable = true;
                }
            }
            if self.runtime_unreliable {
                s.runtime_s = None;
            }
        }
        for r in &refused {
            *self.rejected.entry((*r).to_string()).or_default() += 1;
        }
        if !s.is_empty() {
            if self.samples.len() >= MAX_SAMPLES {
                self.samples = halved(&self.samples);
            }
            self.samples.push(s);
        }
        refused
    }

    /// When a home that reported no level of its battery fell silent on battery, stayed silent
    /// until `restored` (the mains back) less `margin`, and came back as another boot of its
    /// unit (`boot_now`): its last reading. Its home unit runs on the same backup, so the
    /// backup ran out then and the unit lost its power. A network that died in the outage
    /// leaves the unit running, the same boot, and is not taken for it (the agent sends its
    /// events before the snapshots it kept, so the mains' return arrives before the readings
    /// of the cut). Without the agent's clocks (no boot known) nothing is concluded.
    /// `voltage_is_level`: a lead-acid voltage is a level; a lithium one is not.
    pub fn fell_silent(
        &self,
        restored: Time,
        margin: Duration,
        boot_now: Option<&str>,
        voltage_is_level: bool,
    ) -> Option<Time> {
        if self.samples.iter().any(|s| s.charge_pct.is_some() || (voltage_is_level && s.voltage_v.is_some())) {
            return None;
        }
        let last = self.last_heard?;
        let rebooted = matches!((self.heard_boot.as_deref(), boot_now), (Some(a), Some(b)) if a != b);
        let before = restored.checked_sub_signed(margin).is_some_and(|r| last < r);
        (rebooted && before && self.since.is_some_and(|since| last > since)).then_some(last)
    }

    /// Record the home unit's boot of the reading at `at` (the latest of the outage).
    pub fn heard_in(&mut self, at: Time, boot: &str) {
        if self.last_heard == Some(at) {
            self.heard_boot = Some(boot.to_string());
        }
    }

    /// The energy that left the battery since the outage began, Wh, when the power meter
    /// measured it throughout (80 % of the samples or more; 0 at the first reading).
    pub fn metered_wh(&self) -> Option<f64> {
        let with: Vec<(Time, f64)> = self.samples.iter().filter_map(|s| s.at.zip(s.power_w)).collect();
        if with.len() == 1 && self.samples.len() == 1 {
            return Some(0.0); // the outage's first reading: nothing has left the battery yet
        }
        if with.len() < 2 || with.len() * 5 < self.samples.len() * 4 {
            return None;
        }
        Some(with.windows(2).map(|w| (w[0].1 + w[1].1) / 2.0 * hours(w[1].0 - w[0].0)).sum())
    }
}

/// A battery as measured in earlier outages.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Learned {
    /// Which backup it describes (the home's first external one).
    pub source: BackupKind,
    /// The care plan's usable energy it was measured against, Wh (another value: a new
    /// battery, and learning starts over).
    pub plan_wh: f64,
    /// Usable energy delivered ÷ the care plan's (1.0: as planned).
    pub health: f64,
    /// The UPS's runtime claim ÷ what the battery could really give (above 1: optimistic).
    #[serde(default)]
    pub optimism: Option<f64>,
    /// Points of charge observed in all (weights the average; capped so that ageing shows).
    pub evidence_pct: f64,
    /// Discharges measured.
    pub discharges: u32,
    /// When last updated.
    pub updated_at: Time,
    /// Measured only by when the home unit fell silent on battery (a home that reports no
    /// level of its battery): the forecast uses it, but it does not say the battery is weak
    /// (`battery_degraded`), because a unit can lose its power for other reasons; it never
    /// dilutes a battery measured by its level, and a measurement by level replaces it.
    #[serde(default)]
    pub by_silence: bool,
}

impl Learned {
    /// Whether there is enough evidence to use it (20 points of discharge seen).
    pub fn usable(&self) -> bool {
        self.evidence_pct >= 20.0
    }
}

/// What is assumed of a battery never measured, as fractions of the care plan's energy, and
/// of an uncorrected UPS runtime.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Assumptions {
    /// Health of an unverified lead-acid battery whose level is reported: P10, P50, P90. Its
    /// discharge shows within minutes (a charge in 1 % steps, a voltage), so an aged one is
    /// soon seen for what it is.
    pub unverified_health: [f64; 3],
    /// Health of an unverified lithium pack: P10, P50, P90. Its level reads full, or up to
    /// 15 % off, through the first part of a discharge, so an aged one is seen late: the
    /// assumption stays low.
    pub unverified_lithium: [f64; 3],
    /// An unverified UPS's runtime claim: P10, P50, P90 of it.
    pub unverified_runtime: [f64; 3],
    /// The care plan's runtime for a home that reports nothing of its battery (neither its
    /// health nor its load can be seen): P10, P50, P90 of it. The P10 covers a battery at 45 %
    /// of its plan under 1.6 times the planned load (0.45 ÷ 1.6 = 0.28): an old battery and a
    /// humidifier or a suction pump nobody wrote down. Its first outage teaches the real
    /// figure (when it fell silent).
    pub unobserved: [f64; 3],
}

impl Default for Assumptions {
    fn default() -> Self {
        Assumptions {
            unverified_health: [0.7, 0.85, 1.0],
            unverified_lithium: [0.5, 0.7, 1.0],
            unverified_runtime: [0.7, 0.85, 1.0],
            unobserved: [0.28, 0.6, 1.0],
        }
    }
}

fn hours(d: Duration) -> f64 {
    d.num_milliseconds() as f64 / 3_600_000.0
}

fn secs(s: f64) -> Duration {
    Duration::milliseconds((s * 1000.0).round().clamp(0.0, 1e13) as i64)
}

/// Durations (s) of a band from one instant: P10, P50, P90.
type Spans = [f64; 3];

fn min_spans(a: Spans, b: Spans) -> Spans {
    [a[0].min(b[0]), a[1].min(b[1]), a[2].min(b[2])]
}

/// The level of a sample on a 0–100 scale: its charge, or for lead-acid its voltage.
fn level(s: &Sample, by_voltage: Option<f64>) -> Option<f64> {
    match by_voltage {
        None => s.charge_pct,
        Some(cells) => s.voltage_v.map(|v| (v / cells - 1.75) / (2.28 - 1.75) * 100.0),
    }
}

/// Lead-acid cells in a pack whose voltage on battery is `v` (a 12, 24, 36 or 48 V pack).
fn cells(v: f64) -> f64 {
    let nominal = [12.0, 24.0, 36.0, 48.0].into_iter().min_by(|a, b| (v - a).abs().total_cmp(&(v - b).abs()));
    nominal.unwrap_or(12.0) / 2.0
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(quantile(&v, 0.5))
}

/// The observed discharge: the fit of the level against the energy delivered.
#[derive(Debug, Clone, Copy)]
struct Trend {
    /// Time left of the external backup from `as_of`, s: P10, P50, P90.
    spans: Spans,
    /// The fitted level now.
    level: f64,
    /// Points observed to drop (beyond the readings' scatter).
    drop: f64,
    /// How far the pessimistic end is below the middle, as a fraction of it.
    rel: f64,
    /// Readings the line was fitted to.
    readings: usize,
}

/// How the load is known along a discharge: its rate at each sample, in one unit.
fn load_axis(samples: &[Sample]) -> Vec<f64> {
    let n = samples.len();
    let has_w = samples.iter().filter(|s| s.power_w.is_some()).count();
    let has_pct = samples.iter().filter(|s| s.load_pct.is_some()).count();
    let pick: fn(&Sample) -> Option<f64> = if has_w * 5 >= n * 4 {
        |s| s.power_w
    } else if has_pct * 5 >= n * 4 {
        |s| s.load_pct
    } else {
        |_| Some(1.0)
    };
    let mut last = samples.iter().find_map(pick).unwrap_or(1.0).max(1e-3);
    samples
        .iter()
        .map(|s| {
            if let Some(v) = pick(s).filter(|v| *v > 0.0) {
                last = v;
            }
            last
        })
        .collect()
}

fn trend(d: &Discharge, chemistry: Option<Chemistry>) -> Option<Trend> {
    let s = &d.samples;
    let with_charge = if d.charge_stuck { 0 } else { s.iter().filter(|x| x.charge_pct.is_some()).count() };
    let by_voltage = if with_charge >= 3 {
        None
    } else if chemistry == Some(Chemistry::LeadAcid) {
        // Lithium's voltage is flat until the end: only lead-acid's tells the charge.
        Some(cells(s.iter().find_map(|x| x.voltage_v)?))
    } else {
        return None;
    };
    let rate = load_axis(s);
    // Cumulative load-time at each sample (trapezoids).
    let mut u = vec![0.0; s.len()];
    for i in 1..s.len() {
        let dt = (s[i].at? - s[i - 1].at?).num_milliseconds() as f64 / 1000.0;
        u[i] = u[i - 1] + (rate[i] + rate[i - 1]) / 2.0 * dt;
    }
    let pts: Vec<(Time, f64, f64, f64)> =
        s.iter().zip(&u).zip(&rate).filter_map(|((x, u), r)| Some((x.at?, *u, level(x, by_voltage)?, *r))).collect();
    // A pack that reads full for a while (a lithium BMS at 100 %, a float voltage) is not yet
    // seen to discharge: of the readings at the start within a point of the highest, only the
    // last is kept.
    let top = pts.iter().map(|p| p.2).fold(f64::NEG_INFINITY, f64::max);
    let full = pts.iter().take_while(|p| p.2 >= top - 1.0).count();
    let pts: Vec<(Time, f64, f64, f64)> = pts.into_iter().skip(full.saturating_sub(1)).collect();
    if pts.len() < 3 {
        return None;
    }
    let (t0, t1) = (pts[0].0, pts[pts.len() - 1].0);
    let span_s = (t1 - t0).num_milliseconds() as f64 / 1000.0;
    if pts.len() < 4 || span_s <= 0.0 {
        return None;
    }
    // Pairs at least a quarter of the span apart: neighbours one step of 1 % apart would say
    // anything.
    let min_gap = span_s / 4.0;
    let mut slopes = Vec::new();
    for i in 0..pts.len() {
        for j in i + 1..pts.len() {
            let gap = (pts[j].0 - pts[i].0).num_milliseconds() as f64 / 1000.0;
            let du = pts[j].1 - pts[i].1;
            if gap >= min_gap && du > 0.0 {
                slopes.push((pts[j].2 - pts[i].2) / du);
            }
        }
    }
    if slopes.len() < 3 {
        return None;
    }
    slopes.sort_by(f64::total_cmp);
    let b50 = quantile(&slopes, 0.5);
    if b50 >= 0.0 || !b50.is_finite() {
        return None; // not seen to discharge (yet)
    }
    let a = median(pts.iter().map(|p| p.2 - b50 * p.1).collect())?;
    let u_last = pts[pts.len() - 1].1;
    let level_now = a + b50 * u_last;
    let level_first = a + b50 * pts[0].1;
    // The readings' scatter about the line (median absolute residual): a drop within the
    // noise is not a drop.
    let noise = median(pts.iter().map(|p| (p.2 - (a + b50 * p.1)).abs()).collect()).unwrap_or(0.0);
    let drop = (level_first - level_now - 3.0 * noise).max(0.0);
    // The load now: its average over the last 30 minutes (so that a pump's or a humidifier's
    // periodic spikes count as much as they will, and a lasting change shows within half an
    // hour).
    let from = pts.iter().find(|p| t1 - p.0 <= Duration::minutes(30)).unwrap_or(&pts[0]);
    let window_s = (t1 - from.0).num_milliseconds() as f64 / 1000.0;
    let r_now = if window_s >= 60.0 { (u_last - from.1) / window_s } else { pts[pts.len() - 1].3 }.max(1e-6);
    let r_avg = (u_last / span_s).max(1e-6);
    // Lead-acid gives less at a load above the one it was observed at (Peukert, k = 1.2).
    let peukert = if chemistry == Some(Chemistry::LeadAcid) && r_now > r_avg { (r_avg / r_now).powf(0.2) } else { 1.0 };
    let left = |b: f64| level_now.max(0.0) / (-b) / r_now * peukert;
    let mid = left(b50);
    // The slope's uncertainty: its standard error as for a least-squares line (Theil–Sen's is
    // about 10 % wider), from the readings' robust scatter (1.4826 × the median absolute
    // residual, at least half a point: what 1 % steps alone leave), with a wider z while
    // there are few readings.
    let n = pts.len() as f64;
    let u_mean = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let suu: f64 = pts.iter().map(|p| (p.1 - u_mean).powi(2)).sum();
    let se = (1.4826 * noise).max(0.5) / suu.max(1e-12).sqrt() * 1.1;
    let z = 1.2816 + 1.5 / (n - 2.0).max(1.0);
    let (b_steep, b_flat) = (b50 - z * se, (b50 + z * se).min(b50 * 0.5));
    // A level read in whole points is known to about a point over the drop seen (readings in
    // steps, without noise to average, do not improve on it), and never better than ±10 %.
    let rel = (1.0 / (level_first - level_now).max(0.1)).max(0.10);
    let p10 = left(b_steep).min(mid * (1.0 - rel).max(0.2));
    let p90 = if b_flat < 0.0 { left(b_flat) } else { f64::INFINITY }.max(mid * (1.0 + rel));
    Some(Trend { spans: [p10, mid, p90], level: level_now, drop, rel: 1.0 - p10 / mid.max(1e-9), readings: pts.len() })
}

/// Forecast for a home on battery since `outage_since`, from its discharge so far and what
/// is known of its battery.
pub fn forecast(
    home: &Home,
    outage_since: Time,
    d: &Discharge,
    learned: Option<&Learned>,
    a: &Assumptions,
) -> Forecast {
    let internal = secs(home.internal_min() * 60.0);
    let plan_wh = home.external_wh();
    let source = home.external();
    let chemistry = source.map(|b| b.chemistry());
    let learned = learned.filter(|l| l.usable() && plan_wh.is_some_and(|w| (w - l.plan_wh).abs() < 0.5));
    let verified = learned.is_some();
    let unverified = if chemistry == Some(Chemistry::Lithium) { a.unverified_lithium } else { a.unverified_health };
    let health = learned.map_or(unverified, |l| [l.health * 0.85, l.health, (l.health * 1.15).min(1.25)]);
    let as_of = d.samples.last().and_then(|s| s.at).unwrap_or(outage_since).max(outage_since);

    // The load now, W: the meter's (median of 10 minutes), else the care plan's scaled by the
    // UPS's load % against its first reading of the outage.
    let recent = |f: fn(&Sample) -> Option<f64>| {
        median(
            d.samples
                .iter()
                .filter(|s| s.at.is_some_and(|t| as_of - t <= Duration::minutes(10)))
                .filter_map(f)
                .collect(),
        )
    };
    let plan_load = home.load_w();
    let load_w = recent(|s| s.power_w).filter(|w| *w > 1.0).unwrap_or_else(|| {
        let first = d.samples.iter().find_map(|s| s.load_pct).filter(|l| *l > 0.5);
        match (first, recent(|s| s.load_pct)) {
            (Some(f), Some(now)) => plan_load * (now / f).clamp(0.3, 4.0),
            _ => plan_load,
        }
    });
    let peukert = if chemistry == Some(Chemistry::LeadAcid) && plan_load > 0.0 && load_w > plan_load {
        (plan_load / load_w).powf(0.2)
    } else {
        1.0
    };
    let energy_spans = |wh: f64| -> Spans {
        if load_w <= 0.0 {
            return [0.0; 3];
        }
        health.map(|h| (wh * h * peukert / load_w * 3600.0).max(0.0))
    };

    // Claims, each as spans from `as_of`.
    let mut claims: Vec<(Basis, Spans)> = Vec::new();
    let last_charge = d.samples.iter().rev().find_map(|s| s.charge_pct.zip(s.at)).filter(|_| !d.charge_stuck);
    if let (Some(wh), Some((c, at))) = (plan_wh, last_charge) {
        let mut sp = energy_spans(c / 100.0 * wh);
        if chemistry == Some(Chemistry::Lithium) {
            // A lithium pack's level is good to about ±15 %.
            sp = [sp[0] * 0.85, sp[1], sp[2] * 1.15];
        }
        let since = (as_of - at).num_seconds() as f64;
        claims.push((Basis::ChargeAndLoad, sp.map(|x| (x - since).max(0.0))));
    }
    if let (Some(wh), Some(out)) = (plan_wh, d.metered_wh()) {
        // What is left is the battery's real energy less what the meter saw leave it.
        let left = health.map(|h| ((wh * h - out).max(0.0) * peukert / load_w.max(1e-3) * 3600.0).max(0.0));
        claims.push((Basis::EnergyBalance, left));
    }
    let last_runtime = d.samples.iter().rev().find_map(|s| s.runtime_s.zip(s.at));
    if let Some((r, at)) = last_runtime.filter(|_| !d.runtime_unreliable) {
        let f = match learned.and_then(|l| l.optimism).filter(|o| *o > 0.05) {
            Some(o) => [0.85 / o, 1.0 / o, 1.15 / o],
            None => a.unverified_runtime,
        };
        let since = (as_of - at).num_seconds() as f64;
        claims.push((Basis::UpsRuntime, f.map(|k| (f64::from(r) * k - since).max(0.0))));
    }
    let mut claim: Option<(Basis, Spans)> = None;
    for (b, sp) in &claims {
        claim = Some(match claim {
            None => (*b, *sp),
            Some((cb, csp)) => (if sp[1] < csp[1] { *b } else { cb }, min_spans(csp, *sp)),
        });
    }
    if claim.is_none() {
        if let Some(wh) = plan_wh {
            let since = (as_of - outage_since).num_seconds() as f64;
            // Nothing observed: a measured battery at its health, else the assumption for a
            // battery and a load that cannot be seen.
            let k = if verified { health } else { a.unobserved };
            let sp = k.map(|h| (wh * h * peukert / load_w.max(1e-3) * 3600.0 - since).max(0.0));
            claim = Some((Basis::DeadReckoning, sp));
        }
    }

    let observed = trend(d, chemistry);
    let (basis, spans) = match (observed, claim) {
        (Some(t), claim) => {
            // How far the observation is trusted: by how much discharge was seen beyond the
            // scatter (from 2 points to 8), and by how narrow its own band is (its P10 within
            // half of its middle to within a fifth).
            let w = ((t.drop - 2.0) / 6.0).clamp(0.0, 1.0).min(((0.5 - t.rel) / 0.3).clamp(0.0, 1.0));
            let mut sp = t.spans;
            if let Some((_, c)) = claim {
                if w < 1.0 {
                    for i in 0..3 {
                        let (x, y) = (sp[i].max(1.0), c[i].max(1.0));
                        sp[i] = if x.is_finite() { (w * x.ln() + (1.0 - w) * y.ln()).exp() } else { y };
                    }
                }
            }
            // An observation whose whole band is shorter than the claim's pessimistic end says
            // so beyond its own doubt (a battery older or a load heavier than the claim can
            // know of): the pessimistic end and the middle follow it at once, whatever the
            // weight above, which waits for the middle's evidence.
            let certain = t.drop >= 3.0 && t.readings >= 10 && claim.is_some_and(|(_, c)| t.spans[2] < c[0]);
            if certain {
                sp[0] = sp[0].min(t.spans[0]);
                sp[1] = sp[1].min(t.spans[1]);
            }
            // A UPS runtime the observation does not support (longer) is never believed; a
            // shorter one bounds the pessimistic end, and below the observation's P10 (the UPS
            // may know of its own cut-off) it is the middle.
            if let Some((r, at)) = last_runtime.filter(|_| !d.runtime_unreliable) {
                let r = f64::from(r) - (as_of - at).num_seconds() as f64;
                if r < sp[0] {
                    sp = [r * 0.9, r, sp[2].max(r)];
                } else if r < sp[1] {
                    sp[0] = sp[0].min(r * 0.9);
                }
            }
            // Never more than the care plan's energy at 125 % health could give from here.
            if let (Some(wh), true) = (plan_wh, observed.is_some_and(|t| t.level.is_finite())) {
                let cap = (t.level.clamp(0.0, 100.0) / 100.0 * wh * 1.25 / load_w.max(1e-3) * 3600.0).max(0.0);
                sp = [sp[0].min(cap), sp[1].min(cap), sp[2].min(cap)];
            }
            // What the middle rests on: the observation once it is trusted or certain.
            let basis = if w >= 0.5 || certain {
                Basis::ObservedDischarge
            } else {
                claim.map_or(Basis::ObservedDischarge, |c| c.0)
            };
            (basis, sp)
        }
        (None, Some((b, sp))) => (b, sp),
        (None, None) => {
            let external = Band::at(outage_since);
            return Forecast {
                external_until: outage_since,
                runs_out_at: outage_since + internal,
                external,
                runs_out: internal_band(external, internal),
                basis: Basis::InternalOnly,
                as_of: outage_since,
                verified,
            };
        }
    };
    let mut sorted = spans;
    sorted.sort_by(f64::total_cmp);
    let external = Band { p10: as_of + secs(sorted[0]), p50: as_of + secs(sorted[1]), p90: as_of + secs(sorted[2]) };
    Forecast {
        external_until: external.p50,
        runs_out_at: external.p50 + internal,
        external,
        runs_out: internal_band(external, internal),
        basis,
        as_of,
        verified,
    }
}

/// What one discharge teaches about the home's battery: `None` when it was too small to say
/// anything (under 10 points and not run out). `ran_out`: the external backup was seen to run
/// out at `ended` (its level then taken as 0).
pub fn learn(home: &Home, d: &Discharge, prev: Option<&Learned>, ended: Time, ran_out: bool) -> Option<Learned> {
    let source = home.external()?;
    let plan_wh = home.external_wh().filter(|w| *w > 0.0)?;
    let chemistry = source.chemistry();
    let s = &d.samples;
    // A lead-acid voltage where there is no charge (neither: nothing but the time it ran).
    let by_voltage = if s.iter().filter(|x| x.charge_pct.is_some()).count() >= 3 {
        None
    } else if chemistry == Chemistry::LeadAcid {
        s.iter().find_map(|x| x.voltage_v).map(cells)
    } else {
        None
    };
    let levels: Vec<(Time, f64)> = s.iter().filter_map(|x| Some((x.at?, level(x, by_voltage)?))).collect();
    let since = d.since.or_else(|| s.first().and_then(|x| x.at))?;
    let first = levels.first().map(|l| l.1.min(100.0));
    let last = if ran_out { Some(0.0) } else { levels.last().map(|l| l.1.max(0.0)) };
    let end = if ran_out { ended } else { levels.last().map_or(ended, |l| l.0) };
    let hours_on = hours(end - since);
    let (drop, start_level) = match (first, last) {
        (Some(f), Some(l)) => (f - l, f),
        // Nothing reported but seen to run out: it delivered all it had.
        (None, _) if ran_out => (100.0, 100.0),
        _ => return None,
    };
    if drop < 10.0 || hours_on <= 0.0 {
        return None;
    }
    // Energy delivered: measured by the meter, else the load (scaled by the UPS's load %)
    // over the time on battery.
    let delivered = d.metered_wh().unwrap_or_else(|| {
        let rate = load_axis(s);
        let pct_known = s.iter().filter(|x| x.load_pct.is_some()).count() * 5 >= s.len().max(1) * 4;
        let ratio = if pct_known && rate.first().is_some_and(|r| *r > 0.5) {
            median(rate.iter().map(|r| r / rate[0]).collect()).unwrap_or(1.0).clamp(0.3, 4.0)
        } else {
            1.0
        };
        home.load_w() * ratio * hours_on
    });
    if delivered <= 0.0 {
        return None;
    }
    let capacity = delivered / (drop / 100.0);
    let health = (capacity / plan_wh).clamp(0.05, 1.5);
    // The UPS's first runtime claim against what the battery could really give from there.
    let optimism = s.iter().find_map(|x| x.runtime_s.zip(x.at)).and_then(|(r, at)| {
        let load = delivered / hours_on;
        let level_then = levels.iter().find(|l| l.0 >= at).map_or(start_level, |l| l.1);
        let real_s = level_then.clamp(0.0, 100.0) / 100.0 * capacity / load * 3600.0;
        (real_s > 60.0).then(|| (f64::from(r) / real_s).clamp(0.1, 10.0))
    });
    let prev = prev.filter(|p| p.source == source.kind && (p.plan_wh - plan_wh).abs() < 0.5);
    // A time measured by a silence is weaker evidence than a level seen to fall: it never
    // dilutes a measured battery (which is kept as it was), and a measured one replaces it.
    let by_silence = first.is_none();
    let prev = match prev {
        Some(p) if by_silence && !p.by_silence => return Some(p.clone()),
        Some(p) if !by_silence && p.by_silence => None,
        p => p,
    };
    let (health, optimism, evidence, discharges) = match prev {
        Some(p) => {
            let w = p.evidence_pct.min(100.0);
            let mix = |old: f64, new: f64| (old * w + new * drop) / (w + drop);
            let opt = match (p.optimism, optimism) {
                (Some(o), Some(n)) => Some(mix(o, n)),
                (o, n) => n.or(o),
            };
            (mix(p.health, health), opt, (w + drop).min(200.0), p.discharges + 1)
        }
        None => (health, optimism, drop.min(200.0), 1),
    };
    Some(Learned {
        source: source.kind,
        plan_wh,
        health,
        optimism,
        evidence_pct: evidence,
        discharges,
        updated_at: ended,
        by_silence,
    })
}

#[cfg(test)]
mod tests;
