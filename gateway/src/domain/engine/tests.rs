//! The engine's rules with explicit time: no sockets, no sleeps.
//!
//! Over 800 lines for a reason: one test per rule of the engine, each a short story in time
//! over the same few homes and helpers; split by rule they would repeat the helpers.

use super::*;
use crate::domain::homes::{Backup, BackupKind, ChannelRef, Device, Evacuation, Lang};
use chrono::DateTime;
use mamori_protocol::mqtt::Timestamp;

fn t(s: i64) -> Time {
    DateTime::from_timestamp(1_790_000_000 + s, 0).unwrap()
}

fn ts(s: i64) -> Timestamp {
    t(s).fixed_offset()
}

fn contact(role: Role, name: &str) -> Contact {
    Contact {
        role,
        name: name.into(),
        language: Lang::Ja,
        channels: vec![ChannelRef::Console(name.into())],
        quiet_hours: None,
        phone: None,
        consent: None,
        then: vec![],
    }
}

fn plan(id: &str, muni: &str, usable_wh: f64) -> Home {
    Home {
        id: HomeId::new(id).unwrap(),
        municipality: muni.into(),
        municipality_name: None,
        label: format!("L-{id}"),
        devices: vec![
            Device { name: "ventilator".into(), watts: 25.0 },
            Device { name: "humidifier".into(), watts: 75.0 },
        ],
        backup: vec![
            Backup {
                kind: BackupKind::PowerStation,
                usable_wh: Some(usable_wh),
                nameplate_wh: None,
                runtime_min: None,
                chemistry: None,
            },
            Backup {
                kind: BackupKind::VentilatorInternal,
                usable_wh: None,
                nameplate_wh: None,
                runtime_min: Some(60.0),
                chemistry: None,
            },
        ],
        evacuation: Some(Evacuation { destination: "病院".into(), travel_min: 30 }),
        contacts: vec![
            contact(Role::Family, &format!("fam-{id}")),
            contact(Role::Coordinator, &format!("coord-{muni}")),
            contact(Role::VisitingNurse, &format!("nurse-{id}")),
            contact(Role::Facility, &format!("fac-{id}")),
            contact(Role::SupportCentre, "centre"),
        ],
        escalation: Default::default(),
    }
}

fn engine(homes: &[Home]) -> Engine {
    // Homes in these tests are heard once; staleness has its own tests with telemetry.
    let settings = Settings { default_interval_s: 86_400, ..Settings::default() };
    let mut e = Engine::new(settings, Policies::default());
    for h in homes {
        e.upsert_home(h.clone());
    }
    e
}

fn h(id: &str) -> HomeId {
    HomeId::new(id).unwrap()
}

fn event(seq: u64, at: i64, kind: EventKind) -> Event {
    Event {
        id: format!("e-{seq}"),
        seq,
        ts: ts(at),
        kind,
        severity: kind.default_severity(),
        source: None,
        data: Default::default(),
        clock: None,
    }
}

fn telemetry(at: i64, mains: bool) -> Telemetry {
    Telemetry {
        ts: ts(at),
        interval_s: 10,
        mains_present: Some(mains),
        ups: None,
        power_meter: None,
        oximeter: None,
        ventilator: None,
        devices: vec![],
        spool: None,
        conditions: Default::default(),
        clock: None,
        kept: Default::default(),
    }
}

/// (recipient name, key) of every notification in the outputs.
fn sent(e: &mut Engine) -> Vec<(String, String)> {
    e.take_outputs()
        .into_iter()
        .filter_map(|o| match o {
            Output::Notify(n) => Some(n),
            _ => None,
        })
        .flat_map(|n| n.recipients.into_iter().map(move |(_, c)| (c.name, n.key.clone())))
        .collect()
}

fn names(v: &[(String, String)]) -> Vec<&str> {
    let mut n: Vec<&str> = v.iter().map(|(n, _)| n.as_str()).collect();
    n.sort();
    n
}

fn alert<'a>(e: &'a Engine, home: &str, kind: &str) -> Option<&'a Alert> {
    let kind: AlertKind = kind.parse().expect("an alert kind");
    e.home_state(&h(home)).and_then(|s| s.alerts.get(&kind))
}

#[test]
fn a_copy_of_the_engine_is_not_changed_by_what_the_engine_does_after() {
    // The web's snapshots share each home's state with the engine until it changes.
    let mut e = engine(&[plan("a", "431001", 5000.0), plan("b", "431001", 5000.0)]);
    let before = e.clone();
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::MainsLost)), t(1)).unwrap();
    e.poll(t(1));
    e.upsert_home(plan("c", "431001", 10.0));
    assert!(alert(&e, "a", "mains_lost").is_some());
    assert!(alert(&before, "a", "mains_lost").is_none(), "the copy saw the outage");
    assert_eq!(before.home_count(), 2, "the copy saw the new plan");
    assert_eq!(before.home_state(&h("b")), e.home_state(&h("b")), "an unchanged home is the same in both");
}

#[test]
fn mains_lost_pages_the_family_then_the_coordinator_after_the_grace_period_even_if_acknowledged() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::MainsLost)), t(1)).unwrap();
    assert!(sent(&mut e).is_empty(), "handle never sends: poll does");
    e.poll(t(1));
    assert_eq!(names(&sent(&mut e)), ["fam-a"]);
    let id = alert(&e, "a", "mains_lost").unwrap().id.clone();
    e.handle(Input::Ack { alert_id: id.clone(), role: Role::Family, by: "link".into(), note: None }, t(60)).unwrap();
    let outs = e.take_outputs();
    assert!(outs.iter().any(|o| matches!(o, Output::AgentAck(home, ack) if home == &h("a") && ack.alert_id == id)));
    // Acknowledged: no repeat at 5 min.
    e.poll(t(400));
    assert!(sent(&mut e).is_empty());
    // The grace period (15 min) moves it to T1 regardless.
    assert!(e.next_deadline(t(400)).unwrap() <= t(901));
    e.poll(t(1 + 900));
    assert_eq!(names(&sent(&mut e)), ["coord-431001", "nurse-a"]);
    assert_eq!(alert(&e, "a", "mains_lost").unwrap().tier(), Tier::T1);
    assert!(alert(&e, "a", "mains_lost").unwrap().acknowledged.is_none(), "a new step needs a new acknowledgement");
}

