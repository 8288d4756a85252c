//! Nothing a home can send makes the engine panic: arbitrary numbers, times and ids through
//! the contract's decoder (what the gateway really accepts), then the engine, then its timers,
//! at arbitrary arrival times.

use super::*;
use proptest::prelude::*;

fn number() -> impl Strategy<Value = serde_json::Value> {
    let wild = prop_oneof![
        Just(serde_json::json!(0)),
        Just(serde_json::json!(-1)),
        Just(serde_json::json!(65535)),
        Just(serde_json::json!(u64::MAX)),
        Just(serde_json::json!(i64::MIN)),
        Just(serde_json::json!(1e308)),
        Just(serde_json::json!(-1e308)),
        Just(serde_json::json!(1e-300)),
        Just(serde_json::Value::Null),
        any::<i32>().prop_map(|n| serde_json::json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| serde_json::json!(f)),
    ];
    prop_oneof![3 => (0u32..100_000).prop_map(|n| serde_json::json!(n)), 1 => wild]
}

fn time() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0001-01-01T00:00:00Z".to_string()),
        Just("9999-12-31T23:59:59.999+14:00".to_string()),
        Just("1970-01-01T00:00:00-12:00".to_string()),
        (-400_000_000i64..400_000_000i64).prop_map(|s| t(s).to_rfc3339()),
    ]
}

/// Uptimes: mostly ones the contract accepts, from 0 to its limit, sometimes any.
fn uptime() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0..=mamori_protocol::mqtt::MAX_UPTIME_MS,
        1 => Just(mamori_protocol::mqtt::MAX_UPTIME_MS),
        1 => any::<u64>(),
    ]
}

fn telemetry_json() -> impl Strategy<Value = Vec<u8>> {
    (time(), prop_oneof![1u32..100_000, any::<u32>()], proptest::option::of(any::<bool>()), proptest::collection::vec(number(), 8), uptime(), any::<bool>())
        .prop_map(|(ts, interval, mains, n, uptime, kept)| {
            serde_json::to_vec(&serde_json::json!({
                "ts": ts, "interval_s": interval, "mains_present": mains, "kept": kept,
                "ups": {"on_battery": mains.map(|m| !m), "battery_charge_pct": n[0], "runtime_s": n[1], "load_pct": n[2],
                        "battery_voltage_v": n[3], "input_voltage_v": n[4]},
                "power_meter": {"battery_voltage_v": n[5], "current_a": n[6], "power_w": n[7]},
                "oximeter": {"spo2_pct": 50, "pulse_bpm": 200},
                "conditions": {"mains_lost": false, "spo2_low": true},
                "clock": {"boot": "b", "uptime_ms": uptime},
            }))
            .unwrap()
        })
}

fn event_json() -> impl Strategy<Value = Vec<u8>> {
    let kinds = prop_oneof![
        Just("mains_lost"),
        Just("mains_restored"),
        Just("battery_low"),
        Just("spo2_low"),
        Just("device_lost"),
        Just("agent_started"),
        Just("ventilator_alarm"),
        Just("something_new"),
    ];
    (1u64..u64::MAX, time(), kinds, number(), uptime(), proptest::option::of(any::<bool>())).prop_map(
        |(seq, ts, kind, runtime, uptime, synced)| {
            serde_json::to_vec(&serde_json::json!({
                "id": format!("b-{seq}"), "seq": seq, "ts": ts, "kind": kind, "severity": "critical",
                "data": {"runtime_s": runtime}, "clock": {"boot": "b", "uptime_ms": uptime, "synced": synced},
            }))
            .unwrap()
        },
    )
}

#[derive(Debug, Clone)]
enum Msg {
    Telemetry(Vec<u8>),
    Event(Vec<u8>),
    Status(u32, bool),
}

fn msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        telemetry_json().prop_map(Msg::Telemetry),
        event_json().prop_map(Msg::Event),
        (any::<u32>(), any::<bool>()).prop_map(|(i, online)| Msg::Status(i, online)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

    #[test]
    fn nothing_a_home_sends_makes_the_engine_panic(
        msgs in proptest::collection::vec((msg(), -100_000i64..100_000_000i64), 1..30),
        uplink_flaps in proptest::collection::vec(any::<bool>(), 0..4),
    ) {
        let mut e = engine(&[plan("a", "431001", 1e300), plan("b", "431001", -5.0), plan("c", "202011", 0.0)]);
        for (k, up) in uplink_flaps.iter().enumerate() {
            e.set_uplink(*up, t(k as i64));
        }
        let (mut decoded, n) = (0, msgs.len());
        for (i, (m, at)) in msgs.into_iter().enumerate() {
            let home = h(["a", "b", "c"][i % 3]);
            let input = match m {
                Msg::Telemetry(b) => mamori_protocol::mqtt::decode::<Telemetry>(&b).ok().map(|t| Input::Telemetry(home, t)),
                Msg::Event(b) => mamori_protocol::mqtt::decode::<Event>(&b).ok().map(|ev| Input::Event(home, ev)),
                Msg::Status(interval, online) => Some(Input::Status(home, Status {
                    state: if online { mamori_protocol::mqtt::ConnectionState::Online } else { mamori_protocol::mqtt::ConnectionState::Offline },
                    since: None, agent_version: None, telemetry_interval_s: Some(interval), sources: vec![], reason: None,
                })),
            };
            if let Some(input) = input {
                decoded += 1;
                let _ = e.handle(input, t(at));
            }
            e.poll(t(at));
            let _ = e.next_deadline(t(at));
            let _ = e.take_outputs();
            let _ = e.take_dirty();
        }
        e.poll(t(200_000_000));
        // Many inputs are ones the contract accepts (else this would test the decoder only).
        prop_assert!(n < 10 || decoded * 5 >= n, "{decoded} of {n} decoded");
    }
}
