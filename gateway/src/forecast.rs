//! When does the backup power run out? Pure arithmetic over what the home last said and its
//! care plan.
//!
//! The external backup (UPS, power station) lasts, best basis first:
//! 1. `ups_runtime`: the UPS's own reported runtime, counted from the reading's time;
//! 2. `charge_and_load`: the reported charge × the care plan's usable Wh ÷ the load (the
//!    power meter's watts when present, else the care plan's devices);
//! 3. `dead_reckoning`: the care plan's usable Wh ÷ its load, counted from the outage's start.
//!
//! The ventilator's internal battery is added on top. Forecasts are absolute times
//! (`external_until`, `runs_out_at`), so a home that goes silent keeps a running forecast from
//! its last known state without anyone recomputing it.

use chrono::{DateTime, Duration, Utc};
use mamori_protocol::mqtt::{PowerMeterReading, Telemetry};
use mamori_protocol::reading::UpsReading;
use serde::{Deserialize, Serialize};

use crate::homes::Home;

/// A UTC instant.
pub type Time = DateTime<Utc>;

/// What a forecast rests on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// The UPS's reported runtime.
    UpsRuntime,
    /// Reported charge × care-plan capacity ÷ load.
    ChargeAndLoad,
    /// Care-plan energy ÷ load from the outage's start.
    DeadReckoning,
    /// Only the ventilator's internal battery is known.
    InternalOnly,
}

impl Basis {
    /// Wire / display name.
    pub fn as_str(self) -> &'static str {
        match self {
            Basis::UpsRuntime => "ups_runtime",
            Basis::ChargeAndLoad => "charge_and_load",
            Basis::DeadReckoning => "dead_reckoning",
            Basis::InternalOnly => "internal_only",
        }
    }
}

/// A forecast.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
pub struct Forecast {
    /// When the external backup runs out.
    pub external_until: Time,
    /// When everything runs out (the ventilator's internal battery included).
    pub runs_out_at: Time,
    /// What it rests on.
    pub basis: Basis,
    /// The time of the reading it was computed from.
    pub as_of: Time,
}

impl Forecast {
    /// Time left at `now` (zero when past).
    pub fn time_left(&self, now: Time) -> Duration {
        (self.runs_out_at - now).max(Duration::zero())
    }

    /// Whether the home runs on its last battery (the external backup is exhausted).
    pub fn on_last_battery(&self, now: Time) -> bool {
        now >= self.external_until
    }
}

/// The latest readings the forecast uses.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct PowerReadings {
    /// The UPS reading and its time.
    pub ups: Option<(Time, UpsReading)>,
    /// The power meter reading and its time.
    pub meter: Option<(Time, PowerMeterReading)>,
}

impl PowerReadings {
    /// Take the power readings of a telemetry snapshot placed at `at` (the gateway's
    /// timeline: see [`crate::engine::clock`]).
    pub fn update(&mut self, t: &Telemetry, at: Time) {
        if let Some(u) = &t.ups {
            self.ups = Some((at, u.clone()));
        }
        if let Some(m) = &t.power_meter {
            self.meter = Some((at, m.clone()));
        }
    }
}

fn secs(s: f64) -> Duration {
    Duration::milliseconds((s * 1000.0).clamp(0.0, 1e13) as i64)
}

/// Forecast for a home on battery since `outage_since`.
pub fn forecast(home: &Home, outage_since: Time, r: &PowerReadings) -> Forecast {
    let internal = secs(home.internal_min() * 60.0);
    let load_w = r.meter.as_ref().and_then(|(_, m)| m.power_w).filter(|w| *w > 1.0).unwrap_or_else(|| home.load_w());
    let from_ups = r.ups.as_ref().filter(|(at, _)| *at >= outage_since - Duration::seconds(5));
    let external = if let Some((at, runtime)) = from_ups.and_then(|(at, u)| u.runtime_s.map(|s| (*at, s))) {
        Some((at + secs(f64::from(runtime)), Basis::UpsRuntime, at))
    } else if let (Some((at, charge)), Some(wh), true) =
        (from_ups.and_then(|(at, u)| u.battery_charge_pct.map(|c| (*at, c))), home.external_wh(), load_w > 0.0)
    {
        Some((at + secs(charge.clamp(0.0, 100.0) / 100.0 * wh / load_w * 3600.0), Basis::ChargeAndLoad, at))
    } else if let (Some(wh), true) = (home.external_wh(), load_w > 0.0) {
        Some((outage_since + secs(wh / load_w * 3600.0), Basis::DeadReckoning, outage_since))
    } else {
        None
    };
    match external {
        Some((until, basis, as_of)) => Forecast { external_until: until, runs_out_at: until + internal, basis, as_of },
        None => Forecast {
            external_until: outage_since,
            runs_out_at: outage_since + internal,
            basis: Basis::InternalOnly,
            as_of: outage_since,
        },
    }
}