/// A home on battery whose `mains_lost` event never arrived (a clustered broker acknowledged
/// it to the agent and never delivered it): its own snapshot, whose conditions say the mains
/// are lost, pages the family. The event arriving late pages nobody twice; a snapshot older
/// than what the home has said since, a snapshot kept during a broker outage, and a bare mains
/// flag from an agent that sends no conditions raise nothing.
#[test]
fn an_outage_whose_event_never_came_is_raised_from_the_homes_own_snapshot_once() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    let lost = |at: i64| {
        let mut snap = telemetry(at, false);
        snap.conditions.insert(EventKind::MainsLost, true);
        snap
    };
    e.handle(Input::Telemetry(h("a"), lost(0)), t(1)).unwrap();
    e.poll(t(1));
    assert_eq!(names(&sent(&mut e)), ["fam-a"]);
    assert_eq!(alert(&e, "a", "mains_lost").unwrap().since, t(0));
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::MainsLost)), t(2)).unwrap();
    e.handle(Input::Telemetry(h("a"), lost(10)), t(11)).unwrap();
    e.poll(t(12));
    assert!(sent(&mut e).is_empty(), "paged twice");
    // Restored at 20; a snapshot taken at 15, arriving after, is history.
    e.handle(Input::Event(h("a"), event(2, 20, EventKind::MainsRestored)), t(21)).unwrap();
    assert!(alert(&e, "a", "mains_lost").is_none());
    assert!(sent(&mut e).iter().all(|(_, key)| key.ends_with(":clear")), "the family is told it is over");
    e.handle(Input::Telemetry(h("a"), lost(15)), t(22)).unwrap();
    assert!(alert(&e, "a", "mains_lost").is_none(), "raised from a snapshot older than the restore");
    // Kept during a broker outage: history, not the present.
    let mut kept = lost(30);
    kept.kept = true;
    e.handle(Input::Telemetry(h("a"), kept), t(31)).unwrap();
    assert!(alert(&e, "a", "mains_lost").is_none(), "raised from a kept snapshot");
    // An agent that sends no conditions: its mains flag is also down in a battery self-test.
    e.handle(Input::Telemetry(h("a"), telemetry(40, false)), t(41)).unwrap();
    assert!(alert(&e, "a", "mains_lost").is_none(), "raised from a bare mains flag");
    // A new outage whose event is lost again: raised again.
    e.handle(Input::Telemetry(h("a"), lost(50)), t(51)).unwrap();
    e.poll(t(51));
    assert_eq!(names(&sent(&mut e)), ["fam-a"]);
}

/// Not only an outage: any condition whose event was lost (here the ventilator's alarm and a
/// lost oximeter) is raised from the home's snapshot, once. A person's clear holds while the
/// snapshots still say the condition holds, until the home says it is over; a new one after
/// that is raised again.
#[test]
fn a_ventilator_alarm_or_a_lost_device_whose_event_never_came_is_raised_from_the_snapshot() {
    use mamori_protocol::mqtt::{DeviceKind, DeviceStatus};
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    let snap = |at: i64, alarm: bool, lost: bool| {
        let mut s = telemetry(at, true);
        s.conditions.insert(EventKind::MainsLost, false);
        s.conditions.insert(EventKind::VentilatorAlarm, alarm);
        s.conditions.insert(EventKind::DeviceLost, lost);
        let state = if lost { DeviceState::Lost } else { DeviceState::Ok };
        s.devices = vec![DeviceStatus { id: "ox".into(), kind: DeviceKind::Oximeter, state }];
        s
    };
    e.handle(Input::Telemetry(h("a"), snap(0, false, false)), t(0)).unwrap();
    e.poll(t(0));
    assert!(sent(&mut e).is_empty());
    e.handle(Input::Telemetry(h("a"), snap(10, true, true)), t(10)).unwrap();
    e.poll(t(10));
    assert!(!sent(&mut e).is_empty(), "nobody paged");
    let alarm = alert(&e, "a", "ventilator_alarm").expect("the alarm raised from the snapshot");
    assert_eq!((alarm.since, alarm.data["raised_from"].as_str()), (t(10), Some("telemetry")));
    assert_eq!(alert(&e, "a", "device_lost").and_then(|a| a.source.as_deref()), Some("ox"));
    // The alarm's event arrives late, then the next snapshot: nobody is paged again.
    e.handle(Input::Event(h("a"), event(1, 10, EventKind::VentilatorAlarm)), t(11)).unwrap();
    e.handle(Input::Telemetry(h("a"), snap(20, true, true)), t(20)).unwrap();
    e.poll(t(20));
    assert!(sent(&mut e).is_empty(), "paged twice");
    // A person clears the lost device (unplugged on purpose, say): the next snapshot, which
    // still says it is lost, does not bring it back.
    let id = alert(&e, "a", "device_lost").map(|a| a.id.clone()).unwrap();
    e.handle(Input::Clear { alert_id: id, by: "coord-a".into() }, t(21)).unwrap();
    sent(&mut e);
    e.handle(Input::Telemetry(h("a"), snap(30, true, true)), t(30)).unwrap();
    e.poll(t(30));
    assert!(alert(&e, "a", "device_lost").is_none(), "a cleared alert came back with the next snapshot");
    assert!(sent(&mut e).is_empty());
    // The loss the person cleared, its event arriving late (written at 10, before the clear):
    // history, nobody paged.
    let mut lost = event(2, 10, EventKind::DeviceLost);
    lost.source = Some("ox".into());
    e.handle(Input::Event(h("a"), lost), t(31)).unwrap();
    e.poll(t(31));
    assert!(alert(&e, "a", "device_lost").is_none(), "the cleared loss came back from its late event");
    assert!(sent(&mut e).is_empty());
    // Found again (its event, the snapshot after it lost on its way), then lost again with its
    // event lost: raised again, though the person's clear came before.
    e.handle(Input::Event(h("a"), event(3, 40, EventKind::DeviceRestored)), t(40)).unwrap();
    e.handle(Input::Telemetry(h("a"), snap(50, true, true)), t(50)).unwrap();
    assert!(alert(&e, "a", "device_lost").is_some(), "a new loss after the device came back was not raised");
    // And through the snapshots alone: cleared by hand, over, lost again.
    let id = alert(&e, "a", "device_lost").map(|a| a.id.clone()).unwrap();
    e.handle(Input::Clear { alert_id: id, by: "coord-a".into() }, t(51)).unwrap();
    e.handle(Input::Telemetry(h("a"), snap(60, true, false)), t(60)).unwrap();
    e.handle(Input::Telemetry(h("a"), snap(70, true, true)), t(70)).unwrap();
    assert!(alert(&e, "a", "device_lost").is_some(), "a new loss was not raised");
}

