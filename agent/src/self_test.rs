//! Scheduled battery self-tests: when the agent may ask a UPS to test its battery. Pure: the
//! time, the last run and the home's state come in; a decision goes out.
//!
//! ## Why, and the risk
//!
//! A battery is measured only when it is used. A quick self-test (Megatec and Voltronic `T`,
//! 10 seconds; APC Smart `W`; through `upsd`, `INSTCMD <ups> test.battery.start.quick` as a
//! user with `instcmds` rights) switches the UPS to battery for a moment and reports whether the
//! battery carried the load: a battery that cannot is found on a calm night, not in the
//! typhoon. The test itself is the risk: for those seconds the ventilator runs on the battery
//! being tested, and a battery that fails may drop the load (most UPSes switch back to mains
//! on a failing test, but a worn relay or a dead battery is exactly what is being tested). So
//! it is **off by default** and opted into per home by the installer with the family and the
//! ventilator's provider, and never run:
//!
//! - on battery, or with the battery low or below `min_charge_pct` (default 90 %);
//! - while anything is wrong in the home (an alarm, a low SpO2, a lost device);
//! - more often than `every_days` (default 30), and only within an hour of `at_local`
//!   (default 03:30, local time at `utc_offset_min`, default +09:00).
//!
//! While a test runs, the monitor does not take the UPS's own switch to battery for an outage
//! ([`crate::monitor::Monitor::self_test_started`]), for at most `max_s` (default 60 s): a
//! UPS still on battery after that is in an outage, reported as one. The result is reported
//! as a `battery_test` event; a skipped test is reported once, with its reason.
//!
//! The ventilator's own alarm and the UPS's own alarm are untouched: mamori is a secondary,
//! remote notification system.

use chrono::{DateTime, Duration, FixedOffset, NaiveTime};
use serde::Deserialize;

/// `[self_test]` in the agent's config.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SelfTestConfig {
    /// Whether this home opted in (off by default).
    #[serde(default)]
    pub enabled: bool,
    /// Local time of day to run, `HH:MM`.
    #[serde(default = "default_at_local")]
    pub at_local: String,
    /// The local time's offset from UTC, minutes (+540: Japan).
    #[serde(default = "default_utc_offset_min")]
    pub utc_offset_min: i32,
    /// Days between tests.
    #[serde(default = "default_every_days")]
    pub every_days: u32,
    /// The least charge to start a test with, % (where the UPS reports its charge).
    #[serde(default = "default_min_charge_pct")]
    pub min_charge_pct: f64,
    /// The longest a test may hold the UPS on battery before it counts as an outage, s.
    #[serde(default = "default_max_s")]
    pub max_s: u32,
}

fn default_at_local() -> String {
    "03:30".into()
}
fn default_utc_offset_min() -> i32 {
    540
}
fn default_every_days() -> u32 {
    30
}
fn default_min_charge_pct() -> f64 {
    90.0
}
fn default_max_s() -> u32 {
    60
}

impl Default for SelfTestConfig {
    fn default() -> Self {
        SelfTestConfig {
            enabled: false,
            at_local: default_at_local(),
            utc_offset_min: default_utc_offset_min(),
            every_days: default_every_days(),
            min_charge_pct: default_min_charge_pct(),
            max_s: default_max_s(),
        }
    }
}

impl SelfTestConfig {
    /// The key that is wrong and what it expects.
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        if self.time_of_day().is_none() {
            return Err(("at_local", "a local time of day as HH:MM, e.g. \"03:30\""));
        }
        if !(-720..=840).contains(&self.utc_offset_min) {
            return Err(("utc_offset_min", "the local time's offset from UTC in minutes, -720 to 840 (540 for Japan)"));
        }
        if !(1..=365).contains(&self.every_days) {
            return Err(("every_days", "days between tests, 1 to 365"));
        }
        if !(0.0..=100.0).contains(&self.min_charge_pct) {
            return Err(("min_charge_pct", "a charge in %, 0 to 100"));
        }
        if !(10..=600).contains(&self.max_s) {
            return Err(("max_s", "seconds a test may hold the UPS on battery, 10 to 600"));
        }
        Ok(())
    }

    fn time_of_day(&self) -> Option<NaiveTime> {
        NaiveTime::parse_from_str(&self.at_local, "%H:%M").ok()
    }

    /// Whether a test is due at `now`: within the hour after today's `at_local`, and
    /// `every_days` after the last one (`last`), if any.
    pub fn due(&self, now: DateTime<FixedOffset>, last: Option<DateTime<FixedOffset>>) -> bool {
        let (Some(at), Some(offset)) = (self.time_of_day(), FixedOffset::east_opt(self.utc_offset_min * 60)) else {
            return false;
        };
        if !self.enabled {
            return false;
        }
        let local = now.with_timezone(&offset);
        let Some(slot) = local.date_naive().and_time(at).and_local_timezone(offset).single() else { return false };
        let in_window = local >= slot && local < slot + Duration::hours(1);
        // A day less an hour and a half: a test at 03:59 and one at 03:30 thirty days later. A
        // last test "in the future" was recorded by a clock that was wrong then: it does not
        // hold the next one back until that date.
        let rested = last
            .is_none_or(|l| l > now || now - l >= Duration::days(i64::from(self.every_days)) - Duration::minutes(90));
        in_window && rested
    }
}

