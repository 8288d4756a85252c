//! The everyday faults nobody designed for: alerts that end without their event, the centre's
//! own downtime, many homes falling silent at once, wrong clocks, absurd intervals.

use super::*;
use mamori_protocol::mqtt::{ClockInfo, ContactState, DeviceKind, DeviceStatus, SpoolStatus, VentilatorReading};

/// Telemetry whose agent reports `kind` as over.
fn over(at: i64, kind: EventKind) -> Telemetry {
    let mut t = telemetry(at, true);
    t.mains_present = None;
    t.conditions.insert(kind, false);
    t
}

fn notices(outputs: &[Output]) -> Vec<&Notice> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Notice(n) => Some(n),
            _ => None,
        })
        .collect()
}

const OPENING: &[EventKind] = &[
    EventKind::MainsLost,
    EventKind::BatteryLow,
    EventKind::UpsFault,
    EventKind::DeviceLost,
    EventKind::Spo2Low,
    EventKind::PulseOutOfRange,
    EventKind::SensorOff,
    EventKind::OximeterAlarm,
    EventKind::OximeterAlarmSilenced,
    EventKind::VentilatorAlarm,
    EventKind::AlarmCableFault,
    EventKind::SpoolDegraded,
];

#[test]
fn every_kind_with_an_observable_normal_state_clears_when_the_home_says_it_is_over() {
    for &kind in OPENING {
        let mut e = engine(&[plan("a", "431001", 5000.0)]);
        e.handle(Input::Event(h("a"), event(1, 0, kind)), t(0)).unwrap();
        e.poll(t(120));
        assert!(!sent(&mut e).is_empty(), "{kind:?} pages");
        // A report that says nothing about it, or that it still holds, changes nothing.
        e.handle(Input::Telemetry(h("a"), over(100, EventKind::Unknown)), t(100)).unwrap();
        let mut holds = over(110, kind);
        holds.conditions.insert(kind, true);
        e.handle(Input::Telemetry(h("a"), holds), t(110)).unwrap();
        assert!(alert(&e, "a", kind.as_str()).is_some(), "{kind:?} still holds");
        // Over: cleared, and whoever was paged hears so.
        let mut t_over = over(130, kind);
        if kind == EventKind::SpoolDegraded {
            // The spool's state is the agent's, not the monitor's: it comes as `spool`.
            t_over.conditions.clear();
            t_over.spool = Some(SpoolStatus { pending_events: 0, degraded: false });
        }
        e.handle(Input::Telemetry(h("a"), t_over), t(130)).unwrap();
        assert!(alert(&e, "a", kind.as_str()).is_none(), "{kind:?} clears by itself");
        let cleared = sent(&mut e);
        assert!(cleared.iter().any(|(_, key)| key.ends_with(":clear")), "{kind:?}: {cleared:?}");
    }
}

#[test]
fn an_agent_restarted_on_mains_after_an_outage_ends_the_outage_alert() {
    // An older agent (no `conditions`): its readings say mains is back.
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::MainsLost)), t(0)).unwrap();
    e.poll(t(0));
    sent(&mut e);
    e.handle(Input::Event(h("a"), event(2, 600, EventKind::AgentStarted)), t(600)).unwrap();
    e.handle(Input::Telemetry(h("a"), telemetry(601, true)), t(601)).unwrap();
    assert!(alert(&e, "a", "mains_lost").is_none(), "no T3 for a home back on mains");
    // And it never escalates afterwards.
    e.poll(t(4 * 3600));
    let later = sent(&mut e);
    assert!(later.iter().all(|(_, k)| k.ends_with(":clear")), "{later:?}");
    // Other readings of an older agent: devices answering, the ventilator contact normal.
    for (kind, fix) in [
        (EventKind::DeviceLost, "devices"),
        (EventKind::VentilatorAlarm, "ventilator"),
        (EventKind::AlarmCableFault, "ventilator"),
    ] {
        let mut e = engine(&[plan("a", "431001", 5000.0)]);
        e.handle(Input::Event(h("a"), event(1, 0, kind)), t(0)).unwrap();
        let mut tl = telemetry(10, true);
        tl.mains_present = None;
        match fix {
            "devices" => {
                tl.devices = vec![DeviceStatus { id: "ups".into(), kind: DeviceKind::Ups, state: DeviceState::Ok }]
            }
            _ => tl.ventilator = Some(VentilatorReading { alarm: ContactState::Normal }),
        }
        e.handle(Input::Telemetry(h("a"), tl), t(10)).unwrap();
        assert!(alert(&e, "a", kind.as_str()).is_none(), "{kind:?}");
    }
}