/// `oximeter_alarm_cleared` ends the alarm and its silencing together: a snapshot written
/// just before it (still alarming, still silenced) and overtaken by it opens neither again.
#[test]
fn a_snapshot_overtaken_by_the_oximeters_all_clear_opens_neither_of_its_alarms() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    let clock = |written: i64| mamori_protocol::mqtt::ClockInfo {
        boot: "b1".into(),
        uptime_ms: 1_000_000 + written as u64 * 1000,
        synced: Some(true),
    };
    let snap = |written: i64, alarming: bool| {
        let mut s = telemetry(written, true);
        s.conditions.insert(EventKind::OximeterAlarm, alarming);
        s.conditions.insert(EventKind::OximeterAlarmSilenced, alarming);
        s.clock = Some(clock(written));
        s
    };
    let at_uptime = |mut ev: Event| {
        let written = ev.ts.timestamp() - ts(0).timestamp();
        ev.clock = Some(clock(written));
        ev
    };
    e.handle(Input::Telemetry(h("a"), snap(0, false)), t(0)).unwrap();
    e.handle(Input::Event(h("a"), at_uptime(event(1, 10, EventKind::OximeterAlarm))), t(10)).unwrap();
    e.handle(Input::Event(h("a"), at_uptime(event(2, 11, EventKind::OximeterAlarmSilenced))), t(11)).unwrap();
    e.poll(t(11));
    assert!(alert(&e, "a", "oximeter_alarm").is_some() && alert(&e, "a", "oximeter_alarm_silenced").is_some());
    e.handle(Input::Event(h("a"), at_uptime(event(3, 20, EventKind::OximeterAlarmCleared))), t(20)).unwrap();
    e.poll(t(20));
    assert!(alert(&e, "a", "oximeter_alarm").is_none() && alert(&e, "a", "oximeter_alarm_silenced").is_none());
    sent(&mut e);
    // Written at 19 s (still alarming, still silenced), arriving at 22 s, after the all-clear.
    e.handle(Input::Telemetry(h("a"), snap(19, true)), t(22)).unwrap();
    e.poll(t(22));
    assert!(alert(&e, "a", "oximeter_alarm_silenced").is_none(), "the silencing opened again after the all-clear");
    assert!(alert(&e, "a", "oximeter_alarm").is_none(), "the alarm opened again after the all-clear");
    assert!(sent(&mut e).is_empty());
}

/// With the agent's clocks (as a real agent sends them), a snapshot is placed at its arrival;
/// one written before a `mains_restored` and overtaken by it (QoS 0 and QoS 1 take different
/// paths through a clustered broker) must not open the outage again and page the family
/// after their power is back.
#[test]
fn a_snapshot_overtaken_by_the_restore_does_not_open_the_outage_again() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    let clocked = |written: i64, mains_lost: bool| {
        let mut snap = telemetry(written, !mains_lost);
        snap.conditions.insert(EventKind::MainsLost, mains_lost);
        snap.clock = Some(mamori_protocol::mqtt::ClockInfo {
            boot: "b1".into(),
            uptime_ms: 1_000_000 + written as u64 * 1000,
            synced: Some(true),
        });
        snap
    };
    let at_uptime = |mut ev: Event| {
        let written = (ev.ts.timestamp() - ts(0).timestamp()) as u64;
        ev.clock = Some(mamori_protocol::mqtt::ClockInfo {
            boot: "b1".into(),
            uptime_ms: 1_000_000 + written * 1000,
            synced: Some(true),
        });
        ev
    };
    e.handle(Input::Telemetry(h("a"), clocked(0, false)), t(0)).unwrap();
    e.handle(Input::Event(h("a"), at_uptime(event(1, 10, EventKind::MainsLost))), t(10)).unwrap();
    e.poll(t(10));
    assert_eq!(names(&sent(&mut e)), ["fam-a"]);
    e.handle(Input::Event(h("a"), at_uptime(event(2, 20, EventKind::MainsRestored))), t(20)).unwrap();
    e.poll(t(20));
    assert!(alert(&e, "a", "mains_lost").is_none());
    sent(&mut e);
    // Written at 19 s (still on battery), arriving at 22 s, after the restore.
    e.handle(Input::Telemetry(h("a"), clocked(19, true)), t(22)).unwrap();
    e.poll(t(22));
    assert!(alert(&e, "a", "mains_lost").is_none(), "opened again after the power came back");
    assert!(sent(&mut e).is_empty());
}

