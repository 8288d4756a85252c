use super::*;
use mamori_protocol::bridge::{flags, FrameKind, PowerSample};

fn at(ms: u64) -> Now {
    let base = chrono::DateTime::parse_from_rfc3339("2026-11-22T03:00:00+09:00").unwrap();
    Now { mono_ms: ms, wall: base + chrono::Duration::milliseconds(ms as i64) }
}

fn spec(id: &str, kind: DeviceKind, lost_after_ms: u64) -> SourceSpec {
    SourceSpec { id: id.into(), kind, lost_after_ms, glitch_below_v: (kind == DeviceKind::Ups).then_some(80.0) }
}

/// All three sources (for the staleness tests).
fn monitor() -> Monitor {
    Monitor::new(
        vec![
            spec("ups", DeviceKind::Ups, 750),
            spec("oximeter", DeviceKind::Oximeter, 5000),
            spec("vent", DeviceKind::Contacts, 1000),
        ],
        Thresholds::default(),
        &at(0),
    )
}

/// Only the source a test drives (others would rightly be reported lost).
fn only(id: &str) -> Monitor {
    let kind = match id {
        "ups" => DeviceKind::Ups,
        "oximeter" => DeviceKind::Oximeter,
        _ => DeviceKind::Contacts,
    };
    Monitor::new(vec![spec(id, kind, 1_000_000)], Thresholds::default(), &at(0))
}

fn kinds(evs: &[NewEvent]) -> Vec<EventKind> {
    evs.iter().map(|e| e.kind).collect()
}

fn ups(on_battery: bool, fault_v: f64) -> Observation {
    Observation::Ups(UpsReading {
        on_battery: Some(on_battery),
        battery_low: Some(false),
        ups_fault: Some(false),
        input_voltage_v: Some(if on_battery { 0.0 } else { 100.0 }),
        input_fault_voltage_v: Some(fault_v),
        ..Default::default()
    })
}

/// A UPS reading during a battery test: on battery, its "testing" bit as given.
fn testing(on_battery: bool, bit: Option<bool>, low: bool) -> Observation {
    Observation::Ups(UpsReading {
        on_battery: Some(on_battery),
        self_test: bit,
        battery_low: Some(low),
        ups_fault: Some(false),
        battery_voltage_v: Some(if on_battery { 24.1 } else { 27.2 }),
        input_fault_voltage_v: Some(100.0),
        ..Default::default()
    })
}

fn test_result(evs: &[NewEvent]) -> Option<TestResult> {
    evs.iter().find(|e| e.kind == EventKind::BatteryTest).and_then(|e| BatteryTest::of(&e.data).result)
}

#[test]
fn a_self_test_the_agent_started_is_not_an_outage_and_reports_its_result() {
    let mut m = only("ups");
    assert!(m.observe("ups", testing(false, Some(false), false), &at(0)).is_empty());
    m.self_test_started("ups", &at(1000), 60_000);
    assert!(m.self_testing());
    let during = m.observe("ups", testing(true, Some(true), false), &at(2000));
    assert!(during.is_empty(), "{:?}", kinds(&during));
    assert!(!m.local_state().0, "the local alarm does not sound for the test");
    let after = m.observe("ups", testing(false, Some(false), false), &at(12_000));
    assert_eq!(kinds(&after), [EventKind::BatteryTest]);
    assert_eq!(test_result(&after), Some(TestResult::Passed));
    assert_eq!(after[0].data.get("voltage_min_v").and_then(|v| v.as_f64()), Some(24.1));
    assert!(!m.self_testing());
    // Without a test running, the same switch to battery is an outage.
    assert_eq!(kinds(&m.observe("ups", testing(true, Some(false), false), &at(20_000))), [EventKind::MainsLost]);
}

