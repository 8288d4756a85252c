//! Escalation policies: who hears of an alert, when, and how often.
//!
//! A policy is a list of steps. Entering a step notifies its roles; while nobody has
//! acknowledged, the step repeats every `repeat_every_s` up to `repeats` times, and after
//! `escalate_after_s` the next step begins. A step with `escalate_even_if_acknowledged_after_s`
//! moves on after that time whatever happens (mains still out after the grace period).
//! Acknowledgement stops the repeats; if the alert is still active `reescalate_after_ack_s`
//! after the acknowledgement, the next step begins (on the last step, it repeats) and needs a
//! new acknowledgement. Nothing is sent before `notify_after_s` (a home silent for a moment).
//!
//! Steps carry the tiers of `docs/architecture.md` (T0 family, T1 coordinator and visiting nurse, T2 the
//! facility, T3 everyone and the support centre). For power alerts (`follows_forecast`), a
//! forecast that crosses a tier's threshold jumps to that tier's first step at once.
//!
//! The policy in force is copied into the alert when it opens, so a config change never
//! rewrites an escalation in flight.

use std::collections::BTreeMap;

use mamori_protocol::mqtt::Role;
use serde::{Deserialize, Serialize};

/// An escalation tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
pub enum Tier {
    /// The family at once.
    T0,
    /// Coordinator(s) and the visiting nurse.
    T1,
    /// The facility / powered destination.
    T2,
    /// Everyone again, and the prefectural support centre.
    T3,
}

/// The longest delay a policy may have, s (30 days): longer is a typo, and the engine's time
/// arithmetic stays far from its limits.
pub const MAX_DELAY_S: u64 = 30 * 24 * 3600;

/// A delay from a policy as a duration (saturating at [`MAX_DELAY_S`], so a policy that was
/// never validated cannot overflow anything).
pub fn delay(s: u64) -> chrono::Duration {
    chrono::Duration::seconds(i64::try_from(s.min(MAX_DELAY_S)).unwrap_or(0))
}

/// One step of a policy.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Its tier.
    pub tier: Tier,
    /// Who is notified.
    pub roles: Vec<Role>,
    /// Time between repeats while unacknowledged, s (0: no repeats).
    #[serde(default)]
    pub repeat_every_s: u64,
    /// Repeats while unacknowledged.
    #[serde(default)]
    pub repeats: u32,
    /// Go to the next step when still unacknowledged after this long on this step, s.
    #[serde(default)]
    pub escalate_after_s: Option<u64>,
    /// Go to the next step after this long on this step even when acknowledged, s.
    #[serde(default)]
    pub escalate_even_if_acknowledged_after_s: Option<u64>,
}

/// A policy for one alert kind.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// Wait this long before the first notification, s: an alert cleared sooner pages nobody.
    #[serde(default)]
    pub notify_after_s: u64,
    /// Acknowledged but still active after this long: escalate again, s.
    #[serde(default = "default_reescalate")]
    pub reescalate_after_ack_s: u64,
    /// Whether a forecast crossing a tier's threshold jumps to that tier.
    #[serde(default)]
    pub follows_forecast: bool,
}

fn default_reescalate() -> u64 {
    30 * 60
}

impl Policy {
    /// Check a policy's shape.
    pub fn validate(&self) -> Result<(), String> {
        if self.steps.is_empty() {
            return Err("at least one step".into());
        }
        for (i, s) in self.steps.iter().enumerate() {
            if s.roles.is_empty() {
                return Err(format!("roles in step {i}"));
            }
            if s.repeats > 0 && s.repeat_every_s == 0 {
                return Err(format!("repeat_every_s > 0 in step {i} (it has repeats)"));
            }
            if i > 0 && s.tier < self.steps[i - 1].tier {
                return Err(format!("tiers in increasing order (step {i})"));
            }
        }
        if self.reescalate_after_ack_s == 0 {
            return Err("reescalate_after_ack_s > 0".into());
        }
        if self.steps.len() > 16 {
            return Err("at most 16 steps".into());
        }
        let long = |v: u64| v > MAX_DELAY_S;
        for (i, s) in self.steps.iter().enumerate() {
            let delays = [Some(s.repeat_every_s), s.escalate_after_s, s.escalate_even_if_acknowledged_after_s];
            if delays.into_iter().flatten().any(long) || s.repeats > 1000 {
                return Err(format!(
                    "delays of at most {MAX_DELAY_S} s (30 days) and at most 1000 repeats in step {i}"
                ));
            }
        }
        if long(self.notify_after_s) || long(self.reescalate_after_ack_s) {
            return Err(format!("notify_after_s and reescalate_after_ack_s of at most {MAX_DELAY_S} s (30 days)"));
        }
        Ok(())
    }

