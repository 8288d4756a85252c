//! The forecast in the engine: tiers on the pessimistic bound, a home silent at its run-out,
//! learning the battery and telling the family on a calm day.

use super::*;
use crate::domain::forecast::Basis;
use crate::domain::homes::BackupKind;
use mamori_protocol::reading::UpsReading;

/// A home that reports its UPS's charge, every minute, on battery.
fn charge_at(minute: i64, charge: f64) -> Telemetry {
    let mut t = telemetry(minute * 60, false);
    t.interval_s = 60;
    t.ups = Some(UpsReading { battery_charge_pct: Some(charge), on_battery: Some(true), ..Default::default() });
    t
}

fn without_internal(mut p: Home) -> Home {
    p.backup.retain(|b| b.kind != BackupKind::VentilatorInternal);
    p
}

fn tight() -> Settings {
    // T2 when P10 < 30 × 2 + 0 min; T3 when P10 < 10 min.
    Settings { t2_margin_min: 0, t3_time_left_min: 10, ..Settings::default() }
}

fn engine_with(settings: Settings, homes: &[Home]) -> Engine {
    let mut e = Engine::new(settings, Policies::default());
    for h in homes {
        e.upsert_home(h.clone());
    }
    e
}

#[test]
fn the_facility_is_paged_when_the_pessimistic_bound_crosses_not_the_middle() {
    // The care plan says 50 h; the battery really loses 1 % a minute (100 min in all).
    let mut e = engine_with(tight(), &[without_internal(plan("a", "431001", 5000.0))]);
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::MainsLost)), t(0)).unwrap();
    for m in 0..=33 {
        e.handle(Input::Telemetry(h("a"), charge_at(m, 100.0 - m as f64)), t(m * 60)).unwrap();
        e.poll(t(m * 60));
    }
    let f = e.home_state(&h("a")).unwrap().forecast.unwrap();
    assert_eq!(f.basis, Basis::ObservedDischarge);
    assert!(alert(&e, "a", "mains_lost").unwrap().tier() < Tier::T2, "67 min left on P50, 60 on P10: not yet");
    sent(&mut e);
    for m in 34..=35 {
        e.handle(Input::Telemetry(h("a"), charge_at(m, 100.0 - m as f64)), t(m * 60)).unwrap();
        e.poll(t(m * 60));
    }
    let now = t(35 * 60);
    let f = e.home_state(&h("a")).unwrap().forecast_at(now).unwrap();
    assert!(f.time_left(now) > Duration::minutes(60), "the middle still says more than 60 min: {f:?}");
    assert!(f.time_left_p10(now) < Duration::minutes(60), "{f:?}");
    assert_eq!(alert(&e, "a", "mains_lost").unwrap().tier(), Tier::T2);
    assert!(names(&sent(&mut e)).contains(&"fac-a"), "the facility is paged on P10");
}

#[test]
fn a_home_silent_when_its_battery_was_due_has_run_out_and_one_silent_earlier_widens() {
    let mut e = engine_with(tight(), &[plan("a", "431001", 5000.0), plan("b", "431001", 5000.0)]);
    for id in ["a", "b"] {
        e.handle(Input::Event(h(id), event(1, 0, EventKind::MainsLost)), t(0)).unwrap();
    }
    // `a` reports until minute 95 (its P10 of the external backup is minute ~99.5); `b`
    // until minute 50.
    for m in 0..=95 {
        e.handle(Input::Telemetry(h("a"), charge_at(m, 100.0 - m as f64)), t(m * 60)).unwrap();
        if m <= 50 {
            e.handle(Input::Telemetry(h("b"), charge_at(m, 100.0 - m as f64)), t(m * 60)).unwrap();
        }
        e.poll(t(m * 60));
    }
    let before = e.home_state(&h("b")).unwrap().forecast.unwrap();
    // Three missed minutes later, both are silent.
    let now = t(99 * 60);
    e.poll(now);
    let a = e.home_state(&h("a")).unwrap();
    assert!(a.alerts.contains_key(&AlertKind::StateUnknown));
    let f = a.forecast_at(now).unwrap();
    assert_eq!(f.external_until, t(95 * 60), "taken as run out when it fell silent");
    assert!(f.on_last_battery(now));
    assert_eq!(
        alert(&e, "a", "mains_lost").unwrap().tier(),
        Tier::T3,
        "the ventilator's own battery is all that is left"
    );
    let b = e.home_state(&h("b")).unwrap();
    assert!(b.ran_out_at.is_none(), "silent 50 minutes before its run-out: not taken as run out");
    let widened = b.forecast_at(now).unwrap();
    assert!(widened.runs_out.p10 < before.runs_out.p10, "the band widens with the silence");
    assert_eq!(widened.runs_out.p50, before.runs_out.p50);
    // `a` heard again on battery: it has power after all.
    e.handle(Input::Telemetry(h("a"), charge_at(100, 3.0)), t(100 * 60)).unwrap();
    assert!(e.home_state(&h("a")).unwrap().ran_out_at.is_none());
}

