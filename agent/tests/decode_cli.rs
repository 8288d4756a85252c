//! `mamori-agent decode` as an installer runs it: the real binary, captures of every format
//! (with garbage in them), from a file and from standard input.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use mamori_protocol::{bridge, nonin};
use serde_json::Value;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mamori-agent"))
}

fn capture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/captures").join(name)
}

fn lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("each line is JSON")).collect()
}

fn decode_file(format: &str, path: &Path) -> (Vec<Value>, String) {
    let out = bin().args(["decode", "--format", format]).arg(path).output().unwrap();
    assert!(out.status.success(), "{format}: {out:?}");
    (lines(&out), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn decode_stdin(format: &str, bytes: &[u8]) -> (Vec<Value>, String) {
    let mut child = bin()
        .args(["decode", "--format", format])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{format}: {out:?}");
    (lines(&out), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn megatec_capture() {
    let (v, err) = decode_file("megatec", &capture("megatec.cap"));
    let types: Vec<_> = v.iter().map(|x| x["type"].as_str().unwrap().to_string()).collect();
    assert_eq!(types, ["ups", "ups_rating", "ups_identity", "ups", "ups", "ups_unknown_command"]);
    assert_eq!(v[0]["input_fault_voltage_v"], 140.0);
    assert_eq!(v[0]["ups_fault"], true);
    assert_eq!(v[4]["on_battery"], true);
    assert_eq!(v[4]["battery_low"], true);
    assert_eq!(v[4]["battery_charge_pct"], Value::Null);
    assert_eq!(v[2]["company"], "MEGATEC");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("offset 108: "), "{err}");
}

#[test]
fn voltronic_capture() {
    let (v, err) = decode_file("voltronic", &capture("voltronic.cap"));
    assert_eq!(v.len(), 6, "{v:?}");
    assert_eq!(v[1]["mode"], "line");
    assert_eq!(v[3]["runtime_s"], 255 * 60);
    assert_eq!(v[3]["battery_charge_pct"], 68.0);
    assert_eq!(v[4]["on_battery"], true);
    assert_eq!(v[5]["accepted"], false);
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn apc_capture() {
    let (v, err) = decode_file("apc", &capture("apc.cap"));
    assert_eq!(v[0]["type"], "ups_smart_mode");
    assert_eq!(v[1]["on_battery"], false);
    assert_eq!(v[2]["notification"], "line_fail");
    assert_eq!(v[3]["on_battery"], true);
    assert_eq!(v[5]["runtime_s"], 327 * 60);
    assert_eq!(v[7]["notification"], "line_restored");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn nut_capture() {
    let (v, err) = decode_file("nut", &capture("nut.cap"));
    assert_eq!(v.len(), 3);
    assert_eq!(v[0]["ups_name"], "ups");
    assert_eq!(v[0]["on_battery"], true);
    assert_eq!(v[0]["runtime_s"], 1830);
    assert_eq!(v[1]["type"], "nut_error");
    assert_eq!(v[1]["error"], "DATA-STALE");
    assert_eq!(v[2]["on_battery"], false);
    assert!(err.contains("malformed NUT line"), "{err}");
}

#[test]
fn oximeter_text_captures() {
    let (v, err) = decode_file("masimo", &capture("masimo.cap"));
    assert_eq!(v.len(), 2);
    assert_eq!(v[0]["spo2_pct"], 98);
    assert_eq!(v[0]["perfusion_index"], 3.6);
    assert_eq!(v[1]["spo2_pct"], Value::Null);
    assert_eq!(v[1]["alarm_silenced"], true);
    assert_eq!(v[1]["sensor_off"], true);
    assert_eq!(err.lines().count(), 1);

    let (v, _) = decode_file("nonin-ascii", &capture("nonin-ascii.cap"));
    assert_eq!(v.len(), 3);
    assert_eq!(v[1]["pulse_bpm"], Value::Null);

    let (v, err) = decode_file("nellcor", &capture("nellcor.cap"));
    assert_eq!(v.len(), 3);
    assert_eq!(v[1]["sensor_off"], true);
    assert_eq!(v[2]["alarm_silenced"], true);
    assert_eq!(v[2]["status_codes"], serde_json::json!(["SL", "AS"]));
    assert_eq!(err.lines().count(), 1);
}

#[test]
fn nonin_binary_formats_from_stdin() {
    let mut two = b"\x55\xaa".to_vec();
    two.extend(nonin::encode_packet(Some(95), Some(118), 0x02, false));
    two.extend(nonin::encode_packet(None, None, 0x40, false));
    let (v, err) = decode_stdin("nonin-2", &two);
    assert_eq!(v.len(), 2);
    assert_eq!((v[0]["spo2_pct"].clone(), v[0]["pulse_bpm"].clone()), (95.into(), 118.into()));
    assert_eq!((v[1]["spo2_pct"].clone(), v[1]["sensor_off"].clone()), (Value::Null, true.into()));
    assert!(err.starts_with("offset 0: "), "{err}");

    let (v, _) = decode_stdin("nonin-7", &nonin::encode_packet(Some(88), Some(150), 0, true));
    assert_eq!(v[0]["spo2_pct"], 88);

    let mut eight = nonin::Format8::encode(Some(91), Some(77), 0, 0x20).to_vec();
    eight.extend(nonin::Format8::encode(None, None, 0x40, 0));
    let (v, _) = decode_stdin("nonin-8", &eight);
    assert_eq!(v.len(), 2);
    assert_eq!(v[0]["smartpoint"], true);
    assert_eq!(v[1]["pulse_bpm"], Value::Null);
}

#[test]
fn bridge_frames_from_stdin() {
    let mut bytes = Vec::new();
    for seq in 1..=3 {
        let mut out = [0u8; bridge::MAX_ENCODED];
        let f = bridge::Frame {
            seq,
            mains_present: Some(seq != 2),
            ventilator: Some(bridge::ContactState::Normal),
            ..Default::default()
        };
        let n = bridge::encode(&f, &mut out).unwrap();
        bytes.extend(&out[..n]);
    }
    bytes[10] ^= 0xff; // corrupt the first frame
    let (v, err) = decode_stdin("bridge", &bytes);
    assert_eq!(v.iter().map(|x| x["seq"].as_u64().unwrap()).collect::<Vec<_>>(), [2, 3]);
    assert_eq!(v[0]["mains_present"], false);
    assert_eq!(v[0]["ventilator"], "normal");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn pure_garbage_is_reported_and_exit_is_zero() {
    let garbage: Vec<u8> = (0..5000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    for format in [
        "megatec",
        "voltronic",
        "apc",
        "nut",
        "masimo",
        "nonin-ascii",
        "nonin-2",
        "nonin-7",
        "nonin-8",
        "nellcor",
        "bridge",
    ] {
        // decode_stdin asserts the exit status is 0.
        let (_, err) = decode_stdin(format, &garbage);
        // Reported as the decoder says it does: one `offset N: reason` line per skipped stretch.
        assert!(err.lines().next().is_some(), "{format}: garbage not reported");
        for line in err.lines() {
            let offset = line.strip_prefix("offset ").and_then(|r| r.split_once(": "));
            assert!(
                offset.is_some_and(|(n, reason)| n.parse::<usize>().is_ok() && !reason.trim().is_empty()),
                "{format}: not an `offset N: reason` line: {line:?}"
            );
        }
    }
}

#[test]
fn unusable_arguments_and_unreadable_files_fail() {
    let out = bin().args(["decode", "--format", "megatec", "/nonexistent/capture"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/capture"));
    let out = bin().args(["decode", "--format", "pigeon"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = bin().args(["decode"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