#[test]
fn unacknowledged_alerts_repeat_then_escalate_tier_by_tier() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::VentilatorAlarm)), t(0)).unwrap();
    e.poll(t(0));
    assert_eq!(names(&sent(&mut e)), ["fam-a"]);
    e.poll(t(299));
    assert!(sent(&mut e).is_empty());
    e.poll(t(300));
    let repeat = sent(&mut e);
    assert_eq!(names(&repeat), ["fam-a"]);
    assert!(repeat[0].1.ends_with(":s0:r1"));
    e.poll(t(600));
    assert_eq!(names(&sent(&mut e)), ["coord-431001", "nurse-a"]);
    // T1 repeats twice, 10 min apart, then T2 after 30 min on T1.
    e.poll(t(1200));
    e.poll(t(1800));
    assert_eq!(names(&sent(&mut e)), ["coord-431001", "coord-431001", "nurse-a", "nurse-a"]);
    e.poll(t(2399));
    assert!(sent(&mut e).is_empty());
    e.poll(t(600 + 1800));
    assert_eq!(names(&sent(&mut e)), ["fac-a"]);
    e.poll(t(2400 + 900));
    assert_eq!(names(&sent(&mut e)), ["fac-a"], "one repeat of T2");
    e.poll(t(600 + 1800 + 1800));
    assert_eq!(names(&sent(&mut e)), ["centre", "coord-431001", "fac-a", "fam-a", "nurse-a"]);
}

#[test]
fn acknowledged_but_not_cleared_escalates_again_after_30_minutes() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::Spo2Low)), t(0)).unwrap();
    e.poll(t(0));
    sent(&mut e);
    let id = alert(&e, "a", "spo2_low").unwrap().id.clone();
    e.handle(
        Input::Ack { alert_id: id, role: Role::Family, by: "link".into(), note: Some("見ています".into()) },
        t(100),
    )
    .unwrap();
    e.poll(t(100 + 1799));
    assert!(sent(&mut e).is_empty());
    e.poll(t(100 + 1800));
    assert_eq!(names(&sent(&mut e)), ["coord-431001", "nurse-a"]);
}

#[test]
fn cleared_alerts_stop_and_tell_who_was_paged() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::MainsLost)), t(0)).unwrap();
    e.poll(t(0));
    sent(&mut e);
    e.handle(Input::Event(h("a"), event(2, 50, EventKind::MainsRestored)), t(50)).unwrap();
    let s = sent(&mut e);
    assert_eq!(names(&s), ["fam-a"]);
    assert!(s[0].1.ends_with(":clear"));
    assert!(alert(&e, "a", "mains_lost").is_none());
    e.poll(t(5000));
    assert!(sent(&mut e).is_empty());
    assert_eq!(e.home_state(&h("a")).unwrap().power, Power::Mains);
}

#[test]
fn a_replayed_outage_that_already_ended_pages_nobody() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    // Ten minutes cut off, then the spool replays both events at once.
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::MainsLost)), t(600)).unwrap();
    e.handle(Input::Event(h("a"), event(2, 30, EventKind::MainsRestored)), t(600)).unwrap();
    e.poll(t(600));
    assert!(sent(&mut e).is_empty());
    assert_eq!(e.home_state(&h("a")).unwrap().power, Power::Mains);
}

#[test]
fn a_replay_split_across_polls_still_pages_nobody_and_a_replayed_open_outage_pages_after_the_settle() {
    let mut e = engine(&[plan("a", "431001", 5000.0), plan("b", "431001", 5000.0)]);
    // The replay arrives in two batches with a poll between them.
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::MainsLost)), t(600)).unwrap();
    e.poll(t(600));
    assert!(sent(&mut e).is_empty(), "held while the rest of the replay arrives");
    e.handle(Input::Event(h("a"), event(2, 30, EventKind::MainsRestored)), t(601)).unwrap();
    e.poll(t(700));
    assert!(sent(&mut e).is_empty());
    // A replayed outage that has not ended: the family hears once the replay has settled.
    e.handle(Input::Event(h("b"), event(1, 0, EventKind::MainsLost)), t(600)).unwrap();
    e.poll(t(602));
    assert!(sent(&mut e).is_empty());
    assert_eq!(e.next_deadline(t(602)), Some(t(603)));
    e.poll(t(603));
    assert_eq!(names(&sent(&mut e)), ["fam-b"]);
    // A fresh event is not held.
    e.handle(Input::Event(h("a"), event(3, 800, EventKind::MainsLost)), t(801)).unwrap();
    e.poll(t(801));
    assert_eq!(names(&sent(&mut e)), ["fam-a"]);
}

#[test]
fn late_events_are_ordered_by_their_own_time() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    e.handle(Input::Event(h("a"), event(2, 30, EventKind::MainsRestored)), t(40)).unwrap();
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::MainsLost)), t(41)).unwrap();
    e.poll(t(41));
    assert!(alert(&e, "a", "mains_lost").is_none(), "the older mains_lost must not reopen the outage");
    assert_eq!(e.home_state(&h("a")).unwrap().power, Power::Mains);
    assert!(sent(&mut e).is_empty());
}

#[test]
fn one_active_alert_per_home_and_kind() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::VentilatorAlarm)), t(0)).unwrap();
    let id = alert(&e, "a", "ventilator_alarm").unwrap().id.clone();
    e.handle(Input::Event(h("a"), event(2, 5, EventKind::VentilatorAlarm)), t(5)).unwrap();
    assert_eq!(alert(&e, "a", "ventilator_alarm").unwrap().id, id);
    assert_eq!(alert(&e, "a", "ventilator_alarm").unwrap().dedup_key, "a/ventilator_alarm");
}

#[test]
fn a_silenced_bedside_alarm_still_escalates_remotely() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::OximeterAlarm)), t(0)).unwrap();
    e.handle(Input::Event(h("a"), event(2, 3, EventKind::OximeterAlarmSilenced)), t(3)).unwrap();
    e.poll(t(3));
    assert_eq!(names(&sent(&mut e)), ["fam-a", "fam-a"]);
    e.poll(t(600));
    let s = sent(&mut e);
    assert!(names(&s).contains(&"coord-431001"), "{s:?}");
    e.handle(Input::Event(h("a"), event(3, 700, EventKind::OximeterAlarmCleared)), t(700)).unwrap();
    assert!(alert(&e, "a", "oximeter_alarm_silenced").is_none() && alert(&e, "a", "oximeter_alarm").is_none());
}

