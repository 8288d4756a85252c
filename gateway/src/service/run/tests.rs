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
    service_with_family_at(dir, "http://127.0.0.1:9/family")
}

fn service_with_family_at(dir: &std::path::Path, family_url: &str) -> Service {
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
url = "FAMILY_URL"
secret = { value = "hook-secret" }
[endpoints.coord]
url = "http://127.0.0.1:9/coord"
secret = { value = "hook-secret" }
"#
    .replace("FAMILY_URL", family_url);
    let config = Config::parse(&text, &dir.join("gateway.toml")).unwrap();
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
    let up = ServiceInput::Broker(vec![
        FromMqtt::Connected { session_present: false },
        FromMqtt::Subscribed { refused: vec![] },
    ]);
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

/// Connected is not up: the link is up for the service once the broker has taken the
/// subscriptions silence is judged from (status, telemetry). A refused event filter (a NATS
/// node whose JetStream was not ready) leaves silence judged (the telemetry still comes, and
/// raises what its conditions say holds) but the gateway unhealthy; a refused telemetry filter
/// means the homes' silence cannot be told from the gateway's, so it is not judged.
#[test]
fn a_subscription_the_broker_refused_keeps_the_gateway_unhealthy_until_it_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let mut svc = driven_service(dir.path());
    let link = |items| ServiceInput::Broker(items);
    let connected = |session_present| FromMqtt::Connected { session_present };
    let refused = |filters: &[&str]| FromMqtt::Subscribed { refused: filters.iter().map(|f| f.to_string()).collect() };
    svc.handle(link(vec![connected(false), refused(&[])]), at(0)).unwrap();
    assert!(svc.engine.uplink());
    // The connection drops; the next one's event subscription is refused.
    svc.handle(link(vec![FromMqtt::Disconnected]), at(1)).unwrap();
    svc.handle(link(vec![connected(true)]), at(2)).unwrap();
    assert!(!svc.engine.uplink(), "up before the broker answered the subscription");
    svc.handle(link(vec![refused(&["mamori/v1/+/event"])]), at(3)).unwrap();
    assert!(svc.engine.uplink(), "silence not judged though the telemetry comes");
    assert_eq!(svc.health().broker_down_since(), Some(at(1)), "healthy with a subscription refused");
    let problems = svc.health().problems(at(40));
    assert!(
        problems.len() == 1 && problems[0].contains("refuses the subscription to mamori/v1/+/event"),
        "the health line names what is refused, not a lost connection: {problems:?}"
    );
    // The telemetry refused: silence not judged.
    svc.handle(link(vec![refused(&["mamori/v1/+/telemetry"])]), at(4)).unwrap();
    assert!(!svc.engine.uplink(), "silence judged without the telemetry");
    svc.handle(link(vec![refused(&[])]), at(5)).unwrap();
    assert!(svc.engine.uplink());
    assert_eq!(svc.health().broker_down_since(), None);
    assert!(svc.health().problems(at(40)).is_empty());
    // A connection lost after a refusal is told as a lost connection.
    svc.handle(link(vec![refused(&["mamori/v1/+/event"])]), at(41)).unwrap();
    svc.handle(link(vec![FromMqtt::Disconnected]), at(42)).unwrap();
    let problems = svc.health().problems(at(80));
    assert!(problems.len() == 1 && problems[0].starts_with("no broker connection since"), "{problems:?}");
    // A refusal is timed from its own start, not from a disconnection before it.
    svc.handle(link(vec![connected(true)]), at(81)).unwrap();
    svc.handle(link(vec![refused(&["mamori/v1/+/event"])]), at(100)).unwrap();
    assert!(svc.health().problems(at(110)).is_empty(), "a refusal 10 s old is not yet a problem");
    let problems = svc.health().problems(at(131));
    assert!(problems.len() == 1 && problems[0].contains("refuses the subscription"), "{problems:?}");
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

/// A webhook endpoint on a free port: it answers each request with `status`, holding each one
/// until `hold_until_in_flight` requests are open at once (or every expected one has come),
/// and counts requests and the most open at once.
struct Endpoint {
    url: String,
    /// The number of requests so far, to read or wait on.
    seen: watch::Receiver<usize>,
    most_at_once: Arc<std::sync::atomic::AtomicUsize>,
}

async fn endpoint(status: u16, hold_until_in_flight: usize, expected: usize) -> Endpoint {
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/family", listener.local_addr().unwrap());
    let most_at_once = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let (changed, _) = watch::channel(());
    let changed = Arc::new(changed);
    let (seen_tx, seen) = watch::channel(0usize);
    let seen_tx = Arc::new(seen_tx);
    let m = most_at_once.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let (m, open, changed, seen_tx) = (m.clone(), open.clone(), changed.clone(), seen_tx.clone());
            tokio::spawn(async move {
                // The request: its head, then its body by Content-Length.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let now_open = open.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now_open, Ordering::SeqCst);
                seen_tx.send_modify(|n| *n += 1);
                changed.send_replace(());
                let mut rx = changed.subscribe();
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    while open.load(Ordering::SeqCst) < hold_until_in_flight && *seen_tx.borrow() < expected {
                        let _ = rx.changed().await;
                    }
                })
                .await;
                let reply = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                let _ = sock.write_all(reply.as_bytes()).await;
                open.fetch_sub(1, Ordering::SeqCst);
                changed.send_replace(());
            });
        }
    });
    Endpoint { url, seen, most_at_once }
}