#[cfg(test)]
#[allow(clippy::field_reassign_with_default)]
mod tests {
    use super::*;
    use crate::homes::{Backup, BackupKind, Device};
    use mamori_protocol::mqtt::HomeId;

    fn t(s: i64) -> Time {
        DateTime::from_timestamp(1_790_000_000 + s, 0).unwrap()
    }

    fn home(ext_wh: Option<f64>, internal_min: Option<f64>) -> Home {
        let mut backup = vec![];
        if let Some(wh) = ext_wh {
            backup.push(Backup {
                kind: BackupKind::PowerStation,
                usable_wh: Some(wh),
                nameplate_wh: None,
                runtime_min: None,
            });
        }
        if let Some(m) = internal_min {
            backup.push(Backup {
                kind: BackupKind::VentilatorInternal,
                usable_wh: None,
                nameplate_wh: None,
                runtime_min: Some(m),
            });
        }
        Home {
            id: HomeId::new("h").unwrap(),
            municipality: "431001".into(),
            label: "h".into(),
            devices: vec![
                Device { name: "ventilator".into(), watts: 25.0 },
                Device { name: "humidifier".into(), watts: 75.0 },
            ],
            backup,
            evacuation: None,
            contacts: vec![],
            escalation: Default::default(),
        }
    }

    #[test]
    fn the_ups_runtime_wins_and_the_internal_battery_is_added() {
        let mut r = PowerReadings::default();
        r.ups =
            Some((t(60), UpsReading { runtime_s: Some(1800), battery_charge_pct: Some(50.0), ..Default::default() }));
        let f = forecast(&home(Some(800.0), Some(480.0)), t(0), &r);
        assert_eq!(f.basis, Basis::UpsRuntime);
        assert_eq!(f.external_until, t(60 + 1800));
        assert_eq!(f.runs_out_at, t(60 + 1800 + 480 * 60));
        assert_eq!(f.time_left(t(60)), Duration::seconds(1800 + 480 * 60));
        assert!(!f.on_last_battery(t(1859)) && f.on_last_battery(t(1860)));
    }

    #[test]
    fn charge_times_capacity_over_load_when_no_runtime() {
        let mut r = PowerReadings::default();
        r.ups = Some((t(10), UpsReading { battery_charge_pct: Some(50.0), ..Default::default() }));
        // 50 % of 800 Wh at 100 W = 4 h.
        let f = forecast(&home(Some(800.0), None), t(0), &r);
        assert_eq!((f.basis, f.runs_out_at), (Basis::ChargeAndLoad, t(10 + 4 * 3600)));
        // A power meter's watts replace the care plan's load: 50 % of 800 Wh at 200 W = 2 h.
        r.meter = Some((t(10), PowerMeterReading { power_w: Some(200.0), ..Default::default() }));
        assert_eq!(forecast(&home(Some(800.0), None), t(0), &r).runs_out_at, t(10 + 2 * 3600));
    }

    #[test]
    fn dead_reckoning_from_the_outage_start_with_nothing_reported() {
        // 870 Wh × 0.85 through the inverter would be given as nameplate; here usable 700 Wh at 100 W = 7 h.
        let f = forecast(&home(Some(700.0), Some(180.0)), t(0), &PowerReadings::default());
        assert_eq!(f.basis, Basis::DeadReckoning);
        assert_eq!(f.external_until, t(7 * 3600));
        assert_eq!(f.runs_out_at, t(7 * 3600 + 180 * 60));
    }

    #[test]
    fn a_reading_from_before_the_outage_is_not_used() {
        let mut r = PowerReadings::default();
        r.ups = Some((t(-600), UpsReading { runtime_s: Some(99_999), ..Default::default() }));
        assert_eq!(forecast(&home(Some(700.0), None), t(0), &r).basis, Basis::DeadReckoning);
    }

    #[test]
    fn only_the_internal_battery() {
        let f = forecast(&home(None, Some(180.0)), t(0), &PowerReadings::default());
        assert_eq!((f.basis, f.runs_out_at), (Basis::InternalOnly, t(180 * 60)));
        assert!(f.on_last_battery(t(0)));
    }
}