    /// The first step at `tier` or above.
    pub fn first_step_at(&self, tier: Tier) -> Option<usize> {
        self.steps.iter().position(|s| s.tier >= tier)
    }
}

fn step(tier: Tier, roles: &[Role], repeat_every_s: u64, repeats: u32, escalate_after_s: Option<u64>) -> Step {
    Step {
        tier,
        roles: roles.to_vec(),
        repeat_every_s,
        repeats,
        escalate_after_s,
        escalate_even_if_acknowledged_after_s: None,
    }
}

use Role::{Coordinator as C, Facility as F, Family as Fam, SupportCentre as S, VisitingNurse as N};

/// The default tiers (`docs/architecture.md`) for a critical alert: family at once, coordinator and
/// nurse if unacknowledged for 10 min, the facility after 30 more, everyone after 30 more.
pub fn critical_default() -> Policy {
    Policy {
        steps: vec![
            step(Tier::T0, &[Fam], 300, 1, Some(600)),
            step(Tier::T1, &[C, N], 600, 2, Some(1800)),
            step(Tier::T2, &[F], 900, 1, Some(1800)),
            step(Tier::T3, &[Fam, C, N, F, S], 900, 8, None),
        ],
        notify_after_s: 0,
        reescalate_after_ack_s: default_reescalate(),
        follows_forecast: false,
    }
}

/// Mains lost: as critical, and the coordinator hears after the 15 min grace period even when
/// the family acknowledged (the outage itself is the reason); tiers follow the forecast.
pub fn mains_lost_default() -> Policy {
    let mut p = critical_default();
    p.steps[0].escalate_even_if_acknowledged_after_s = Some(15 * 60);
    p.follows_forecast = true;
    p
}

/// A warning (a device lost, the spool degraded): the family, then the coordinator after an
/// hour unacknowledged.
pub fn warning_default() -> Policy {
    Policy {
        steps: vec![step(Tier::T0, &[Fam], 1800, 1, Some(3600)), step(Tier::T1, &[C], 3600, 2, None)],
        notify_after_s: 60,
        reescalate_after_ack_s: 4 * 3600,
        follows_forecast: false,
    }
}

/// A home silent while on mains: family after 2 min, the coordinator after 30 min.
pub fn silent_default() -> Policy {
    Policy {
        steps: vec![step(Tier::T0, &[Fam], 1800, 1, Some(1800)), step(Tier::T1, &[C], 3600, 2, None)],
        notify_after_s: 120,
        reescalate_after_ack_s: 2 * 3600,
        follows_forecast: false,
    }
}

/// A home silent while on battery or inside a regional outage: nobody can see it, so the
/// coordinator hears at once and the forecast (from the last known state) drives the tiers.
pub fn state_unknown_default() -> Policy {
    Policy {
        steps: vec![
            step(Tier::T1, &[Fam, C, N], 600, 2, Some(1800)),
            step(Tier::T2, &[F], 900, 1, Some(1800)),
            step(Tier::T3, &[Fam, C, N, F, S], 900, 8, None),
        ],
        notify_after_s: 0,
        reescalate_after_ack_s: default_reescalate(),
        follows_forecast: true,
    }
}

/// Notifications that cannot be delivered: the coordinator and the support centre.
pub fn delivery_failed_default() -> Policy {
    Policy {
        steps: vec![step(Tier::T1, &[C], 1800, 1, Some(1800)), step(Tier::T3, &[S], 3600, 4, None)],
        notify_after_s: 0,
        reescalate_after_ack_s: 2 * 3600,
        follows_forecast: false,
    }
}

/// A home whose clock is wrong: the coordinator, once, if it lasts ten minutes (the gateway
/// already places the home's messages by its own clock; someone should have the installer
/// look at the home unit's time synchronisation).
pub fn clock_skew_default() -> Policy {
    Policy {
        steps: vec![step(Tier::T1, &[C], 0, 0, None)],
        notify_after_s: 600,
        reescalate_after_ack_s: 24 * 3600,
        follows_forecast: false,
    }
}

/// A battery measured to hold less than its care plan: the family and the coordinator, once,
/// and again every week while it lasts (acknowledged or not) — a calm-day task, never a page.
pub fn battery_degraded_default() -> Policy {
    Policy {
        steps: vec![step(Tier::T0, &[Fam, C], 7 * 24 * 3600, 3, None)],
        notify_after_s: 0,
        reescalate_after_ack_s: 7 * 24 * 3600,
        follows_forecast: false,
    }
}