#[test]
fn forecast_from_the_care_plan_crosses_tiers_and_escalates_at_once() {
    // 500 Wh at 100 W = 5 h external for a battery as planned, + 1 h internal. Nothing is
    // reported of the battery: P10 at 28 % (1.4 h), P50 at 60 % (3 h); the internal one's
    // P10 at 80 %. T2 below 30×2 + 360 min on P10 (always here), T3 below 2 h on P10.
    let mut e = engine(&[plan("a", "431001", 500.0)]);
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::MainsLost)), t(0)).unwrap();
    let f = e.home_state(&h("a")).unwrap().forecast.unwrap();
    assert_eq!(f.basis, crate::domain::forecast::Basis::DeadReckoning);
    assert_eq!((f.runs_out.p10, f.runs_out_at), (t(5040 + 2880), t(10_800 + 3600)));
    e.poll(t(0));
    // 2 h 12 min left on P10 < 7 h: straight to T2 without waiting for T0 and T1, and the tiers are
    // cumulative: the family, the coordinator and the nurse hear with the facility.
    assert_eq!(names(&sent(&mut e)), ["coord-431001", "fac-a", "fam-a", "nurse-a"]);
    assert_eq!(alert(&e, "a", "mains_lost").unwrap().tier(), Tier::T2);
    // 13 minutes later P10 is under 2 h: T3, though the middle still says almost 4 h.
    e.poll(t(13 * 60));
    assert_eq!(names(&sent(&mut e)), ["centre", "coord-431001", "fac-a", "fam-a", "nurse-a"]);
}

#[test]
fn a_home_silent_on_battery_raises_state_unknown_with_its_last_forecast() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    e.handle(Input::Telemetry(h("a"), telemetry(0, true)), t(0)).unwrap();
    e.handle(Input::Event(h("a"), event(1, 5, EventKind::MainsLost)), t(5)).unwrap();
    let f = e.home_state(&h("a")).unwrap().forecast.unwrap();
    e.poll(t(5));
    sent(&mut e);
    // Telemetry every 10 s: stale after 30 s of nothing.
    assert!(e.next_deadline(t(6)).unwrap() <= t(36));
    e.poll(t(36));
    let a = alert(&e, "a", "state_unknown").expect("state_unknown");
    assert_eq!(a.severity, Severity::Critical);
    assert_eq!(a.data["runs_out_at"], f.runs_out_at.to_rfc3339());
    assert_eq!(e.home_state(&h("a")).unwrap().forecast, Some(f), "the forecast keeps running");
    assert!(sent(&mut e).is_empty(), "homes falling silent together are seen together first");
    e.poll(t(36 + 30));
    let s = sent(&mut e);
    assert_eq!(names(&s), ["coord-431001", "fam-a", "nurse-a"]);
    // Heard again: cleared.
    e.handle(Input::Telemetry(h("a"), telemetry(100, false)), t(100)).unwrap();
    assert!(alert(&e, "a", "state_unknown").is_none());
}

#[test]
fn a_home_silent_on_mains_is_a_warning_after_a_delay() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    e.handle(Input::Telemetry(h("a"), telemetry(0, true)), t(0)).unwrap();
    e.handle(Input::Status(h("a"), Status::last_will()), t(10)).unwrap();
    assert_eq!(alert(&e, "a", "home_silent").unwrap().severity, Severity::Warning);
    e.poll(t(60));
    assert!(sent(&mut e).is_empty(), "not before notify_after_s");
    e.poll(t(130));
    assert_eq!(names(&sent(&mut e)), ["fam-a"]);
}

#[test]
fn unknown_homes_are_refused_and_change_nothing() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    let err = e.handle(Input::Event(h("zz"), event(1, 0, EventKind::MainsLost)), t(0)).unwrap_err();
    assert_eq!(err, EngineError::UnknownHome("zz".into()));
    assert!(e.take_outputs().is_empty());
    assert!(e.home_state(&h("zz")).is_none());
}

fn region() -> Engine {
    let mut homes: Vec<Home> = (0..4).map(|i| plan(&format!("k{i}"), "431001", 1000.0 * (i + 1) as f64)).collect();
    // One care plan names the municipality: the digest says it for all.
    homes[1].municipality_name = Some("熊本市".into());
    homes.push(plan("n0", "202011", 1000.0));
    engine(&homes)
}