#[test]
fn a_report_older_than_the_alert_clears_nothing_and_an_event_older_than_the_report_opens_nothing() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    e.handle(Input::Telemetry(h("a"), over(100, EventKind::Spo2Low)), t(100)).unwrap();
    // A replayed spo2_low from before the report: history only.
    e.handle(Input::Event(h("a"), event(1, 50, EventKind::Spo2Low)), t(101)).unwrap();
    assert!(alert(&e, "a", "spo2_low").is_none());
    // A new one after it opens.
    e.handle(Input::Event(h("a"), event(2, 102, EventKind::Spo2Low)), t(102)).unwrap();
    assert!(alert(&e, "a", "spo2_low").is_some());
    // A late snapshot from before it does not close it.
    e.handle(Input::Telemetry(h("a"), over(101, EventKind::Spo2Low)), t(103)).unwrap();
    assert!(alert(&e, "a", "spo2_low").is_some());
}

/// An engine whose homes send telemetry every 10 s.
fn heard_homes(n: usize, municipalities: &[&str], at: i64) -> Engine {
    let plans: Vec<Home> =
        (0..n).map(|i| plan(&format!("h{i}"), municipalities[i % municipalities.len()], 5000.0)).collect();
    let mut e = engine(&plans);
    for p in &plans {
        e.handle(Input::Telemetry(p.id.clone(), telemetry(at, true)), t(at)).unwrap();
    }
    e.poll(t(at));
    e.take_outputs();
    e
}

#[test]
fn silence_is_not_judged_while_the_gateway_is_disconnected_and_counts_from_its_return() {
    let mut e = heard_homes(3, &["431001"], 0);
    // The gateway's broker connection drops at 5 s (or the gateway stops) and returns at 60 s.
    e.set_uplink(false, t(5));
    e.poll(t(45));
    assert!(e.states().all(|(_, s)| s.conn == Connectivity::Online), "nobody is silent while the centre is");
    assert!(e.next_deadline(t(45)).is_none_or(|d| d > t(45)));
    e.set_uplink(true, t(60));
    e.poll(t(61));
    assert!(e.states().all(|(_, s)| s.conn == Connectivity::Online), "judged from the return, not from 0 s");
    e.handle(Input::Telemetry(h("h0"), telemetry(65, true)), t(65)).unwrap();
    e.handle(Input::Telemetry(h("h1"), telemetry(65, true)), t(65)).unwrap();
    // h2 stays silent: stale 30 s after the return.
    e.poll(t(91));
    assert!(alert(&e, "h2", "home_silent").is_some() && alert(&e, "h0", "home_silent").is_none());
}

#[test]
fn a_retained_status_replayed_at_subscription_is_not_hearing_from_the_home() {
    let mut e = heard_homes(1, &["431001"], 0);
    e.poll(t(40));
    assert!(alert(&e, "h0", "home_silent").is_some());
    let online = Status {
        state: mamori_protocol::mqtt::ConnectionState::Online,
        since: None,
        agent_version: None,
        telemetry_interval_s: Some(10),
        sources: vec![],
        reason: None,
    };
    e.handle(Input::RetainedStatus(h("h0"), online.clone()), t(50)).unwrap();
    assert!(alert(&e, "h0", "home_silent").is_some(), "old news");
    e.handle(Input::Status(h("h0"), online), t(51)).unwrap();
    assert!(alert(&e, "h0", "home_silent").is_none(), "a live status is hearing from it");
}

