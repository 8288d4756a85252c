//! A restart loses nothing the engine decided: after any sequence of inputs and timers, an
//! engine rebuilt from what the store would hold (each changed home's state, each alert's row
//! written by [`alerts_to_store`] through the service's filter [`StoredAlerts`], which writes only
//! what differs from the row, each incident) is the engine that wrote it. An alert changed
//! in place without its home being marked changed, or a state change nobody saves, fails here.

use super::*;
use proptest::prelude::*;

const HOMES: [(&str, &str); 8] = [
    ("a", "431001"),
    ("b", "431001"),
    ("c", "431001"),
    ("d", "431001"),
    ("e", "202011"),
    ("f", "202011"),
    ("g", "202011"),
    ("i", "202011"),
];

#[derive(Debug, Clone)]
enum Step {
    /// An event from a home; `late` ones are an hour old when they arrive (a spool replayed).
    Event(usize, EventKind, bool),
    /// Telemetry: mains, and the UPS's charge when on battery.
    Telemetry(usize, bool, f64),
    /// Every home reports at once (so that they can fall silent together).
    Everyone(bool),
    Offline(usize),
    Ack(usize, Role),
    Answer(usize, Answer),
    Clear(usize),
    Drill(usize),
    DeliveryFailed,
    Uplink(bool),
    /// Time passes, s.
    Wait(i64),
}

fn step() -> impl Strategy<Value = Step> {
    let home = 0..HOMES.len();
    let kind = prop_oneof![
        Just(EventKind::MainsLost),
        Just(EventKind::MainsRestored),
        Just(EventKind::BatteryLow),
        Just(EventKind::BatteryOk),
        Just(EventKind::VentilatorAlarm),
        Just(EventKind::VentilatorAlarmCleared),
        Just(EventKind::Spo2Low),
        Just(EventKind::AgentStarted),
    ];
    let role =
        prop_oneof![Just(Role::Family), Just(Role::Coordinator), Just(Role::Facility), Just(Role::SupportCentre)];
    let answer = prop_oneof![
        Just(Answer::Evacuating),
        Just(Answer::PowerSecured),
        Just(Answer::CanAccept),
        Just(Answer::CannotAccept)
    ];
    prop_oneof![
        4 => (home.clone(), kind, any::<bool>()).prop_map(|(h, k, late)| Step::Event(h, k, late)),
        3 => (home.clone(), any::<bool>(), 5.0..100.0f64).prop_map(|(h, m, c)| Step::Telemetry(h, m, c)),
        1 => any::<bool>().prop_map(Step::Everyone),
        1 => home.clone().prop_map(Step::Offline),
        2 => (home.clone(), role).prop_map(|(h, r)| Step::Ack(h, r)),
        1 => (home.clone(), answer).prop_map(|(h, a)| Step::Answer(h, a)),
        1 => home.clone().prop_map(Step::Clear),
        1 => home.prop_map(Step::Drill),
        1 => Just(Step::DeliveryFailed),
        1 => any::<bool>().prop_map(Step::Uplink),
        4 => prop_oneof![1i64..60, 60i64..900, 900i64..7200].prop_map(Step::Wait),
    ]
}

/// What the store would hold: the rows the service writes, as it writes them.
#[derive(Default)]
struct Stored {
    states: BTreeMap<HomeId, String>,
    alerts: BTreeMap<String, Alert>,
    incidents: BTreeMap<String, Incident>,
    /// The service's filter: only alerts that differ from their stored row are written.
    filter: StoredAlerts,
}

impl Stored {
    fn write(&mut self, outputs: &[Output], dirty: &[(HomeId, HomeState)]) {
        for a in self.filter.to_write(outputs, dirty) {
            self.alerts.insert(a.id.clone(), a);
        }
        self.filter.committed();
        for o in outputs {
            if let Output::Incident(i) = o {
                self.incidents.insert(i.id.clone(), i.clone());
            }
        }
        for (h, s) in dirty {
            self.states.insert(h.clone(), serde_json::to_string(s).unwrap());
        }
    }

    /// A new process, as `run::load_engine` builds it.
    fn load(&self, settings: &Settings) -> Engine {
        let mut e = Engine::new(settings.clone(), Policies::default());
        for (id, muni) in HOMES {
            e.upsert_home(plan(id, muni, 300.0));
        }
        for (h, s) in &self.states {
            e.restore_state(h.clone(), serde_json::from_str(s).unwrap());
        }
        let mut active: Vec<&Alert> = self.alerts.values().filter(|a| a.cleared_at.is_none()).collect();
        active.sort_by_key(|a| std::cmp::Reverse(a.raised_at));
        for a in active {
            e.restore_alert(a.clone());
        }
        for i in self.incidents.values() {
            e.restore_incident(i.clone());
        }
        e
    }
}