#[test]
fn an_outage_teaches_the_battery_and_a_weak_one_is_reported_on_a_calm_day() {
    // 800 Wh planned at 100 W (8 h); the battery holds half: 1 % every 2.4 minutes.
    let mut e = engine_with(Settings::default(), &[plan("a", "431001", 800.0)]);
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::MainsLost)), t(0)).unwrap();
    for m in 0..=144 {
        e.handle(Input::Telemetry(h("a"), charge_at(m, (100.0 - m as f64 / 2.4).round())), t(m * 60)).unwrap();
    }
    assert!(e.home_state(&h("a")).unwrap().battery.is_none(), "nothing learned during the outage");
    e.handle(Input::Event(h("a"), event(2, 145 * 60, EventKind::MainsRestored)), t(145 * 60)).unwrap();
    let st = e.home_state(&h("a")).unwrap();
    let l = st.battery.clone().expect("learned at the outage's end");
    assert!((l.health - 0.5).abs() < 0.05, "{l:?}");
    assert!(st.discharge.is_none());
    assert!(st.alerts.contains_key(&AlertKind::BatteryDegraded));
    e.poll(t(145 * 60));
    let s = sent(&mut e);
    let to: Vec<&str> = names(&s).into_iter().filter(|n| !n.starts_with("fac") && !n.starts_with("nurse")).collect();
    assert!(to.contains(&"fam-a") && to.contains(&"coord-431001"), "{s:?}");
    assert!(!names(&s).contains(&"centre"), "a calm-day task pages no one else: {s:?}");
    // The next outage starts from what was learned.
    e.handle(Input::Event(h("a"), event(3, 86_400, EventKind::MainsLost)), t(86_400)).unwrap();
    let f = e.home_state(&h("a")).unwrap().forecast.unwrap();
    assert!(f.verified);
    e.handle(Input::Event(h("a"), event(4, 86_400 + 60, EventKind::MainsRestored)), t(86_400 + 60)).unwrap();
    // A new battery in the care plan: the alert clears itself.
    e.upsert_home(plan("a", "431001", 1200.0));
    e.poll(t(90_000));
    assert!(alert(&e, "a", "battery_degraded").is_none());
}

#[test]
fn what_was_learned_and_the_discharge_so_far_survive_a_restart() {
    let mut e = engine_with(Settings::default(), &[plan("a", "431001", 800.0)]);
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::MainsLost)), t(0)).unwrap();
    for m in 0..=20 {
        e.handle(Input::Telemetry(h("a"), charge_at(m, 100.0 - m as f64)), t(m * 60)).unwrap();
    }
    let st = e.home_state(&h("a")).unwrap().clone();
    let json = serde_json::to_string(&st).unwrap();
    let back: HomeState = serde_json::from_str(&json).unwrap();
    // Its alerts are stored in their own rows, not with the state.
    assert_eq!(back, HomeState { alerts: Default::default(), ..st.clone() });
    assert_eq!(back.discharge.as_ref().unwrap().samples.len(), 21);
    // A state stored by an older version (its forecast in the old shape) still loads.
    let mut old: serde_json::Value = serde_json::from_str(&json).unwrap();
    old["forecast"] = serde_json::json!({"external_until": "2026-01-01T00:00:00Z", "runs_out_at": "2026-01-01T00:00:00Z", "basis": "ups_runtime", "as_of": "2026-01-01T00:00:00Z"});
    for k in ["discharge", "battery", "ran_out_at", "rejected_readings"] {
        old.as_object_mut().unwrap().remove(k);
    }
    // It carried its alerts: they are read.
    old["alerts"] = serde_json::to_value(&st.alerts).unwrap();
    assert!(!st.alerts.is_empty());
    let old: HomeState = serde_json::from_value(old).unwrap();
    assert!(old.forecast.is_none() && old.discharge.is_none());
    assert_eq!(old.alerts, st.alerts);
}

#[test]
fn nonsense_from_a_ups_is_set_aside_counted_and_the_next_basis_used() {
    let mut e = engine_with(Settings::default(), &[plan("a", "431001", 800.0)]);
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::MainsLost)), t(0)).unwrap();
    let mut t1 = charge_at(1, 300.0);
    t1.ups.as_mut().unwrap().runtime_s = Some(65_535);
    e.handle(Input::Telemetry(h("a"), t1), t(60)).unwrap();
    let mut t2 = charge_at(2, 90.0);
    t2.ups.as_mut().unwrap().battery_voltage_v = Some(f64::MAX);
    t2.ups.as_mut().unwrap().load_pct = Some(-3.0);
    e.handle(Input::Telemetry(h("a"), t2), t(120)).unwrap();
    let st = e.home_state(&h("a")).unwrap();
    for reason in ["charge_out_of_range", "runtime_sentinel", "voltage_out_of_range", "load_out_of_range"] {
        assert_eq!(st.rejected_readings.get(reason), Some(&1), "{reason}: {:?}", st.rejected_readings);
    }
    assert_eq!(st.forecast.unwrap().basis, Basis::ChargeAndLoad, "the sound charge reading is used");
}