#[test]
fn a_battery_that_goes_low_in_its_test_fails_it() {
    let mut m = only("ups");
    m.observe("ups", testing(false, Some(false), false), &at(0));
    m.self_test_started("ups", &at(0), 60_000);
    let low = m.observe("ups", testing(true, Some(true), true), &at(3000));
    assert_eq!(kinds(&low), [EventKind::BatteryLow], "a battery low in the test is news in itself");
    let after = m.observe("ups", testing(false, Some(false), false), &at(5000));
    assert_eq!(test_result(&after), Some(TestResult::Failed));
}

#[test]
fn a_ups_that_never_switches_did_not_start_the_test() {
    let mut m = only("ups");
    m.observe("ups", testing(false, None, false), &at(0));
    m.self_test_started("ups", &at(0), 60_000);
    assert_eq!(m.next_deadline_ms(), Some(60_000));
    assert!(m.observe("ups", testing(false, None, false), &at(30_000)).is_empty());
    let end = m.tick(&at(60_000));
    assert_eq!(test_result(&end), Some(TestResult::NotStarted));
    assert!(!kinds(&end).contains(&EventKind::MainsLost));
}

#[test]
fn a_refused_test_ends_at_once_with_the_reason() {
    let mut m = only("ups");
    m.observe("ups", testing(false, None, false), &at(0));
    m.self_test_started("ups", &at(0), 60_000);
    let e = m.observe("ups", Observation::SelfTestRefused("upsd refused INSTCMD: ERR ACCESS-DENIED".into()), &at(50));
    assert_eq!(test_result(&e), Some(TestResult::NotStarted));
    assert_eq!(e[0].data.get("reason").and_then(|r| r.as_str()), Some("upsd refused INSTCMD: ERR ACCESS-DENIED"));
    assert!(!m.self_testing());
    // A refusal with no test running is nothing.
    assert!(m.observe("ups", Observation::SelfTestRefused("late".into()), &at(60)).is_empty());
}

#[test]
fn mains_that_fail_during_a_test_are_reported_when_the_test_ends() {
    // A UPS with the testing bit: the bit clears and it stays on battery.
    let mut m = only("ups");
    m.observe("ups", testing(false, Some(false), false), &at(0));
    m.self_test_started("ups", &at(0), 60_000);
    assert!(m.observe("ups", testing(true, Some(true), false), &at(2000)).is_empty());
    let e = m.observe("ups", testing(true, Some(false), false), &at(11_000));
    assert_eq!(kinds(&e), [EventKind::MainsLost, EventKind::BatteryTest]);
    assert_eq!(test_result(&e), Some(TestResult::EndedOnBattery));
    // A UPS without the bit (APC): on battery past the test's longest, at that deadline.
    let mut m = only("ups");
    m.observe("ups", testing(false, None, false), &at(0));
    m.self_test_started("ups", &at(0), 60_000);
    assert!(m.observe("ups", testing(true, None, false), &at(2000)).is_empty());
    assert!(m.observe("ups", testing(true, None, false), &at(40_000)).is_empty());
    let e = m.tick(&at(60_000));
    assert_eq!(kinds(&e), [EventKind::BatteryTest, EventKind::MainsLost]);
    assert_eq!(test_result(&e), Some(TestResult::EndedOnBattery));
}

#[test]
fn the_ups_own_test_is_not_an_outage_but_a_bit_stuck_on_battery_is() {
    let mut m = only("ups");
    m.observe("ups", testing(false, Some(false), false), &at(0));
    // Its own fortnightly test: no event at all.
    assert!(m.observe("ups", testing(true, Some(true), false), &at(1000)).is_empty());
    assert!(m.observe("ups", testing(false, Some(false), false), &at(11_000)).is_empty());
    // A bit that stays set while on battery explains it for a minute, no longer.
    assert!(m.observe("ups", testing(true, Some(true), false), &at(20_000)).is_empty());
    assert!(m.observe("ups", testing(true, Some(true), false), &at(20_000 + TEST_BIT_MAX_MS - 1)).is_empty());
    assert_eq!(
        kinds(&m.observe("ups", testing(true, Some(true), false), &at(20_000 + TEST_BIT_MAX_MS))),
        [EventKind::MainsLost]
    );
}

