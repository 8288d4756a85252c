//! `mamori-gateway demo`: the Quick start's first command, run to the end of its story.

use std::process::Command;

#[test]
fn the_demo_tells_its_story_and_exits_cleanly() {
    let out = Command::new(env!("CARGO_BIN_EXE_mamori-gateway"))
        .args(["demo", "--linger-s", "1"])
        .output()
        .expect("run the demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exit {:?}\n{text}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    for expected in [
        "広域停電（熊本市）",               // one regional incident for Kumamoto's coordinator, by name
        "停電中に通信が途絶え、状況不明",   // K-04 silent during the outage
        "消音されました",                   // the bedside-silenced oximeter alarm still escalates
        "人工呼吸器のアラーム",             // the ventilator alarm contact
        "【mamori・至急】K-03",             // the small battery crossed into T3
        "→ 200 OK",                         // the coordinator's acknowledgement through the signed link
        "広域停電（熊本市）が終わりました", // power back: the incident closes
        "the story is over",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in the demo's output:\n{text}");
    }
    // Each reader's messages carry that reader's request, never another's (what a newcomer
    // reads first is the demo's output).
    let mut checked = 0;
    for block in text.split("── to ").skip(1) {
        let (head, body) = block.split_once('\n').unwrap_or((block, ""));
        let body = body.split("\n\n").next().unwrap_or("");
        let foreign: &[&str] = if head.contains("(Family)") {
            &["受け入れの準備", "を調整してください", "ご家族に連絡", "ご家族に電話", "市町村と連携"]
        } else if head.contains("(Facility)") {
            &["119番", "を調整してください", "ご家族に連絡", "移動の準備をしてください（"]
        } else if head.contains("(Coordinator)") {
            &["119番", "受け入れの準備をしてください", "移動の準備をしてください（"]
        } else {
            &[]
        };
        for phrase in foreign {
            assert!(!body.contains(phrase), "{head} was sent another reader's task ({phrase}):\n{body}");
        }
        checked += 1;
    }
    assert!(checked > 20, "{checked} messages in the demo's output");
}

#[test]
fn the_shipped_example_configs_are_valid() {
    use std::path::Path;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/gateway");
    let config = mamori_gateway::config::Config::load(&dir.join("gateway.toml")).expect("gateway.toml");
    let homes = mamori_gateway::homes::HomesFile::load(&dir.join("homes.toml"), &config.known()).expect("homes.toml");
    assert_eq!(homes.homes.len(), 1);
    let yaml = mamori_gateway::homes::HomesFile::load(&dir.join("homes.yaml"), &config.known()).expect("homes.yaml");
    assert_eq!(yaml.homes, homes.homes, "homes.yaml says what homes.toml says");
    let (text, path) = mamori_gateway::demo::demo_homes();
    let known = mamori_gateway::homes::Known::default();
    let demo = mamori_gateway::homes::HomesFile::parse(&text, &path, &known).expect("the demo's homes");
    assert_eq!(demo.homes.len(), 12);
}

#[test]
fn the_shipped_mosquitto_config_and_acl_are_what_pki_init_generates() {
    use std::path::Path;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mosquitto");
    let lines = |text: &str| -> Vec<String> {
        text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).map(str::to_string).collect()
    };
    let shipped = std::fs::read_to_string(dir.join("mosquitto.conf")).expect("mosquitto.conf");
    let generated = format!(
        "{}{}",
        mamori_gateway::pki::mosquitto_listener(8883, "0.0.0.0", Path::new("/etc/mamori/pki")),
        mamori_gateway::pki::mosquitto_service(Path::new("/var/lib/mosquitto"))
    );
    assert_eq!(lines(&shipped), lines(&generated));
    let acl = std::fs::read_to_string(dir.join("acl")).expect("acl");
    assert_eq!(lines(&acl), lines(&mamori_gateway::pki::acl()));
}