/// A drill: one labelled test message to every contact of the home at once, no repeats, no
/// escalation — how a family learns the chain works before the typhoon.
pub fn drill_default() -> Policy {
    Policy {
        steps: vec![step(Tier::T0, &[Fam, C, N, F, S], 0, 0, None)],
        notify_after_s: 0,
        reescalate_after_ack_s: 24 * 3600,
        follows_forecast: false,
    }
}

/// The built-in policy for an alert kind.
pub fn builtin(kind: &str) -> Policy {
    match kind {
        "mains_lost" => mains_lost_default(),
        "battery_low" => {
            let mut p = critical_default();
            p.follows_forecast = true;
            p
        }
        "home_silent" => silent_default(),
        "state_unknown" => state_unknown_default(),
        "delivery_failed" => delivery_failed_default(),
        "clock_skew" => clock_skew_default(),
        "battery_degraded" | "battery_test_failed" => battery_degraded_default(),
        "drill" => drill_default(),
        "device_lost" | "sensor_off" | "spool_degraded" => warning_default(),
        _ => critical_default(),
    }
}

/// Policies in force: the built-ins, the gateway config's overrides and each home's.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    /// From the gateway config, by kind (`default` applies to every kind without its own).
    pub config: BTreeMap<String, Policy>,
}

/// Kinds about the monitoring itself rather than the child, for people who maintain it: a
/// `default` override (meant for emergencies) does not apply to them, only their own. (A
/// `delivery_failed` under an emergency default would page the family through the very channel
/// that failed.)
pub const OPERATIONAL: &[&str] = &["clock_skew", "delivery_failed", "battery_degraded", "battery_test_failed", "drill"];

impl Policies {
    /// The policy for an alert of `kind` at a home with `home` overrides.
    pub fn for_alert(&self, kind: &str, home: &BTreeMap<String, Policy>) -> Policy {
        let defaults = !OPERATIONAL.contains(&kind);
        home.get(kind)
            .or_else(|| self.config.get(kind))
            .or_else(|| home.get("default").filter(|_| defaults))
            .or_else(|| self.config.get("default").filter(|_| defaults))
            .cloned()
            .unwrap_or_else(|| builtin(kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_valid_and_follow_the_tiers() {
        for kind in [
            "mains_lost",
            "battery_low",
            "home_silent",
            "state_unknown",
            "delivery_failed",
            "device_lost",
            "clock_skew",
            "battery_degraded",
            "battery_test_failed",
            "x",
        ] {
            builtin(kind).validate().unwrap();
        }
        let p = mains_lost_default();
        assert_eq!(p.steps.iter().map(|s| s.tier).collect::<Vec<_>>(), [Tier::T0, Tier::T1, Tier::T2, Tier::T3]);
        assert!(p.steps[3].roles.contains(&Role::SupportCentre));
        assert_eq!(p.first_step_at(Tier::T2), Some(2));
    }

    #[test]
    fn home_overrides_win_over_config_over_builtin() {
        let mut mine = critical_default();
        mine.notify_after_s = 7;
        let mut cfg = critical_default();
        cfg.notify_after_s = 9;
        let policies = Policies { config: [("spo2_low".to_string(), cfg)].into() };
        let home = [("spo2_low".to_string(), mine)].into();
        assert_eq!(policies.for_alert("spo2_low", &home).notify_after_s, 7);
        assert_eq!(policies.for_alert("spo2_low", &BTreeMap::new()).notify_after_s, 9);
        assert_eq!(policies.for_alert("mains_lost", &BTreeMap::new()), mains_lost_default());
        let with_default = Policies { config: [("default".to_string(), critical_default())].into() };
        assert_eq!(with_default.for_alert("spo2_low", &BTreeMap::new()), critical_default());
        assert_eq!(
            with_default.for_alert("clock_skew", &BTreeMap::new()),
            clock_skew_default(),
            "an emergency default does not page families about a clock"
        );
    }

    #[test]
    fn absurd_delays_are_refused() {
        let mut p = critical_default();
        p.steps[0].escalate_after_s = Some(u64::MAX);
        assert!(p.validate().unwrap_err().contains("30 days"));
        let mut p = critical_default();
        p.notify_after_s = 1 << 62;
        assert!(p.validate().is_err());
        assert_eq!(delay(u64::MAX), chrono::Duration::seconds(MAX_DELAY_S as i64));
    }

    #[test]
    fn bad_policies_are_refused() {
        let mut p = critical_default();
        p.steps[1].tier = Tier::T0;
        p.steps[0].tier = Tier::T1;
        assert!(p.validate().is_err());
        assert!(Policy { steps: vec![], ..critical_default() }.validate().is_err());
    }
}
