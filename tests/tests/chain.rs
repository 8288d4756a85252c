//! End-to-end scenarios: the whole chain the way it will fail in a real disaster. Every part is
//! real (see [`mamori_tests::chain`]): the generated TLS broker config, provisioned homes, agent
//! processes reading simulated devices on pseudo-terminals, the gateway process with its SQLite
//! store, and a webhook receiver for the phones. Waits are for conditions, with deadlines.
//!
//! Times are scaled for CI: agents send telemetry every second, so "silent" comes after 3 s
//! (3 missed periods) instead of 3 minutes; escalation delays are seconds, not minutes.
#![allow(clippy::disallowed_methods)] // the scenarios time what they cause with their own clock
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use mamori_tests::chain::{Bins, Chain, Options};
use mamori_tests::webhook::Delivery;

const LIMIT: Duration = Duration::from_secs(30);

fn bins() -> Bins {
    Bins {
        agent: PathBuf::from(env!("CARGO_BIN_EXE_e2e-agent")),
        gateway: PathBuf::from(env!("CARGO_BIN_EXE_e2e-gateway")),
    }
}

fn policy(steps: &str) -> String {
    format!("[policy.default]\nsteps = [\n{steps}\n]\n")
}

fn homes(ids: &[(&str, &str)]) -> Vec<(String, String)> {
    ids.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

/// Accepted deliveries per idempotency key: each (alert, step, recipient) at most once.
fn assert_no_duplicates(c: &Chain) {
    let mut n: BTreeMap<String, usize> = BTreeMap::new();
    for (_, key, _) in c.delivered() {
        *n.entry(key).or_default() += 1;
    }
    let dup: Vec<_> = n.iter().filter(|(_, v)| **v > 1).collect();
    assert!(dup.is_empty(), "delivered more than once: {dup:?}");
}

/// The alert kind a delivery is about ("" for digests).
fn kind(d: &Delivery) -> &str {
    d.body["content"]["kind"].as_str().unwrap_or_default()
}

/// 1. Mains fails in a home: the coordinator's webhook receives the notification.
#[test]
fn mains_failure_reaches_the_coordinator() -> Result<()> {
    let o =
        Options { policy: policy("{ tier = \"T0\", roles = [\"family\", \"coordinator\"] }"), ..Options::default() };
    let mut c = Chain::start(&bins(), &o)?;
    let cut = Instant::now();
    c.sim("home-a", "mains off")?;
    let d = c.hook.wait("the coordinator", LIMIT, |d| d.iter().any(|x| x.path == "/coord" && x.accepted))?;
    let got = d.iter().find(|x| x.path == "/coord").unwrap();
    assert!(got.signature_ok);
    assert_eq!(got.body["home"], "home-a");
    let text = got.body["text"].as_str().unwrap_or_default();
    assert!(text.contains("停電") || text.contains("mains"), "{text}");
    eprintln!("mains off → coordinator's webhook: {:?}", got.at.duration_since(cut));
    assert_no_duplicates(&c);
    Ok(())
}

/// 3. The gateway is killed with SIGKILL mid-escalation and restarted: the escalation
/// continues at the right time, and nothing is sent twice.
#[test]
fn a_gateway_killed_mid_escalation_resumes_on_time() -> Result<()> {
    let o = Options {
        policy: policy(
            "{ tier = \"T0\", roles = [\"family\"], escalate_after_s = 8 },\n{ tier = \"T1\", roles = [\"coordinator\"] },",
        ),
        ..Options::default()
    };
    let mut c = Chain::start(&bins(), &o)?;
    c.sim("home-a", "mains off")?;
    let d = c.hook.wait("the family", LIMIT, |d| d.iter().any(|x| x.path == "/family" && x.accepted))?;
    let family_at = d.iter().find(|x| x.path == "/family").unwrap().at;
    c.gateway.as_mut().unwrap().kill9()?;
    c.start_gateway()?;
    let d = c.hook.wait("the coordinator", LIMIT, |d| d.iter().any(|x| x.path == "/coord" && x.accepted))?;
    let coord_at = d.iter().find(|x| x.path == "/coord").unwrap().at;
    let waited = coord_at.duration_since(family_at);
    // The policy's 8 s from the family's notification (the stored timer, not a new one).
    assert!(waited >= Duration::from_secs(7), "escalated after {waited:?}, before the policy allows");
    assert!(waited < Duration::from_secs(20), "escalated after {waited:?}: the timer was re-armed or lost");
    assert_no_duplicates(&c);
    Ok(())
}

/// 8. A home goes silent while on battery: a "state unknown" alert with the last known forecast.
#[test]
fn a_home_silent_on_battery_raises_state_unknown_with_the_last_forecast() -> Result<()> {
    let o = Options {
        policy: format!(
            "{}[policy.state_unknown]\nsteps = [{{ tier = \"T1\", roles = [\"family\", \"coordinator\"] }}]\n",
            policy("{ tier = \"T0\", roles = [\"family\"] },")
        ),
        ..Options::default()
    };
    let mut c = Chain::start(&bins(), &o)?;
    c.sim("home-a", "mains off")?;
    c.hook.wait("the family", LIMIT, |d| d.iter().any(|x| x.path == "/family" && kind(x) == "mains_lost"))?;
    c.home("home-a")?.link.cut();
    let d = c.hook.wait("state unknown to the coordinator", LIMIT, |d| {
        d.iter().any(|x| x.path == "/coord" && x.accepted && x.body["content"]["kind"] == "state_unknown")
    })?;
    let got = d.iter().find(|x| x.path == "/coord" && x.body["content"]["kind"] == "state_unknown").unwrap();
    let content = &got.body["content"];
    assert_eq!(content["silent"], true, "{content}");
    assert!(content["time_left_s"].as_i64().is_some_and(|s| s > 0), "the last known forecast: {content}");
    assert!(!content["forecast"].is_null(), "{content}");
    assert_no_duplicates(&c);
    Ok(())
}