fn oxi(spo2: Option<u8>, pulse: Option<u16>) -> Observation {
    Observation::Oximeter(OximeterReading {
        spo2_pct: spo2,
        pulse_bpm: pulse,
        sensor_off: Some(false),
        alarm_active: Some(false),
        alarm_silenced: Some(false),
        ..Default::default()
    })
}

#[test]
fn mains_lost_and_restored_once_each() {
    let mut m = only("ups");
    assert!(m.observe("ups", ups(false, 100.0), &at(0)).is_empty(), "starting on mains is not news");
    let e = m.observe("ups", ups(true, 0.0), &at(250));
    assert_eq!(kinds(&e), [EventKind::MainsLost]);
    assert_eq!(e[0].ts, at(250).wall);
    assert_eq!(e[0].data["input_voltage_v"], 0.0);
    assert!(m.observe("ups", ups(true, 0.0), &at(500)).is_empty());
    // The first reply after the outage still shows its fault voltage: not a glitch.
    assert_eq!(kinds(&m.observe("ups", ups(false, 0.0), &at(750))), [EventKind::MainsRestored]);
    assert!(m.observe("ups", ups(false, 100.0), &at(1000)).is_empty());
}

#[test]
fn starting_during_an_outage_reports_it() {
    let mut m = only("ups");
    assert_eq!(kinds(&m.observe("ups", ups(true, 0.0), &at(0))), [EventKind::MainsLost]);
}

#[test]
fn an_outage_shorter_than_a_poll_is_caught_by_the_fault_voltage() {
    let mut m = only("ups");
    m.observe("ups", ups(false, 100.0), &at(0));
    let e = m.observe("ups", ups(false, 12.0), &at(250));
    assert_eq!(kinds(&e), [EventKind::MainsLost, EventKind::MainsRestored]);
    assert_eq!(e[0].data["glitch"], true);
    assert!(!m.local_state().0, "and mains is present afterwards");
}

#[test]
fn staleness_and_restore() {
    let mut m = monitor();
    m.observe("ups", ups(false, 100.0), &at(0));
    m.observe(
        "vent",
        Observation::Contacts { mains_present: None, ventilator: Some(ContactState::Normal), alarm_latched: false },
        &at(0),
    );
    m.observe("oximeter", oxi(Some(97), Some(80)), &at(0));
    assert!(m.tick(&at(700)).is_empty());
    assert_eq!(m.next_deadline_ms(), Some(750));
    let e = m.tick(&at(750));
    assert_eq!(kinds(&e), [EventKind::DeviceLost]);
    assert_eq!(e[0].source.as_deref(), Some("ups"));
    assert!(m.tick(&at(800)).is_empty(), "lost once");
    m.observe("ups", Observation::Failed("port /dev/ttyUSB0 missing".into()), &at(900));
    m.observe("ups", Observation::Garbage, &at(950));
    assert_eq!(m.garbage("ups"), 1);
    let e = m.observe("ups", ups(false, 100.0), &at(1200));
    assert_eq!(kinds(&e)[0], EventKind::DeviceRestored);
    let snap = m.snapshot(&at(1200), 10, None);
    assert!(snap.devices.iter().any(|d| d.id == "vent" && d.state == DeviceState::Lost));
    assert!(snap.devices.iter().any(|d| d.id == "ups" && d.state == DeviceState::Ok));
}

#[test]
fn a_device_that_never_answers_is_lost() {
    let mut m = monitor();
    let e = m.tick(&at(5000));
    assert!(e.iter().all(|e| e.kind == EventKind::DeviceLost));
    assert_eq!(e.len(), 3);
    assert_eq!(e[0].data["never_answered"], true);
}

