//! The service driven by hand: inputs and the time, no socket.

use super::*;

#[test]
fn a_wall_clock_set_back_never_holds_up_what_waits_for_time_to_pass() {
    let t = |ms: i64| chrono::DateTime::from_timestamp_millis(1_790_000_000_000 + ms).unwrap();
    assert!(!passed(t(50), t(0), 100));
    assert!(passed(t(100), t(0), 100));
    assert_eq!(when_passed(t(50), t(0), 100), t(100));
    // Set back an hour: at once, not an hour later.
    assert!(passed(t(-3_600_000), t(0), 100));
    assert_eq!(when_passed(t(-3_600_000), t(0), 100), t(-3_600_000));
    assert!(passed(t(0), Time::MIN_UTC, 100), "never done yet");
}

/// One home, its family on a webhook (never called here: a send is an effect), the
/// coordinator after ten minutes.
fn driven_service(dir: &std::path::Path) -> Service {
    std::fs::write(
        dir.join("homes.toml"),
        r#"
[[home]]
id = "h1"
municipality = "431001"
label = "K-01"
contacts = [
  { role = "family", name = "家族", channels = [{ webhook = "family" }] },
  { role = "coordinator", name = "Sato", channels = [{ webhook = "coord" }] },
]
"#,
    )
    .unwrap();
    let text = r#"
data_dir = "data"
homes_file = "homes.toml"
public_url = "http://127.0.0.1:8080"
link_secret = { value = "a-test-secret-long-enough" }
[broker]
host = "127.0.0.1"
port = 1883
[policy.default]
steps = [
  { tier = "T0", roles = ["family"], repeat_every_s = 300, repeats = 1, escalate_after_s = 600 },
  { tier = "T1", roles = ["coordinator"] },
]
[endpoints.family]
url = "http://127.0.0.1:9/family"
secret = { value = "hook-secret" }
[endpoints.coord]
url = "http://127.0.0.1:9/coord"
secret = { value = "hook-secret" }
"#;
    let config = Config::parse(text, &dir.join("gateway.toml")).unwrap();
    drop(open_store(&config).unwrap()); // `init`
    let (console, _) = mpsc::channel(8);
    Service::new(config, console).unwrap()
}

fn at(s: i64) -> Time {
    chrono::DateTime::from_timestamp(1_790_000_000 + s, 0).unwrap()
}

/// The sends asked for, as (recipient, key).
fn sends(effects: &[Effect]) -> Vec<(String, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { row, .. } => Some((row.recipient.clone(), row.key.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn the_service_runs_on_inputs_and_the_time_it_is_given_with_no_socket() {
    let dir = tempfile::tempdir().unwrap();
    let mut svc = driven_service(dir.path());
    let up = ServiceInput::Broker(vec![FromMqtt::Connected { session_present: false }]);
    assert!(sends(&svc.handle(up, at(0)).unwrap()).is_empty());

    // An outage: stored, then acknowledged to the broker, and the family asked for at once.
    let body =
        format!(r#"{{"id":"boot-1","seq":1,"ts":"{}","kind":"mains_lost","severity":"critical"}}"#, at(1).to_rfc3339());
    let message = Publish::new("mamori/v1/h1/event", QoS::AtLeastOnce, body.into_bytes());
    let fx = svc.handle(ServiceInput::Broker(vec![FromMqtt::Message(message)]), at(1)).unwrap();
    assert!(svc.store.has_messages().unwrap(), "stored");
    assert!(fx.iter().any(|e| matches!(e, Effect::Broker(Outbound::Ack(p)) if p.topic == "mamori/v1/h1/event")));
    let first = sends(&fx);
    assert_eq!(first.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>(), ["家族"]);

    // Nothing is sent twice while its result is out, and the result closes it.
    assert!(sends(&svc.handle(ServiceInput::Timer, at(2)).unwrap()).is_empty());
    let row = svc.store.due(at(400), 10, &[]).unwrap().into_iter().find(|r| r.key == first[0].1).unwrap();
    svc.handle(ServiceInput::Results(vec![(row, Ok(()))]), at(3)).unwrap();
    assert!(svc.store.due(at(400), 10, &[]).unwrap().iter().all(|r| r.key != first[0].1), "recorded as delivered");

    // The repeat on time, not before; then the coordinator.
    assert!(svc.next_deadline(at(3)) <= at(4), "the housekeeping second at the latest");
    assert!(sends(&svc.handle(ServiceInput::Timer, at(300)).unwrap()).is_empty());
    let repeat = sends(&svc.handle(ServiceInput::Timer, at(302)).unwrap());
    assert_eq!(repeat.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>(), ["家族"]);
    assert_ne!(repeat[0].1, first[0].1, "a repeat is a message of its own");
    assert!(sends(&svc.handle(ServiceInput::Timer, at(600)).unwrap()).iter().all(|(r, _)| r != "Sato"));
    let coordinator = sends(&svc.handle(ServiceInput::Timer, at(602)).unwrap());
    assert!(coordinator.iter().any(|(r, _)| r == "Sato"), "{coordinator:?}");
}

#[test]
fn the_engine_gets_the_privacy_settings_and_the_local_offset_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"
data_dir = "data"
public_url = "http://127.0.0.1:8080"
link_secret = { value = "a-test-secret-long-enough" }
utc_offset = "+09:00"
[broker]
host = "127.0.0.1"
port = 1883
[privacy]
require_consent = true
"#;
    let config = Config::parse(text, &dir.path().join("gateway.toml")).unwrap();
    let store = open_store(&config).unwrap();
    let engine = load_engine(&config, store.as_ref()).unwrap();
    assert!(engine.require_consent());
    assert_eq!(engine.settings().local_offset_s, 9 * 3600);
    // 15:00 UTC is the next day in Japan: the day a consent is read against.
    let at = chrono::DateTime::parse_from_rfc3339("2026-11-30T15:00:00Z").unwrap().with_timezone(&chrono::Utc);
    assert_eq!(engine.today(at), chrono::NaiveDate::from_ymd_opt(2026, 12, 1).unwrap());
}