/// What the home is like when a test is due.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HomeNow {
    /// On battery.
    pub on_battery: bool,
    /// The battery is low.
    pub battery_low: bool,
    /// The UPS's charge, %, where reported.
    pub charge_pct: Option<f64>,
    /// Anything else is wrong (an alarm, a low SpO2, a lost device, a UPS fault).
    pub trouble: bool,
    /// A test is already running.
    pub testing: bool,
    /// A UPS that can be asked to test is configured.
    pub testable: bool,
}

/// Why a due test is not run, for the `battery_test` event's `reason`.
pub fn blocked(cfg: &SelfTestConfig, home: &HomeNow) -> Option<&'static str> {
    if !home.testable {
        Some("no_testable_ups")
    } else if home.testing {
        Some("already_testing")
    } else if home.on_battery {
        Some("on_battery")
    } else if home.battery_low {
        Some("battery_low")
    } else if home.charge_pct.is_some_and(|c| c < cfg.min_charge_pct) {
        Some("charge_below_minimum")
    } else if home.trouble {
        Some("active_alert")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<FixedOffset> {
        DateTime::parse_from_rfc3339(s).unwrap()
    }

    fn on() -> SelfTestConfig {
        SelfTestConfig { enabled: true, ..Default::default() }
    }

    #[test]
    fn off_unless_the_home_opted_in() {
        assert!(!SelfTestConfig::default().due(at("2026-12-01T03:35:00+09:00"), None));
        assert!(on().due(at("2026-12-01T03:35:00+09:00"), None));
    }

    #[test]
    fn only_within_the_hour_after_the_local_time() {
        let c = on();
        assert!(!c.due(at("2026-12-01T03:29:59+09:00"), None));
        assert!(c.due(at("2026-12-01T03:30:00+09:00"), None));
        assert!(c.due(at("2026-12-01T04:29:59+09:00"), None));
        assert!(!c.due(at("2026-12-01T04:30:00+09:00"), None));
        // The same instant seen from UTC: 18:35 UTC is 03:35 in Japan.
        assert!(c.due(at("2026-11-30T18:35:00+00:00"), None));
    }

    #[test]
    fn not_again_until_every_days_have_passed() {
        let c = on();
        let last = at("2026-12-01T03:59:00+09:00");
        assert!(!c.due(at("2026-12-02T03:30:00+09:00"), Some(last)));
        assert!(!c.due(at("2026-12-30T03:30:00+09:00"), Some(last)));
        assert!(c.due(at("2026-12-31T03:30:00+09:00"), Some(last)));
        // Recorded when the clock was years ahead: not a reason to wait years.
        assert!(c.due(at("2026-12-02T03:30:00+09:00"), Some(at("2031-01-01T03:30:00+09:00"))));
    }

    #[test]
    fn never_on_battery_low_or_in_trouble() {
        let c = on();
        let ok = HomeNow { charge_pct: Some(100.0), testable: true, ..Default::default() };
        assert_eq!(blocked(&c, &ok), None);
        assert_eq!(blocked(&c, &HomeNow { on_battery: true, ..ok }), Some("on_battery"));
        assert_eq!(blocked(&c, &HomeNow { battery_low: true, ..ok }), Some("battery_low"));
        assert_eq!(blocked(&c, &HomeNow { charge_pct: Some(80.0), ..ok }), Some("charge_below_minimum"));
        assert_eq!(blocked(&c, &HomeNow { trouble: true, ..ok }), Some("active_alert"));
        assert_eq!(blocked(&c, &HomeNow { testing: true, ..ok }), Some("already_testing"));
        assert_eq!(blocked(&c, &HomeNow { testable: false, ..ok }), Some("no_testable_ups"));
    }

    #[test]
    fn bad_config_names_its_key() {
        let bad = |c: SelfTestConfig| c.check().unwrap_err().0;
        assert_eq!(bad(SelfTestConfig { at_local: "25:00".into(), ..on() }), "at_local");
        assert_eq!(bad(SelfTestConfig { at_local: "3.30".into(), ..on() }), "at_local");
        assert_eq!(bad(SelfTestConfig { utc_offset_min: 100_000, ..on() }), "utc_offset_min");
        assert_eq!(bad(SelfTestConfig { every_days: 0, ..on() }), "every_days");
        assert_eq!(bad(SelfTestConfig { min_charge_pct: f64::NAN, ..on() }), "min_charge_pct");
        assert_eq!(bad(SelfTestConfig { max_s: 0, ..on() }), "max_s");
        assert!(on().check().is_ok());
    }
}
