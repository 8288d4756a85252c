//! Every example in `docs/mqtt.md` parses with the contract's types (and every counter-example
//! is rejected), so the document and the code cannot drift apart.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use mamori_protocol::mqtt::{self, Ack, Event, Status, Telemetry};

const DOC: &str = include_str!("../../docs/mqtt.md");

fn blocks() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = DOC.lines();
    while let Some(line) = lines.next() {
        if let Some(tag) = line.strip_prefix("```json ") {
            let body: Vec<&str> = lines.by_ref().take_while(|l| !l.starts_with("```")).collect();
            out.push((tag.trim().to_string(), body.join("\n")));
        }
    }
    out
}

#[test]
fn every_example_parses() {
    let blocks = blocks();
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for (tag, body) in &blocks {
        let b = body.as_bytes();
        let result = match tag.as_str() {
            "status" => mqtt::decode::<Status>(b).map(drop),
            "telemetry" => mqtt::decode::<Telemetry>(b).map(drop),
            "event" => mqtt::decode::<Event>(b).map(|e| assert_ne!(e.kind, mqtt::EventKind::Unknown, "{body}")),
            "ack" => mqtt::decode::<Ack>(b).map(drop),
            "invalid-event" => {
                assert!(mqtt::decode::<Event>(b).is_err(), "accepted: {body}");
                Ok(())
            }
            other => panic!("unknown example tag {other}"),
        };
        result.unwrap_or_else(|e| panic!("{tag} example does not parse: {e}\n{body}"));
        *seen.entry(tag.clone()).or_default() += 1;
    }
    for tag in ["status", "telemetry", "event", "ack", "invalid-event"] {
        assert!(seen.get(tag).copied().unwrap_or(0) > 0, "no {tag} example in docs/mqtt.md");
    }
}

#[test]
fn the_last_will_example_is_what_the_agent_registers() {
    let lw =
        blocks().into_iter().find(|(t, b)| t == "status" && b.contains("offline") && !b.contains("since")).unwrap();
    assert_eq!(lw.1.trim().as_bytes(), mqtt::encode(&Status::last_will()).as_slice());
}

#[test]
fn every_event_kind_is_documented() {
    for kind in mqtt::EventKind::ALL {
        assert!(DOC.contains(&format!("| `{}` |", kind.as_str())), "{} missing from the kinds table", kind.as_str());
    }
}