#[test]
fn many_homes_falling_silent_across_municipalities_is_one_notice_and_a_grace() {
    let mut e = heard_homes(12, &["431001", "202011"], 0);
    // Ten of them return within the grace; two stay silent. Everyone stops at once.
    e.poll(t(31));
    let outs = e.take_outputs();
    let n = notices(&outs);
    assert_eq!(n.len(), 1, "{outs:?}");
    assert!(matches!(n[0], Notice::MassSilence { homes: 12, municipalities: 2, .. }), "{n:?}");
    let pages: Vec<_> = outs.iter().filter(|o| matches!(o, Output::Notify(_))).collect();
    assert!(pages.is_empty(), "no family is paged for the centre's problem");
    e.poll(t(31 + 300));
    assert!(sent(&mut e).is_empty(), "still within the grace");
    for i in 0..10 {
        e.handle(Input::Telemetry(h(&format!("h{i}")), telemetry(400, true)), t(400)).unwrap();
    }
    assert!(sent(&mut e).is_empty(), "homes that came back were never paged, so hear nothing");
    // After the grace, the two still silent are escalated as usual (home_silent: the family).
    e.poll(t(31 + 601));
    let s = sent(&mut e);
    assert_eq!(names(&s), ["fam-h10", "fam-h11"], "{s:?}");
}

#[test]
fn an_incident_opening_during_a_mass_silence_waits_for_the_homes_still_reconnecting() {
    // A regional network cut (`bench-reconnect`): twelve homes in two municipalities fall
    // silent together. When the network is back, three of 431001's homes reconnect first and
    // report the outage they had during the cut; that opens an incident around the others,
    // whose agents are still waiting out their reconnect backoff.
    let mut e = heard_homes(12, &["431001", "202011"], 0);
    e.poll(t(31));
    assert_eq!(notices(&e.take_outputs()).len(), 1, "one mass-silence notice");
    for i in [0, 2, 4] {
        let home = h(&format!("h{i}"));
        e.handle(Input::Event(home.clone(), event(1, 20, EventKind::MainsLost)), t(60)).unwrap();
        e.handle(Input::Telemetry(home, telemetry(60, false)), t(60)).unwrap();
    }
    e.poll(t(61));
    assert!(alert(&e, "h6", "state_unknown").is_some(), "silent inside an incident: at risk, on the dashboard");
    // Anyone of the silent homes' own (family, nurse, facility): none for mass_silence_return_s.
    let theirs = |pages: &[(String, String)], homes: &[&str]| -> Vec<String> {
        pages
            .iter()
            .filter(|(n, _)| homes.iter().any(|x| n.ends_with(&format!("-{x}"))))
            .map(|(n, _)| n.clone())
            .collect()
    };
    let mut pages = Vec::new();
    for at in (70..=230).step_by(10) {
        if at == 130 {
            // Two come back: their alerts end, and nobody ever hears of them.
            for i in [6, 8] {
                e.handle(Input::Telemetry(h(&format!("h{i}")), telemetry(125, true)), t(125)).unwrap();
            }
            assert!(alert(&e, "h6", "state_unknown").is_none());
        }
        e.poll(t(at));
        pages.extend(sent(&mut e));
    }
    assert!(theirs(&pages, &["h6", "h8", "h10"]).is_empty(), "the wait holds: {pages:?}");
    // The third is still silent 180 s after the incident opened, long before the mass
    // silence's grace (631 s) ends: it may be in the power cut, and is paged.
    e.poll(t(241));
    let late = sent(&mut e);
    assert!(theirs(&late, &["h6", "h8"]).is_empty(), "{late:?}");
    assert!(theirs(&late, &["h10"]).contains(&"fam-h10".to_string()), "{late:?}");
}

