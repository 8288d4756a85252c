//! Where the gateway's output is the agent's input: the one-file bundle that `homes provision`
//! writes must be a config the agent accepts, and the agent must refuse it once others can
//! read its private key. (Here, not in either crate, so that neither crate's tests build the
//! other.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use mamori_agent::config::Config;
use mamori_gateway::admin::pki;
use mamori_protocol::mqtt::HomeId;

fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp(1_790_000_000, 0).unwrap()
}

#[test]
fn the_bundle_is_an_agent_config_the_agent_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::Pki::init(dir.path(), &["mqtt.example.lg.jp".into()], now()).unwrap();
    let home = HomeId::new("k-01").unwrap();
    let (issued, password) = pki.provision(&home, now()).unwrap();
    let ca = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
    let text = pki::agent_bundle(
        &home,
        "mqtt.example.lg.jp",
        8883,
        &["mqtt2.example.lg.jp:8883".into()],
        &ca,
        &issued,
        &password,
    );
    let path = dir.path().join("k-01.toml");
    // Without devices the agent says what is missing; the installer adds them.
    pki::write_bundle(&path, &text).unwrap();
    let e = Config::load(&path).unwrap_err().to_string();
    assert!(e.contains("at least one source"), "{e}");
    let installed = format!("{text}\n[[ups]]\nid = \"ups\"\nprotocol = \"megatec\"\nport = \"/dev/ttyUSB0\"\n");
    pki::write_bundle(&path, &installed).unwrap();
    let c = Config::load(&path).unwrap();
    assert_eq!(c.home_id, "k-01");
    assert_eq!(c.broker.failover, ["mqtt2.example.lg.jp:8883"]);
    let tls = c.broker.tls.unwrap();
    assert_eq!(tls.ca().unwrap(), ca.into_bytes());
    assert_eq!(tls.client_key_pem.as_deref(), Some(issued.key_pem.as_str()));
    // Readable by others: the agent refuses it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Config::load(&path).unwrap_err().to_string();
    assert!(e.contains("client_key_pem") && e.contains("600"), "{e}");
}