#[test]
fn spo2_low_after_the_delay_and_ok_after_hysteresis() {
    let mut m = only("oximeter");
    let mut evs = Vec::new();
    for s in 0..=10u64 {
        evs.extend(m.observe("oximeter", oxi(Some(87), Some(120)), &at(s * 1000)));
    }
    assert_eq!(kinds(&evs), [EventKind::Spo2Low], "at 10 s, not before");
    assert!(
        m.observe("oximeter", oxi(Some(91), Some(120)), &at(11_000)).is_empty(),
        "91 is inside the hysteresis band"
    );
    assert_eq!(kinds(&m.observe("oximeter", oxi(Some(92), Some(120)), &at(12_000))), [EventKind::Spo2Ok]);
}

#[test]
fn a_value_flickering_around_the_limit_makes_no_storm() {
    let mut m = only("oximeter");
    let mut evs = Vec::new();
    for s in 0..120u64 {
        let v = if s % 2 == 0 { 89 } else { 90 };
        evs.extend(m.observe("oximeter", oxi(Some(v), Some(80)), &at(s * 1000)));
    }
    assert!(evs.is_empty(), "{evs:?}");
    // And a missing value stops the delay rather than counting towards it.
    for s in 0..30u64 {
        let v = if s % 3 == 0 { None } else { Some(85) };
        evs.extend(m.observe("oximeter", oxi(v, Some(80)), &at(200_000 + s * 1000)));
    }
    assert!(evs.is_empty(), "{evs:?}");
}

#[test]
fn pulse_out_of_range_both_ways() {
    let mut m = only("oximeter");
    let mut evs = Vec::new();
    for s in 0..=10u64 {
        evs.extend(m.observe("oximeter", oxi(Some(97), Some(190)), &at(s * 1000)));
    }
    assert_eq!(kinds(&evs), [EventKind::PulseOutOfRange]);
    assert!(m.observe("oximeter", oxi(Some(97), Some(178)), &at(11_000)).is_empty());
    assert_eq!(kinds(&m.observe("oximeter", oxi(Some(97), Some(170)), &at(12_000))), [EventKind::PulseOk]);
}

#[test]
fn bedside_alarm_then_silenced_then_cleared() {
    let mut m = only("oximeter");
    let r = |active, silenced| {
        Observation::Oximeter(OximeterReading {
            spo2_pct: Some(86),
            alarm_active: Some(active),
            alarm_silenced: Some(silenced),
            ..Default::default()
        })
    };
    assert_eq!(kinds(&m.observe("oximeter", r(true, false), &at(0))), [EventKind::OximeterAlarm]);
    let e = m.observe("oximeter", r(false, true), &at(1000));
    assert_eq!(kinds(&e), [EventKind::OximeterAlarmSilenced]);
    assert_eq!(e[0].data["spo2_pct"], 86);
    assert_eq!(kinds(&m.observe("oximeter", r(false, false), &at(2000))), [EventKind::OximeterAlarmCleared]);
}

#[test]
fn sensor_off_must_hold() {
    let mut m = only("oximeter");
    let r = |off| Observation::Oximeter(OximeterReading { sensor_off: Some(off), ..Default::default() });
    let mut evs = Vec::new();
    for s in 0..10u64 {
        evs.extend(m.observe("oximeter", r(s % 2 == 1), &at(s * 1000)));
    }
    assert!(evs.is_empty(), "a probe slipping on and off is not an event: {evs:?}");
    for s in 10..15u64 {
        evs.extend(m.observe("oximeter", r(true), &at(s * 1000)));
    }
    assert_eq!(kinds(&evs), [EventKind::SensorOff]);
    for s in 15..20u64 {
        evs.extend(m.observe("oximeter", r(false), &at(s * 1000)));
    }
    assert_eq!(kinds(&evs), [EventKind::SensorOff, EventKind::SensorOn]);
}

