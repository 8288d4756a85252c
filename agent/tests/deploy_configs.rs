//! Every shipped example config under `deploy/agent/` parses and validates, and a bad config
//! fails at start with the file, the key and what was expected.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use std::path::Path;
use std::process::Command;

use mamori_agent::config::Config;

#[test]
fn every_example_config_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(!c.home_id.is_empty());
            n += 1;
        }
    }
    assert!(n >= 4, "only {n} example configs");
}

#[test]
fn a_bad_config_fails_at_start_with_file_key_and_expectation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    let good =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent/demo-simulated.toml"))
            .unwrap();
    for (bad, expect) in [
        (
            good.replace("port = \"/tmp/mamori-sim/ups\"", "port = \"/tmp/mamori-sim/ups\"\npoll_interval_ms = 10"),
            "key `ups[0].poll_interval_ms`: expected between 50 and 60000",
        ),
        (good.replace("[broker]", "[broker]\ntls_please = true"), "unknown field `tls_please`"),
        (good.replace("host = \"127.0.0.1\"", "host = \"mqtt.example.jp\""), "key `broker.tls`"),
        (good.replace("home_id = \"demo-home-01\"", "home_id = \"Tanaka Hanako\""), "key `home_id`"),
    ] {
        std::fs::write(&path, bad).unwrap();
        for verb in ["run", "probe"] {
            let out =
                Command::new(env!("CARGO_BIN_EXE_mamori-agent")).args([verb, "--config"]).arg(&path).output().unwrap();
            assert_eq!(out.status.code(), Some(2), "{verb}: {out:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(err.contains(expect), "{verb}: expected `{expect}` in: {err}");
        }
    }
    let out = Command::new(env!("CARGO_BIN_EXE_mamori-agent"))
        .args(["run", "--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/agent.toml: cannot read"));
}
