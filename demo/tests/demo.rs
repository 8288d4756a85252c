//! `mamori-demo`: the Quick start's first command, run to the end of its story.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use std::process::Command;

#[test]
fn the_demo_tells_its_story_and_exits_cleanly() {
    let out = Command::new(env!("CARGO_BIN_EXE_mamori-demo")).args(["--linger-s", "1"]).output().expect("run the demo");
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
fn the_demos_homes_file_is_valid() {
    let (text, path) = mamori_demo::demo_homes();
    let known = mamori_gateway::domain::homes::Known::default();
    let demo = mamori_gateway::domain::homes::HomesFile::parse(&text, &path, &known).expect("the demo's homes");
    assert_eq!(demo.homes.len(), 12);
}

/// The README's way in for a newcomer: `--attach` registers one more home and prints its
/// agent config; an agent run from it (here the demo's own `home`: the real agent beside the
/// simulated devices) is heard by the demo's gateway, and its outage pages its family.
#[test]
fn a_newcomers_own_agent_attaches_to_the_running_demo_and_its_outage_reaches_its_family() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    use std::time::Duration;

    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let devices = tempfile::tempdir().unwrap();
    let mut demo = Command::new(env!("CARGO_BIN_EXE_mamori-demo"))
        .args(["--linger-s", "0", "--attach"])
        .arg(devices.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the demo");
    let stdout = demo.stdout.take().unwrap();
    let _demo = Killed(demo);
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // One deadline for the whole test: the demo prints its story whatever happens to this home.
    #[allow(clippy::disallowed_methods)] // the test's own clock
    let until = std::time::Instant::now() + Duration::from_secs(120);
    let next = |what: &str| {
        #[allow(clippy::disallowed_methods)] // the test's own clock
        let left = until.saturating_duration_since(std::time::Instant::now());
        rx.recv_timeout(left).unwrap_or_else(|_| panic!("not within 120 s: {what}"))
    };
    let config = loop {
        if let Some(path) = next("the demo prints the attach config").strip_prefix("attach: ") {
            break std::path::PathBuf::from(path.trim());
        }
    };
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.contains("home_id = \"demo-home-01\"") && text.contains(&devices.path().display().to_string()),
        "{text}"
    );
    let mut home = Command::new(env!("CARGO_BIN_EXE_mamori-demo"))
        .args(["home", "--config"])
        .arg(&config)
        .arg("--dir")
        .arg(devices.path())
        .args(["--devices", "ups,oximeter,bridge"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the attached home");
    let mut stdin = home.stdin.take().unwrap();
    let _home = Killed(home);
    // The demo's own homes page their families too: wait for this home's family, by name.
    writeln!(stdin, "mains off").unwrap();
    stdin.flush().unwrap();
    loop {
        let line = next("the attached home's family is paged");
        if line.starts_with("── to home-01の家族 (Family)") {
            break;
        }
    }
}