/// A home's state as the engine holds it, its alerts included, read back from JSON (serde_json
/// reads a float to within one unit in the last place: what was stored is compared, not that).
fn held(e: &Engine, home: &HomeId) -> serde_json::Value {
    let s = e.home_state(home).cloned().unwrap_or_default();
    serde_json::from_str(&serde_json::json!({ "state": s, "alerts": s.alerts }).to_string()).unwrap()
}

fn first_alert(e: &Engine, home: &HomeId) -> Option<String> {
    e.home_state(home).and_then(|s| s.alerts.values().next()).map(|a| a.id.clone())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 150, .. ProptestConfig::default() })]

    #[test]
    fn an_engine_rebuilt_from_what_it_stored_is_the_engine_that_stored_it(
        steps in proptest::collection::vec(step(), 1..80),
    ) {
        // Small thresholds, so that incidents and mass silences happen among eight homes.
        let settings = Settings {
            incident_min_homes: 2,
            mass_silence_min_homes: 3,
            ..Settings::default()
        };
        let mut e = Engine::new(settings.clone(), Policies::default());
        for (id, muni) in HOMES {
            e.upsert_home(plan(id, muni, 300.0));
        }
        let mut stored = Stored::default();
        let (mut now, mut seq) = (0i64, 0u64);
        let mut last_alert_note: Option<Notification> = None;
        e.set_uplink(true, t(0));
        for (n, s) in steps.into_iter().enumerate() {
            let id = |i: usize| h(HOMES[i].0);
            let _ = match s {
                Step::Event(i, kind, late) => {
                    seq += 1;
                    e.handle(Input::Event(id(i), event(seq, if late { now - 3600 } else { now }, kind)), t(now))
                }
                Step::Telemetry(i, mains, charge) => {
                    let mut tel = telemetry(now, mains);
                    tel.ups = Some(mamori_protocol::reading::UpsReading {
                        on_battery: Some(!mains),
                        battery_charge_pct: Some(charge),
                        ..Default::default()
                    });
                    e.handle(Input::Telemetry(id(i), tel), t(now))
                }
                Step::Everyone(mains) => {
                    for i in 0..HOMES.len() {
                        let _ = e.handle(Input::Telemetry(id(i), telemetry(now, mains)), t(now));
                    }
                    Ok(())
                }
                Step::Offline(i) => e.handle(
                    Input::Status(id(i), Status {
                        state: mamori_protocol::mqtt::ConnectionState::Offline,
                        since: None,
                        agent_version: None,
                        telemetry_interval_s: Some(10),
                        sources: vec![],
                        reason: None,
                    }),
                    t(now),
                ),
                Step::Ack(i, role) => match first_alert(&e, &id(i)) {
                    Some(alert_id) => e.handle(Input::Ack { alert_id, role, by: format!("{role:?}"), note: None }, t(now)),
                    None => Ok(()),
                },
                Step::Answer(i, answer) => match first_alert(&e, &id(i)) {
                    Some(alert_id) => e.handle(Input::Answer { alert_id, by: "someone".into(), answer }, t(now)),
                    None => Ok(()),
                },
                Step::Clear(i) => match first_alert(&e, &id(i)) {
                    Some(alert_id) => e.handle(Input::Clear { alert_id, by: "coord".into() }, t(now)),
                    None => Ok(()),
                },
                Step::Drill(i) => e.handle(Input::Drill { home: id(i), by: "coord".into() }, t(now)),
                Step::DeliveryFailed => match last_alert_note.take() {
                    Some(note) => match note.recipients.first() {
                        Some((role, c)) => e.handle(
                            Input::DeliveryFailed {
                                key: note.key.clone(),
                                alert_id: note.alert_id.clone(),
                                home: note.home.clone(),
                                role: *role,
                                name: c.name.clone(),
                                content: note.content.clone(),
                            },
                            t(now),
                        ),
                        None => Ok(()),
                    },
                    None => Ok(()),
                },
                Step::Uplink(up) => {
                    e.set_uplink(up, t(now));
                    Ok(())
                }
                Step::Wait(s) => {
                    now += s;
                    Ok(())
                }
            };
            e.poll(t(now));
            let outputs = e.take_outputs();
            for o in &outputs {
                if let Output::Notify(note) = o {
                    if matches!(note.content, Content::Alert { .. }) {
                        last_alert_note = Some(note.clone());
                    }
                }
            }
            let dirty = e.take_dirty();
            stored.write(&outputs, &dirty);

            let again = stored.load(&settings);
            for (home, _) in HOMES {
                let home = h(home);
                prop_assert_eq!(held(&again, &home), held(&e, &home), "home {} after step {}", home, n);
            }
            let open = |e: &Engine| e.incidents().map(|i| serde_json::to_value(i).unwrap()).collect::<Vec<_>>();
            prop_assert_eq!(open(&again), open(&e), "incidents after step {}", n);
        }
    }
}