#[test]
fn a_second_mass_silence_during_the_first_ones_grace_waits_a_grace_of_its_own() {
    // Two regional cuts five minutes apart. The second wave's homes wait their own grace, not
    // what is left of the first one's (which would page their families for the network).
    let mut e = heard_homes(24, &["431001", "202011"], 0);
    let second: Vec<String> = (12..24).map(|i| format!("h{i}")).collect();
    let mut pages = Vec::new();
    let mut told = Vec::new();
    // h12..h23 keep talking until 300 s; h0..h11 are silent from 31 s.
    for at in (10..=300).step_by(10) {
        for home in &second {
            e.handle(Input::Telemetry(h(home), telemetry(at, true)), t(at)).unwrap();
        }
        e.poll(t(at + 1));
        let outs = e.take_outputs();
        told.extend(notices(&outs).into_iter().cloned());
        pages.extend(outs.into_iter().filter_map(|o| match o {
            Output::Notify(n) => Some((n.at, n.recipients[0].1.name.clone())),
            _ => None,
        }));
    }
    for at in (310..=900).step_by(10) {
        e.poll(t(at));
        let outs = e.take_outputs();
        told.extend(notices(&outs).into_iter().cloned());
        pages.extend(outs.into_iter().filter_map(|o| match o {
            Output::Notify(n) => Some((n.at, n.recipients[0].1.name.clone())),
            _ => None,
        }));
    }
    let masses = told.iter().filter(|n| matches!(n, Notice::MassSilence { homes: 12, municipalities: 2, .. })).count();
    assert_eq!(masses, 2, "one notice per cut: {told:?}");
    // The first wave is paged when its grace ends (31 + 600), the second wave not yet.
    assert!(pages.iter().any(|(at, n)| n == "fam-h0" && *at == t(640)), "{pages:?}");
    let early: Vec<_> = pages.iter().filter(|(_, n)| second.iter().any(|s| n.ends_with(&format!("-{s}")))).collect();
    assert!(early.is_empty(), "the second wave waits its own grace: {early:?}");
    // Its grace ends 600 s after it was found silent (at the poll of 340 s): then its homes
    // still silent are paged.
    e.poll(t(340 + 601));
    let late = sent(&mut e);
    assert!(late.iter().any(|(n, _)| n == "fam-h12"), "{late:?}");
}

#[test]
fn a_few_homes_falling_silent_are_paged_as_usual() {
    let mut e = heard_homes(12, &["431001", "202011"], 0);
    let mut pages = Vec::new();
    // h10 and h11 (one in each municipality, but only two homes) fall silent; the others
    // keep talking.
    for at in (10..=200).step_by(10) {
        for i in 0..10 {
            e.handle(Input::Telemetry(h(&format!("h{i}")), telemetry(at, true)), t(at)).unwrap();
        }
        e.poll(t(at + 1));
        let outs = e.take_outputs();
        assert!(notices(&outs).is_empty(), "{outs:?}");
        pages.extend(outs.into_iter().filter_map(|o| match o {
            Output::Notify(n) => Some((n.at, n.recipients[0].1.name.clone())),
            _ => None,
        }));
    }
    // Stale after 30 s (t = 31), home_silent waits its policy's 2 minutes: paged at 151.
    let when: Vec<(Time, &str)> = pages.iter().map(|(at, n)| (*at, n.as_str())).collect();
    assert_eq!(when, [(t(151), "fam-h10"), (t(151), "fam-h11")]);
}

fn clocked(at: i64, boot_uptime_s: u64) -> Option<ClockInfo> {
    let _ = at;
    Some(ClockInfo { boot: "boot-1".into(), uptime_ms: boot_uptime_s * 1000, synced: Some(true) })
}

#[test]
fn a_clock_an_hour_ahead_then_corrected_cannot_swallow_a_real_outage() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    // An hour ahead: an outage and its end, then telemetry.
    e.handle(Input::Event(h("a"), event(1, 3600, EventKind::MainsLost)), t(0)).unwrap();
    e.handle(Input::Event(h("a"), event(2, 3660, EventKind::MainsRestored)), t(60)).unwrap();
    // (An agent that does not send its clocks: two snapshots sent as they were written show
    // the gateway its skew.)
    e.handle(Input::Telemetry(h("a"), telemetry(3660, true)), t(60)).unwrap();
    e.handle(Input::Telemetry(h("a"), telemetry(3670, true)), t(70)).unwrap();
    assert!(alert(&e, "a", "clock_skew").is_some(), "the coordinator will hear the clock is wrong");
    // Corrected by NTP: a real outage at 120 s must page.
    e.handle(Input::Telemetry(h("a"), telemetry(100, true)), t(100)).unwrap();
    e.handle(Input::Telemetry(h("a"), telemetry(110, true)), t(110)).unwrap();
    assert!(alert(&e, "a", "clock_skew").is_none(), "right again: cleared");
    e.handle(Input::Event(h("a"), event(3, 120, EventKind::MainsLost)), t(120)).unwrap();
    e.poll(t(120));
    assert_eq!(names(&sent(&mut e)), ["fam-a"], "the outage is not discarded as older than what is known");
}