#[test]
fn a_regional_outage_is_one_incident_with_a_triage_list_for_the_coordinator() {
    let mut e = region();
    for i in 0..4 {
        e.handle(Input::Telemetry(h(&format!("k{i}")), telemetry(0, true)), t(0)).unwrap();
    }
    e.handle(Input::Event(h("n0"), event(1, 10, EventKind::MainsLost)), t(10)).unwrap();
    // k3 goes silent before anyone else loses mains.
    e.handle(Input::Status(h("k3"), Status::last_will()), t(20)).unwrap();
    for (i, at) in [(0, 30), (1, 60), (2, 90)] {
        e.handle(Input::Event(h(&format!("k{i}")), event(1, at, EventKind::MainsLost)), t(at)).unwrap();
    }
    e.poll(t(90));
    let outs = e.take_outputs();
    let notes: Vec<&Notification> = outs
        .iter()
        .filter_map(|o| match o {
            Output::Notify(n) => Some(n),
            _ => None,
        })
        .collect();
    let digests: Vec<&&Notification> = notes.iter().filter(|n| matches!(n.content, Content::Incident { .. })).collect();
    assert_eq!(digests.len(), 1, "one incident for 431001, none for 202011 (one home)");
    let Content::Incident { municipality, rows, .. } = &digests[0].content else { unreachable!() };
    assert_eq!(municipality, "熊本市", "the municipality as people say it, not its code");
    let order: Vec<&str> = rows.iter().map(|r| r.home.as_str()).collect();
    // Time left: k0 (1000 Wh) < k1 < k2; the silent home k3 (on mains when last heard) is listed, marked.
    assert_eq!(&order[..3], ["k0", "k1", "k2"]);
    assert!(rows.iter().any(|r| r.home.as_str() == "k3" && r.silent));
    let to: Vec<&str> = digests[0].recipients.iter().map(|(_, c)| c.name.as_str()).collect();
    assert_eq!(to, ["coord-431001", "centre"], "each desk once");
    // The per-home power alerts skip the coordinator: families, nurses and facilities still hear.
    for n in notes.iter().filter(|n| n.home.as_ref().is_some_and(|h| h.as_str().starts_with('k'))) {
        assert!(n.recipients.iter().all(|(r, _)| !matches!(r, Role::Coordinator | Role::SupportCentre)), "{n:?}");
    }
    // The incident lifts every member's alert to T1, and the family is not skipped on the way.
    for k in ["k0", "k1", "k2"] {
        let told: Vec<&str> = notes
            .iter()
            .filter(|n| n.home.as_ref().is_some_and(|h| h.as_str() == k))
            .flat_map(|n| n.recipients.iter().map(|(_, c)| c.name.as_str()))
            .collect();
        assert!(told.contains(&format!("fam-{k}").as_str()), "{k}: {told:?}");
    }
    // k3 silent inside the incident: state unknown.
    assert!(alert(&e, "k3", "state_unknown").is_some());
    assert!(alert(&e, "k3", "home_silent").is_none());
    // Municipality 202011's lone home pages its own coordinator normally (after T0).
    assert!(alert(&e, "n0", "mains_lost").is_some());
}

#[test]
fn incident_digests_are_rate_limited_except_on_tier_crossings_and_close_when_power_returns() {
    let mut e = region();
    for (i, at) in [(0, 0), (1, 10), (2, 20)] {
        e.handle(Input::Event(h(&format!("k{i}")), event(1, at, EventKind::MainsLost)), t(at)).unwrap();
    }
    e.poll(t(20));
    let digests = |e: &mut Engine| {
        e.take_outputs()
            .into_iter()
            .filter(|o| matches!(o, Output::Notify(Notification { content: Content::Incident { .. }, .. })))
            .count()
    };
    assert_eq!(digests(&mut e), 1);
    // Another home joins: changed, but within 5 min of the last digest.
    e.handle(Input::Event(h("k3"), event(1, 60, EventKind::MainsLost)), t(60)).unwrap();
    e.poll(t(60));
    assert_eq!(digests(&mut e), 0);
    e.poll(t(20 + 300));
    assert_eq!(digests(&mut e), 1);
    // k0 (1000 Wh at 100 W = 10 h + 1 h) crosses T2 (7 h left) at 4 h: a digest at once.
    e.poll(t(4 * 3600 + 1));
    assert_eq!(digests(&mut e), 1);
    for i in 0..4 {
        e.handle(Input::Event(h(&format!("k{i}")), event(2, 5 * 3600, EventKind::MainsRestored)), t(5 * 3600)).unwrap();
    }
    e.poll(t(5 * 3600));
    let outs = e.take_outputs();
    assert!(outs
        .iter()
        .any(|o| matches!(o, Output::Notify(Notification { content: Content::Incident { closed: true, .. }, .. }))));
    assert_eq!(e.incidents().count(), 0);
}

#[test]
fn a_failed_delivery_goes_to_the_next_role_and_is_itself_an_alert() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::VentilatorAlarm)), t(0)).unwrap();
    e.poll(t(0));
    let outs = e.take_outputs();
    let Some(Output::Notify(n)) = outs.into_iter().find(|o| matches!(o, Output::Notify(_))) else { panic!() };
    e.handle(
        Input::DeliveryFailed {
            key: n.key.clone(),
            alert_id: n.alert_id.clone(),
            home: n.home.clone(),
            role: Role::Family,
            name: "fam-a".into(),
            content: n.content.clone(),
        },
        t(30),
    )
    .unwrap();
    let s = sent(&mut e);
    assert_eq!(names(&s), ["coord-431001"]);
    assert!(s[0].1.ends_with(":fallback"));
    assert_eq!(alert(&e, "a", "delivery_failed").unwrap().data["recipient"], "fam-a");
}

#[test]
fn state_survives_a_restart_and_escalation_resumes_on_time() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::VentilatorAlarm)), t(0)).unwrap();
    e.poll(t(0));
    sent(&mut e);
    let saved: Vec<(HomeId, HomeState)> = e.take_dirty();
    let json = serde_json::to_string(&saved).unwrap();
    let rows = serde_json::to_string(&alerts_to_store(&[], &saved)).unwrap();
    // A new process: plans from the store, states and alerts from their rows.
    let mut e2 = engine(&[plan("a", "431001", 5000.0)]);
    for (id, st) in serde_json::from_str::<Vec<(HomeId, HomeState)>>(&json).unwrap() {
        e2.restore_state(id, st);
    }
    for a in serde_json::from_str::<Vec<Alert>>(&rows).unwrap() {
        e2.restore_alert(a);
    }
    e2.poll(t(299));
    assert!(sent(&mut e2).is_empty(), "nothing re-sent after the restart");
    e2.poll(t(300));
    assert_eq!(names(&sent(&mut e2)), ["fam-a"]);
    let id = alert(&e2, "a", "ventilator_alarm").unwrap().id.clone();
    e2.handle(Input::Ack { alert_id: id, role: Role::Family, by: "cli".into(), note: None }, t(301)).unwrap();
}