#[test]
fn a_failed_battery_self_test_tells_the_family_and_the_coordinator_and_a_passed_one_clears_it() {
    let mut e = engine_with(Settings::default(), &[plan("a", "431001", 800.0)]);
    let test = |seq: u64, at: i64, result: &str| {
        let mut ev = event(seq, at, EventKind::BatteryTest);
        ev.source = Some("ups".into());
        ev.data.insert("result".into(), result.into());
        ev
    };
    // Skipped or not started says nothing of the battery.
    e.handle(Input::Event(h("a"), test(1, 0, "skipped")), t(0)).unwrap();
    e.handle(Input::Event(h("a"), test(2, 60, "not_started")), t(60)).unwrap();
    e.poll(t(60));
    assert!(sent(&mut e).is_empty());
    assert!(alert(&e, "a", "battery_test_failed").is_none());
    e.handle(Input::Event(h("a"), test(3, 120, "failed")), t(120)).unwrap();
    assert!(alert(&e, "a", "battery_test_failed").is_some());
    e.poll(t(120));
    let s = sent(&mut e);
    let to = names(&s);
    assert!(to.contains(&"fam-a") && to.contains(&"coord-431001"), "{s:?}");
    assert!(!to.iter().any(|n| n.starts_with("fac") || *n == "centre"), "a calm-day task pages no one else: {s:?}");
    // The power state is untouched: a test is not an outage.
    assert!(e.home_state(&h("a")).unwrap().forecast.is_none());
    e.handle(Input::Event(h("a"), test(4, 30 * 86_400, "passed")), t(30 * 86_400)).unwrap();
    assert!(alert(&e, "a", "battery_test_failed").is_none());
}

#[test]
fn a_home_that_reports_no_level_learns_its_battery_from_when_it_fell_silent_on_battery() {
    // 800 Wh planned at 100 W (8 h), each home reporting only that the mains are off. `ups`
    // (a lead-acid UPS) and `station` fall silent after 2 h on battery and come back, when the
    // mains do at 5 h, as a new boot of their unit: their backup ran out and took the unit with
    // it. `cut` falls silent at 2 h too but comes back as the same boot (its network died; the
    // unit ran on). `heard` reports to the end. Only the first two learn anything.
    let mut ups = plan("ups", "431001", 800.0);
    ups.backup[0].kind = BackupKind::Ups;
    let homes = [ups, plan("station", "431001", 800.0), plan("cut", "431001", 800.0), plan("heard", "431001", 800.0)];
    let mut e = engine_with(Settings::default(), &homes);
    let ids = ["ups", "station", "cut", "heard"];
    for id in ids {
        e.handle(Input::Event(h(id), event(1, 0, EventKind::MainsLost)), t(0)).unwrap();
    }
    let clock = |boot: &str, uptime_s: i64| mamori_protocol::mqtt::ClockInfo {
        boot: boot.into(),
        uptime_ms: u64::try_from(uptime_s * 1000).unwrap(),
        synced: Some(true),
    };
    let off = |m: i64| {
        let mut x = telemetry(m * 60, false);
        x.interval_s = 60;
        x.clock = Some(clock("boot-1", 3600 + m * 60));
        x
    };
    for m in 0..=300 {
        for id in ids {
            if m <= 120 || id == "heard" {
                e.handle(Input::Telemetry(h(id), off(m)), t(m * 60)).unwrap();
            }
        }
        e.poll(t(m * 60));
    }
    for (id, boot) in [("ups", "boot-2"), ("station", "boot-2"), ("cut", "boot-1"), ("heard", "boot-1")] {
        let mut back = event(2, 301 * 60, EventKind::MainsRestored);
        back.clock = Some(clock(boot, if boot == "boot-1" { 3600 + 301 * 60 } else { 30 }));
        e.handle(Input::Event(h(id), back), t(301 * 60)).unwrap();
    }
    e.poll(t(301 * 60));
    for id in ["ups", "station"] {
        let st = e.home_state(&h(id)).unwrap();
        let l = st.battery.clone().unwrap_or_else(|| panic!("{id}: learned from the silence"));
        assert!((l.health - 0.25).abs() < 0.01, "{id}: 2 h of a planned 8 h: {l:?}");
        assert!(l.by_silence);
        assert!(
            !st.alerts.contains_key(&AlertKind::BatteryDegraded),
            "{id}: a silence alone does not tell the family their battery is weak"
        );
    }
    assert!(e.home_state(&h("cut")).unwrap().battery.is_none(), "the same boot: its network died, not its battery");
    assert!(e.home_state(&h("heard")).unwrap().battery.is_none(), "heard to the end: nothing measured");
    // The next outage expects 2 h, not the care plan's 8 h less a guess.
    e.handle(Input::Event(h("ups"), event(3, 86_400, EventKind::MainsLost)), t(86_400)).unwrap();
    e.handle(Input::Telemetry(h("ups"), off(1440)), t(86_400)).unwrap();
    let f = e.home_state(&h("ups")).unwrap().forecast.unwrap();
    assert!(f.verified);
    assert_eq!(f.basis, Basis::DeadReckoning);
    let p50_min = (f.external.p50 - t(86_400)).num_minutes();
    assert!((115..=125).contains(&p50_min), "{p50_min} min");
}