#[test]
fn a_clock_a_day_behind_does_not_page_zero_minutes_left() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    let day = 86_400;
    // With the agent's clocks (a Pi booted without NTP): placed by uptime.
    let mut tl = telemetry(-day, true);
    tl.clock = clocked(0, 1000);
    e.handle(Input::Telemetry(h("a"), tl), t(0)).unwrap();
    let mut ev = event(1, 5 - day, EventKind::MainsLost);
    ev.clock = clocked(5, 1005);
    e.handle(Input::Event(h("a"), ev), t(5)).unwrap();
    let f = e.home_state(&h("a")).unwrap().forecast.unwrap();
    assert!(f.runs_out_at > t(3600), "5000 Wh at 100 W is 50 h, not 0 min: {f:?}");
    e.poll(t(5));
    let a = alert(&e, "a", "mains_lost").unwrap();
    assert_eq!((a.since, a.tier()), (t(5), Tier::T0));
    // Without them (an older agent): the measured skew corrects its events.
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    e.handle(Input::Telemetry(h("a"), telemetry(-day - 10, true)), t(-10)).unwrap();
    e.handle(Input::Telemetry(h("a"), telemetry(-day, true)), t(0)).unwrap();
    e.handle(Input::Event(h("a"), event(1, 5 - day, EventKind::MainsLost)), t(5)).unwrap();
    assert_eq!(alert(&e, "a", "mains_lost").unwrap().since, t(5));
    assert!(e.home_state(&h("a")).unwrap().forecast.unwrap().runs_out_at > t(3600));
}

#[test]
fn a_replay_from_the_spool_is_still_a_replay_when_the_clock_is_wrong() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    let mut tl = telemetry(-86_400, true);
    tl.clock = clocked(0, 10_000);
    e.handle(Input::Telemetry(h("a"), tl), t(0)).unwrap();
    // The network is cut at 10 s; an outage at 100 s and its end at 200 s are spooled and
    // replayed when it comes back at 900 s. Placed by uptime: 100 s and 200 s, not 900 s.
    let mut lost = event(1, 100 - 86_400, EventKind::MainsLost);
    lost.clock = clocked(100, 10_100);
    let mut back = event(2, 200 - 86_400, EventKind::MainsRestored);
    back.clock = clocked(200, 10_200);
    e.handle(Input::Event(h("a"), lost), t(900)).unwrap();
    e.handle(Input::Event(h("a"), back), t(900)).unwrap();
    e.poll(t(900));
    let s = sent(&mut e);
    // (The coordinator hears that the home's clock is a day off: clock_skew, not the outage.)
    assert!(s.iter().all(|(name, _)| name == "coord-431001"), "an outage that already ended pages nobody: {s:?}");
    assert!(alert(&e, "a", "mains_lost").is_none() && alert(&e, "a", "clock_skew").is_some());
}

#[test]
fn a_home_cannot_switch_its_own_silence_detection_off() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    let mut tl = telemetry(0, true);
    tl.interval_s = u32::MAX;
    e.handle(Input::Telemetry(h("a"), tl), t(0)).unwrap();
    let limit = i64::from(Settings::default().max_interval_s) * 3;
    assert!(e.next_deadline(t(1)).unwrap() <= t(limit + 1));
    e.poll(t(limit + 1));
    assert!(alert(&e, "a", "home_silent").is_some());
}

#[test]
fn a_network_cut_is_not_a_wrong_clock() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    let mut tl = telemetry(0, true);
    tl.clock = clocked(0, 1000);
    e.handle(Input::Telemetry(h("a"), tl), t(0)).unwrap();
    // Cut from 10 s to 900 s: the snapshots kept meanwhile arrive at 900 s, marked kept or not.
    for (k, at) in [10i64, 20, 30].into_iter().enumerate() {
        let mut kept = telemetry(at, true);
        kept.clock = clocked(at, 1000 + at as u64);
        kept.kept = k % 2 == 0;
        e.handle(Input::Telemetry(h("a"), kept), t(900)).unwrap();
    }
    e.poll(t(900));
    assert!(alert(&e, "a", "clock_skew").is_none());
    // Without clocks either.
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    e.handle(Input::Telemetry(h("a"), telemetry(0, true)), t(0)).unwrap();
    e.handle(Input::Telemetry(h("a"), telemetry(10, true)), t(10)).unwrap();
    for at in [20, 30, 40] {
        e.handle(Input::Telemetry(h("a"), telemetry(at, true)), t(900)).unwrap();
    }
    assert!(alert(&e, "a", "clock_skew").is_none());
}