#[test]
fn ventilator_contacts_and_latched_alarms() {
    let mut m = only("vent");
    let c =
        |v, latched| Observation::Contacts { mains_present: Some(true), ventilator: Some(v), alarm_latched: latched };
    assert!(m.observe("vent", c(ContactState::Normal, false), &at(0)).is_empty());
    assert_eq!(kinds(&m.observe("vent", c(ContactState::Alarm, true), &at(100))), [EventKind::VentilatorAlarm]);
    assert_eq!(
        kinds(&m.observe("vent", c(ContactState::Normal, false), &at(200))),
        [EventKind::VentilatorAlarmCleared]
    );
    let e = m.observe("vent", c(ContactState::Normal, true), &at(300));
    assert_eq!(kinds(&e), [EventKind::VentilatorAlarm, EventKind::VentilatorAlarmCleared]);
    assert_eq!(e[0].data["latched"], true);
    assert_eq!(kinds(&m.observe("vent", c(ContactState::CableFault, false), &at(400))), [EventKind::AlarmCableFault]);
    assert_eq!(kinds(&m.observe("vent", c(ContactState::Normal, false), &at(500))), [EventKind::AlarmCableOk]);
    // The contacts' mains input counts for mains.
    let e = m.observe(
        "vent",
        Observation::Contacts {
            mains_present: Some(false),
            ventilator: Some(ContactState::Normal),
            alarm_latched: false,
        },
        &at(600),
    );
    assert_eq!(kinds(&e), [EventKind::MainsLost]);
}

#[test]
fn bridge_frames() {
    let mut m = Monitor::new(vec![spec("bridge", DeviceKind::Bridge, 3000)], Thresholds::default(), &at(0));
    let f = |mains, flags_, vent| Frame {
        seq: 1,
        uptime_ms: 1,
        kind: FrameKind::Sample,
        power: Some(PowerSample { bus_mv: 12_400, shunt_uv: 100, current_ma: Some(2_000), power_mw: Some(24_800) }),
        mains_present: Some(mains),
        ventilator: Some(vent),
        flags: flags_,
    };
    assert!(m.observe("bridge", Observation::Bridge(f(true, 0, ContactState::Normal)), &at(0)).is_empty());
    assert_eq!(
        kinds(&m.observe("bridge", Observation::Bridge(f(false, 0, ContactState::Normal)), &at(1000))),
        [EventKind::MainsLost]
    );
    assert_eq!(
        kinds(&m.observe("bridge", Observation::Bridge(f(false, flags::LOW_BATTERY, ContactState::Normal)), &at(2000))),
        [EventKind::BatteryLow]
    );
    let e = m.observe(
        "bridge",
        Observation::Bridge(f(false, flags::LOW_BATTERY | flags::ALARM_LATCHED, ContactState::Normal)),
        &at(3000),
    );
    assert_eq!(kinds(&e), [EventKind::VentilatorAlarm, EventKind::VentilatorAlarmCleared]);
    let snap = m.snapshot(&at(3000), 10, None);
    assert_eq!(snap.power_meter.unwrap().battery_voltage_v, Some(12.4));
    assert_eq!(snap.mains_present, Some(false));
}

#[test]
fn ups_battery_low_and_fault() {
    let mut m = only("ups");
    let r = |low, fault| {
        Observation::Ups(UpsReading {
            on_battery: Some(true),
            battery_low: Some(low),
            ups_fault: Some(fault),
            ..Default::default()
        })
    };
    assert_eq!(kinds(&m.observe("ups", r(false, false), &at(0))), [EventKind::MainsLost]);
    assert_eq!(kinds(&m.observe("ups", r(true, false), &at(250))), [EventKind::BatteryLow]);
    assert_eq!(kinds(&m.observe("ups", r(true, true), &at(500))), [EventKind::UpsFault]);
    assert_eq!(kinds(&m.observe("ups", r(false, false), &at(750))), [EventKind::BatteryOk, EventKind::UpsFaultCleared]);
}

#[test]
fn unknown_sources_are_ignored() {
    let mut m = monitor();
    assert!(m.observe("nope", ups(true, 0.0), &at(0)).is_empty());
}