fn family_row(key: &str) -> OutboxRow {
    OutboxRow { channel: ChannelRef::Webhook("family".into()), ..crate::edge::store::contract::row(key, 0) }
}

type Results = mpsc::Receiver<(OutboxRow, Result<(), Failure>)>;

/// Hand `rows` to the runner's lanes as the dispatcher would, nobody reading the results.
fn hand_out(svc: &Service, lanes: &mut Lanes, rows: &[(&str, bool)], capacity: usize) -> Results {
    let (tx, rx) = mpsc::channel(capacity);
    for (key, probe) in rows {
        let lane = lanes.lane("webhook:family".into());
        let ctx = (svc.sender.clone(), tx.clone(), None);
        let (all, failures) = (lanes.all.clone(), lanes.breaker_failures);
        tokio::spawn(send_one(family_row(key), String::new(), *probe, lane, all, failures, ctx));
    }
    rx
}

#[tokio::test]
async fn a_destination_sends_back_to_back_within_its_slots_whatever_the_service_is_doing() {
    let mut hook = endpoint(200, 2, 6).await;
    let dir = tempfile::tempdir().unwrap();
    let svc = service_with_family_at(dir.path(), &hook.url);
    let mut lanes = Lanes::new(8, 2, 3);
    let keys = ["k1", "k2", "k3", "k4", "k5", "k6"].map(|k| (k, false));
    // The service is busy (its results are not read, in a channel with room for one): the
    // slots are given back as each attempt ends, so all six go, two at a time.
    let mut results = hand_out(&svc, &mut lanes, &keys, 1);
    // The endpoint has all six before anything reads a result.
    let all_sent = tokio::time::timeout(Duration::from_secs(20), hook.seen.wait_for(|n| *n >= 6)).await.is_ok();
    assert!(all_sent, "only {} of 6 sent while the results waited", *hook.seen.borrow());
    let mut rx_closed = false;
    let mut got = Vec::new();
    while got.len() < 6 && !rx_closed {
        match tokio::time::timeout(Duration::from_secs(10), results.recv()).await {
            Ok(Some((row, r))) => got.push((row.key, r.is_ok())),
            _ => rx_closed = true,
        }
    }
    assert_eq!(got.len(), 6, "{got:?}");
    assert!(got.iter().all(|(_, ok)| *ok), "{got:?}");
    assert_eq!(hook.most_at_once.load(Ordering::SeqCst), 2, "two slots for the destination, both used");
}

#[tokio::test]
async fn rows_waiting_for_a_destination_that_just_failed_are_not_sent_but_its_probe_is() {
    let hook = endpoint(503, 1, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let svc = service_with_family_at(dir.path(), &hook.url);
    // One slot, the breaker after two failures in a row: k1 and k2 fail at the endpoint, k3
    // and k4 waited behind them and are failed at once, the probe goes.
    let mut lanes = Lanes::new(8, 1, 2);
    let mut results = hand_out(&svc, &mut lanes, &[("k1", false), ("k2", false), ("k3", false), ("k4", false)], 8);
    let mut got = BTreeMap::new();
    while got.len() < 4 {
        let (row, r) = tokio::time::timeout(Duration::from_secs(20), results.recv()).await.unwrap().unwrap();
        got.insert(row.key, r.unwrap_err());
    }
    assert_eq!(*hook.seen.borrow(), 2, "{got:?}");
    for k in ["k3", "k4"] {
        assert!(got[k].destination && got[k].text.contains("not tried, it failed 2 times in a row"), "{got:?}");
    }
    let mut probe = hand_out(&svc, &mut lanes, &[("k5", true)], 1);
    let (_, r) = tokio::time::timeout(Duration::from_secs(20), probe.recv()).await.unwrap().unwrap();
    assert!(r.unwrap_err().text.contains("503"), "the probe was sent");
    assert_eq!(*hook.seen.borrow(), 3);
}