#[test]
fn a_replayed_acknowledgement_link_neither_adds_nor_postpones() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::Spo2Low)), t(0)).unwrap();
    e.poll(t(0));
    sent(&mut e);
    let id = alert(&e, "a", "spo2_low").unwrap().id.clone();
    let ack = |by: &str| Input::Ack { alert_id: id.clone(), role: Role::Family, by: by.into(), note: None };
    e.handle(ack("link"), t(60)).unwrap();
    // The same link, replayed a hundred times over the next half hour.
    for k in 1..=100 {
        e.handle(ack("link"), t(60 + k * 17)).unwrap();
    }
    let a = alert(&e, "a", "spo2_low").unwrap();
    assert_eq!(a.acks.len(), 1, "one acknowledgement per person or link");
    assert_eq!(a.acknowledged.as_ref().map(|k| k.at), Some(t(60)), "timed from the first");
    // Someone else acknowledges too: recorded, and the timing stays with the first.
    e.handle(ack("cli:sato"), t(100)).unwrap();
    let a = alert(&e, "a", "spo2_low").unwrap();
    assert_eq!((a.acks.len(), a.acknowledged.as_ref().map(|k| k.at)), (2, Some(t(60))));
    // Re-escalation 30 min after the first acknowledgement, replays or not.
    e.poll(t(60 + 30 * 60 + 1));
    assert!(!sent(&mut e).is_empty(), "re-escalated on time");
}

#[test]
fn a_facility_that_cannot_take_the_child_does_not_acknowledge_and_the_escalation_goes_on() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::Spo2Low)), t(0)).unwrap();
    e.poll(t(0));
    sent(&mut e);
    let id = alert(&e, "a", "spo2_low").unwrap().id.clone();
    let answer = |a: Answer| Input::Answer { alert_id: id.clone(), by: "hospital".into(), answer: a };
    e.handle(answer(Answer::CannotAccept), t(60)).unwrap();
    e.handle(answer(Answer::CannotAccept), t(70)).unwrap();
    let a = alert(&e, "a", "spo2_low").unwrap();
    assert_eq!(a.acks.len(), 1, "recorded once: {:?}", a.acks);
    assert_eq!((a.acks[0].role, a.acks[0].answer), (Role::Facility, Some(Answer::CannotAccept)));
    assert!(a.acknowledged.is_none(), "a refusal is not an acknowledgement");
    // A family's answer does acknowledge, with its words, and a second one is recorded too.
    let family = |a: Answer| Input::Answer { alert_id: id.clone(), by: "family-a".into(), answer: a };
    e.handle(family(Answer::Evacuating), t(120)).unwrap();
    e.handle(family(Answer::PowerSecured), t(180)).unwrap();
    let a = alert(&e, "a", "spo2_low").unwrap();
    assert_eq!(a.acknowledged.as_ref().and_then(|k| k.answer), Some(Answer::Evacuating));
    assert_eq!(a.acks.len(), 3);
    assert_eq!(a.acks[2].said(crate::domain::homes::Lang::Ja).as_deref(), Some("電源を確保しました"));
    // An answer about nothing: refused.
    assert!(e
        .handle(Input::Answer { alert_id: "nope".into(), by: "x".into(), answer: Answer::CanAccept }, t(200))
        .is_err());
}

#[test]
fn after_a_refusal_the_escalation_goes_on_and_no_message_says_the_facility_acknowledged() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::Spo2Low)), t(0)).unwrap();
    e.poll(t(0));
    sent(&mut e);
    let id = alert(&e, "a", "spo2_low").unwrap().id.clone();
    e.handle(Input::Answer { alert_id: id, by: "hospital".into(), answer: Answer::CannotAccept }, t(30)).unwrap();
    e.take_outputs();
    let mut later = Vec::new();
    for m in 1..=120 {
        e.poll(t(30 + m * 60));
        for o in e.take_outputs() {
            if let Output::Notify(Notification { content: Content::Alert { acknowledged_by, .. }, .. }) = o {
                later.push(acknowledged_by);
            }
        }
    }
    assert!(!later.is_empty(), "the escalation went on after the refusal");
    assert!(later.iter().all(|a| !a.contains(&Role::Facility)), "{later:?}");
}