#[test]
fn a_batch_writes_only_the_alerts_that_changed_and_writes_again_what_a_rollback_lost() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    let mut stored = StoredAlerts::new();
    // (whether the home's state changed, the kinds of the alerts written)
    let write = |e: &mut Engine, stored: &mut StoredAlerts| {
        let outputs = e.take_outputs();
        let dirty = e.take_dirty();
        let written = stored.to_write(&outputs, &dirty).into_iter().map(|a| a.kind.to_string()).collect::<Vec<_>>();
        (!dirty.is_empty(), written)
    };
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::VentilatorAlarm)), t(0)).unwrap();
    e.poll(t(0));
    assert_eq!(write(&mut e, &mut stored).1, ["ventilator_alarm"], "a new alert is written");
    stored.committed();
    // Telemetry changes the home's state, not its alert: the alert is not written again.
    e.handle(Input::Telemetry(h("a"), telemetry(10, true)), t(10)).unwrap();
    e.poll(t(10));
    let (changed, written) = write(&mut e, &mut stored);
    assert!(changed, "the home's state changed");
    assert!(written.is_empty(), "an unchanged alert is not written: {written:?}");
    stored.committed();
    // An acknowledgement changes the alert: written; the transaction is rolled back, so the
    // next change of the home writes it again even though the alert did not change since.
    let id = alert(&e, "a", "ventilator_alarm").unwrap().id.clone();
    e.handle(Input::Ack { alert_id: id, role: Role::Family, by: "cli".into(), note: None }, t(20)).unwrap();
    assert_eq!(write(&mut e, &mut stored).1, ["ventilator_alarm"]);
    stored.rolled_back();
    e.handle(Input::Telemetry(h("a"), telemetry(30, true)), t(30)).unwrap();
    let (changed, written) = write(&mut e, &mut stored);
    assert!(changed);
    assert_eq!(written, ["ventilator_alarm"], "written again after the rollback");
    stored.committed();
    assert_eq!(stored.len(), 1);
}

#[test]
fn a_long_downtime_sends_one_catch_up_not_a_burst() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::VentilatorAlarm)), t(0)).unwrap();
    e.poll(t(0));
    sent(&mut e);
    // The gateway was down for 3 hours: one escalation step at a time, not every missed repeat.
    e.poll(t(3 * 3600));
    let s = sent(&mut e);
    assert!(s.len() <= 6, "{s:?}");
}

#[test]
fn a_hand_clear_is_refused_while_on_battery_and_ends_an_alert_whose_condition_is_over() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::MainsLost)), t(0)).unwrap();
    e.handle(Input::Event(h("a"), event(2, 1, EventKind::DeviceLost)), t(1)).unwrap();
    e.poll(t(1));
    sent(&mut e);
    let power = alert(&e, "a", "mains_lost").unwrap().id.clone();
    let r = e.handle(Input::Clear { alert_id: power.clone(), by: "coord-1".into() }, t(10));
    assert_eq!(r, Err(EngineError::StillActive(power)));
    assert!(alert(&e, "a", "mains_lost").is_some());

    let lost = alert(&e, "a", "device_lost").unwrap().id.clone();
    e.poll(t(1000)); // long enough for the warning's first notification
    sent(&mut e);
    assert!(!alert(&e, "a", "device_lost").unwrap().notified.is_empty());
    e.handle(Input::Clear { alert_id: lost.clone(), by: "coord-1".into() }, t(1001)).unwrap();
    assert!(alert(&e, "a", "device_lost").is_none());
    let outs = e.take_outputs();
    let cleared = outs.iter().find_map(|o| match o {
        Output::Alert(a) if a.id == lost => Some(a.clone()),
        _ => None,
    });
    let cleared = cleared.expect("the cleared alert is persisted");
    assert_eq!(cleared.cleared_at, Some(t(1001)));
    assert_eq!(cleared.cleared_by.as_deref(), Some("coord-1"));
    assert!(outs.iter().any(|o| matches!(o, Output::Notify(n) if n.key == format!("{lost}:clear"))));
    assert_eq!(
        e.handle(Input::Clear { alert_id: lost.clone(), by: "coord-1".into() }, t(1002)),
        Err(EngineError::UnknownAlert(lost))
    );
}

mod everyday;

mod props;

mod battery;

mod restart;

#[test]
fn a_drill_tells_every_contact_once_records_who_acknowledged_and_ends_without_a_word() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    e.handle(Input::Drill { home: h("a"), by: "coord".into() }, t(0)).unwrap();
    e.poll(t(0));
    assert_eq!(names(&sent(&mut e)), ["centre", "coord-431001", "fac-a", "fam-a", "nurse-a"]);
    let id = alert(&e, "a", "drill").unwrap().id.clone();
    assert_eq!(
        e.handle(Input::Drill { home: h("a"), by: "coord".into() }, t(10)),
        Err(EngineError::DrillOpen(id.clone())),
        "one drill at a time"
    );
    e.handle(Input::Ack { alert_id: id.clone(), role: Role::Family, by: "link".into(), note: None }, t(60)).unwrap();
    // No repeats and no escalation, however long nobody else answers.
    for m in 1..60 {
        e.poll(t(m * 60));
    }
    assert!(sent(&mut e).is_empty());
    assert_eq!(e.next_deadline(t(3000)), Some(t(3600)), "the drill's end is a deadline");
    e.poll(t(3600));
    let outs = e.take_outputs();
    assert!(!outs.iter().any(|o| matches!(o, Output::Notify(_))), "it ends without a message");
    let ended = outs.iter().find_map(|o| match o {
        Output::Alert(a) if a.id == id => Some(a.clone()),
        _ => None,
    });
    let ended = ended.expect("the drill's record is stored");
    assert!(ended.cleared_at.is_some() && ended.acks.iter().any(|a| a.role == Role::Family));
    assert!(alert(&e, "a", "drill").is_none());
    assert_eq!(
        e.handle(Input::Drill { home: h("nope"), by: "x".into() }, t(4000)),
        Err(EngineError::UnknownHome("nope".into()))
    );
}