#[test]
fn answers_change_minds_a_refusal_leaves_others_told_and_a_home_can_be_taken_back() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::Spo2Low)), t(0)).unwrap();
    e.poll(t(0));
    sent(&mut e);
    let id = alert(&e, "a", "spo2_low").unwrap().id.clone();
    let say = |by: &str, a: Answer| Input::Answer { alert_id: id.clone(), by: by.into(), answer: a };
    // A facility says no: another facility contact's later message is still needed.
    e.handle(say("hospital-1", Answer::CannotAccept), t(10)).unwrap();
    assert!(e.still_needed(Some(&h("a")), &id, Role::Facility, t(0)), "a refusal does not silence the others");
    // It changes its mind (yes), then back (no): the acknowledgement goes with it.
    e.handle(say("hospital-1", Answer::CanAccept), t(20)).unwrap();
    assert_eq!(alert(&e, "a", "spo2_low").unwrap().acknowledged.as_ref().map(|k| k.by.as_str()), Some("hospital-1"));
    e.handle(say("hospital-1", Answer::CannotAccept), t(30)).unwrap();
    let a = alert(&e, "a", "spo2_low").unwrap();
    assert!(a.acknowledged.is_none(), "its yes was taken back: {:?}", a.acks);
    assert_eq!(a.acks.len(), 3);
    // Coordinator A takes the home on, B takes it over, A takes it back: the latest holds.
    for (by, at) in [("coord-a", 40), ("coord-b", 50), ("coord-a", 60)] {
        e.handle(say(by, Answer::Handling), t(at)).unwrap();
    }
    let a = alert(&e, "a", "spo2_low").unwrap();
    let latest = a.acks.iter().filter(|k| k.answer == Some(Answer::Handling)).max_by_key(|k| k.at).unwrap();
    assert_eq!(latest.by, "coord-a");
    // The same thing said twice in a row is nothing new.
    e.handle(say("coord-a", Answer::Handling), t(70)).unwrap();
    assert_eq!(alert(&e, "a", "spo2_low").unwrap().acks.len(), 6);
}

#[test]
fn an_answer_reaches_those_who_act_on_it_once_and_a_claim_pages_nobody() {
    let mut e = engine(&[plan("a", "431001", 5000.0)]);
    e.handle(Input::Event(h("a"), event(1, 0, EventKind::Spo2Low)), t(0)).unwrap();
    e.poll(t(0));
    sent(&mut e);
    let id = alert(&e, "a", "spo2_low").unwrap().id.clone();
    let say = |by: &str, a: Answer| Input::Answer { alert_id: id.clone(), by: by.into(), answer: a };
    let answers = |e: &mut Engine| -> Vec<(Vec<String>, Answer, bool)> {
        e.take_outputs()
            .into_iter()
            .filter_map(|o| match o {
                Output::Notify(Notification {
                    content: Content::Answer { answer, .. }, recipients, critical, ..
                }) => Some((recipients.into_iter().map(|(_, c)| c.name).collect(), answer, critical)),
                _ => None,
            })
            .collect()
    };
    // The facility cannot take the child: the coordinator hears at once (quiet hours or not).
    e.handle(say("hospital", Answer::CannotAccept), t(10)).unwrap();
    assert_eq!(answers(&mut e), [(vec!["coord-431001".to_string()], Answer::CannotAccept, true)]);
    // Said again: nothing new, nobody told twice.
    e.handle(say("hospital", Answer::CannotAccept), t(20)).unwrap();
    assert!(answers(&mut e).is_empty());
    // The family leaves: the coordinator and the facility that will take the child.
    e.handle(say("family-a", Answer::Evacuating), t(30)).unwrap();
    assert_eq!(answers(&mut e), [(vec!["coord-431001".to_string(), "fac-a".to_string()], Answer::Evacuating, true)]);
    // Power secured: the coordinator, not urgent.
    e.handle(say("family-a", Answer::PowerSecured), t(40)).unwrap();
    assert_eq!(answers(&mut e), [(vec!["coord-431001".to_string()], Answer::PowerSecured, false)]);
    // A coordinator taking the home on is on the board, not a message.
    e.handle(say("coord-a", Answer::Handling), t(50)).unwrap();
    assert!(answers(&mut e).is_empty());
}