#[test]
fn with_consent_required_only_consented_contacts_hear_and_a_digest_names_only_their_homes() {
    let consent = |on: &str| {
        Some(crate::domain::homes::Consent {
            given_by: "母".into(),
            on: on.into(),
            purpose: "停電時の通知と避難の調整".into(),
            withdrawn_on: None,
        })
    };
    let mut homes: Vec<Home> = (0..3).map(|i| plan(&format!("k{i}"), "431001", 1000.0 * (i + 1) as f64)).collect();
    // k0 consented to its coordinator and its nurse; k1 to its coordinator from a day not yet
    // come; k2 to nobody.
    for c in &mut homes[0].contacts {
        if matches!(c.role, Role::Coordinator | Role::VisitingNurse) {
            c.consent = consent("1970-01-01");
        }
    }
    for c in homes[1].contacts.iter_mut().filter(|c| c.role == Role::Coordinator) {
        c.consent = consent("2999-01-01");
    }
    let settings = Settings { default_interval_s: 86_400, require_consent: true, ..Settings::default() };
    let mut e = Engine::new(settings, Policies::default());
    for h in &homes {
        e.upsert_home(h.clone());
    }
    for k in ["k0", "k2"] {
        e.handle(Input::Event(h(k), event(1, 0, EventKind::Spo2Low)), t(0)).unwrap();
    }
    e.poll(t(0));
    let first = sent(&mut e);
    let told = names(&first);
    assert!(told.contains(&"fam-k0") && told.contains(&"fam-k2"), "the family always: {told:?}");
    let mut later = Vec::new();
    for m in 1..=120 {
        e.poll(t(m * 60));
        later.extend(sent(&mut e));
    }
    let k2 = alert(&e, "k2", "spo2_low").unwrap().id.clone();
    let coord_of_k2 = later.iter().filter(|(n, key)| n == "coord-431001" && key.starts_with(&k2)).count();
    let heard = names(&later);
    assert!(heard.contains(&"coord-431001") && heard.contains(&"nurse-k0"), "k0's consented contacts: {heard:?}");
    assert_eq!(coord_of_k2, 0, "k2 consented to nobody: {later:?}");
    assert!(!heard.contains(&"nurse-k2") && !heard.contains(&"fac-k2") && !heard.contains(&"fac-k0"), "{heard:?}");

    // A regional outage: the coordinator's digest lists only k0, the home that consented to
    // the coordinator today (k1's consent is not in force yet; k2 has none).
    let mut e = Engine::new(Settings { require_consent: true, ..Settings::default() }, Policies::default());
    for h in &homes {
        e.upsert_home(h.clone());
    }
    for (i, at) in [(0, 30), (1, 60), (2, 90)] {
        e.handle(Input::Event(h(&format!("k{i}")), event(1, at, EventKind::MainsLost)), t(at)).unwrap();
    }
    e.poll(t(90));
    let digests: Vec<Notification> = e
        .take_outputs()
        .into_iter()
        .filter_map(|o| match o {
            Output::Notify(n) if matches!(n.content, Content::Incident { .. }) => Some(n),
            _ => None,
        })
        .collect();
    assert_eq!(digests.len(), 1, "{digests:?}");
    let Content::Incident { rows, .. } = &digests[0].content else { unreachable!() };
    assert_eq!(rows.iter().map(|r| r.home.as_str()).collect::<Vec<_>>(), ["k0"]);
    assert_eq!(digests[0].recipients.iter().map(|(_, c)| c.name.as_str()).collect::<Vec<_>>(), ["coord-431001"]);
}

#[test]
fn a_message_already_queued_is_not_sent_once_consent_is_withdrawn_and_the_day_is_local() {
    let mut home = plan("k0", "431001", 1000.0);
    for c in home.contacts.iter_mut().filter(|c| c.role == Role::Coordinator) {
        c.consent = Some(crate::domain::homes::Consent {
            given_by: "母".into(),
            on: "2026-04-01".into(),
            purpose: "停電時の通知と避難の調整".into(),
            withdrawn_on: Some("2026-12-01".into()),
        });
    }
    // Japan: UTC+9. 2026-11-30 15:30 UTC is already December 1st there.
    let settings = Settings { require_consent: true, local_offset_s: 9 * 3600, ..Settings::default() };
    let mut e = Engine::new(settings, Policies::default());
    e.upsert_home(home.clone());
    let at = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&chrono::Utc);
    let k0 = h("k0");
    assert!(
        e.may_send(
            Some(&k0),
            Role::Coordinator,
            "coord-431001",
            &ChannelRef::Console("coord-431001".into()),
            at("2026-11-30T14:59:00Z")
        ),
        "still November 30th in Japan"
    );
    assert!(
        !e.may_send(
            Some(&k0),
            Role::Coordinator,
            "coord-431001",
            &ChannelRef::Console("coord-431001".into()),
            at("2026-11-30T15:00:00Z")
        ),
        "withdrawn from December 1st, Japan time"
    );
    assert!(
        e.may_send(
            Some(&k0),
            Role::Family,
            "fam-k0",
            &ChannelRef::Console("fam-k0".into()),
            at("2026-11-30T15:00:00Z")
        ),
        "the family always"
    );
    assert!(
        !e.may_send(
            Some(&k0),
            Role::Facility,
            "fac-k0",
            &ChannelRef::Console("fac-k0".into()),
            at("2026-11-30T00:00:00Z")
        ),
        "no consent at all"
    );
    assert!(
        e.may_send(
            Some(&k0),
            Role::Coordinator,
            "a corrected name",
            &ChannelRef::Console("coord-431001".into()),
            at("2026-11-30T00:00:00Z")
        ),
        "renamed in the plan meanwhile: the same channel"
    );
    assert!(
        !e.may_send(
            Some(&k0),
            Role::Coordinator,
            "someone else",
            &ChannelRef::Console("elsewhere".into()),
            at("2026-11-30T00:00:00Z")
        ),
        "not in the plan any more"
    );
    // Without consent required, everything that was queued goes.
    let mut e = Engine::new(Settings::default(), Policies::default());
    e.upsert_home(home);
    assert!(e.may_send(
        Some(&k0),
        Role::Facility,
        "fac-k0",
        &ChannelRef::Console("fac-k0".into()),
        at("2026-11-30T15:00:00Z")
    ));
}
